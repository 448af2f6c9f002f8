"""Out-of-memory reports (framework.train.oom): XLA's allocation failure while compiling the
step or at a later step exits 3 through scripts/train.py with a report that names the layers,
without XLA's wall of text and without touching the checkpoints already saved."""

import importlib.util
import logging
from pathlib import Path

import jax
import pytest

import framework.train
from framework.config import load_config
from framework.train import build, oom
from framework.train import loop as train_loop
from framework.train.checkpoint import Checkpointer, checkpoint_dir
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/lm.yaml")
# what XLA's GPU allocator raises: a first line, then a dump of every allocation
XLA_WALL = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\n"
    "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n"
    "             parameter allocation:    1.20GiB\n"
    "              constant allocation:         0B\n"
    + "".join(f"  allocation {i}: size 16.00GiB, maybe-live-out:\n" for i in range(200))
)
LAYERS = ("transformer/blocks/attn", "transformer/blocks/mlp")


def _script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_path_strips_wrappers_and_marks_backward():
    path = oom.layer_path
    assert (
        path(
            "jit(wrapped)/transpose(jvp(transformer))/blocks/while/body/closed_call/mlp/up/"
            "...i,io->...o/dot_general"
        )
        == "transformer/blocks/mlp (backward)"
    )
    assert path("jit(step)/jvp(transformer)/blocks/3/attn/jit(_where)/select_n") == (
        "transformer/blocks/attn"
    )
    assert path("jit(wrapped)/jvp(transformer)/blocks/while/body/eval_jaxpr/mlp/up") == (
        "transformer/blocks/mlp"  # jax 0.12's scan body
    )
    assert path("jit(wrapped)/add") == "(outside any layer scope)"
    assert path("") == "(no op name)"
    assert oom.is_oom(jax.errors.JaxRuntimeError(XLA_WALL))
    assert not oom.is_oom(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: bad shapes"))
    assert not oom.is_oom(ValueError("RESOURCE_EXHAUSTED: disk full"))  # not XLA's


@pytest.fixture(scope="module")
def compiled_step(tmp_path_factory):
    cfg = load_config(Config, TINY, [f"run.dir={tmp_path_factory.mktemp('runs')}"])
    run = build(cfg)
    batch = run.put(next(run.train_data))
    return run.train_step.lower(run.init_state(), batch).compile()


def test_buffers_grouped_by_layer_on_a_real_step(compiled_step):
    groups = oom.buffers_by_layer(compiled_step.as_text(), min_bytes=0)
    paths = {g.path for g in groups}
    for layer in LAYERS:
        assert layer in paths and f"{layer} (backward)" in paths, paths
    assert [g.bytes for g in groups] == sorted((g.bytes for g in groups), reverse=True)
    # every buffer counted once, none shared: at least XLA's temporaries after its reuse, and
    # within a small multiple of everything the step holds
    m = compiled_step.memory_analysis()
    total = sum(g.bytes for g in groups)
    held = oom.step_bytes(compiled_step)
    assert held == (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    assert m.temp_size_in_bytes <= total <= 20 * held, (total, m)
    big = oom.buffers_by_layer(compiled_step.as_text(), min_bytes=64 << 10)
    assert 0 < sum(g.count for g in big) < sum(g.count for g in groups)


def _run_script(capsys, tmp_path, *overrides):
    logger = logging.getLogger("framework")
    saved = list(logger.handlers), logger.propagate, logger.level
    try:  # main adds a handler on this test's captured stderr and stops propagation
        status = _script().main([TINY, f"run.dir={tmp_path}", *overrides])
    finally:  # later tests in this worker capture framework.* records through the root
        logger.handlers, logger.propagate = saved[:2]
        logger.setLevel(saved[2])  # setLevel (not .level =) clears the enabled-for cache
    return status, capsys.readouterr().err


def _checked_report(err: str, where: str) -> list[str]:
    lines = err.strip().splitlines()
    lines = lines[next(i for i, x in enumerate(lines) if x.startswith("out of memory on")) :]
    assert lines[0].startswith("out of memory on cpu " + where), err
    assert lines[-1].startswith("out of memory: the train step does not fit"), err
    assert "BufferAssignment" not in err and "allocation 17" not in err, err
    assert "Traceback" not in err and len(lines) < 20, err
    assert any(line.startswith("suggestion: ") for line in lines), err
    rows = [line for line in lines if line.startswith("  ") and "%" in line]
    for layer in LAYERS:  # each row: size, share, layer path
        assert any(layer in row and ("KiB" in row or "MiB" in row) for row in rows), err
    return lines


def test_compile_oom_reports_layers_and_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(oom, "MIN_BYTES", 16 << 10)  # the tiny model's buffers are small

    class Lowered:
        def __init__(self, real):
            self.real = real

        def compile(self):
            raise jax.errors.JaxRuntimeError(XLA_WALL)

        def as_text(self, *args, **kwargs):
            return self.real.as_text(*args, **kwargs)

    class FailingJit:
        def __init__(self, real):
            self.real = real

        def lower(self, *args):
            return Lowered(self.real.lower(*args))

    real_build = framework.train.build

    def failing_build(cfg):
        run = real_build(cfg)
        return run.__class__(**{**run.__dict__, "train_step": FailingJit(run.train_step)})

    monkeypatch.setattr(framework.train, "build", failing_build)
    status, err = _run_script(capsys, tmp_path)
    assert status == 3, err
    lines = _checked_report(err, "while compiling the train step")
    assert "the step's size is unknown" in lines[0], err
    assert "before optimization and sharding" in err, err


def test_step_oom_keeps_checkpoints_and_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(oom, "MIN_BYTES", 16 << 10)
    fail_at = 5

    class FailingStep:  # the compiled step, failing to allocate at its fifth call
        def __init__(self, compiled):
            self.compiled, self.calls = compiled, 0

        def __call__(self, *args):
            self.calls += 1
            if self.calls == fail_at:
                raise jax.errors.JaxRuntimeError(XLA_WALL)
            return self.compiled(*args)

        def __getattr__(self, name):  # memory_analysis, as_text
            return getattr(self.compiled, name)

    real_compile = train_loop.compile_step

    def compile_step(*args):
        compiled, flops = real_compile(*args)
        return FailingStep(compiled), flops

    monkeypatch.setattr(train_loop, "compile_step", compile_step)
    overrides = ["train.steps=8", "checkpoint.every=2", "train.eval_every=100"]
    status, err = _run_script(capsys, tmp_path, *overrides)
    assert status == 3, err
    lines = _checked_report(err, f"at step {fail_at}")
    assert "the step needs ~" in lines[0] and "per device" in lines[0], err
    assert "compiled step, per device" in err, err
    cfg = load_config(Config, TINY, [f"run.dir={tmp_path}", *overrides])
    checkpoints = Checkpointer(checkpoint_dir(tmp_path / "tiny_lm"), cfg.checkpoint)
    assert checkpoints.steps() == [2, 4]
    for step in (2, 4):  # restores with matching checksums
        assert checkpoints.read_numpy("params", step)[0] == step
    checkpoints.close()


def test_train_script_adds_the_estimators_advice_on_a_known_card():
    """On a card framework.estimate knows, the printed report states the estimated need of a
    step that did not compile and the cheapest change that fits the device's limit."""
    from framework.errors import OutOfMemoryError

    cfg = load_config(Config, ROOT / "configs/llama_1b.yaml", ["data.vocab_size=32000"])
    details = oom.Report(
        "NVIDIA H100 80GB HBM3", "while compiling the train step", None, 60 * 2**30,
        "RESOURCE_EXHAUSTED: Out of memory", ("no instruction result (test)",), cfg, 8,
    )  # fmt: skip
    plain = OutOfMemoryError(details).report
    assert "size is unknown" in plain and f"suggestion: {oom.GENERIC_SUGGESTION}" in plain
    text = _script()._report_text(OutOfMemoryError(details))
    headline, *_, suggestion = text.splitlines()
    assert "(estimated: it did not compile), the device has 60.0 GiB" in headline, headline
    assert suggestion.startswith("suggestion: set ") and "GiB per device" in suggestion
