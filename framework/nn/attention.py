"""Multi-head attention with grouped-query / multi-query K/V heads, optional RoPE, QK-norm and
a sliding window; `cached_attention` is the same layer over a KV cache (generation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from framework import ops
from framework.nn.basic import fan_in_init, low_rank, sub_key, zeros
from framework.nn.checks import check_float, check_last_dim, check_rank
from framework.nn.norm import rms_norm, rms_norm_spec
from framework.nn.param import Param
from framework.nn.rope import apply_rope
from framework.parallel.logical import constrain


def attention_spec(
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    bias: bool = False,
    *,
    qkv_bias: bool | None = None,
    qk_norm: bool = False,
) -> dict:
    """Q [embed, heads, head_dim], K/V [embed, kv_heads, head_dim], O [heads, head_dim, embed].

    qkv_bias (default `bias`) puts biases on q/k/v only (Qwen2); qk_norm adds an RMSNorm scale
    [head_dim] for q and for k, applied per head before RoPE (Qwen3)."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    head_dim = d_model // n_heads if head_dim is None else head_dim
    spec = {
        "q": {
            "kernel": Param(
                (d_model, n_heads, head_dim),
                ("embed", "heads", "head_dim"),
                fan_in_init,
                out_dims=2,
            )
        },
        "k": {
            "kernel": Param(
                (d_model, n_kv_heads, head_dim),
                ("embed", "kv_heads", "head_dim"),
                fan_in_init,
                out_dims=2,
            )
        },
        "v": {
            "kernel": Param(
                (d_model, n_kv_heads, head_dim),
                ("embed", "kv_heads", "head_dim"),
                fan_in_init,
                out_dims=2,
            )
        },
        "o": {
            "kernel": Param(
                (n_heads, head_dim, d_model),
                ("heads", "head_dim", "embed"),
                jax.nn.initializers.variance_scaling(
                    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
                ),
                out_dims=1,
            )
        },
    }
    if bias if qkv_bias is None else qkv_bias:
        spec["q"]["bias"] = Param((n_heads, head_dim), ("heads", "head_dim"), zeros)
        spec["k"]["bias"] = Param((n_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)
        spec["v"]["bias"] = Param((n_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)
    if bias:
        spec["o"]["bias"] = Param((d_model,), ("embed",), zeros)
    if qk_norm:
        spec["q_norm"] = rms_norm_spec(head_dim, axis="head_dim")
        spec["k_norm"] = rms_norm_spec(head_dim, axis="head_dim")
    return spec


def _project(p: dict, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("btd,dhk->bthk", x, p["kernel"].astype(x.dtype)) + low_rank(p, x, key)
    return y + p["bias"].astype(y.dtype) if "bias" in p else y


def _qkv(
    params: dict,
    x: jax.Array,
    positions: jax.Array | None,
    rope_theta: float | None,
    rope_scaling: Mapping[str, Any] | None,
    norm_eps: float,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [batch, seq, d_model] -> q [b, s, heads, hd], k and v [b, s, kv_heads, hd]: projected,
    QK-normed when the params have norms, rotated when rope_theta is set."""
    check_float(x)
    check_rank(x, 3, layout="batch, seq, d_model")
    check_last_dim(x, params["q"]["kernel"].shape[0])
    q, k, v = (_project(params[n], x, sub_key(key, i)) for i, n in enumerate(("q", "k", "v")))
    if "q_norm" in params:  # per head, over head_dim; XLA fuses it into the projection
        q = rms_norm(params["q_norm"], q, eps=norm_eps, impl="xla")
        k = rms_norm(params["k_norm"], k, eps=norm_eps, impl="xla")
    if rope_theta is not None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        q = apply_rope(q, positions, rope_theta, rope_scaling)
        k = apply_rope(k, positions, rope_theta, rope_scaling)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def _output(params: dict, out: jax.Array, key: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("bthk,hkd->btd", out, params["o"]["kernel"].astype(out.dtype))
    y = y + low_rank(params["o"], out, sub_key(key, 3))
    return y + params["o"]["bias"].astype(y.dtype) if "bias" in params["o"] else y


def attention(
    params: dict,
    x: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rope_theta: float | None = None,
    rope_scaling: Mapping[str, Any] | None = None,
    window: int | None = None,
    norm_eps: float = 1e-6,
    mask: jax.Array | None = None,
    impl: str = "auto",
    key: jax.Array | None = None,
) -> jax.Array:
    """Self-attention over x [batch, seq, d_model] -> [batch, seq, d_model].

    rope_theta=None means no rotary embedding (e.g. GPT-2's learned positions); positions
    default to 0..seq-1. window: each query sees at most that many latest keys, itself
    included (sliding-window attention); norm_eps is the QK-norm's epsilon; key: the LoRA
    adapters' dropout key (None: none)."""
    q, k, v = _qkv(params, x, positions, rope_theta, rope_scaling, norm_eps, key)
    out = ops.attention(
        q, k, v, causal=causal, segment_ids=segment_ids, mask=mask, window=window, impl=impl
    )
    return _output(params, out, key)


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [b, T, kv, hd] with new [b, s, kv, hd] written at rows start[b] .. start[b]+s-1."""
    update = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    return update(cache, new.astype(cache.dtype), start)


def cached_attention(
    params: dict,
    x: jax.Array,
    cache: dict,
    positions: jax.Array,
    *,
    rope_theta: float | None = None,
    rope_scaling: Mapping[str, Any] | None = None,
    window: int | None = None,
    norm_eps: float = 1e-6,
) -> tuple[jax.Array, dict]:
    """Causal self-attention of x [batch, seq, d_model] at `positions` [batch, seq] (each row
    contiguous) over a KV cache {"k", "v": [batch, length, kv_heads, head_dim]}: the new keys
    and values are written at their positions, then each query attends to the cached
    positions <= its own (and inside the window). Returns (output, updated cache)."""
    q, k, v = _qkv(params, x, positions, rope_theta, rope_scaling, norm_eps)
    start = positions[:, 0]
    cache = {"k": _write(cache["k"], k, start), "v": _write(cache["v"], v, start)}
    kv_pos = jnp.arange(cache["k"].shape[1])[None, None, None, :]
    q_pos = positions[:, None, :, None]
    allowed = kv_pos <= q_pos
    if window is not None:
        allowed = allowed & (kv_pos > q_pos - window)
    out = ops.attention(
        q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask=allowed, impl="xla"
    )
    return _output(params, out), cache
