"""MLP classifier: flattened inputs -> ReLU hidden layers (with dropout) -> class logits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import jax
import pydantic

from framework.errors import ConfigError, ShapeError
from framework.models.classifier import ClassifierConfig, classifier_loss
from framework.models.registry import Model, register
from framework.nn.basic import dropout, linear, linear_spec
from framework.nn.checks import check_float, scope


class MLPConfig(ClassifierConfig):
    """Sizes of an MLP classifier; every layer but the last is followed by ReLU and dropout."""

    name: Literal["mlp"] = pydantic.Field("mlp", description="model family; selects this model")
    input_dim: int | None = pydantic.Field(
        None, gt=0, description="features per example (flattened); null = from the data's shape"
    )
    hidden: list[Annotated[int, pydantic.Field(gt=0)]] = pydantic.Field(
        default_factory=lambda: [128, 128], description="width of each hidden layer, in order"
    )
    dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0, description="dropout rate after each hidden activation (training)"
    )

    def unset(self) -> list[str]:
        return super().unset() + (["input_dim"] if self.input_dim is None else [])

    def for_data(self, meta: Mapping[str, Any]) -> MLPConfig:
        """Classes as any classifier; input_dim is the data's flattened example size."""
        cfg = super().for_data(meta)
        shape = meta.get("input_shape")
        if shape is None:
            return cfg
        features = math.prod(shape)
        if cfg.input_dim is None:
            return cfg.model_copy(update={"input_dim": features})
        if cfg.input_dim != features:
            raise ConfigError(
                f"model.input_dim ({cfg.input_dim}) does not match the data's examples of shape "
                f"{list(shape)} ({features} features); set it to {features} or leave it unset"
            )
        return cfg


def spec(cfg: MLPConfig) -> dict:
    """One linear layer per hidden width plus the classifier head, named layer_0 ... layer_n."""
    dims = [cfg.input_dim, *cfg.hidden, cfg.num_classes]
    layers = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        axes = (None if i == 0 else "mlp", None if i == len(dims) - 2 else "mlp")
        layers[f"layer_{i}"] = linear_spec(d_in, d_out, axes)
    return layers


def apply(
    params: dict,
    inputs: jax.Array,
    cfg: MLPConfig,
    *,
    key: jax.Array | None = None,
    state: Any = None,
) -> tuple[jax.Array, Any]:
    """[batch, input_dim] (or [batch, ...] flattened) floats -> ([batch, classes] logits, state).

    Params and inputs are cast to the compute dtype; logits come back in the output dtype.
    key=None is evaluation (no dropout). The MLP has no state; `state` is returned as given."""
    check_float(inputs)
    if inputs.ndim < 2:
        raise ShapeError(
            f"input must have rank >= 2 (batch, features...), got shape {tuple(inputs.shape)}"
        )
    policy = cfg.policy
    x = policy.cast_to_compute(inputs.reshape(inputs.shape[0], -1))
    params = policy.cast_to_compute(params)
    n = len(cfg.hidden) + 1
    for i in range(n):
        with scope(f"layer_{i}"):
            x = linear(params[f"layer_{i}"], x)
        if i < n - 1:
            x = jax.nn.relu(x)
            x = dropout(x, cfg.dropout, None if key is None else jax.random.fold_in(key, i))
    return policy.cast_to_output(x), state


loss = classifier_loss(apply)


MODEL = register(Model(name="mlp", config=MLPConfig, spec=spec, apply=apply, loss=loss))
spec = MODEL.spec  # the registered spec: Params in cfg.param_dtype
