"""Transformer: causality, scan vs unroll, remat, precision policy, error paths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import nn
from framework.models import transformer
from framework.models.transformer import TransformerConfig

GPT2 = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=16)
LLAMA = dict(
    GPT2,
    position="rope",
    norm="rmsnorm",
    activation="swiglu",
    bias=False,
    tie_embeddings=False,
    n_kv_heads=2,
)


def _setup(**kw):
    cfg = TransformerConfig(**kw)
    params = nn.init(transformer.spec(cfg), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    return cfg, params, tokens


def _loss_and_grads(cfg, params, tokens, key=None):
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    f = jax.jit(jax.value_and_grad(lambda p: transformer.loss(p, batch, cfg, key=key)[0]))
    return f(params)


@pytest.mark.parametrize("style", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_causality(style):
    cfg, params, tokens = _setup(**style)
    logits, _ = transformer.apply(params, tokens, cfg)
    t = 5
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % cfg.vocab_size)
    logits2, _ = transformer.apply(params, changed, cfg)
    np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
    assert not np.allclose(logits[:, t + 1], logits2[:, t + 1], atol=1e-4)


@pytest.mark.parametrize("style", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_scanned_and_unrolled_agree(style):
    cfg, params, tokens = _setup(**style, dropout=0.1)
    unrolled = cfg.model_copy(update={"scan_layers": False})
    key = jax.random.key(3)
    loss_s, grads_s = _loss_and_grads(cfg, params, tokens, key)
    loss_u, grads_u = _loss_and_grads(unrolled, params, tokens, key)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    chex.assert_trees_all_close(grads_s, grads_u, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_dots_no_batch"])
def test_remat_policies_leave_gradients_unchanged(remat):
    cfg, params, tokens = _setup(**LLAMA)
    loss_ref, grads_ref = _loss_and_grads(cfg, params, tokens)
    loss_r, grads_r = _loss_and_grads(cfg.model_copy(update={"remat": remat}), params, tokens)
    np.testing.assert_allclose(loss_ref, loss_r, rtol=1e-6)
    chex.assert_trees_all_close(grads_ref, grads_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_bf16_policy_keeps_params_f32(output_dtype):
    cfg, params, tokens = _setup(**LLAMA, compute_dtype="bfloat16", output_dtype=output_dtype)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, _ = transformer.apply(params, tokens, cfg)
    assert logits.dtype == jnp.dtype(output_dtype)
    loss, grads = _loss_and_grads(cfg, params, tokens)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    f32_logits, _ = transformer.apply(
        params,
        tokens,
        cfg.model_copy(update={"compute_dtype": "float32", "output_dtype": "float32"}),
    )
    np.testing.assert_allclose(logits.astype(jnp.float32), f32_logits, atol=0.1)


def test_dropout_only_with_key():
    cfg, params, tokens = _setup(**GPT2, dropout=0.5)
    eval1, _ = transformer.apply(params, tokens, cfg)
    eval2, _ = transformer.apply(params, tokens, cfg)
    train, _ = transformer.apply(params, tokens, cfg, key=jax.random.key(0))
    np.testing.assert_array_equal(eval1, eval2)
    assert not np.allclose(eval1, train)


def test_segment_ids_make_packed_rows_independent():
    cfg, params, tokens = _setup(**LLAMA)
    seg = jnp.array([[1] * 5 + [2] * 7] * 2)
    packed, _ = transformer.apply(params, tokens, cfg, segment_ids=seg)
    alone, _ = transformer.apply(params, tokens[:, 5:], cfg)
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_param_layout_and_styles():
    cfg, params, _ = _setup(**LLAMA)
    axes = nn.logical_axes(transformer.spec(cfg))
    assert axes["blocks"]["attn"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert params["blocks"]["attn"]["k"]["kernel"].shape == (3, 32, 2, 8)
    assert "unembed" in params and "pos_embed" not in params and "gate" in params["blocks"]["mlp"]
    gcfg, gparams, _ = _setup(**GPT2)
    assert "pos_embed" in gparams and "bias" in gparams["blocks"]["mlp"]["up"]


def test_shape_errors_name_path():
    cfg, params, tokens = _setup(**GPT2)
    with pytest.raises(nn.ShapeError, match=r"transformer: .*max_seq_len"):
        transformer.apply(params, jnp.zeros((1, 17), jnp.int32), cfg)
    bad = jax.tree.map(lambda x: x, params)
    bad["blocks"]["attn"]["q"]["kernel"] = jnp.zeros((3, 31, 4, 8))
    with pytest.raises(nn.ShapeError, match=r"transformer/blocks/attn: .*31.*\(2, 12, 32\)"):
        transformer.apply(bad, tokens, cfg)


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divide d_model"):
        TransformerConfig(d_model=30, n_heads=4)
