"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), in that
order (as transformers applies them). Everything is jittable; filtered-out tokens get -inf."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from framework.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens: temperature 0 = greedy; top_k / top_p None = no such filter."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def filtered(self) -> bool:
        """Whether a top-k or top-p filter applies (a sort of the vocabulary per step)."""
        return self.top_k is not None or self.top_p is not None


def filter_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """f32 logits / temperature, then top-k, then top-p over the renormalized survivors (as
    transformers does); -inf where filtered out. Values may be traced (one compile for all)."""
    x = logits.astype(jnp.float32) / temperature
    if top_k is None and top_p is None:
        return x
    order = jnp.argsort(-x, axis=-1, stable=True)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape)
    keep = jnp.ones(x.shape, bool) if top_k is None else rank < top_k
    if top_p is not None:
        probs = jax.nn.softmax(jnp.where(keep, sorted_x, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = keep & (before < top_p)
    keep = keep | (rank == 0)
    keep = jnp.put_along_axis(jnp.zeros_like(keep), order, keep, axis=-1, inplace=False)
    return jnp.where(keep, x, -jnp.inf)


def row_keys(key: jax.Array, step: int | jax.Array, rows: int) -> jax.Array:
    """One key per row for one step: a row's draws do not depend on the rest of the batch."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(rows))


def sample(
    logits: jax.Array,
    keys: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Next token per row of logits [batch, vocab] (int32 [batch]); `keys` [batch] one per row.
    temperature 0 (possibly traced) takes the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(temperature, int | float) and temperature == 0:
        return greedy
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    x = filter_logits(logits, temperature=safe_t, top_k=top_k, top_p=top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
