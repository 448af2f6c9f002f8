"""`attention(q, k, v, ...)`: one entry point for every attention implementation.

Layout is [batch, seq, heads, head_dim]. K/V may have fewer heads than Q (grouped-query or
multi-query attention); the number of query heads must be a multiple of the K/V heads."""

from __future__ import annotations

import functools

import jax

from framework.ops import attention_dispatch, registry
from framework.ops.sharded import per_shard
from pallas_kernels import flash_attention as fa
from pallas_kernels._compat import target_device

# The plain-XLA impl is the kernel's reference itself, at the backend's default dot precision.
registry.register("attention", "xla", functools.partial(fa.attention_reference, precision=None))
causal_mask = fa.causal_mask  # the one causal rule, for layers that build masks (nn.masks)

# Per-shard layouts for kernels under a mesh: the sequence is gathered (causal masks need
# global positions); batch and heads stay split, and GQA groups never straddle a head shard.
_Q_AXES = ("batch", None, "heads", None)
_KV_AXES = ("batch", None, "kv_heads", None)
_SEG_AXES = ("batch", None)


def attention_pallas(
    q,
    k,
    v,
    *,
    causal=False,
    segment_ids=None,
    kv_segment_ids=None,
    mask=None,
    window=None,
    scale=None,
):
    """Flash attention (pallas_kernels.flash_attention); interpreted on CPU."""
    if mask is not None:
        raise ValueError(
            "attention impl=pallas takes causal/segment_ids, not an arbitrary "
            "mask; use impl=xla for that"
        )

    def run(q, k, v, seg, kv_seg):
        return fa.flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=seg,
            kv_segment_ids=kv_seg,
            window=window,
            scale=scale,
        )

    return per_shard(run, [_Q_AXES, _KV_AXES, _KV_AXES, _SEG_AXES, _SEG_AXES], _Q_AXES)(
        q, k, v, segment_ids, kv_segment_ids
    )


def attention_cudnn(
    q,
    k,
    v,
    *,
    causal=False,
    segment_ids=None,
    kv_segment_ids=None,
    mask=None,
    window=None,
    scale=None,
):
    """cuDNN fused attention through jax.nn.dot_product_attention (GPU only)."""
    if segment_ids is not None or kv_segment_ids is not None or mask is not None or window:
        raise ValueError(
            "attention impl=cudnn supports causal masking only (no segment_ids, "
            "window or mask); use impl=pallas or impl=xla"
        )

    def run(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
        )

    return per_shard(run, [_Q_AXES, _KV_AXES, _KV_AXES], _Q_AXES)(q, k, v)


def _choose(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, mask=None, window=None, **kw
) -> tuple[str, str]:
    """impl=auto: attention_dispatch's table for the device this is compiled for."""
    platform, kind = target_device()
    on_gpu = platform == "gpu"
    dtypes = {str(x.dtype) for x in (q, k, v)}
    call = attention_dispatch.Call(
        device_kind=kind if on_gpu else platform,
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        head_dim=q.shape[3],
        q_len=q.shape[1],
        kv_len=k.shape[1],
        causal=causal,
        segments=segment_ids is not None or kv_segment_ids is not None,
        mask=mask is not None or window is not None,  # cuDNN takes neither here
        pallas_ok=on_gpu
        and fa.supports(
            q,
            k,
            v,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            mask=mask,
            window=window,
            **kw,
        ),
        # cuDNN's own checks query the local CUDA device: not possible when lowering for an
        # abstract GPU from a host without one.
        cudnn_available=on_gpu
        and jax.default_backend() == "gpu"
        and kind.lower().startswith(("nvidia", "tesla")),
        on_gpu=on_gpu,
    )
    return attention_dispatch.choose(call, attention_dispatch.measured_entries())


registry.register("attention", "pallas", attention_pallas)
registry.register("attention", "cudnn", attention_cudnn)
registry.set_chooser("attention", _choose)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    segment_ids: [batch, q_len] ints; tokens attend only within their segment (packing,
    padding). kv_segment_ids defaults to segment_ids. mask: optional boolean broadcastable to
    [batch, heads, q_len, kv_len], True where attention is allowed. window (with causal):
    each query sees at most that many latest keys, itself included (sliding window). scale
    defaults to head_dim**-0.5.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects rank-4 q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: {q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads"
        )
    if window is not None and (not causal or window < 1):
        raise ValueError(f"attention: window={window} needs causal=True and window >= 1")
    window = fa.effective_window(window, k.shape[1])  # None if it masks nothing: cuDNN may run
    kwargs = dict(
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        window=window,
        scale=scale,
    )
    signature = (q.shape, k.shape, str(q.dtype), causal, segment_ids is not None, window)
    fn = registry.resolve("attention", impl, signature, q, k, v, **kwargs)
    return fn(q, k, v, **kwargs)
