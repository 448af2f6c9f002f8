"""Models by name: a config's `model.name` picks one of these and nothing else runs.

A model is four plain functions over plain data plus its config class:
  spec(cfg)                 -> tree of Param (the parameters)
  state_spec(cfg)           -> tree of Param (mutable state such as batch-norm statistics; {})
  apply(params, inputs, cfg, *, key=None, state=None) -> (outputs, new_state)
  loss(params, batch, cfg, *, key=None, state=None)
      -> (mean loss, {"metrics": {...}, "weight": items counted, "state": ...})
key=None means evaluation (no dropout, frozen statistics).

Precision is applied here, once for every model: `register` stores each Param of `spec` in
the config's `param_dtype`, so a model declares shapes, axes and initializers only. Models
cast params and activations to `compute_dtype` at apply time and return outputs in
`output_dtype` (`cfg.policy`). What a model takes from the data (vocabulary, classes, input
shape) it fills in and checks itself in `ModelConfig.for_data`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self

import jax
import pydantic

from framework.errors import ConfigError
from framework.nn.param import is_param
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

    def for_data(self, meta: Mapping[str, Any]) -> Self:
        """This config fitted to the data's metadata (see `framework.data.make_loaders`):
        fields left unset (None) that the data decides are filled in, and a mismatch is a
        ConfigError naming the key. The default accepts any data."""
        return self

    def unset(self) -> list[str]:
        """Fields still None that `for_data` fills in (they must be set before `spec`)."""
        return []


def data_kind_error(cfg: ModelConfig, needs: str, meta: Mapping[str, Any]) -> ConfigError:
    """The one-line error for a model given data of the wrong kind."""
    has = "token" if meta.get("kind") == "lm" else "classification"
    return ConfigError(
        f"model.name={cfg.name!r} needs {needs} data, but data.source gives {has} data"
    )


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
    # Model FLOPs per trained token given (cfg, seq_len), for MFU; None where not meaningful.
    flops_per_token: Callable[..., float] | None = None
    # params -> bool tree of the leaves training updates (None: all); the rest is frozen: not
    # differentiated, no optimizer state (LoRA, framework.finetune).
    trainable: Callable[[Any], Any] | None = None


def _in_param_dtype(spec: Callable[..., Any]) -> Callable[..., Any]:
    """`spec` with every Param stored in the config's param_dtype."""

    @functools.wraps(spec)
    def wrapped(cfg: ModelConfig) -> Any:
        unset = cfg.unset()
        if unset:
            raise ConfigError(
                f"model.{unset[0]} is not set: it comes from the data (build the run with "
                "framework.train.build, or set it in the config)"
            )
        dtype = cfg.policy.param_dtype
        tree = spec(cfg)
        return jax.tree.map(lambda p: dataclasses.replace(p, dtype=dtype), tree, is_leaf=is_param)

    return wrapped


REGISTRY: dict[str, Model] = {}


def register(model: Model) -> Model:
    """Add a model under its name; the registered `spec` applies the precision policy."""
    if model.name in REGISTRY:
        raise ValueError(f"model {model.name!r} is already registered")
    model = dataclasses.replace(model, spec=_in_param_dtype(model.spec))
    REGISTRY[model.name] = model
    return model


def get(name: str) -> Model:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]
