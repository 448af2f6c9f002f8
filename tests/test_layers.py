"""Layers: finite-difference gradients, jit agreement, masks, GQA, shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from framework import nn, ops
from framework.parallel import logical

KEY = jax.random.key(42)
# f32 finite differences in check_grads use eps=1e-3-ish steps; these tolerances are loose
# enough for that and tight enough to catch a wrong gradient (errors there are O(1)).
GRAD_TOL = dict(atol=2e-2, rtol=2e-2)


def _rand(shape, i=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape, dtype)


def _params(spec, i=0):
    return nn.init(spec, jax.random.fold_in(KEY, 1000 + i))


def _grads_ok(f, params, *args):
    check_grads(lambda p, *a: f(p, *a), (params, *args), order=1, modes=["rev"], **GRAD_TOL)


def test_linear_and_embedding_grads():
    p = _params(nn.linear_spec(5, 3))
    _grads_ok(nn.linear, p, _rand((2, 5)))
    e = _params(nn.embedding_spec(11, 6))
    tokens = jnp.array([[1, 5, 10], [0, 0, 3]])
    _grads_ok(lambda p: nn.embed(p, tokens), e)
    _grads_ok(nn.attend, e, _rand((2, 6)))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_grads_and_values(kind):
    x = _rand((3, 8)) * 3 + 1
    if kind == "layer":
        p = {"scale": _rand((8,), 1), "bias": _rand((8,), 2)}
        y = nn.layer_norm(p, x)
        ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, ref * p["scale"] + p["bias"], atol=1e-5)
        _grads_ok(nn.layer_norm, p, x)
    else:
        p = {"scale": _rand((8,), 1)}
        y = nn.rms_norm(p, x)
        ref = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]
        np.testing.assert_allclose(y, ref, atol=1e-5)
        _grads_ok(nn.rms_norm, p, x)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_grads(activation):
    p = _params(nn.mlp_spec(6, 12, activation))
    assert ("gate" in p) == (activation == "swiglu")
    _grads_ok(nn.mlp, p, _rand((2, 3, 6)))


@pytest.mark.parametrize("rope", [None, 10000.0])
def test_attention_layer_grads(rope):
    p = _params(nn.attention_spec(8, n_heads=4, n_kv_heads=2, head_dim=4, bias=True))
    x = _rand((2, 5, 8))
    _grads_ok(lambda p, x: nn.attention(p, x, rope_theta=rope), p, x)


def test_rope_and_dropout_grads():
    x, pos = _rand((1, 4, 2, 6)), jnp.arange(4)[None]
    _grads_ok(lambda x: nn.apply_rope(x, pos), x)
    _grads_ok(lambda x: nn.dropout(x, 0.3, jax.random.key(7)), x)


def test_rope_preserves_norm_and_is_relative():
    q, k = _rand((1, 1, 1, 8), 1), _rand((1, 1, 1, 8), 2)
    rq = nn.apply_rope(q, jnp.array([[3]]))
    np.testing.assert_allclose(jnp.linalg.norm(rq), jnp.linalg.norm(q), rtol=1e-5)

    def score(i, j):
        return jnp.sum(nn.apply_rope(q, jnp.array([[i]])) * nn.apply_rope(k, jnp.array([[j]])))

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
    assert not np.isclose(score(5, 2), score(5, 3))


def test_dropout_eval_is_identity_and_train_scales():
    x = jnp.ones((1000,))
    assert nn.dropout(x, 0.5, None) is x
    y = nn.dropout(x, 0.5, jax.random.key(0))
    kept = np.asarray(y != 0)
    assert 0.4 < kept.mean() < 0.6 and np.allclose(np.asarray(y)[kept], 2.0)


def test_jit_and_eager_apply_agree():
    p = _params(nn.attention_spec(16, n_heads=4, n_kv_heads=1))
    x = _rand((2, 7, 16))
    eager = nn.attention(p, x, rope_theta=10000.0)
    jitted = jax.jit(lambda p, x: nn.attention(p, x, rope_theta=10000.0))(p, x)
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_attention_causality():
    p = _params(nn.attention_spec(16, n_heads=4))
    x = _rand((1, 9, 16))
    y = nn.attention(p, x, causal=True)
    t = 4
    x2 = x.at[:, t + 1].set(_rand((16,), 3))
    y2 = nn.attention(p, x2, causal=True)
    np.testing.assert_array_equal(y[:, : t + 1], y2[:, : t + 1])
    assert not np.allclose(y[:, t + 1], y2[:, t + 1])


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv(n_kv):
    q, k, v = _rand((2, 6, 4, 8), 1), _rand((2, 6, n_kv, 8), 2), _rand((2, 6, n_kv, 8), 3)
    gqa = ops.attention(q, k, v, causal=True, impl="xla")
    rep = 4 // n_kv
    mha = ops.attention(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), causal=True, impl="xla")
    np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_segment_ids_isolate_packed_documents():
    q, k, v = _rand((1, 8, 2, 4), 1), _rand((1, 8, 2, 4), 2), _rand((1, 8, 2, 4), 3)
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    packed = ops.attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
    first = ops.attention(q[:, :3], k[:, :3], v[:, :3], causal=True, impl="xla")
    second = ops.attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True, impl="xla")
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-6)


def test_padding_mask_ignores_padded_keys():
    q, k, v = _rand((1, 3, 2, 4), 1), _rand((1, 5, 2, 4), 2), _rand((1, 5, 2, 4), 3)
    valid = jnp.array([[1, 1, 1, 0, 0]])
    masked = ops.attention(q, k, v, mask=nn.padding_mask(valid), impl="xla")
    trimmed = ops.attention(q, k[:, :3], v[:, :3], impl="xla")
    np.testing.assert_allclose(masked, trimmed, atol=1e-6)
    np.testing.assert_array_equal(nn.causal_mask(2, 3)[0, 0], [[1, 1, 0], [1, 1, 1]])


def test_segment_positions_restart():
    seg = jnp.array([[5, 5, 7, 7, 7, 2]])
    np.testing.assert_array_equal(nn.segment_positions(seg), [[0, 1, 0, 1, 2, 0]])


def test_shape_errors_name_layer_path():
    p = _params(nn.mlp_spec(6, 12))
    with pytest.raises(nn.ShapeError) as err:
        with nn.scope("model"):
            nn.mlp(p, _rand((2, 5)))
    msg = str(err.value)
    assert "model/up" in msg and "6" in msg and "(2, 5)" in msg
    with pytest.raises(nn.ShapeError, match="integer"):
        nn.embed(_params(nn.embedding_spec(4, 2)), _rand((3,)))


def test_constrain_is_noop_without_mesh_and_shards_with_one():
    x = _rand((8, 4))
    assert logical.constrain(x, ("batch", "embed")) is x
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with logical.activate(mesh, {"batch": "data"}):
        y = jax.jit(lambda x: logical.constrain(x * 2, ("batch", "embed")))(x)
    assert y.sharding.spec[0] == "data"
    assert len(y.sharding.device_set) == 8


def test_precision_policy_casts_floats_only():
    pol = nn.BF16
    tree = pol.cast_to_compute({"w": jnp.ones(2), "ids": jnp.arange(2)})
    assert tree["w"].dtype == jnp.bfloat16 and tree["ids"].dtype == jnp.int32
