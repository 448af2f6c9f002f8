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
from framework.estimate import (
    answer,
    as_data,
    card,
    estimate,
    for_device_kind,
    oom_advice,
)
from framework.estimate.fit import with_overrides
from framework.train import build
from framework.train.config import Config
from framework.train.oom import step_bytes

ROOT = Path(__file__).resolve().parents[1]
# a transformer whose state, activations and loss all weigh (f32: with bf16 compute the CPU
# compile keeps more than a GPU does; docs/estimate.md)
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
    return step_bytes(run.train_step.lower(run.abstract_state, batch).compile())


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


LLAMA = ROOT / "configs/llama_1b.yaml"


def test_gpu_estimate_searches_and_fixes():
    """llama_1b's 256 x 2048 tokens on 8 H100s do not fit; every suggested change, applied
    as the key=value overrides it prints, fits; the largest micro-batch fits and 8 more rows
    (one per device) do not."""
    h100 = card("h100")
    cfg = load_config(Config, LLAMA, ["data.vocab_size=32000"])
    a = answer(cfg, 8, h100)
    e = a.estimate
    assert not e.fits and a.fixes
    steps = [f.estimate.seconds["step"] for f in a.fixes]
    assert steps == sorted(steps)
    for fix in a.fixes:
        fixed = load_config(Config, LLAMA, ["data.vocab_size=32000", *fix.overrides])
        assert estimate(fixed, 8, h100, e.usable).fits, fix.overrides
    rows = a.max_micro_batch
    fit = with_overrides(cfg, {"data": {"batch_size": rows}})
    over = with_overrides(cfg, {"data": {"batch_size": rows + 8}})
    assert estimate(fit, 8, h100, e.usable).fits and not estimate(over, 8, h100, e.usable).fits
    assert e.hardware_flops > e.model_flops  # save_dots_no_batch recomputes attention
    assert e.collective_bytes["data"] > 0 and e.collective_bytes["tensor"] == 0
    assert "(for one row)" in e.memory.largest_activation
    assert "convert" not in e.memory.largest_activation  # an activation, not a weight copy
    data = as_data(a)
    json.dumps(data)  # serializable
    assert data["memory"]["total"] == e.memory.total and data["fits"] == e.fits


def test_same_step_on_a_faster_card_and_across_nodes():
    """An H200 holds the same bytes, has more of them and a faster HBM; with the data axis
    across two nodes its collectives take the network (not NVLink) and take longer."""
    cfg = load_config(Config, LLAMA, ["data.vocab_size=32000"])
    h100, h200 = estimate(cfg, 8, card("h100")), estimate(cfg, 8, card("h200"))
    assert h100.memory == h200.memory
    assert h200.seconds["memory"] < h100.seconds["memory"]
    two = load_config(Config, LLAMA, ["data.vocab_size=32000", "mesh.across_nodes.data=2"])
    far = estimate(two, 8, card("h100"))  # 2 nodes x 4 GPUs
    assert far.crossing == {"data"} and not h100.crossing
    assert far.collective_bytes == h100.collective_bytes
    assert far.seconds["collectives"] > 5 * h100.seconds["collectives"]
    for fix in answer(two, 8, card("h100")).fixes:  # printed per-node sizes load and fit
        fixed = load_config(
            Config, LLAMA, ["data.vocab_size=32000", "mesh.across_nodes.data=2", *fix.overrides]
        )
        assert estimate(fixed, 8, card("h100"), far.usable).fits, fix.overrides


def test_lora_trains_only_the_adapters():
    """LoRA (its frozen base traced as an input, not a residual): gradients and optimizer
    state shrink to the adapters', the activations stay."""
    base = load_config(Config, LLAMA, ["data.vocab_size=32000"])
    lora = load_config(
        Config,
        LLAMA,
        ["data.vocab_size=32000", "finetune.lora.rank=8", "checkpoint.resume=/nonexistent"],
    )
    full, adapted = estimate(base, 8, card("h100")).memory, estimate(lora, 8, card("h100")).memory
    assert adapted.gradients < full.gradients / 50 and adapted.optimizer < full.optimizer / 50
    assert adapted.params > full.params
    assert 0.8 < adapted.activations / full.activations < 1.5


def test_out_of_memory_advice():
    """What an out-of-memory report adds (scripts/train.py): on an H100, the predicted need and
    the cheapest change that fits the device's limit; nothing off the estimator's cards."""
    cfg = load_config(Config, LLAMA, ["data.vocab_size=32000"])
    limit = 60 * 2**30
    need, line = oom_advice(cfg, 8, "NVIDIA H100 80GB HBM3", limit)
    assert need == estimate(cfg, 8, card("h100"), limit).memory.total > limit
    assert line.startswith("set ") and "GiB per device" in line
    for other in ("cpu", "NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-40GB"):
        assert oom_advice(cfg, 8, other, limit) == (None, None), other


def test_calibration_matches_the_recorded_gpu_run():
    """The step recorded by scripts/gpu_check.sh (docs/performance.json: llama_1b, one GPU):
    the estimate's peak memory and step time within 15% of the measurement."""
    record = json.loads((ROOT / "docs/performance.json").read_text())
    step = record["train_steps"].get("llama_1b", {})
    if "measured_peak_bytes" not in step:
        pytest.fail("docs/performance.json holds no llama_1b step with a measured peak")
    gpu = for_device_kind(record["card"])
    if gpu is None:
        pytest.skip(f"the GPU check ran on {record['card']!r}, a card the estimator lacks")
    cfg = load_config(Config, LLAMA, step["overrides"])
    e = estimate(cfg, 1, gpu)
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
        (("--devices", "0"), "--devices"),
        (("model.remat=sometimes",), "model.remat"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    out = _cli("configs/llama_1b.yaml", *args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
