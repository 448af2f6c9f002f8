"""Mask helpers: attention takes `causal=` and `segment_ids=` directly; these build the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The one causal mask (queries aligned to the end of the keys), shared with the kernels.
from framework.ops.attention import causal_mask

__all__ = ["causal_mask", "padding_mask", "segment_positions"]


def padding_mask(valid: jax.Array) -> jax.Array:
    """[batch, kv_len] bool (True = real token) -> [batch, 1, 1, kv_len] attention mask."""
    return valid.astype(bool)[:, None, None, :]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment (restarts at 0 where the id changes)."""
    seq = segment_ids.shape[-1]
    idx = jnp.arange(seq)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
    return idx - start_idx
