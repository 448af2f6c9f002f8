"""Rotary position embeddings (rotate-half convention) for [batch, seq, heads, head_dim], with
the frequency scalings long-context checkpoints use (`linear`, Llama 3's `llama3`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCALING_TYPES = ("linear", "llama3")


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (f32): theta**(-2i/d), rescaled as `scaling` says.

    scaling: {"type": "linear", "factor": f} divides every frequency by f (positions / f);
    {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} divides the low frequencies by `factor`, keeps the high
    ones and interpolates between (Llama 3.1's published rule)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if not scaling:
        return inv_freq
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"unknown rope scaling type {kind!r}; expected one of {SCALING_TYPES}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Rotate pairs (i, i + d/2) of the head dimension by angle position * frequency_i.

    x: [batch, seq, heads, head_dim] (head_dim even); positions: [batch, seq] ints."""
    inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling))
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, d/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
