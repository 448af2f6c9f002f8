"""Conv, pooling and batch norm against naive references; MLP and CNN models end to end."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest
from jax.test_util import check_grads

from framework.errors import ShapeError
from framework.models import cnn, get, mlp
from framework.nn.batch_norm import batch_norm, batch_norm_spec, batch_norm_state_spec
from framework.nn.conv import avg_pool, conv2d, conv2d_spec, max_pool
from framework.nn.param import init, logical_axes

# Finite differences in float32: central differences with step EPS, compared along a random
# direction by jax.test_util.check_grads with these absolute / relative tolerances.
GRAD_EPS = 1e-3
GRAD_TOL = 2e-2


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """XLA's SAME padding: output ceil(size / s), extra padding goes after."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _naive_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: str):
    """Loop-based NHWC x HWIO cross-correlation in float64."""
    kh, kw, _, cout = w.shape
    if padding == "SAME":
        (t, bo), (le, r) = _same_pads(x.shape[1], kh, stride), _same_pads(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), (t, bo), (le, r), (0, 0)))
    n, h, wd, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    for bi, i, j, o in itertools.product(range(n), range(oh), range(ow), range(cout)):
        patch = x[bi, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
        out[bi, i, j, o] = np.sum(patch * w[:, :, :, o]) + b[o]
    return out


# ---------------------------------------------------------------- conv2d


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID"), (2, "VALID")])
def test_conv2d_matches_naive_loop(stride, padding):
    rng = _rng(1)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float32)
    got = conv2d(
        {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)},
        jnp.asarray(x),
        stride=stride,
        padding=padding,
    )
    want = _naive_conv(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, padding
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_conv2d_spec_shapes_axes_and_fan_in_scale():
    spec = conv2d_spec(8, 16, kernel=(3, 3))
    assert spec["kernel"].shape == (3, 3, 8, 16)
    assert logical_axes(spec) == {
        "kernel": (None, None, "conv_in", "conv_out"),
        "bias": ("conv_out",),
    }
    assert "bias" not in conv2d_spec(8, 16, bias=False)
    big = init(conv2d_spec(64, 256), jax.random.key(0))
    # fan-in is kh * kw * in = 576, so std ~ 1/24 (not 1/sqrt(64) or 1/sqrt(256 * 9)).
    assert abs(float(jnp.std(big["kernel"])) * np.sqrt(3 * 3 * 64) - 1.0) < 0.05
    assert not np.any(np.asarray(big["bias"]))


def test_conv2d_wrong_input_raises_shape_error():
    params = init(conv2d_spec(3, 4), jax.random.key(0))
    with pytest.raises(ShapeError, match=r"channels.*3.*\(2, 5, 5, 2\)"):
        conv2d(params, jnp.zeros((2, 5, 5, 2)))
    with pytest.raises(ShapeError, match=r"rank 4 \(batch, height, width, channels\).*\(5, 5, 3\)"):
        conv2d(params, jnp.zeros((5, 5, 3)))
    with pytest.raises(ShapeError, match="floating"):
        conv2d(params, jnp.zeros((2, 5, 5, 3), jnp.int32))


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("pool,reduce", [(max_pool, np.max), (avg_pool, np.mean)])
@pytest.mark.parametrize("hw", [(8, 6), (7, 9)])
def test_pool_matches_reshape_reference(pool, reduce, hw):
    h, w = hw
    x = _rng(2).standard_normal((2, h, w, 3)).astype(np.float32)
    got = pool(jnp.asarray(x), window=2)  # stride defaults to the window, VALID drops the rest
    oh, ow = h // 2, w // 2
    crop = x[:, : oh * 2, : ow * 2, :].reshape(2, oh, 2, ow, 2, 3)
    np.testing.assert_allclose(np.asarray(got), reduce(crop, axis=(2, 4)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool,reduce", [(max_pool, np.max), (avg_pool, np.mean)])
def test_pool_same_padding_ignores_padding(pool, reduce):
    """With SAME padding, max never picks the padding and the mean divides by real inputs."""
    x = _rng(3).standard_normal((1, 5, 5, 2)).astype(np.float32) - 10.0  # all negative
    got = np.asarray(pool(jnp.asarray(x), window=3, stride=2, padding="SAME"))
    assert got.shape == (1, 3, 3, 2)
    (lo, _) = _same_pads(5, 3, 2)
    for i, j in itertools.product(range(3), range(3)):
        r0, c0 = max(i * 2 - lo, 0), max(j * 2 - lo, 0)
        r1, c1 = min(i * 2 - lo + 3, 5), min(j * 2 - lo + 3, 5)
        want = reduce(x[0, r0:r1, c0:c1, :], axis=(0, 1))
        np.testing.assert_allclose(got[0, i, j], want, rtol=1e-6, atol=1e-6)


def test_pool_wrong_rank_raises_shape_error():
    with pytest.raises(ShapeError, match=r"\(4, 4\)"):
        max_pool(jnp.zeros((4, 4)))
    with pytest.raises(ShapeError, match="floating"):
        avg_pool(jnp.zeros((1, 4, 4, 1), jnp.int32))


# ---------------------------------------------------------------- gradients


def test_conv2d_gradients_match_finite_differences():
    rng = _rng(4)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32)

    def f(w, b, x):
        return conv2d({"kernel": w, "bias": b}, x, stride=2)

    check_grads(f, (w, b, x), order=1, modes=("rev",), atol=GRAD_TOL, rtol=GRAD_TOL, eps=GRAD_EPS)


def test_batch_norm_training_gradients_match_finite_differences():
    rng = _rng(5)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, (3,)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 3, 3, 3)) * 2 + 1, jnp.float32)
    state = init(batch_norm_state_spec(3), jax.random.key(0))

    def f(scale, bias, x):
        # Nonlinear readout so the gradient through the batch statistics matters.
        y, _ = batch_norm({"scale": scale, "bias": bias}, state, x, training=True)
        return jnp.sin(y)

    check_grads(
        f, (scale, bias, x), order=1, modes=("rev",), atol=GRAD_TOL, rtol=GRAD_TOL, eps=GRAD_EPS
    )


@pytest.mark.parametrize("pool", [max_pool, avg_pool])
def test_pool_gradients_match_finite_differences(pool):
    # Distinct values 0.1 apart, so no max switches within a finite-difference step.
    x = jnp.asarray(_rng(6).permutation(2 * 6 * 6 * 2).reshape(2, 6, 6, 2) * 0.1, jnp.float32)
    check_grads(
        lambda x: pool(x, window=2),
        (x,),
        order=1,
        modes=("rev",),
        atol=GRAD_TOL,
        rtol=GRAD_TOL,
        eps=GRAD_EPS,
    )


# ---------------------------------------------------------------- batch norm


def _bn_setup(seed: int = 7):
    rng = _rng(seed)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, (3,)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }
    x = rng.standard_normal((6, 4, 4, 3)).astype(np.float32) * np.array([1.0, 3.0, 0.5]) + 2.0
    return params, x.astype(np.float32)


def test_batch_norm_spec_and_state_init():
    assert logical_axes(batch_norm_spec(5)) == {"scale": ("conv_out",), "bias": ("conv_out",)}
    state = init(batch_norm_state_spec(5), jax.random.key(0))
    np.testing.assert_array_equal(state["mean"], np.zeros(5, np.float32))
    np.testing.assert_array_equal(state["var"], np.ones(5, np.float32))


def test_batch_norm_training_normalizes_and_updates_statistics():
    params, x = _bn_setup()
    state = {"mean": jnp.asarray([0.5, -1.0, 0.0]), "var": jnp.asarray([1.0, 2.0, 4.0])}
    y, new_state = batch_norm(params, state, jnp.asarray(x), training=True, momentum=0.8)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(
        new_state["mean"], 0.8 * np.asarray(state["mean"]) + 0.2 * mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        new_state["var"], 0.8 * np.asarray(state["var"]) + 0.2 * var, rtol=1e-5, atol=1e-5
    )
    # Output uses this batch's statistics: per channel it has mean `bias` and std `scale`.
    y = np.asarray(y)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), params["bias"], atol=1e-4)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), params["scale"], rtol=1e-3)


def test_batch_norm_eval_uses_stored_statistics_and_leaves_state_unchanged():
    params, x = _bn_setup()
    state = {"mean": jnp.asarray([0.5, -1.0, 0.0]), "var": jnp.asarray([1.0, 2.0, 4.0])}
    before = jax.tree.map(np.array, state)
    y, new_state = batch_norm(params, state, jnp.asarray(x), training=False, eps=1e-5)
    for k in before:
        np.testing.assert_array_equal(np.asarray(new_state[k]), before[k])  # bitwise
    want = (x - before["mean"]) / np.sqrt(before["var"] + 1e-5) * np.asarray(
        params["scale"]
    ) + np.asarray(params["bias"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # Evaluation is per example: the batch it comes in does not matter.
    one, _ = batch_norm(params, state, jnp.asarray(x[:1]), training=False, eps=1e-5)
    np.testing.assert_allclose(np.asarray(one), np.asarray(y[:1]), rtol=1e-6, atol=1e-6)


def test_batch_norm_low_precision_input_keeps_f32_statistics():
    params, x = _bn_setup()
    state = init(batch_norm_state_spec(3), jax.random.key(0))
    y, new_state = batch_norm(params, state, jnp.asarray(x, jnp.bfloat16), training=True)
    assert y.dtype == jnp.bfloat16
    assert new_state["mean"].dtype == new_state["var"].dtype == jnp.float32
    with pytest.raises(ShapeError, match=r"channels.*\(6, 4, 4, 2\)"):
        batch_norm(params, state, jnp.zeros((6, 4, 4, 2)), training=True)


# ---------------------------------------------------------------- models

MLP_CFG = mlp.MLPConfig(input_dim=8, hidden=[16, 16], num_classes=3)
CNN_CFG = cnn.CNNConfig(image_size=8, in_channels=2, channels=[4, 8], num_classes=2)


def _mlp_data(n: int = 64, seed: int = 0):
    """Linearly separable 3-class problem: the label is the argmax of a fixed projection."""
    rng = _rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    labels = np.argmax(x @ rng.standard_normal((8, 3)), axis=-1).astype(np.int32)
    return {"inputs": jnp.asarray(x), "labels": jnp.asarray(labels)}


def _cnn_data(n: int = 32, seed: int = 0):
    """Class 0 is bright in the top half, class 1 in the bottom half, plus noise."""
    rng = _rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    x = rng.standard_normal((n, 8, 8, 2)).astype(np.float32) * 0.5
    x[labels == 0, :4] += 1.0
    x[labels == 1, 4:] += 1.0
    return {"inputs": jnp.asarray(x), "labels": jnp.asarray(labels)}


def _replace(cfg, **changes):
    """A validated copy of a config with some fields changed."""
    return type(cfg)(**{**cfg.model_dump(), **changes})


def _setup(model, cfg, key=0):
    k = jax.random.key(key)
    return init(model.spec(cfg), k), init(model.state_spec(cfg), k)


MODELS = [
    pytest.param(get("mlp"), MLP_CFG, _mlp_data, id="mlp"),
    pytest.param(get("cnn"), CNN_CFG, _cnn_data, id="cnn"),
]


def test_models_are_registered_with_their_configs():
    assert get("mlp").config is mlp.MLPConfig and get("cnn").config is cnn.CNNConfig
    assert get("mlp").apply is mlp.apply and get("cnn").state_spec is cnn.state_spec
    assert mlp.MLPConfig(input_dim=4, num_classes=2).hidden == [128, 128]
    assert cnn.CNNConfig().model_dump()["channels"] == [16, 32]
    for field in ("input_dim", "hidden", "num_classes", "dropout"):
        assert mlp.MLPConfig.model_fields[field].description


@pytest.mark.parametrize(
    "bad",
    [
        {"input_dim": 0, "num_classes": 3},
        {"input_dim": 4, "num_classes": 3, "hidden": [8, 0]},
        {"input_dim": 4, "num_classes": 3, "dropout": 1.0},
        {"input_dim": 4, "num_classes": 1},
        {"input_dim": 4, "num_classes": 3, "hiden": [8]},
        {"name": "cnn", "input_dim": 4, "num_classes": 3},
    ],
)
def test_mlp_config_rejects_bad_values(bad):
    with pytest.raises(pydantic.ValidationError):
        mlp.MLPConfig(**bad)


def test_cnn_config_rejects_image_too_small_for_its_stages():
    with pytest.raises(pydantic.ValidationError, match="too small"):
        cnn.CNNConfig(image_size=4, channels=[4, 4, 4])
    with pytest.raises(pydantic.ValidationError):
        cnn.CNNConfig(channels=[])


@pytest.mark.parametrize("model,cfg,data", MODELS)
def test_init_is_deterministic(model, cfg, data):
    p1, s1 = _setup(model, cfg, 3)
    p2, s2 = _setup(model, cfg, 3)
    p3, _ = _setup(model, cfg, 4)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3), strict=True)
    )


@pytest.mark.parametrize("model,cfg,data", MODELS)
@pytest.mark.parametrize("training", [False, True])
def test_jit_and_eager_apply_agree(model, cfg, data, training):
    params, state = _setup(model, cfg)
    x = data()["inputs"]
    key = jax.random.key(1) if training else None

    def run(params, state, x):
        return model.apply(params, x, cfg, key=key, state=state)

    eager_y, eager_s = run(params, state, x)
    jit_y, jit_s = jax.jit(run)(params, state, x)
    assert eager_y.shape == (x.shape[0], cfg.num_classes)
    np.testing.assert_allclose(np.asarray(jit_y), np.asarray(eager_y), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jit_s), jax.tree.leaves(eager_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,cfg,data", MODELS)
def test_sgd_reduces_loss_on_separable_problem(model, cfg, data):
    params, state = _setup(model, cfg)
    batch = data()
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, state, key):
        grad_fn = jax.value_and_grad(model.loss, has_aux=True)
        (loss, aux), grads = grad_fn(params, batch, cfg, key=key, state=state)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux["state"], loss

    eval_loss = jax.jit(lambda p, s: model.loss(p, batch, cfg, state=s))
    first, _ = eval_loss(params, state)
    losses = []
    for i in range(30):
        params, opt_state, state, loss = step(params, opt_state, state, jax.random.key(i))
        losses.append(float(loss))
    last, aux = eval_loss(params, state)
    assert np.all(np.isfinite(losses))
    assert float(last) < 0.5 * float(first), (float(first), losses, float(last))
    assert float(aux["metrics"]["accuracy"]) >= 0.9


def _dot_operand_dtypes(jaxpr) -> set:
    """dtypes of the operands of every dot_general / conv in a jaxpr, nested ones included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.update(str(v.aval.dtype) for v in eqn.invars)
        for sub in eqn.params.values():
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                found |= _dot_operand_dtypes(inner)
    return found


@pytest.mark.parametrize("model,cfg,data", MODELS)
@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_bf16_policy(model, cfg, data, output_dtype):
    cfg = _replace(cfg, compute_dtype="bfloat16", output_dtype=output_dtype)
    params, state = _setup(model, cfg)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves((params, state))} == {"float32"}
    x = data()["inputs"]
    logits, new_state = model.apply(params, x, cfg, key=jax.random.key(0), state=state)
    assert logits.dtype == jnp.dtype(output_dtype)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(new_state)} <= {"float32"}
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, cfg, state=state))(params, x)
    assert _dot_operand_dtypes(jaxpr.jaxpr) == {"bfloat16"}
    loss, aux = model.loss(params, data(), cfg, state=state)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_mlp_wrong_input_shape_names_the_layer():
    params, _ = _setup(get("mlp"), MLP_CFG)
    with pytest.raises(ShapeError, match=r"layer_0.*\(4, 9\)"):
        mlp.apply(params, jnp.zeros((4, 9)), MLP_CFG)
    with pytest.raises(ShapeError, match=r"layer_0.*\(4, 9\)"):  # also at jit trace time
        jax.jit(lambda p, x: mlp.apply(p, x, MLP_CFG))(params, jnp.zeros((4, 9)))
    # A too-narrow layer_1: the mismatch is reported by the layer that consumes its output.
    narrow = init(
        mlp.spec(mlp.MLPConfig(input_dim=8, hidden=[16, 12], num_classes=3)), jax.random.key(0)
    )
    with pytest.raises(ShapeError, match=r"^layer_2: .*16.*\(4, 12\)"):
        mlp.apply({**params, "layer_1": narrow["layer_1"]}, jnp.zeros((4, 8)), MLP_CFG)
    # Images are flattened: [4, 2, 4] is 8 features.
    logits, _ = mlp.apply(params, jnp.zeros((4, 2, 4)), MLP_CFG)
    assert logits.shape == (4, 3)


def test_cnn_wrong_input_shape_names_the_layer():
    params, state = _setup(get("cnn"), CNN_CFG)
    with pytest.raises(ShapeError, match=r"stage_0/conv: .*channels.*\(3, 8, 8, 3\)"):
        cnn.apply(params, jnp.zeros((3, 8, 8, 3)), CNN_CFG, state=state)
    with pytest.raises(ShapeError, match=r"8x8.*\(3, 9, 9, 2\)"):
        cnn.apply(params, jnp.zeros((3, 9, 9, 2)), CNN_CFG, state=state)
    with pytest.raises(ShapeError, match=r"rank 4.*\(8, 8, 2\)"):
        cnn.apply(params, jnp.zeros((8, 8, 2)), CNN_CFG, state=state)
    with pytest.raises(ValueError, match="state"):
        cnn.apply(params, jnp.zeros((3, 8, 8, 2)), CNN_CFG)


def test_cnn_state_updates_only_in_training():
    params, state = _setup(get("cnn"), CNN_CFG)
    x = _cnn_data()["inputs"]
    _, eval_state = cnn.apply(params, x, CNN_CFG, state=state)
    for a, b in zip(jax.tree.leaves(eval_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, train_state = cnn.apply(params, x, CNN_CFG, key=jax.random.key(0), state=state)
    assert jax.tree.structure(train_state) == jax.tree.structure(state)
    assert not np.allclose(train_state["stage_0"]["bn"]["mean"], state["stage_0"]["bn"]["mean"])
    # Without batch norm there are no statistics and no conv bias is dropped.
    plain = _replace(CNN_CFG, batch_norm=False)
    assert cnn.state_spec(plain) == {}
    assert "bias" in cnn.spec(plain)["stage_0"]["conv"] and "bn" not in cnn.spec(plain)["stage_0"]
    logits, none_state = cnn.apply(init(cnn.spec(plain), jax.random.key(0)), x, plain)
    assert logits.shape == (x.shape[0], 2) and none_state is None
