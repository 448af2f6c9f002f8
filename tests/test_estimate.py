"""The estimator (framework.estimate, scripts/estimate.py): its per-device peak memory against
XLA's memory analysis of the compiled sharded step on the 8 simulated CPU devices, across
remat policies and mesh layouts; its searches; its command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from framework.config import load_config
from framework.estimate import answer, as_data, card, estimate
from framework.estimate.fit import largest_micro_batch, with_overrides
from framework.train import build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
# a transformer whose state, activations and loss all weigh (f32: the CPU compiles bf16 dots
# through f32, so bf16 buffers there are not the GPU's)
MEDIUM = [
    "data.source=synthetic_lm",
    "data.vocab_size=2048",
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.d_ff=1024",
    "data.seq_len=256",
    "model.max_seq_len=256",
    "data.batch_size=16",
    "model.compute_dtype=float32",
]


def _config(*overrides: str) -> Config:
    return load_config(Config, ROOT / "configs/tiny/lm.yaml", [*MEDIUM, *overrides])


def _compiled_peak(cfg: Config) -> int:
    """XLA's peak bytes per device of the compiled train step: arguments + outputs - aliased
    (the donated state) + temporaries (on an H200 this equalled the measured peak exactly)."""
    run = build(cfg, read_data=False)
    shape = (run.cfg.data.batch_size, run.cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets")}
    m = run.train_step.lower(run.abstract_state, batch).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.remat=none", "mesh.data=8"),
        ("model.remat=full", "mesh.data=1", "mesh.fsdp=8"),
        ("model.remat=save_dots_no_batch", "mesh.data=2", "mesh.tensor=4"),
        ("model.remat=save_dots", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
        ("model.remat=full", "mesh.data=4", "mesh.sequence=2", "train.grad_accum=2"),
    ],
    ids=lambda o: " ".join(o),
)
def test_peak_memory_agrees_with_the_compiler_within_15_percent(overrides):
    cfg = _config(*overrides)
    predicted = estimate(cfg, jax.device_count(), None).memory.total
    compiled = _compiled_peak(cfg)
    assert abs(predicted / compiled - 1) <= 0.15, (predicted, compiled)


def test_terms_follow_the_layout():
    """FSDP divides the state, tensor parallelism the activations, remat trades activations
    for workspace: each term moves the way its cause says."""
    n = jax.device_count()
    base = estimate(_config("model.remat=none", "mesh.data=8"), n, None).memory
    fsdp = estimate(_config("model.remat=none", "mesh.data=1", "mesh.fsdp=8"), n, None).memory
    # every matrix is split 8 ways (norm scales and biases are not)
    assert base.params / 8 <= fsdp.params < base.params / 7
    assert base.optimizer / 8 <= fsdp.optimizer < base.optimizer / 7
    assert fsdp.collectives > 0 == base.collectives
    full = estimate(_config("model.remat=full", "mesh.data=8"), n, None).memory
    assert full.activations < base.activations / 3
    assert full.workspace > base.workspace
    accum = estimate(_config("model.remat=none", "mesh.data=8", "train.grad_accum=2"), n, None)
    assert accum.memory.grad_accumulator == base.gradients
    assert accum.memory.activations < base.activations


def test_gpu_estimate_time_and_searches():
    """On 8 H100s: time terms add up, MFU follows from them, and the searches' answers hold."""
    h100 = card("h100")
    cfg = load_config(Config, ROOT / "configs/llama_1b.yaml", ["data.vocab_size=32000"])
    a = answer(cfg, 8, h100)
    e = a.estimate
    s = e.seconds
    assert s["step"] == pytest.approx(s["compute"] + s["memory"] + s["exposed_collectives"])
    assert e.mfu == pytest.approx(e.model_flops / (s["step"] * h100.bf16_flops))
    assert e.hardware_flops > e.model_flops  # save_dots_no_batch recomputes attention
    assert e.collective_bytes["data"] > 0 and e.collective_bytes["tensor"] == 0
    # the largest micro-batch fits and one more step of 8 rows (one per device) does not
    rows = a.max_micro_batch
    fit = with_overrides(cfg, {"data": {"batch_size": rows}, "train": {"grad_accum": 1}})
    over = with_overrides(cfg, {"data": {"batch_size": rows + 8}, "train": {"grad_accum": 1}})
    assert estimate(fit, 8, h100, e.usable).fits and not estimate(over, 8, h100, e.usable).fits
    assert largest_micro_batch(cfg, 8, h100, e.usable) == rows
    if not e.fits:  # 256 rows x 2048 tokens over 8 devices: each suggested change fits
        assert a.fixes
        steps = [f.estimate.seconds["step"] for f in a.fixes]
        assert steps == sorted(steps) and all(f.estimate.fits for f in a.fixes)
    data = as_data(a)
    json.dumps(data)  # serializable
    assert data["memory"]["total"] == e.memory.total and data["fits"] == e.fits


def test_calibration_matches_the_recorded_gpu_run():
    """The step recorded by scripts/gpu_check.sh (docs/performance.json: llama_1b, one GPU):
    the estimate's peak memory and step time within 15% of the measurement."""
    record = json.loads((ROOT / "docs/performance.json").read_text())
    step = record["train_steps"].get("llama_1b", {})
    if "measured_peak_bytes" not in step:
        pytest.fail("docs/performance.json holds no llama_1b step with a measured peak")
    gpu = next(k for k in ("h100", "h200") if k in record["card"].lower())
    cfg = load_config(Config, ROOT / "configs/llama_1b.yaml", step["overrides"])
    e = estimate(cfg, 1, card(gpu))
    assert abs(e.memory.total / step["measured_peak_bytes"] - 1) < 0.15
    assert abs(e.seconds["step"] / step["step_s"] - 1) < 0.15


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/estimate.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_text_and_json():
    out = _cli("configs/llama3_8b.yaml", "--gpu", "h200", "--devices", "8")
    assert out.returncode == 0, out.stderr
    for line in ("parameters", "activations kept for backward", "predicted step", "MFU"):
        assert line in out.stdout
    out = _cli("configs/llama3_8b.yaml", "--gpu", "h100", "--devices", "8", "--json")
    data = json.loads(out.stdout)
    assert data["mesh"]["fsdp"] == 8 and data["card"]["name"].startswith("NVIDIA H100")
    assert data["memory"]["total"] == sum(
        v for k, v in data["memory"].items() if k not in ("total", "largest_activation")
    )
    assert math.isfinite(data["seconds"]["step"]) and 0 < data["mfu"] < 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--gpu", "tpu9"), "--gpu 'tpu9' is not a known card"),
        (("--devices", "6"), "mesh"),
        (("model.remat=sometimes",), "model.remat"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    out = _cli("configs/llama_1b.yaml", *args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
