"""framework.ops dispatch: impl names, auto's logged choice, and the transformer with Pallas
kernels (interpret mode) equal to the XLA path, alone and under a mesh via shard_map."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import nn, ops
from framework.models import transformer
from framework.models.transformer import TransformerConfig
from framework.parallel import logical
from framework.parallel.mesh import MeshConfig, make_mesh

KERNELS = dict(attention_impl="pallas", norm_impl="pallas", loss_impl="pallas")
TINY = dict(
    vocab_size=96,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    max_seq_len=24,
    position="rope",
    norm="rmsnorm",
    activation="swiglu",
    bias=False,
    tie_embeddings=False,
)


def _loss_grads(cfg, params, batch):
    return jax.jit(jax.value_and_grad(lambda p: transformer.loss(p, batch, cfg)[0]))(params)


def _setup(**kw):
    cfg = TransformerConfig(**{**TINY, **kw})
    params = nn.init(transformer.spec(cfg), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 21), 0, cfg.vocab_size)
    return cfg, params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _close(a, b, tol):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "style",
    [
        {},
        dict(
            position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True
        ),
    ],
    ids=["llama", "gpt2"],
)
def test_transformer_pallas_equals_xla(style):
    cfg_x, params, batch = _setup(
        **{**style, "attention_impl": "xla", "norm_impl": "xla", "loss_impl": "xla"}
    )
    cfg_p = cfg_x.model_copy(update=KERNELS)
    loss_x, grads_x = _loss_grads(cfg_x, params, batch)
    loss_p, grads_p = _loss_grads(cfg_p, params, batch)
    np.testing.assert_allclose(loss_x, loss_p, rtol=1e-5)
    _close(grads_x, grads_p, 2e-5)
    loss_c, grads_c = _loss_grads(cfg_x.model_copy(update={"loss_impl": "chunked"}), params, batch)
    np.testing.assert_allclose(loss_x, loss_c, rtol=1e-5)
    _close(grads_x, grads_c, 2e-5)


def test_kernels_under_a_mesh_run_per_shard():
    cfg_x, params, batch = _setup(attention_impl="xla", norm_impl="xla", loss_impl="xla")
    cfg_p = cfg_x.model_copy(update=KERNELS)
    loss_x, grads_x = _loss_grads(cfg_x, params, batch)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = MeshConfig().rules
    with logical.activate(mesh, rules):
        loss_p, grads_p = _loss_grads(cfg_p, params, batch)
    np.testing.assert_allclose(loss_x, loss_p, rtol=1e-5)
    _close(grads_x, grads_p, 2e-5)


def test_auto_picks_xla_on_cpu_and_logs_once(caplog):
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
    with caplog.at_level(logging.INFO, logger="framework.ops"):
        ops.attention(q, q, q, impl="auto")
        ops.attention(q, q, q, impl="auto")
    chosen = [r.message for r in caplog.records if "attention" in r.message]
    assert len(chosen) <= 1  # logged at most once per shape (maybe earlier in the session)
    assert "pallas" not in "".join(chosen)


def test_unknown_impl_and_unsupported_options_are_clear():
    q = jnp.ones((1, 4, 2, 16))
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        ops.attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="not an arbitrary mask"):
        ops.attention(q, q, q, mask=jnp.ones((1, 1, 4, 4), bool), impl="pallas")
    with pytest.raises(ValueError, match="literal_error|Input should be"):
        TransformerConfig(attention_impl="flash")
