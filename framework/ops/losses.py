"""`cross_entropy(logits, labels)`: per-example softmax cross-entropy (f32), optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework.ops import registry


def cross_entropy_xla(logits, labels, *, z_loss=0.0):
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = lse - label_logit
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    return loss


registry.register("cross_entropy", "xla", cross_entropy_xla)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, z_loss: float = 0.0,
                  impl: str = "auto") -> jax.Array:
    """Loss per position: logsumexp(logits) - logits[label] (+ z_loss * logsumexp**2).

    logits: [..., vocab]; labels: [...] integer class ids. Returns f32 [...]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} and labels {labels.shape} "
                         "disagree on the leading dimensions")
    fn = registry.resolve("cross_entropy", impl, (logits.shape, str(logits.dtype)),
                          logits, labels, z_loss=z_loss)
    return fn(logits, labels, z_loss=z_loss)
