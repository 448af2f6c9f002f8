"""`cross_entropy(logits, labels)`: per-example softmax cross-entropy (f32), optional z-loss."""

from __future__ import annotations

import functools

import jax

from framework.ops import registry
from framework.ops.sharded import per_shard
from pallas_kernels import cross_entropy as ce
from pallas_kernels._compat import on_gpu

# The plain-XLA impls are the kernels' references; linear_cross_entropy's keeps the full
# logits in h's dtype (w cast to it), halving that buffer for bf16 activations.
registry.register("cross_entropy", "xla", ce.cross_entropy_reference)
registry.register(
    "linear_cross_entropy",
    "xla",
    functools.partial(ce.linear_cross_entropy_reference, f32_logits=False),
)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, z_loss: float = 0.0, impl: str = "auto"
) -> jax.Array:
    """Loss per position: logsumexp(logits) - logits[label] (+ z_loss * logsumexp**2).

    logits: [..., vocab]; labels: [...] integer class ids. Returns f32 [...]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} and labels {labels.shape} "
            "disagree on the leading dimensions"
        )
    fn = registry.resolve(
        "cross_entropy", impl, (logits.shape, str(logits.dtype)), logits, labels, z_loss=z_loss
    )
    return fn(logits, labels, z_loss=z_loss)


def linear_cross_entropy_chunked(h, w, labels, *, z_loss=0.0):
    """Plain-jnp scan over token chunks with its own backward: no full logits, any backend."""
    return _per_token_shards(
        lambda h, w, y: ce.linear_cross_entropy_chunked(h, w, y, z_loss=z_loss), h, w, labels
    )


def linear_cross_entropy_pallas(h, w, labels, *, z_loss=0.0):
    """Fused Pallas kernel over (tokens x vocab) tiles with an online logsumexp."""
    return _per_token_shards(
        lambda h, w, y: ce.linear_cross_entropy(h, w, y, z_loss=z_loss), h, w, labels
    )


def _per_token_shards(fn, h, w, labels):
    """Under a mesh: tokens stay split over the batch axes, the unembedding is gathered."""
    lead = ("batch", "seq")[: labels.ndim] if labels.ndim <= 2 else (None,) * labels.ndim
    return per_shard(fn, [(*lead, None), None, lead], lead)(h, w, labels)


def _ce_pallas_ok(h, w, labels, **_):
    return on_gpu() and ce.supports(h, w, labels)


registry.register("linear_cross_entropy", "chunked", linear_cross_entropy_chunked)
registry.register(
    "linear_cross_entropy", "pallas", linear_cross_entropy_pallas, auto_if=_ce_pallas_ok
)


def linear_cross_entropy(
    h: jax.Array, w: jax.Array, labels: jax.Array, *, z_loss: float = 0.0, impl: str = "auto"
) -> jax.Array:
    """cross_entropy(h @ w, labels) per position; `chunked` and `pallas` never hold the full
    f32 logits. h: [..., d]; w: [d, vocab]; labels: [...] ints. Returns f32 [...]."""
    if h.shape[:-1] != labels.shape or w.ndim != 2 or h.shape[-1] != w.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: h {h.shape}, w {w.shape}, labels "
            f"{labels.shape} must be [..., d], [d, vocab], [...]"
        )
    fn = registry.resolve(
        "linear_cross_entropy", impl, (h.shape, w.shape, str(h.dtype)), h, w, labels, z_loss=z_loss
    )
    return fn(h, w, labels, z_loss=z_loss)
