"""The end-of-run text sample: a thin wrapper over `framework.generate` (KV cache, one jitted
decode step per token), restarting from the last half of the context when the sample is longer
than the context the model was trained on."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from framework.errors import ConfigError
from framework.generate import generate_long
from framework.models.registry import Model, ModelConfig
from framework.models.transformer import TransformerConfig

log = logging.getLogger(__name__)


def sample_tokens(
    model: Model,
    params: Any,
    mcfg: ModelConfig,
    prompt: list[int],
    n: int,
    *,
    window: int,
    temperature: float = 0.8,
    key: jax.Array,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """`prompt` (or [0] if empty) followed by `n` sampled tokens; the model sees at most the
    last `window` tokens (the trained sequence length); sampling stops after `eos_id`. Prompt
    ids outside the model's vocabulary (a byte prompt for a synthetic-token model) are left out
    of what it sees."""
    if not isinstance(mcfg, TransformerConfig):
        raise ConfigError(f"sampling needs a transformer model, not model.name={model.name!r}")
    tokens = list(prompt) or [0]
    known = [t for t in tokens if 0 <= t < mcfg.vocab_size]
    if len(known) < len(tokens):
        log.warning(
            "sample prompt: %d of %d token ids are outside the vocabulary [0, %d); left out",
            len(tokens) - len(known),
            len(tokens),
            mcfg.vocab_size,
        )
    new = generate_long(
        params,
        mcfg,
        known or [0],
        max_new_tokens=n,
        context=window,
        temperature=temperature,
        key=key,
        mesh=mesh,
        rules=rules,
        eos_id=eos_id if eos_id is not None and eos_id < mcfg.vocab_size else None,
    )
    return tokens + new
