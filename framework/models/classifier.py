"""The loss shared by every classifier: mean softmax cross-entropy plus accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from framework import ops
from framework.nn.errors import check_int


def classifier_loss(apply: Callable[..., Any]) -> Callable[..., Any]:
    """A model `loss` for `apply` over batch["inputs"] and integer batch["labels"] [batch]."""

    def loss(
        params: dict, batch: dict, cfg: Any, *, key: jax.Array | None = None, state: Any = None
    ) -> tuple[jax.Array, dict]:
        labels = batch["labels"]
        check_int(labels, "labels")
        logits, state = apply(params, batch["inputs"], cfg, key=key, state=state)
        mean_loss = jnp.mean(ops.cross_entropy(logits, labels))
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return mean_loss, {"metrics": {"loss": mean_loss, "accuracy": accuracy}, "state": state}

    return loss
