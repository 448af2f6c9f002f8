"""Transformer options that published checkpoints need (GPT-2 exact GELU, Llama 3 RoPE
scaling, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's QK-norm): each changes the
parameters or the math exactly as documented. Parity with transformers is in test_hf.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest

from framework import nn, ops
from framework.models import transformer as T
from framework.nn.rope import rope_frequencies

TINY = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
LLAMA = dict(TINY, position="rope", norm="rmsnorm", activation="swiglu", bias=False)


def _params(cfg: T.TransformerConfig, seed: int = 0) -> dict:
    """Random params with every leaf perturbed (norm scales and biases included)."""
    params = nn.init(T.spec(cfg), jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _tokens(seq: int = 24) -> jax.Array:
    return jax.random.randint(jax.random.key(7), (2, seq), 0, TINY["vocab_size"])


def _logits(cfg: T.TransformerConfig, params: dict, tokens: jax.Array) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(T.apply(params, tokens, cfg)[0])


def test_gelu_exact_is_the_erf_form():
    params = nn.init(nn.mlp_spec(8, 16, "gelu_exact"), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    h = x @ params["up"]["kernel"] + params["up"]["bias"]
    erf = 0.5 * h * (1 + jax.scipy.special.erf(h / math.sqrt(2)))
    want = erf @ params["down"]["kernel"] + params["down"]["bias"]
    np.testing.assert_allclose(nn.mlp(params, x, "gelu_exact"), want, rtol=1e-5, atol=1e-6)
    tanh = nn.mlp(params, x, "gelu")
    assert not np.allclose(tanh, want, rtol=1e-6, atol=1e-7)  # the two forms differ


def test_rope_linear_scaling_divides_positions():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    pos = jnp.arange(5)[None] * 3
    scaled = nn.apply_rope(x, pos, 500.0, {"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(scaled, nn.apply_rope(x, pos / 4.0, 500.0), rtol=1e-5, atol=1e-6)


def test_rope_llama3_scaling_bands():
    """Wavelengths shorter than context/high_freq_factor keep their frequency, longer than
    context/low_freq_factor are divided by factor, the band between is interpolated."""
    d, theta = 64, 500000.0
    cfg = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    base, scaled = rope_frequencies(d, theta), rope_frequencies(d, theta, cfg)
    wavelen = 2 * np.pi / base
    high, low = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()  # all three bands exercised
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8.0)


def test_sliding_window_limits_what_a_token_sees():
    """Window w: a token's logits do not depend on tokens w or more positions back, and a
    window covering the sequence is the plain causal model."""
    cfg = T.TransformerConfig(**{**LLAMA, "n_layers": 1}, n_kv_heads=2, sliding_window=4)
    params = _params(cfg)
    tokens = _tokens()
    base = _logits(cfg, params, tokens)
    changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % TINY["vocab_size"])
    after = _logits(cfg, params, changed)
    np.testing.assert_array_equal(after[:, 6:], base[:, 6:])  # position 2 is out of reach
    assert not np.allclose(after[:, 2:6], base[:, 2:6])  # ... but inside the window it counts
    wide = cfg.model_copy(update={"sliding_window": 64})
    plain = cfg.model_copy(update={"sliding_window": None})
    np.testing.assert_allclose(_logits(wide, params, tokens), _logits(plain, params, tokens))


def test_sliding_window_xla_and_pallas_agree():
    """The model's window goes to the kernel (interpreted here) and to XLA alike."""
    cfg = T.TransformerConfig(**LLAMA, sliding_window=5, attention_impl="xla")
    params, tokens = _params(cfg), _tokens()
    pallas = cfg.model_copy(update={"attention_impl": "pallas"})
    np.testing.assert_allclose(
        _logits(pallas, params, tokens), _logits(cfg, params, tokens), rtol=2e-5, atol=2e-5
    )


def test_qkv_bias_only_on_projections():
    cfg = T.TransformerConfig(**LLAMA, qkv_bias=True)
    attn = T.spec(cfg)["blocks"]["attn"]
    assert {"bias" in attn[n] for n in "qkv"} == {True} and "bias" not in attn["o"]
    assert "bias" not in T.spec(cfg)["blocks"]["mlp"]["up"]
    params = _params(cfg)
    moved = jax.tree.map(lambda x: x, params)
    moved["blocks"]["attn"]["k"]["bias"] = params["blocks"]["attn"]["k"]["bias"] + 1.0
    assert not np.allclose(_logits(cfg, moved, _tokens()), _logits(cfg, params, _tokens()))


def test_qk_norm_normalizes_each_head():
    """QK-norm scales exist per layer over head_dim; with them the logits no longer change
    when the q/k projections are scaled up (RMSNorm undoes it)."""
    cfg = T.TransformerConfig(**LLAMA, qk_norm=True, n_kv_heads=2)
    shapes = nn.shapes(T.spec(cfg))["blocks"]["attn"]
    assert shapes["q_norm"]["scale"].shape == shapes["k_norm"]["scale"].shape == (2, 8)
    params, tokens = _params(cfg), _tokens()
    big = jax.tree.map(lambda x: x, params)
    for n in "qk":
        big["blocks"]["attn"][n]["kernel"] = params["blocks"]["attn"][n]["kernel"] * 5.0
    np.testing.assert_allclose(
        _logits(cfg, big, tokens), _logits(cfg, params, tokens), rtol=1e-4, atol=1e-4
    )
    plain = cfg.model_copy(update={"qk_norm": False})
    del big["blocks"]["attn"]["q_norm"], big["blocks"]["attn"]["k_norm"]
    plain_params = {**params, "blocks": {**params["blocks"], "attn": big["blocks"]["attn"]}}
    assert not np.allclose(_logits(plain, plain_params, tokens), _logits(cfg, params, tokens))


def test_config_errors():
    with pytest.raises(pydantic.ValidationError, match="rope_scaling needs position: rope"):
        T.TransformerConfig(**TINY, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(pydantic.ValidationError, match="type"):
        T.TransformerConfig(**LLAMA, rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(pydantic.ValidationError, match="sliding_window"):
        T.TransformerConfig(**LLAMA, sliding_window=0)
    with pytest.raises(ValueError, match="needs causal"):
        q = jnp.ones((1, 4, 2, 8))
        ops.attention(q, q, q, causal=False, window=2)
