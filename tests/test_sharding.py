"""Mesh layouts from config: every layout trains exactly like one device, FSDP really shards
params and optimizer state, and impossible layouts are one-line config errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax_setup import cpu_env
from mp_launch import distributed_overrides, free_port, run_all

from framework.config import ConfigError, load_config
from framework.parallel.sharding import bytes_per_device
from framework.train import Run, build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
# Dimensions divisible by 8 so every axis can take all 8 devices.
DIMS = (
    "model.n_heads=8",
    "model.d_model=64",
    "model.d_ff=128",
    "model.vocab_size=64",
    "train.steps=3",
)
# Parity runs use SGD with momentum: its update is linear in the gradient, so reduction-order
# rounding stays at 1e-7 relative. Adam divides by sqrt(v) and turns the rounding of a
# near-zero gradient (the key bias's is exactly zero in exact arithmetic) into a full-size step.
SGD = ("optim.name=sgd", "optim.learning_rate=0.5", "optim.warmup_steps=0")
ONE = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.sequence=1")
LAYOUTS = {
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "tensor8": ("mesh.data=1", "mesh.tensor=8"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    "data2_sequence4": ("mesh.data=2", "mesh.sequence=4"),
}


def _build(tmp_path, *overrides, devices=None) -> Run:
    cfg = load_config(Config, TINY, [f"run.dir={tmp_path}", *DIMS, *overrides])
    return build(cfg, devices=devices)


def _train(run: Run, steps: int = 3):
    state = run.init_state()
    losses = []
    for _ in range(steps):
        state, metrics = run.train_step(state, run.put(next(run.train_data)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = _build(tmp_path_factory.mktemp("one"), *SGD, *ONE, devices=jax.devices()[:1])
    return run.init_state()["params"], *_train(run)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(layout, reference, tmp_path):
    run = _build(tmp_path, *SGD, *LAYOUTS[layout])
    assert run.mesh.size == 8
    losses, params = _train(run)
    init_params, ref_losses, ref_params = reference
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), init_params, ref_params))
    assert np.median(moved) > 1e-3  # training really moved the params (the key bias cannot)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
    )


def test_fsdp_shards_params_and_optimizer_state(tmp_path):
    # SGD's momentum is optimizer state the size of the params; with SGD this is the program
    # test_layout_matches_one_device[fsdp8] compiled (the persistent cache has it)
    run = _build(tmp_path, *SGD, *LAYOUTS["fsdp8"])
    state = run.init_state()
    state, _ = run.train_step(state, run.put(next(run.train_data)))
    for part in ("params", "opt_state"):
        tree = state[part]
        leaves = jax.tree.leaves(tree)
        total = sum(x.nbytes for x in leaves)
        replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
        assert replicated < 0.05 * total, (part, replicated, total)
        per_device = bytes_per_device(tree)
        assert len(per_device) == 8
        for device, held in per_device.items():
            assert held <= total / 8 + replicated, (part, device, held, total)
    embed = state["params"]["embed"]["embedding"]
    assert {s.data.shape for s in embed.addressable_shards} == {(64, 8)}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (("mesh.data=3",), "mesh sizes data=3 x fsdp=1 x tensor=1 x sequence=1 multiply to 3"),
        (("mesh.data=1", "mesh.tensor=8", "model.n_heads=4"), "mesh.tensor=8"),
        (("mesh.data=1", "mesh.fsdp=8", "model.d_model=60", "model.n_heads=4"), "mesh.fsdp=8"),
        (("data.batch_size=12",), "data.batch_size (12) is not divisible by mesh.data=8"),
        (
            ("mesh.data=2", "mesh.sequence=4", "data.seq_len=30", "model.max_seq_len=30"),
            "data.seq_len (30)",
        ),
        (("mesh.data=-1", "mesh.fsdp=3"), "mesh.data=-1"),
        (("mesh.across_nodes.data=2",), "mesh.across_nodes data=2"),
    ],
)
def test_impossible_layout_is_a_config_error(overrides, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, *overrides)
    assert needle in err.value.message


def test_impossible_layout_exits_2_naming_the_axis(tmp_path):
    env = cpu_env(8)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            str(TINY),
            "mesh.data=1",
            "mesh.tensor=8",
            f"run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mesh.tensor=8" in lines[0], done.stderr
    assert "heads" in lines[0]


def test_inspect_prints_specs_and_bytes_per_device():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/inspect_model.py"),
            str(TINY),
            "--devices",
            "8",
            "mesh.data=1",
            "mesh.fsdp=8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "parameters: 20,224" in out and "FLOPs per trained token" in out
    assert "embed/embedding         (64, 32) ('vocab', 'embed') -> P('tensor', 'fsdp')" in out
    params = next(line for line in out.splitlines() if line.strip().startswith("params"))
    # 1/8 of the 80,896 param bytes, plus the (replicated) q/k/v and MLP-hidden biases' 7/8
    assert "11,232 B" in params and "80,896 B" in params


_WORKER = """
import json, sys
from framework.config import load_config
from framework.train.config import Config
from framework.train import build
config, run_dir = sys.argv[1], sys.argv[2]
common, layouts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
results = {}
for name, layout in layouts.items():  # one jax.distributed session: the second build joins it
    run = build(load_config(Config, config, [f"run.dir={run_dir}/{name}", *common, *layout]))
    state = run.init_state()
    losses = []
    for _ in range(3):
        state, metrics = run.train_step(state, run.put(next(run.train_data)))
        losses.append(float(metrics["loss"]))
    results[name] = {"devices": int(run.mesh.devices.size), "losses": losses}
print(json.dumps(results))
"""

# Both layouts in each of the two processes (one launch, one distributed start). SGD, as the
# single-process layouts above: the losses must match one device's (`reference`).
GLOO_LAYOUTS = {
    "flat": ["mesh.data=2", "mesh.fsdp=4"],
    # within-node fsdp=4, data spans the 2 "nodes" (processes): a hybrid (ICI x DCN) mesh
    "across_nodes": ["mesh.data=1", "mesh.fsdp=4", "mesh.across_nodes.data=2"],
}


def test_two_processes_with_gloo_match_one_device(reference, tmp_path):
    port = free_port()
    outs = run_all(
        [
            [
                sys.executable,
                "-c",
                _WORKER,
                str(TINY),
                str(tmp_path),
                json.dumps([*DIMS, *SGD, *distributed_overrides(port, i)]),
                json.dumps(GLOO_LAYOUTS),
            ]
            for i in range(2)
        ],
        cwd=ROOT,
        env=cpu_env(4),
        timeout=300,  # a hang guard: two layouts per process
    )
    _, ref_losses, _ = reference
    for out in outs:
        results = json.loads(out.strip().splitlines()[-1])
        assert sorted(results) == sorted(GLOO_LAYOUTS)
        for name, result in results.items():
            assert result["devices"] == 8, name
            np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5, atol=1e-6)
