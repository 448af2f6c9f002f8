"""`attention(q, k, v, ...)`: one entry point for every attention implementation.

Layout is [batch, seq, heads, head_dim]. K/V may have fewer heads than Q (grouped-query or
multi-query attention); the number of query heads must be a multiple of the K/V heads."""

from __future__ import annotations

import functools

import jax

from framework.ops import attention_dispatch, registry
from framework.ops.sharded import per_shard
from pallas_kernels import flash_attention as fa
from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels._compat import target_device

# The plain-XLA impl is the kernel's reference itself, at the backend's default dot precision.
registry.register("attention", "xla", functools.partial(fa.attention_reference, precision=None))
causal_mask = fa.causal_mask  # the one causal rule, for layers that build masks (nn.masks)

# Per-shard layouts for kernels under a mesh: the sequence is gathered (causal masks need
# global positions); batch and heads stay split, and GQA groups never straddle a head shard.
_Q_AXES = ("batch", None, "heads", None)
_KV_AXES = ("batch", None, "kv_heads", None)
_SEG_AXES = ("batch", None)


def _per_shard(kernel, q, k, v, segment_ids, kv_segment_ids, **options):
    """kernel(q, k, v, segment_ids=, kv_segment_ids=, **options) per shard under a mesh."""

    def run(q, k, v, seg, kv_seg):
        return kernel(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg, **options)

    return per_shard(run, [_Q_AXES, _KV_AXES, _KV_AXES, _SEG_AXES, _SEG_AXES], _Q_AXES)(
        q, k, v, segment_ids, kv_segment_ids
    )


def _triton(q, k, v, *, causal, segment_ids, kv_segment_ids, window, scale):
    """The Triton-backend Pallas kernel, per shard under a mesh; interpreted on CPU."""
    return _per_shard(
        fa.flash_attention, q, k, v, segment_ids, kv_segment_ids,
        causal=causal, window=window, scale=scale,
    )  # fmt: skip


def _mosaic(q, k, v, *, causal, segment_ids, kv_segment_ids, scale):
    """The Mosaic GPU kernels (Hopper), per shard under a mesh; interpreted on a CPU target."""
    return _per_shard(
        mgpu.flash_attention, q, k, v, segment_ids, kv_segment_ids,
        causal=causal, scale=scale, interpret=target_device()[0] != "gpu",
    )  # fmt: skip


_mosaic_warned = False  # the Mosaic GPU kernels' absence is logged once per process


def mosaic_problem(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, window=None):
    """None if `pallas` and `auto` may run the Mosaic GPU kernels for this call: compiling for a
    Hopper GPU, this jax has the Mosaic GPU API and the kernels take the call; else why not.
    On Hopper with a jax lacking the API, that is logged once per process (a warning)."""
    global _mosaic_warned
    platform, kind = target_device()
    if platform != "gpu" or attention_dispatch.generation(kind) != "hopper":
        return f"{kind if platform == 'gpu' else platform}: Mosaic GPU kernels are for Hopper"
    reason = mgpu.available()
    if reason is not None:
        if not _mosaic_warned:
            _mosaic_warned = True
            registry.log.warning(
                "ops.attention: Mosaic GPU kernels unavailable on %s (%s); attention "
                "impl=pallas uses the Triton kernel instead, impl=auto cuDNN or Triton",
                kind,
                reason,
            )
        return reason
    return mgpu.unsupported(
        q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask, window=window
    )


def attention_triton(
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
    """Flash attention on the Triton backend (pallas_kernels.flash_attention); interpreted on
    CPU."""
    if mask is not None:
        raise ValueError(
            "attention impl=triton/pallas takes causal/segment_ids, not an arbitrary "
            "mask; use impl=xla for that"
        )
    return _triton(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        window=window,
        scale=scale,
    )


def attention_mosaic(
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
    """Flash attention on the Mosaic GPU kernels (pallas_kernels.flash_attention_mgpu) for
    Hopper; interpreted on CPU (slow). One-line error where unavailable or unsupported."""
    platform, kind = target_device()
    problem = mgpu.available()
    if problem is None and platform == "gpu" and attention_dispatch.generation(kind) != "hopper":
        problem = f"the kernels are for Hopper (sm90), not {kind}"
    problem = problem or mgpu.unsupported(
        q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask, window=window
    )
    if problem:
        raise ValueError(f"attention impl=mosaic: {problem}; use impl=triton, cudnn or xla")
    return _mosaic(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale
    )


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
    """The Pallas kernel for the target: Mosaic GPU on Hopper where available and it takes the
    call, else Triton (interpreted on CPU)."""
    if mask is not None:
        raise ValueError(
            "attention impl=pallas takes causal/segment_ids, not an arbitrary "
            "mask; use impl=xla for that"
        )
    segments = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    if mosaic_problem(q, k, v, window=window, **segments) is None:
        return _mosaic(q, k, v, causal=causal, scale=scale, **segments)
    return _triton(q, k, v, causal=causal, window=window, scale=scale, **segments)


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
            "window or mask); use impl=pallas, triton or xla"
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
        triton_ok=on_gpu
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
        mosaic_ok=on_gpu
        and mosaic_problem(
            q,
            k,
            v,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            mask=mask,
            window=window,
        )
        is None,
    )
    return attention_dispatch.choose(call, attention_dispatch.measured_entries())


registry.register("attention", "pallas", attention_pallas)
registry.register("attention", "triton", attention_triton)
registry.register("attention", "mosaic", attention_mosaic)
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
