"""Checkpoints: exact resume, SIGTERM, kill -9 loop, damaged checkpoints, resume policy,
non-finite policy, restore onto another mesh / unrolled layers, safetensors round trip.

Runs that must be separate processes use scripts/train.py with a shared persistent compilation
cache, so only the first start compiles."""

import importlib.util
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax_setup import cpu_env
from mp_launch import distributed_overrides, free_port, run_all

from framework.config import load_config
from framework.errors import CheckpointError, ConfigError, NonFiniteError
from framework.train import Run, build, train
from framework.train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    flatten_params,
    load_safetensors,
    step_dirs,
)
from framework.train.config import Config
from framework.train.hooks import evaluate
from framework.train.resume import plan_resume, restore_or_init

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
STEPS = 40
# Log every step to compare losses. Saves cost most of a run's time (orbax moves each of 8
# devices' slices), so every 8 steps here (and at train.stop_at, STEPS/2); the kill -9 loop
# saves every 2 so that its kills often land during an asynchronous save.
RUN = (
    "checkpoint.every=8",
    "checkpoint.keep=2",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.sample_tokens=0",
    f"train.steps={STEPS}",
)


@pytest.fixture(scope="module")
def env():
    """Subprocess environment: 8 CPU devices and the session's compilation cache (conftest)."""
    return cpu_env(PYTHONUNBUFFERED="1")


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "scripts/train.py"),
        str(TINY),
        f"run.dir={run_dir}",
        *RUN,
        *overrides,
    ]


def _train(
    env: dict, run_dir: Path, *overrides: str, timeout: float = 90
) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(run_dir, *overrides),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from metrics.jsonl (a replayed step keeps its last value)."""
    out = {}
    for line in (run_dir / "tiny_lm/metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def _read(run_dir: Path, item: str, step: int | None = None):
    reader = Checkpointer(run_dir / "tiny_lm/checkpoints", CheckpointConfig(), read_only=True)
    try:
        return reader.read_numpy(item, step)
    finally:
        reader.close()


def _assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("straight")
    done = _train(env, run_dir, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def halves(env, tmp_path_factory) -> Path:
    """The same run stopped (with a checkpoint) at STEPS/2, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("halves")
    first = _train(env, run_dir, f"train.stop_at={STEPS // 2}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped by train.stop_at" in first.stdout
    assert step_dirs(run_dir / "tiny_lm/checkpoints")[-1] == STEPS // 2
    shutil.copytree(run_dir, run_dir.parent / (run_dir.name + "_at_half"))
    second = _train(env, run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"step {STEPS // 2}" in second.stderr  # "resumed from ... step 20"
    return run_dir


def test_exact_resume_is_bitwise(straight, halves):
    for item in ("params", "opt_state", "data", "meta"):
        step_a, a = _read(straight, item)
        step_b, b = _read(halves, item)
        assert step_a == step_b == STEPS
        if item == "meta":  # the array checksums agree too; the configs differ in run.dir
            assert a["checksums"].pop("config") != b["checksums"].pop("config")
        _assert_same(a, b)
    losses_a, losses_b = _losses(straight), _losses(halves)
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, STEPS + 1))
    assert losses_a == losses_b  # same data order and dropout keys, step by step


def test_sigterm_finishes_step_saves_and_exits_zero(env, tmp_path):
    proc = subprocess.Popen(
        _cmd(tmp_path, "train.steps=100000", "checkpoint.every=1000"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "tiny_lm/metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    saved = step_dirs(tmp_path / "tiny_lm/checkpoints")
    assert saved and saved[-1] == max(_losses(tmp_path)) > 0


def test_kill9_loop_resumes_to_the_same_result(env, straight, tmp_path):
    rng = random.Random(0)
    metrics = tmp_path / "tiny_lm/metrics.jsonl"
    kills = 0
    start = time.monotonic()
    while kills < 5:
        seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = subprocess.Popen(
            _cmd(tmp_path, "checkpoint.every=2"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120  # hang guards only: a loaded CI box starts jax slowly
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > seen):
            assert time.monotonic() < deadline, "no progress after a restart"
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))  # often lands inside an asynchronous save
        if proc.poll() is not None:
            break  # finished before the kill: the loop below checks there were enough kills
        proc.kill()
        proc.wait(timeout=10)
        kills += 1
        assert time.monotonic() - start < 600
    assert kills >= 5, f"the run finished after only {kills} kills"
    done = _train(env, tmp_path, "checkpoint.every=2", timeout=180)  # a hang guard only
    assert done.returncode == 0, done.stderr[-3000:]
    losses, ref = _losses(tmp_path), _losses(straight)
    assert max(losses) == STEPS and losses[STEPS] == ref[STEPS]
    _assert_same(_read(tmp_path, "params")[1], _read(straight, "params")[1])
    # every restart trimmed what it would write again (and any torn line): one line per step
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))


def _build(run_dir: Path, *overrides: str) -> Run:
    cfg = load_config(Config, TINY, [f"run.dir={run_dir}", *RUN, *overrides])
    return build(cfg)


def _start_state(run: Run):
    """The state `train` would start from (checkpoint.resume applied)."""
    return restore_or_init(run, plan_resume(run)).state


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "copy")
    return tmp_path / "copy"


def _damage(step_dir: Path) -> None:
    """Truncate every array file of a checkpoint to half its size."""
    for f in step_dir.rglob("*"):
        if f.is_file() and "ocdbt" in str(f) or f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_damaged_newest_checkpoint_falls_back_with_a_warning(straight, tmp_path, caplog):
    run_dir = _copy(straight, tmp_path)
    ckpts = run_dir / "tiny_lm/checkpoints"
    newest, before = step_dirs(ckpts)[-1], step_dirs(ckpts)[-2]
    _damage(ckpts / str(newest))
    run = _build(run_dir)
    start = restore_or_init(run, plan_resume(run))
    state = start.state
    assert int(state["step"]) == before
    assert f"{ckpts / str(newest)} is damaged" in caplog.text
    assert f"moved to {ckpts / 'damaged' / (str(newest) + '-unreadable')}" in caplog.text
    _assert_same(jax.device_get(state["params"]), _read(straight, "params", before)[1])
    # trains the lost steps again and rewrites the damaged checkpoint
    train(run, start=start)
    step, params = _read(run_dir, "params")
    assert step == newest
    _assert_same(params, _read(straight, "params")[1])


def test_only_damaged_checkpoints_is_an_error(straight, tmp_path):
    run_dir = _copy(straight, tmp_path)
    ckpts = run_dir / "tiny_lm/checkpoints"
    for step in step_dirs(ckpts):
        _damage(ckpts / str(step))
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        _start_state(_build(run_dir))


def test_resume_never_refuses_and_fresh_starts_over(straight, tmp_path):
    run_dir = _copy(straight, tmp_path)
    with pytest.raises(ConfigError, match=f"checkpoint.resume=never.*{run_dir}"):
        plan_resume(_build(run_dir, "checkpoint.resume=never"))
    run = _build(run_dir, "checkpoint.resume=fresh")
    assert plan_resume(run) is None
    assert not step_dirs(run_dir / "tiny_lm/checkpoints")
    assert int(_start_state(run)["step"]) == 0
    with pytest.raises(ConfigError, match="neither auto/never/fresh"):
        plan_resume(_build(tmp_path / "other", "checkpoint.resume=atuo"))


def test_params_only_resume_from_another_run(straight, tmp_path):
    run = _build(
        tmp_path, f"checkpoint.resume={straight / 'tiny_lm'}", "checkpoint.resume_params_only=true"
    )
    state = _start_state(run)
    assert int(state["step"]) == 0 and run.train_data.get_state()["step"] == 0
    _assert_same(jax.device_get(state["params"]), _read(straight, "params")[1])
    assert not any(np.any(x) for x in jax.tree.leaves(jax.device_get(state["opt_state"])))


@pytest.mark.parametrize(
    "layout",
    [("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), ("model.scan_layers=false",)],
    ids=["fsdp_tensor", "unrolled"],
)
def test_restore_onto_another_layout_gives_the_same_loss(straight, layout, tmp_path):
    losses = []
    for overrides in ((), layout):
        run = _build(_copy(straight, tmp_path / str(len(losses))), *overrides)
        state = _start_state(run)
        assert int(state["step"]) == STEPS
        losses.append(evaluate(run, state, 2)["loss"])
        if overrides and "mesh.fsdp=2" in overrides:
            assert not state["params"]["embed"]["embedding"].sharding.is_fully_replicated
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.fixture(scope="module")
def at_half(halves) -> Path:
    """The halves run as it was when stopped at STEPS/2 (copied before resuming)."""
    return halves.parent / (halves.name + "_at_half")


def test_nonfinite_stop_names_the_leaf_and_keeps_the_last_good_checkpoint(at_half, tmp_path):
    run_dir = _copy(at_half, tmp_path)
    run = _build(run_dir, "optim.learning_rate=1e39")  # inf in float32
    with pytest.raises(NonFiniteError) as info:
        train(run)
    msg = str(info.value)
    assert f"at step {STEPS // 2 + 1}" in msg and "first non-finite parameter" in msg
    assert f"last good checkpoint: step {STEPS // 2}" in msg
    assert step_dirs(run_dir / "tiny_lm/checkpoints")[-1] == STEPS // 2


def test_nonfinite_skip_drops_updates_and_counts_them(at_half, tmp_path):
    run_dir = _copy(at_half, tmp_path)
    run = _build(
        run_dir,
        "optim.learning_rate=1e39",
        "train.nonfinite=skip",
        f"train.stop_at={STEPS // 2 + 4}",
    )
    summary = train(run)
    assert summary["step"] == STEPS // 2 + 4 and summary["skipped_steps"] == 4
    last = json.loads((run_dir / "tiny_lm/metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 4
    step, params = _read(run_dir, "params")
    assert step == STEPS // 2 + 4
    _assert_same(params, _read(at_half, "params", STEPS // 2)[1])  # no update was applied


def test_skipped_count_in_checkpoints_between_log_lines(at_half, tmp_path):
    """A checkpoint written between log lines still counts the skips since the last line."""
    run_dir = _copy(at_half, tmp_path)
    run = _build(
        run_dir,
        "optim.learning_rate=1e39",
        "train.nonfinite=skip",
        "train.log_every=5",
        "checkpoint.every=2",
        f"train.stop_at={STEPS // 2 + 4}",
    )
    train(run)
    step, meta = _read(run_dir, "meta")
    assert step == STEPS // 2 + 4 and meta["skipped_steps"] == 4
    step, meta = _read(run_dir, "meta", STEPS // 2 + 2)
    assert meta["skipped_steps"] == 2


def _script(name: str):
    """scripts/NAME.py as a module (its main(argv) returns the exit status)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_safetensors_export_round_trip(straight, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    status = _script("export_safetensors").main([str(straight / "tiny_lm"), "--out", str(out)])
    assert status == 0, capsys.readouterr().err[-2000:]
    params = load_safetensors(out)
    _assert_same(params, _read(straight, "params")[1])
    assert "blocks/attn/q/kernel" in flatten_params(params)
    assert out.read_bytes()[8:9] == b"{"  # a JSON header, no pickle


def test_restore_with_two_processes_continues_the_run(env, straight, at_half, tmp_path):
    """A checkpoint written by 1 process x 8 devices resumes in 2 processes x 4 devices (gloo):
    the first resumed step's loss equals the uninterrupted run's, and the run finishes."""
    run_dir = _copy(at_half, tmp_path)
    port = free_port()
    env4 = cpu_env(4, PYTHONUNBUFFERED="1")
    run_all(
        [
            # one save, the last: saving in 2 processes is slow, and once shows it works
            _cmd(
                run_dir,
                "mesh.data=2",
                "mesh.fsdp=4",
                "checkpoint.every=1000",
                *distributed_overrides(port, i),
            )
            for i in range(2)
        ],
        env=env4,
        timeout=300,  # a hang guard: 150 s (run_all's default) timed out on a loaded 2-core box
    )
    assert step_dirs(run_dir / "tiny_lm/checkpoints")[-1] == STEPS
    resumed, straight_losses = _losses(run_dir), _losses(straight)
    first = STEPS // 2 + 1
    np.testing.assert_allclose(resumed[first], straight_losses[first], rtol=1e-5)
    assert max(resumed) == STEPS
