"""Models by name: a config's `model.name` picks one of these and nothing else runs.

A model is four plain functions over plain data plus its config class:
  spec(cfg)                 -> tree of Param (the parameters)
  state_spec(cfg)           -> tree of Param (mutable state such as batch-norm statistics; {})
  apply(params, inputs, cfg, *, key=None, state=None) -> (outputs, new_state)
  loss(params, batch, cfg, *, key=None, state=None)   -> (scalar, {"metrics": {...}, "state": ...})
key=None means evaluation (no dropout, frozen statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import pydantic

from framework.nn.precision import Policy

DType = Literal["float32", "bfloat16", "float16"]


class ModelConfig(pydantic.BaseModel):
    """Fields every model shares: the mixed-precision policy."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    param_dtype: DType = pydantic.Field("float32", description="dtype parameters are stored in")
    compute_dtype: DType = pydantic.Field("float32", description="dtype of matmuls/activations")
    output_dtype: DType = pydantic.Field("float32", description="dtype of the model's outputs")

    @property
    def policy(self) -> Policy:
        return Policy(self.param_dtype, self.compute_dtype, self.output_dtype)


def _no_state(cfg: Any) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    config: type[ModelConfig]
    spec: Callable[..., Any]
    apply: Callable[..., Any]
    loss: Callable[..., Any]
    state_spec: Callable[..., Any] = _no_state
    # Training FLOPs per token given (cfg, seq_len), for MFU; None where not meaningful.
    flops_per_token: Callable[..., float] | None = None


REGISTRY: dict[str, Model] = {}


def register(model: Model) -> Model:
    if model.name in REGISTRY:
        raise ValueError(f"model {model.name!r} is already registered")
    REGISTRY[model.name] = model
    return model


def get(name: str) -> Model:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]
