"""Text sampling from a trained language model: a jitted fixed-shape forward per token over a
sliding window (no KV cache; meant for short end-of-run samples, not serving)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from framework.models.registry import Model, ModelConfig


def sample_tokens(
    model: Model,
    params,
    mcfg: ModelConfig,
    prompt: list[int],
    n: int,
    *,
    window: int,
    temperature: float = 0.8,
    key: jax.Array,
) -> list[int]:
    """Append `n` sampled tokens to `prompt`; the model sees at most the last `window`."""

    @jax.jit
    def next_token(params, buf, last, key):
        logits, _ = model.apply(params, buf[None], mcfg)
        return jax.random.categorical(key, logits[0, last].astype(jnp.float32) / temperature)

    tokens = list(prompt) or [0]
    for i in range(n):
        ctx = tokens[-window:]
        buf = np.zeros(window, np.int32)
        buf[: len(ctx)] = ctx
        tokens.append(int(next_token(params, buf, len(ctx) - 1, jax.random.fold_in(key, i))))
    return tokens
