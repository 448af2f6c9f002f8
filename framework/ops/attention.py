"""`attention(q, k, v, ...)`: one entry point for every attention implementation.

Layout is [batch, seq, heads, head_dim]. K/V may have fewer heads than Q (grouped-query or
multi-query attention); the number of query heads must be a multiple of the K/V heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework.ops import registry
from framework.ops.sharded import per_shard

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def _mask(causal: bool, q_len: int, kv_len: int, q_segment_ids, kv_segment_ids, mask):
    """Boolean [batch|1, 1, q, kv] mask (True = attend) combining the requested masks."""
    allowed = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    if causal:
        # Queries are aligned to the end of the keys, so a KV cache (kv_len > q_len) works.
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        allowed = allowed & (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        allowed = allowed & (q_segment_ids[:, None, :, None] == kv_seg[:, None, None, :])
    if mask is not None:
        allowed = allowed & mask
    return allowed


def attention_xla(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, mask=None, scale=None
):
    """Reference attention in plain jax.numpy: f32 softmax, output in q's dtype."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = h // kh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = _mask(causal, t, s, segment_ids, kv_segment_ids, mask)  # [b|1, 1|h, t, s]
    allowed = (
        allowed.reshape(allowed.shape[0], -1, 1, t, s)
        if allowed.shape[1] == 1
        else allowed.reshape(allowed.shape[0], kh, groups, t, s)
    )
    logits = jnp.where(allowed, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allowed.any(axis=-1, keepdims=True), probs, 0.0)  # fully masked rows -> 0
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(b, t, h, d).astype(q.dtype)


registry.register("attention", "xla", attention_xla)

# Per-shard layouts for kernels under a mesh: the sequence is gathered (causal masks need
# global positions); batch and heads stay split, and GQA groups never straddle a head shard.
_Q_AXES = ("batch", None, "heads", None)
_KV_AXES = ("batch", None, "kv_heads", None)
_SEG_AXES = ("batch", None)


def attention_pallas(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, mask=None, scale=None
):
    """Flash attention (pallas_kernels.flash_attention); interpreted on CPU."""
    from pallas_kernels.flash_attention import flash_attention

    if mask is not None:
        raise ValueError(
            "attention impl=pallas takes causal/segment_ids, not an arbitrary "
            "mask; use impl=xla for that"
        )

    def run(q, k, v, seg, kv_seg):
        return flash_attention(
            q, k, v, causal=causal, segment_ids=seg, kv_segment_ids=kv_seg, scale=scale
        )

    return per_shard(run, [_Q_AXES, _KV_AXES, _KV_AXES, _SEG_AXES, _SEG_AXES], _Q_AXES)(
        q, k, v, segment_ids, kv_segment_ids
    )


def attention_cudnn(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, mask=None, scale=None
):
    """cuDNN fused attention through jax.nn.dot_product_attention (GPU only)."""
    if segment_ids is not None or kv_segment_ids is not None or mask is not None:
        raise ValueError(
            "attention impl=cudnn supports causal masking only (no segment_ids "
            "or mask); use impl=pallas or impl=xla"
        )

    def run(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
        )

    return per_shard(run, [_Q_AXES, _KV_AXES, _KV_AXES], _Q_AXES)(q, k, v)


def _pallas_ok(q, k, v, **kw):
    from pallas_kernels.flash_attention import supports

    return jax.default_backend() == "gpu" and supports(q, k, v, **kw)


registry.register("attention", "pallas", attention_pallas, auto_if=_pallas_ok)
registry.register("attention", "cudnn", attention_cudnn)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    segment_ids: [batch, q_len] ints; tokens attend only within their segment (packing,
    padding). kv_segment_ids defaults to segment_ids. mask: optional boolean broadcastable to
    [batch, heads, q_len, kv_len], True where attention is allowed. scale defaults to
    head_dim**-0.5.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects rank-4 q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: {q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads"
        )
    kwargs = dict(
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        scale=scale,
    )
    signature = (q.shape, k.shape, str(q.dtype), causal, segment_ids is not None)
    fn = registry.resolve("attention", impl, signature, q, k, v, **kwargs)
    return fn(q, k, v, **kwargs)
