"""MLP classifier: flattened inputs -> ReLU hidden layers (with dropout) -> class logits."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import jax
import pydantic

from framework.models.classifier import classifier_loss
from framework.models.registry import Model, ModelConfig, register
from framework.nn.basic import dropout, linear, linear_spec
from framework.nn.errors import ShapeError, check_float, scope
from framework.nn.param import is_param


class MLPConfig(ModelConfig):
    """Sizes of an MLP classifier; every layer but the last is followed by ReLU and dropout."""

    name: Literal["mlp"] = pydantic.Field("mlp", description="model family; selects this model")
    input_dim: int = pydantic.Field(
        gt=0, description="features per example (images are flattened to this many)"
    )
    hidden: list[Annotated[int, pydantic.Field(gt=0)]] = pydantic.Field(
        default_factory=lambda: [128, 128], description="width of each hidden layer, in order"
    )
    num_classes: int = pydantic.Field(gt=1, description="number of output classes (logits)")
    dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0, description="dropout rate after each hidden activation (training)"
    )


def _with_param_dtype(spec: Any, dtype: Any) -> Any:
    """Store every Param of the tree in the policy's parameter dtype."""
    return jax.tree.map(lambda p: dataclasses.replace(p, dtype=dtype), spec, is_leaf=is_param)


def spec(cfg: MLPConfig) -> dict:
    """One linear layer per hidden width plus the classifier head, named layer_0 ... layer_n."""
    dims = [cfg.input_dim, *cfg.hidden, cfg.num_classes]
    layers = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        axes = (None if i == 0 else "mlp", None if i == len(dims) - 2 else "mlp")
        layers[f"layer_{i}"] = linear_spec(d_in, d_out, axes)
    return _with_param_dtype(layers, cfg.policy.param_dtype)


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
