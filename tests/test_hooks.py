"""Hooks on their own (stop, profile window), what the default hooks log, the builder's
model-owned data checks, and the step benchmark built through the same builder."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from framework import models
from framework.config import load_config
from framework.errors import ConfigError
from framework.train import build, train
from framework.train.config import Config
from framework.train.context import Context
from framework.train.hooks import Profile, StopOnSignal

ROOT = Path(__file__).resolve().parents[1]


def _ctx(step: int, done: bool = False) -> Context:
    """A context without a run: enough for hooks that never touch it."""
    return Context(run=None, state={}, step=step, done=done)


def test_stop_at_ends_the_run_at_that_step_but_not_after_the_last():
    hook = StopOnSignal(stop_at=3)
    ctx = _ctx(2)
    hook(ctx)
    assert ctx.stop_reason is None and not ctx.final
    ctx.step = 3
    hook(ctx)
    assert ctx.stop_reason == "train.stop_at=3" and ctx.final
    last = _ctx(3, done=True)  # reaching train.steps is not a stop
    hook(last)
    assert last.stop_reason is None and last.final


def test_profile_traces_exactly_its_window(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", step[0])))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop", step[0])))
    step = [0]
    hook = Profile("unused", first=3, steps=2)
    ctx = _ctx(0)
    hook.start(ctx)
    for s in range(1, 8):  # the loop calls the hook after each step s
        step[0] = s
        ctx.step = s
        hook(ctx)
    hook.close(ctx)
    # started after step 2 (so step 3 is traced), stopped after step 4
    assert calls == [("start", 2), ("stop", 4)]


def test_default_hooks_log_throughput_and_print_eval(tmp_path, caplog):
    cfg = load_config(
        Config,
        ROOT / "configs/tiny/lm.yaml",
        [
            f"run.dir={tmp_path}",
            "train.steps=10",
            "train.eval_every=10",
            "checkpoint.enabled=false",
            "model.scan_layers=false",  # no loop in the step: XLA's FLOP count is complete
        ],
    )
    with caplog.at_level(logging.INFO, logger="framework"):
        summary = train(build(cfg))
    assert f"eval at step 10: loss {summary['eval']['loss']:.4f}" in caplog.text
    lines = (tmp_path / "tiny_lm/metrics.jsonl").read_text().splitlines()
    last_train = [json.loads(x) for x in lines if '"split": "train"' in x][-1]
    assert 0 < last_train["mfu"] < 1 and 0 < last_train["hfu"] < 1
    assert math.isclose(last_train["step"], 10)


@pytest.mark.parametrize(
    "config, overrides, needle",
    [
        ("lm", ["model.vocab_size=32"], "model.vocab_size (32) is smaller than the data's"),
        ("lm", ["data.seq_len=64"], "data.seq_len (64) is longer than model.max_seq_len"),
        ("mlp", ["model.num_classes=3"], "model.num_classes (3) is smaller than the data's 4"),
        ("mlp", ["model.input_dim=9"], "model.input_dim (9) does not match"),
        ("mlp", ["data.source=synthetic_lm"], "model.name='mlp' needs classification data"),
        ("lm", ["data.source=synthetic_classification"], "needs token data"),
    ],
)
def test_model_checks_its_config_against_the_data(config, overrides, needle, tmp_path):
    cfg = load_config(
        Config, ROOT / f"configs/tiny/{config}.yaml", [f"run.dir={tmp_path}", *overrides]
    )
    with pytest.raises(ConfigError) as err:
        build(cfg, read_data=False)
    assert needle in err.value.message


def test_sizes_left_unset_come_from_the_data(tmp_path):
    lm = build(load_config(Config, ROOT / "configs/tiny/lm.yaml", [f"run.dir={tmp_path}"]))
    assert lm.cfg.model.vocab_size == 64
    mlp = build(load_config(Config, ROOT / "configs/tiny/mlp.yaml", [f"run.dir={tmp_path}"]))
    assert (mlp.cfg.model.num_classes, mlp.cfg.model.input_dim) == (4, 8)
    cnn = models.get("cnn")
    with pytest.raises(ConfigError, match="model.num_classes is not set"):
        cnn.spec(cnn.config(name="cnn"))


def test_causal_attention_counts_half_of_dense():
    model = models.get("transformer")
    cfg = model.config(name="transformer", vocab_size=64, d_model=64, n_layers=3, n_heads=4)
    grow = model.flops_per_token(cfg, 128) - model.flops_per_token(cfg, 64)
    dense = 12 * cfg.n_layers * 64 * cfg.n_heads * (cfg.d_model // cfg.n_heads)
    assert grow == dense / 2


def test_bench_step_measures_the_built_program(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/bench_step.py"),
            str(ROOT / "configs/tiny/mlp.yaml"),
            f"run.dir={tmp_path}",
            "mesh.data=2",
            "mesh.tensor=4",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    main = json.loads((tmp_path / "bench.json").read_text())["main"]
    assert main["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1}
    assert main["state_devices"] == 8
    assert (
        main["state_bytes_per_device"] < main["state_bytes_total"]
    )  # tensor parallelism shards it
    assert main["items_per_s"] > 0 and np.isfinite(main["step_s"])
