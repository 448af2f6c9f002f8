"""What every classifier shares: the number of classes taken from (or checked against) the
data, and the loss, mean softmax cross-entropy plus accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import pydantic

from framework import ops
from framework.errors import ConfigError
from framework.models.registry import ModelConfig, data_kind_error
from framework.nn.checks import check_int


class ClassifierConfig(ModelConfig):
    """A model over classification data: `num_classes` comes from the data unless set."""

    num_classes: int | None = pydantic.Field(
        None, gt=1, description="output classes (logits); null = the data's number of classes"
    )

    def unset(self) -> list[str]:
        return ["num_classes"] if self.num_classes is None else []

    def for_data(self, meta: Mapping[str, Any]) -> ClassifierConfig:
        if meta.get("kind") != "classification":
            raise data_kind_error(self, "classification", meta)
        classes = meta["num_classes"]
        if self.num_classes is None:
            return self.model_copy(update={"num_classes": classes})
        if self.num_classes < classes:
            raise ConfigError(
                f"model.num_classes ({self.num_classes}) is smaller than the data's {classes} "
                "classes; raise it or leave it unset to take the data's"
            )
        return self


def classifier_loss(apply: Callable[..., Any]) -> Callable[..., Any]:
    """A model `loss` for `apply` over batch["inputs"] and integer batch["labels"] [batch]: the mean
    cross-entropy, with accuracy as a metric and the example count as aux["weight"]."""

    def loss(
        params: dict, batch: dict, cfg: Any, *, key: jax.Array | None = None, state: Any = None
    ) -> tuple[jax.Array, dict]:
        labels = batch["labels"]
        check_int(labels, "labels")
        logits, state = apply(params, batch["inputs"], cfg, key=key, state=state)
        mean_loss = jnp.mean(ops.cross_entropy(logits, labels))
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        aux = {"metrics": {"accuracy": accuracy}, "weight": labels.shape[0], "state": state}
        return mean_loss, aux

    return loss
