"""LoRA (framework.finetune): adapters beside projection kernels, the base frozen (bitwise), no
optimizer state or weight-gradient matmul for it, merge == adapters, exact resume, 8 devices ==
1 device, and the bad inputs (one line, exit 2)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_setup import cpu_env

from framework.config import load_config
from framework.errors import ConfigError
from framework.finetune import lora
from framework.train import build, train
from framework.train.build import compile_step
from framework.train.checkpoint import CheckpointConfig, Checkpointer
from framework.train.config import Config
from framework.train.resume import plan_resume, restore_or_init

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
QUIET = ("train.eval_every=1000", "train.sample_tokens=0", "train.log_every=1")
TARGETS = '["blocks/attn/(q|k|v|o)/kernel", "blocks/mlp/(up|down)/kernel"]'
STEPS = 20


def _cfg(run_dir: Path, *overrides: str) -> Config:
    return load_config(Config, TINY, [f"run.dir={run_dir}", *QUIET, *overrides])


def _lora(base: Path, run_dir: Path, *overrides: str) -> Config:
    return _cfg(
        run_dir,
        "run.name=lora",
        f"checkpoint.resume={base}",
        "checkpoint.resume_params_only=true",
        f"finetune.lora={{rank: 4, alpha: 8, targets: {TARGETS}}}",
        "optim.learning_rate=5e-2",
        f"train.steps={STEPS}",
        "checkpoint.every=5",
        *overrides,
    )


def _read(run_dir: Path, item: str = "params", step: int | None = None):
    reader = Checkpointer(run_dir / "checkpoints", CheckpointConfig(), read_only=True)
    try:
        return reader.read_numpy(item, step)
    finally:
        reader.close()


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained tiny LM (a few steps): the weights LoRA adapts."""
    root = tmp_path_factory.mktemp("base")
    train(build(_cfg(root, "run.name=base", "train.steps=4")))
    return root / "base"


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> Path:
    """A LoRA run of STEPS steps from `base`."""
    root = tmp_path_factory.mktemp("lora")
    train(build(_lora(base, root)))
    return root / "lora"


def test_only_adapters_train_and_the_base_is_bitwise_unchanged(base, straight):
    """After STEPS (20) steps."""
    base_params = _flat(_read(base)[1])
    step, params = _read(straight)
    assert step == STEPS
    params = _flat(params)
    adapters = {k for k in params if any(f"'{n}'" in k for n in lora.ADAPTER_LEAVES)}
    assert set(params) - adapters == set(base_params)
    for k, v in base_params.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    b_leaves = [k for k in adapters if "'lora_b'" in k]
    assert len(b_leaves) == 6 and all(np.abs(params[k]).max() > 0 for k in b_leaves)  # trained
    scales = [params[k] for k in adapters if "'lora_scale'" in k]
    np.testing.assert_array_equal(np.concatenate(scales), np.full(12, 2.0, np.float32))


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_optimizer_state_holds_the_adapters_only(base, tmp_path):
    """inspect_model's numbers: the optimizer state is Adam's two moments of the adapters (and
    its step counts), nothing for the frozen base."""
    run = build(_lora(base, tmp_path))
    params = run.abstract_state["params"]
    adapters = [
        x for p, x in jax.tree_util.tree_leaves_with_path(params) if p[-1].key in lora.TRAINED
    ]
    moments = 2 * _nbytes(adapters)
    assert moments <= _nbytes(run.abstract_state["opt_state"]) <= moments + 64
    assert moments < 0.25 * 2 * _nbytes(lora.strip(params))  # a full fine-tune's moments


def test_frozen_kernels_cost_no_weight_gradient_matmul(base, tmp_path):
    """XLA's FLOP count of the compiled step (layers unrolled, so it counts every one): the LoRA
    step does no weight-gradient matmuls (a third of a projection's training FLOPs), so it is
    well below a full fine-tune's (d_model 128, rank 2: the adapters' own FLOPs are small)."""
    wide = ("model.scan_layers=false", "model.n_layers=1", "model.d_model=128", "model.d_ff=256")
    flops = []
    for extra in (("finetune.lora.rank=2",), ("finetune.lora=null", "checkpoint.resume=auto")):
        run = build(_lora(base, tmp_path / str(len(flops)), *wide, *extra))
        state = run.init_state()
        batch = run.put(next(iter(run.train_data)))
        flops.append(compile_step(run, state, batch)[1])
    lora_flops, full_flops = flops
    assert math.isfinite(lora_flops) and lora_flops < 0.8 * full_flops, flops


def test_merged_kernels_give_the_adapted_logits(straight, tmp_path):
    run = build(_lora(straight, tmp_path))
    params = jax.tree.map(jnp.asarray, _read(straight)[1])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 32)), jnp.int32)
    adapted = run.model.apply(params, tokens, run.cfg.model)[0]
    merged = lora.merge(params)
    assert not any(
        "lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged)
    )
    plain = run.model.apply(merged, tokens, run.cfg.model)[0]
    np.testing.assert_allclose(plain, adapted, rtol=1e-5, atol=1e-5)
    base_logits = run.model.apply(lora.strip(params), tokens, run.cfg.model)[0]
    assert np.abs(np.asarray(base_logits - adapted)).max() > 1e-3  # the adapters matter


def test_stopped_and_resumed_lora_run_is_bitwise_the_straight_one(base, straight, tmp_path):
    train(build(_lora(base, tmp_path, f"train.stop_at={STEPS // 2}")))
    assert _read(tmp_path / "lora")[0] == STEPS // 2
    train(build(_lora(base, tmp_path)))  # resumes its own checkpoint, not the base
    for item in ("params", "opt_state"):
        step, got = _read(tmp_path / "lora", item)
        want = _read(straight, item)[1]
        assert step == STEPS
        for (path, x), y in zip(
            jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_array_equal(x, y, err_msg=f"{item}{jax.tree_util.keystr(path)}")


def test_eight_devices_match_one(base, tmp_path):
    """Two LoRA steps from the base weights on 1 device and on 8 (data, fsdp, tensor = 2):
    the same losses and adapters; the adapters are split like their kernels."""
    results = []
    for devices, mesh in (
        (jax.devices()[:1], ()),
        (None, ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),
    ):
        run = build(_lora(base, tmp_path / str(len(results)), *mesh), devices=devices)
        state = restore_or_init(run, plan_resume(run)).state
        batches = iter(run.train_data)
        losses = []
        for _ in range(2):
            state, metrics = run.train_step(state, run.put(next(batches)))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(lora.adapters_only(state["params"]))))
        if devices is None:
            a = state["params"]["blocks"]["attn"]["q"]["lora_a"]
            assert not a.sharding.is_fully_replicated  # the adapters shard like their kernel
    (one_losses, one), (eight_losses, eight) = results
    np.testing.assert_allclose(one_losses, eight_losses, rtol=2e-5)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.lora={targets: [blocks/attn/qq/kernel]}", "matches no parameter"),
        ("finetune.lora={rank: 40}", "exceeds the smaller dimension"),
        ("finetune.lora={targets: [embed/embedding]}", "not a projection kernel"),
    ],
)
def test_bad_lora_config_is_one_line(base, tmp_path, override, message):
    cfg = _cfg(tmp_path, f"checkpoint.resume={base}", override)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_lora_without_base_weights_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/train.py", str(TINY), f"run.dir={tmp_path}", "finetune.lora={}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cpu_env(1),
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.resume" in lines[0] and "finetune.lora" in lines[0]


def test_base_weights_may_be_stored_in_bfloat16(base, tmp_path):
    """model.param_dtype=bfloat16 on a float32 base: the frozen weights are read (checksums
    verified in the saved dtype) and cast; the adapters stay float32."""
    run = build(_lora(base, tmp_path, "model.param_dtype=bfloat16"))
    params = jax.device_get(restore_or_init(run, plan_resume(run)).state["params"])
    q = params["blocks"]["attn"]["q"]
    assert q["kernel"].dtype == jnp.bfloat16 and q["lora_a"].dtype == np.float32
    want = _read(base)[1]["blocks"]["attn"]["q"]["kernel"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(q["kernel"], want)


def test_a_lora_run_is_a_base_for_another(straight, tmp_path):
    """Weights from a LoRA run: its adapters are merged into its kernels, fresh ones added."""
    run = build(_lora(straight, tmp_path, "run.name=second", "finetune.lora.rank=2"))
    params = jax.device_get(restore_or_init(run, plan_resume(run)).state["params"])
    merged = lora.merge(jax.tree.map(jnp.asarray, _read(straight)[1]))
    q = params["blocks"]["attn"]["q"]
    np.testing.assert_allclose(q["kernel"], merged["blocks"]["attn"]["q"]["kernel"], rtol=1e-6)
    assert q["lora_a"].shape[-1] == 2 and not np.any(q["lora_b"])


def test_changed_lora_settings_do_not_resume_silently(straight, tmp_path):
    import shutil

    shutil.copytree(straight, tmp_path / "lora")
    run = build(_lora(straight, tmp_path, "finetune.lora.alpha=4", f"train.steps={STEPS + 2}"))
    with pytest.raises(ConfigError, match="finetune.lora.alpha 8.0 -> 4.0"):
        restore_or_init(run, plan_resume(run))


def test_adapter_dropout_is_unbiased_and_off_without_a_key(tmp_path):
    """finetune.lora.dropout: PEFT's dropout on the adapters' input, with the step's key only
    (evaluation and decoding pass none): the layer's mean over keys is the key-less output."""
    from framework import nn

    spec = {"kernel": nn.Param((8, 6), (None, None), out_dims=1)}
    cfg = lora.LoraConfig(rank=2, alpha=4, dropout=0.25, targets=("kernel",))
    params = nn.init(lora.add_adapters(spec, cfg), jax.random.key(0))
    params["lora_b"] = jax.random.normal(jax.random.key(1), params["lora_b"].shape)
    np.testing.assert_allclose(params["lora_dropout"], 0.25)
    x = jax.random.normal(jax.random.key(2), (4, 8))
    exact = nn.linear(params, x)
    keys = jax.random.split(jax.random.key(3), 20000)
    dropped = jax.vmap(lambda k: nn.linear(params, x, k))(keys)
    assert np.abs(np.asarray(dropped[0] - exact)).max() > 1e-3  # the key drops inputs
    term = exact - x @ params["kernel"]  # the adapters' share; its mean over keys is kept
    spread = 4 * np.asarray(dropped.std(0)) / np.sqrt(len(keys))  # 4 standard errors
    assert np.all(np.abs(np.asarray(dropped.mean(0) - exact)) <= spread + 1e-6)
    assert np.abs(np.asarray(term)).max() > 10 * spread.max()  # a check that can fail
    no_dropout = lora.add_adapters(spec, cfg.model_copy(update={"dropout": 0.0}))
    assert "lora_dropout" not in no_dropout  # no leaf, no random numbers


def test_transformer_trains_with_adapter_dropout_and_evaluates_without(base, tmp_path):
    run = build(_lora(base, tmp_path, "finetune.lora.dropout=0.5"))
    params = jax.tree.map(jnp.asarray, restore_or_init(run, plan_resume(run)).state["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if p[-1].key == "lora_b" else x, params
    )  # adapters that matter
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 32)), jnp.int32)
    apply = lambda key: run.model.apply(params, tokens, run.cfg.model, key=key)[0]  # noqa: E731
    np.testing.assert_array_equal(apply(None), apply(None))
    assert np.abs(np.asarray(apply(jax.random.key(0)) - apply(None))).max() > 1e-3
