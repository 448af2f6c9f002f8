"""Multi-head attention with grouped-query / multi-query K/V heads and optional RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework import ops
from framework.nn.basic import fan_in_init, zeros
from framework.nn.checks import check_float, check_last_dim, check_rank
from framework.nn.param import Param
from framework.nn.rope import apply_rope
from framework.parallel.logical import constrain


def attention_spec(
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    bias: bool = False,
) -> dict:
    """Q [embed, heads, head_dim], K/V [embed, kv_heads, head_dim], O [heads, head_dim, embed]."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    head_dim = d_model // n_heads if head_dim is None else head_dim
    spec = {
        "q": {
            "kernel": Param(
                (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), fan_in_init
            )
        },
        "k": {
            "kernel": Param(
                (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), fan_in_init
            )
        },
        "v": {
            "kernel": Param(
                (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), fan_in_init
            )
        },
        "o": {
            "kernel": Param(
                (n_heads, head_dim, d_model),
                ("heads", "head_dim", "embed"),
                jax.nn.initializers.variance_scaling(
                    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
                ),
            )
        },
    }
    if bias:
        spec["q"]["bias"] = Param((n_heads, head_dim), ("heads", "head_dim"), zeros)
        spec["k"]["bias"] = Param((n_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)
        spec["v"]["bias"] = Param((n_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)
        spec["o"]["bias"] = Param((d_model,), ("embed",), zeros)
    return spec


def _project(p: dict, x: jax.Array) -> jax.Array:
    y = jnp.einsum("btd,dhk->bthk", x, p["kernel"].astype(x.dtype))
    return y + p["bias"].astype(y.dtype) if "bias" in p else y


def attention(
    params: dict,
    x: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rope_theta: float | None = None,
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Self-attention over x [batch, seq, d_model] -> [batch, seq, d_model].

    rope_theta=None means no rotary embedding (e.g. GPT-2's learned positions); positions
    default to 0..seq-1."""
    check_float(x)
    check_rank(x, 3, layout="batch, seq, d_model")
    check_last_dim(x, params["q"]["kernel"].shape[0])
    q, k, v = (_project(params[n], x) for n in ("q", "k", "v"))
    if rope_theta is not None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        q, k = apply_rope(q, positions, rope_theta), apply_rope(k, positions, rope_theta)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    out = ops.attention(q, k, v, causal=causal, segment_ids=segment_ids, mask=mask, impl=impl)
    y = jnp.einsum("bthk,hkd->btd", out, params["o"]["kernel"].astype(out.dtype))
    return y + params["o"]["bias"].astype(y.dtype) if "bias" in params["o"] else y
