"""The train step as built: token-weighted gradient accumulation, the precision policy for
every registered model, FLOP counts against XLA's, and layer names in the compiled program."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from framework import models, nn
from framework.config import load_config
from framework.train import build, train
from framework.train.build import compile_step
from framework.train.config import Config
from framework.train.step import gradients

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"


def _build(tmp_path, *overrides, devices=None):
    return build(load_config(Config, TINY, [f"run.dir={tmp_path}", *overrides]), devices)


@pytest.mark.parametrize("layout", ["one_device", "data8"])
def test_masked_gradient_accumulation_equals_one_batch(layout, tmp_path):
    """Micro-batches with different counts of masked-in tokens: accumulating 4 of them gives
    the gradient of the mean over every counted token of the batch (an average of the
    micro-batches' means would not)."""
    one = layout == "one_device"
    devices = jax.devices()[:1] if one else None
    run = _build(tmp_path, "mesh.data=1" if one else "mesh.data=8", devices=devices)
    batch = next(run.train_data)
    rng = np.random.default_rng(0)
    keep = rng.uniform(size=batch["inputs"].shape[0])[:, None]  # rows differ in how much counts
    batch["mask"] = (rng.uniform(size=batch["inputs"].shape) < keep).astype(np.float32)
    placed = run.put(batch)
    state = run.init_state()
    key = jax.random.key(0)

    def grads(accum):  # jit follows the arguments' shardings (the batch split over data)
        def fn(params, model_state, b):
            return gradients(run.model, run.cfg.model, params, model_state, b, key, accum)[:2]

        return jax.jit(fn)(state["params"], state["model_state"], placed)

    (g1, m1), (g4, m4) = grads(1), grads(4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), g1, g4
    )


# Tiny configs per registered model (a new model must add one here).
TINY_MODELS = {
    "transformer": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    "mlp": dict(input_dim=8, hidden=[16], num_classes=3),
    "cnn": dict(image_size=8, in_channels=1, channels=[4], num_classes=3),
}


def test_every_registered_model_stores_params_in_param_dtype():
    shipped = {
        n for n, m in models.REGISTRY.items() if str(m.spec.__module__).startswith("framework.")
    }
    assert set(TINY_MODELS) == shipped, "add the new model to TINY_MODELS"
    for name, kw in TINY_MODELS.items():
        model = models.get(name)
        cfg = model.config(name=name, param_dtype="bfloat16", **kw)
        dtypes = {x.dtype for x in jax.tree.leaves(nn.shapes(model.spec(cfg)))}
        assert dtypes == {np.dtype("bfloat16")}, (name, dtypes)


def test_bf16_compute_with_f32_master_params_tracks_f32(tmp_path):
    """Mixed precision (f32 params, bf16 matmuls) trains to within 2% of full f32."""
    common = ("train.steps=40", "checkpoint.enabled=false", "train.eval_every=40")
    f32 = train(_build(tmp_path / "f32", *common))
    bf16 = train(_build(tmp_path / "bf16", *common, "model.compute_dtype=bfloat16"))
    params = jax.tree.leaves(bf16["state"]["params"])
    assert {x.dtype for x in params} == {np.dtype("float32")}  # master params stay f32
    a, b = f32["eval"]["loss"], bf16["eval"]["loss"]
    assert a < 0.9 * np.log(64), a  # it learned
    assert abs(a - b) / a < 0.02, (a, b)


def test_model_flops_agree_with_xla_cost_analysis(tmp_path):
    """The model's count (causal attention at half) within 10% of XLA's count of the compiled
    step (which does the masked half of attention too, and the elementwise work)."""
    run = _build(
        tmp_path,
        "mesh.data=1",
        "model.scan_layers=false",  # XLA's cost analysis counts a loop body once
        "model.remat=none",
        "model.d_model=128",
        "model.d_ff=512",
        "data.seq_len=16",
        devices=jax.devices()[:1],
    )
    state = run.init_state()
    _, hardware = compile_step(run, state, run.put(next(run.train_data)))
    model = run.flops_per_token * run.items_per_step
    assert abs(hardware - model) / model < 0.10, (hardware, model)


@pytest.mark.parametrize("scan", [True, False])
def test_layer_paths_name_the_compiled_ops(scan):
    model = models.get("transformer")
    cfg = model.config(name="transformer", **TINY_MODELS["transformer"], scan_layers=scan)
    params = nn.shapes(model.spec(cfg))
    tokens = jax.ShapeDtypeStruct((2, 8), np.int32)
    compiled = jax.jit(lambda p, t: model.apply(p, t, cfg)[0]).lower(params, tokens).compile()
    text = compiled.as_text()  # op metadata carries the name stack (scan bodies included)
    assert re.search(r"transformer/blocks/[^\"]*attn/", text), "no transformer/blocks/.../attn"
    assert re.search(r"transformer/blocks/[^\"]*mlp/", text)
