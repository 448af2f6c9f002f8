"""framework.ops dispatch: impl names, auto's logged choice, and the transformer with Pallas
kernels (interpret mode) equal to the XLA path, alone and under a mesh via shard_map."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import nn, ops
from framework.models import transformer
from framework.models.transformer import TransformerConfig
from framework.ops import registry, sharded
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


def test_kernels_under_a_mesh_run_per_shard(monkeypatch):
    """Under a 2x2x2 mesh every kernel runs inside jax.shard_map (a spy on the call that
    framework.ops.sharded makes counts each per-shard body traced) and matches XLA."""
    cfg_x, params, batch = _setup(attention_impl="xla", norm_impl="xla", loss_impl="xla")
    cfg_p = cfg_x.model_copy(update=KERNELS)
    loss_x, grads_x = _loss_grads(cfg_x, params, batch)
    mapped = collections.Counter()
    real_shard_map = jax.shard_map

    def spy(fn, *args, **kwargs):
        op = fn.__qualname__.split(".")[0]  # e.g. "_per_shard" (attention) for its local `run`

        def body(*shards):
            mapped[op] += 1
            return fn(*shards)

        return real_shard_map(body, *args, **kwargs)

    monkeypatch.setattr(sharded.jax, "shard_map", spy)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = MeshConfig().rules
    with logical.activate(mesh, rules):
        loss_p, grads_p = _loss_grads(cfg_p, params, batch)
    # pallas on CPU: attention's Triton kernel (framework.ops.attention._per_shard), the norm
    # and the fused loss
    ops_run = ("_per_shard", "rms_norm_pallas", "linear_cross_entropy_pallas")
    assert all(mapped[op] for op in ops_run), f"not all kernels ran under shard_map: {mapped}"
    np.testing.assert_allclose(loss_x, loss_p, rtol=1e-5)
    _close(grads_x, grads_p, 2e-5)


def test_auto_logs_its_choice_once_per_shape(monkeypatch, ops_log):
    """impl=auto logs exactly one line per shape however often it is called (xla on CPU)."""
    monkeypatch.setattr(registry, "_LOGGED", set())  # earlier tests may have logged these shapes
    for seq in (8, 8, 12, 12, 8):
        q = jax.random.normal(jax.random.key(0), (1, seq, 2, 16))
        ops.attention(q, q, q, impl="auto")
    chosen = [m for m in ops_log if m.startswith("ops.attention:")]
    assert len(chosen) == 2, chosen
    assert all("impl=auto chose xla" in m for m in chosen), chosen
    assert "(1, 8, 2, 16)" in chosen[0] and "(1, 12, 2, 16)" in chosen[1], chosen


def test_unknown_impl_and_unsupported_options_are_clear():
    q = jnp.ones((1, 4, 2, 16))
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        ops.attention(q, q, q, impl="flash")
    for impl in ("pallas", "triton"):
        with pytest.raises(ValueError, match="not an arbitrary mask"):
            ops.attention(q, q, q, mask=jnp.ones((1, 1, 4, 4), bool), impl=impl)
    with pytest.raises(ValueError, match="literal_error|Input should be"):
        TransformerConfig(attention_impl="flash")


def test_triton_equals_pallas_on_cpu():
    """On a CPU host impl=pallas is the Triton kernel (interpreted), as impl=triton names it:
    the same numbers, values and gradients, with segment ids, a window and GQA."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 24, 4, 16))
    k, v = (jax.random.normal(key, (2, 24, 2, 16)) for key in keys[1:])
    seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 8)[None].repeat(2, 0)
    kw = dict(causal=True, segment_ids=seg, window=6)

    def run(impl):
        f = lambda q, k, v: ops.attention(q, k, v, impl=impl, **kw).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    chex.assert_trees_all_equal(run("pallas"), run("triton"))
    _close(run("triton"), run("xla"), 2e-5)
