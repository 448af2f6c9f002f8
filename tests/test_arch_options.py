"""Transformer options that published checkpoints need (GPT-2 exact GELU, Llama 3 RoPE
scaling, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's QK-norm): each changes the
parameters or the math exactly as documented. Parity with transformers is in test_hf.py."""

from __future__ import annotations

import itertools
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
    """Random host params with every leaf perturbed (norm scales ~1, biases ~0): numpy, so no
    initializer is compiled per shape."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        base = 1.0 if jax.tree_util.keystr(path).endswith("'scale']") else 0.0
        return (base + 0.2 * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, nn.shapes(T.spec(cfg)))


def _tokens(seq: int = 24) -> np.ndarray:
    return np.random.default_rng(7).integers(0, TINY["vocab_size"], (2, seq)).astype(np.int32)


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
    changed = tokens.copy()
    changed[:, 2] = (tokens[:, 2] + 1) % TINY["vocab_size"]
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


def _band(tq: int, tk: int, nq_pad: int, nk_pad: int, window: int | None) -> np.ndarray:
    """[nq_pad, nk_pad] bool written out by hand: causal, end-aligned, within the window, real
    keys only."""
    rows = np.arange(nq_pad)[:, None] + (tk - tq)
    cols = np.arange(nk_pad)[None, :]
    allowed = (cols <= rows) & (cols < tk)
    return allowed if window is None else allowed & (cols > rows - window)


@pytest.mark.parametrize("tq, tk", [(33, 33), (7, 40), (40, 9), (64, 16), (1, 64)])
def test_window_block_ranges_cover_the_band(tq, tk):
    """The kernel's block loops (_kv_range for the forward/dq, _q_range for dk/dv) visit every
    block holding an allowed (query, key) pair of a real query, and skip the mask only on blocks
    where every pair is allowed: windows narrower than, equal to and wider than a block,
    queries longer or shorter than the keys (end-aligned), padded last blocks, segments."""
    from pallas_kernels import flash_attention as fa

    for window, (bq, bk), seg in itertools.product(
        [None, 1, 3, 16, 17, 100], [(16, 16), (16, 32), (32, 16)], [False, True]
    ):
        blocks = fa.KernelConfig(bq, bk, 4, 1)
        st = fa._Static(
            1.0, True, tq, tk, 1, seg, window, blocks, blocks, blocks, False, False, True
        )
        nq, nk = -(-tq // bq), -(-tk // bk)
        allowed = _band(tq, tk, nq * bq, nk * bk, window)
        tiles = allowed.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
        real = tiles & (np.arange(nq * bq) < tq).reshape(nq, 1, bq, 1)
        needed, whole = real.any(axis=(2, 3)), tiles.all(axis=(2, 3)) & (not seg)
        where = (window, bq, bk, seg)
        for i in range(nq):
            start, full, end = (int(x) for x in fa._kv_range(st, i * bq, bq, bk, nk))
            visited = (np.arange(nk) >= start) & (np.arange(nk) < end)
            unmasked = (np.arange(nk) >= start) & (np.arange(nk) < full)
            assert np.all(visited[needed[i]]), (where, i, start, end)
            assert np.all(whole[i][unmasked]), (where, i, start, full)
        for j in range(nk):
            lo, full, hi = (int(x) for x in fa._q_range(st, j * bk, bq, bk, nq))
            visited = (np.arange(nq) >= lo) & (np.arange(nq) < hi)
            unmasked = (np.arange(nq) >= full) & (np.arange(nq) < hi)
            assert np.all(visited[needed[:, j]]), (where, j, lo, hi)
            assert np.all(whole[:, j][unmasked]), (where, j, full, hi)


def test_window_as_wide_as_the_keys_is_no_window():
    """A window of kv_len or more masks nothing: ops.attention and the kernel drop it (so
    cuDNN may take the call and the kernel skips the mask on full blocks), same values."""
    from pallas_kernels import flash_attention as fa

    assert fa.effective_window(None, 8) is None and fa.effective_window(7, 8) == 7
    assert fa.effective_window(8, 8) is None and fa.effective_window(4096, 8) is None
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
    k, v = q[:, :, :1], q[:, :, 1:] * 2
    st = fa._prepare(q, k, v, True, None, None, None, 16, 16, None, None, True, "cpu", 8)[0]
    assert st.window is None
    st = fa._prepare(q, k, v, True, None, None, None, 16, 16, None, None, True, "cpu", 7)[0]
    assert st.window == 7
    np.testing.assert_array_equal(
        ops.attention(q, k, v, causal=True, window=8, impl="xla"),
        ops.attention(q, k, v, causal=True, impl="xla"),
    )
    assert not np.allclose(
        ops.attention(q, k, v, causal=True, window=7, impl="xla"),
        ops.attention(q, k, v, causal=True, impl="xla"),
    )


def test_flops_per_token_counts_the_keys_a_window_leaves():
    """Attention FLOPs follow the keys each query sees: half the sequence when causal, and
    min(position + 1, window) with a window (not half the window)."""
    cfg = T.TransformerConfig(**LLAMA)
    per_key = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size  # attention FLOPs per key seen
    dense = T.flops_per_token(cfg, 1024)
    for window in (64, 1000):
        windowed = T.flops_per_token(cfg.model_copy(update={"sliding_window": window}), 1024)
        seen = np.minimum(np.arange(1, 1025), window).mean()  # keys per query, counted
        want = dense - per_key * (1024 / 2 - seen)
        np.testing.assert_allclose(windowed, want, rtol=2e-3)
    wide = cfg.model_copy(update={"sliding_window": 1024})
    assert T.flops_per_token(wide, 1024) == dense


def test_cudnn_with_a_window_narrower_than_the_sequence_is_a_config_error():
    from framework.errors import ConfigError

    meta = {"kind": "lm", "vocab_size": 40, "seq_len": 32}
    cfg = T.TransformerConfig(**LLAMA, sliding_window=16, attention_impl="cudnn")
    with pytest.raises(ConfigError, match="cudnn takes no sliding window"):
        cfg.for_data(meta)


def test_cached_decode_with_every_option_unrolled():
    """QK-norm, q/k/v biases, llama3 RoPE scaling and a window, layers in a Python loop (the
    unrolled branch of the blocks with a cache): prefill then one token per step equal the full
    forward."""
    rope = {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 8}
    cfg = T.TransformerConfig(
        **LLAMA,
        n_kv_heads=2,
        qk_norm=True,
        qkv_bias=True,
        rope_scaling=rope,
        sliding_window=3,
        scan_layers=False,
    )
    params, tokens = _params(cfg), _tokens(10)
    # XLA:CPU without its expensive passes (as tests/test_generate.py): same f32 math
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

    def compiled(fn, *args):
        return jax.jit(fn).lower(*args).compile(fast)

    def decode(p, t, c, pos):
        return T.decode(p, t, cfg, cache=c, positions=pos)

    with jax.default_matmul_precision("highest"):
        full = np.asarray(
            compiled(lambda p, t: T.apply(p, t, cfg)[0], params, tokens)(params, tokens)
        )
        cache = T.init_cache(cfg, 2, 16)
        assert jax.tree.map(jnp.shape, cache) == {"k": (2, 2, 16, 2, 8), "v": (2, 2, 16, 2, 8)}
        prefill = jnp.broadcast_to(jnp.arange(6), (2, 6))
        logits, cache = compiled(decode, params, tokens[:, :6], cache, prefill)(
            params, tokens[:, :6], cache, prefill
        )
        got = [np.asarray(logits)]
        step = compiled(decode, params, tokens[:, :1], cache, prefill[:, :1])
        for s in range(6, 10):
            logits, cache = step(params, tokens[:, s : s + 1], cache, jnp.full((2, 1), s))
            got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-5, atol=1e-5)
