"""LoRA as a transformation of the parameter tree: each targeted projection kernel W gets
sibling leaves `lora_a` [*layers, *in, r], `lora_b` [*layers, r, *out], `lora_scale`
(alpha / r) and, with dropout, `lora_dropout` (its rate); the projection layers (nn.linear,
attention's q/k/v/o) add scale * (dropout(x) @ lora_a) @ lora_b to x @ W. Adapters are
declared as `Param`s (logical axes of the kernel's in/out dims, so they shard like it; A
uniform in +-1/sqrt(fan_in) as in PEFT, B zero), initialized, sharded and checkpointed like
every parameter. Only `lora_a`/`lora_b` train: the train step differentiates them alone and
the optimizer keeps state for them alone."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import pydantic

from framework.errors import ConfigError
from framework.models.registry import Model
from framework.nn.param import Param, is_param

TRAINED = ("lora_a", "lora_b")
SCALE = "lora_scale"
DROPOUT = "lora_dropout"  # present only with finetune.lora.dropout > 0
ADAPTER_LEAVES = (*TRAINED, SCALE, DROPOUT)


class LoraConfig(pydantic.BaseModel):
    """Low-rank adapters on projection kernels; the base parameters are frozen."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    rank: int = pydantic.Field(8, gt=0, description="adapter rank r")
    alpha: float = pydantic.Field(16.0, gt=0, description="adapter scale is alpha / rank")
    dropout: float = pydantic.Field(
        0.0, ge=0, lt=1, description="dropout on the adapters' input while training (PEFT's)"
    )
    targets: tuple[str, ...] = pydantic.Field(
        ("blocks/attn/(q|k|v|o)/kernel",),
        min_length=1,
        description="regexes matched against whole '/'-joined parameter paths (e.g. "
        "blocks/attn/q/kernel, blocks/mlp/(up|gate|down)/kernel); each must match a projection",
    )

    @pydantic.field_validator("targets")
    @classmethod
    def _compiles(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return targets


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _uniform_fan_in(stacked: int):
    """PEFT's A init (kaiming-uniform, a=sqrt(5)): uniform in +-1/sqrt(fan_in), fan_in the
    product of the dims between the stacked ones and the rank."""

    def init(key, shape, dtype):
        bound = 1.0 / math.sqrt(math.prod(shape[stacked:-1]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _adapters(kernel: Param, path: str, cfg: LoraConfig) -> dict[str, Param]:
    """lora_a, lora_b and lora_scale Params for one projection kernel."""
    if kernel.out_dims is None:
        raise ConfigError(
            f"finetune.lora.targets: {path} is not a projection kernel LoRA can adapt "
            "(only nn.linear and attention q/k/v/o kernels)"
        )
    s, o = kernel.stacked, kernel.ndim - kernel.out_dims
    stack_shape, in_shape, out_shape = kernel.shape[:s], kernel.shape[s:o], kernel.shape[o:]
    stack_axes, in_axes, out_axes = kernel.axes[:s], kernel.axes[s:o], kernel.axes[o:]
    smaller = min(math.prod(in_shape), math.prod(out_shape))
    if cfg.rank > smaller:
        raise ConfigError(
            f"finetune.lora.rank={cfg.rank} exceeds the smaller dimension ({smaller}) of {path} "
            f"{kernel.shape}"
        )
    r, f32, init = cfg.rank, jnp.float32, jax.nn.initializers
    rate = {DROPOUT: Param(stack_shape, stack_axes, init.constant(cfg.dropout), f32)}
    return (rate if cfg.dropout else {}) | {
        "lora_a": Param(
            (*stack_shape, *in_shape, r), (*stack_axes, *in_axes, None), _uniform_fan_in(s), f32
        ),
        "lora_b": Param(
            (*stack_shape, r, *out_shape), (*stack_axes, None, *out_axes), init.zeros, f32
        ),
        SCALE: Param(stack_shape, stack_axes, init.constant(cfg.alpha / r), f32),
    }


def add_adapters(spec: Any, cfg: LoraConfig) -> Any:
    """The spec tree with adapters beside every kernel a target matches (ConfigError for a
    target that matches nothing, a leaf that is not a projection, a rank that is too big)."""
    leaves = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_param)[0]
    paths = {_path(p): leaf for p, leaf in leaves if is_param(leaf)}
    chosen: dict[str, Param] = {}
    for pattern in cfg.targets:
        hits = [p for p in paths if re.fullmatch(pattern, p)]
        if not hits:
            kernels = sorted(p for p, leaf in paths.items() if leaf.out_dims is not None)
            raise ConfigError(
                f"finetune.lora.targets: {pattern!r} matches no parameter; projection kernels "
                f"are {', '.join(kernels[:12])}{' ...' if len(kernels) > 12 else ''}"
            )
        chosen.update((p, paths[p]) for p in hits)

    def add(tree: Any, prefix: str) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {k: add(v, f"{prefix}{k}/") for k, v in tree.items()}
        for name, leaf in tree.items():
            if f"{prefix}{name}" in chosen:
                out.update(_adapters(leaf, f"{prefix}{name}", cfg))
        return out

    return add(spec, "")


def trainable(params: Any) -> Any:
    """True at the leaves a LoRA run trains (lora_a, lora_b), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")) in TRAINED, params
    )


def wrap(model: Model, cfg: LoraConfig) -> Model:
    """`model` whose spec carries adapters and whose trainable leaves are the adapters; its
    apply and loss are the model's own (the layers honour adapters in the tree)."""
    spec = model.spec

    def lora_spec(mcfg: Any) -> Any:
        return add_adapters(spec(mcfg), cfg)

    return dataclasses.replace(model, spec=lora_spec, trainable=trainable)


def strip(tree: Any) -> Any:
    """The tree without adapter leaves (the base model's tree)."""
    if not isinstance(tree, dict):
        return tree
    return {k: strip(v) for k, v in tree.items() if k not in ADAPTER_LEAVES}


def adapters_only(tree: Any) -> Any:
    """Only the adapter leaves, nested as in the tree (dicts without adapters dropped)."""
    if not isinstance(tree, dict):
        return None
    out = {}
    for k, v in tree.items():
        if k in ADAPTER_LEAVES:
            out[k] = v
        elif (sub := adapters_only(v)) not in (None, {}):
            out[k] = sub
    return out


def deep_merge(base: Any, extra: Any) -> Any:
    """Nested dicts: `base` with `extra`'s leaves added (for attaching adapters)."""
    if not isinstance(extra, dict):
        return extra
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def merge(params: Any) -> Any:
    """The base tree with each adapted kernel replaced by W + scale * A @ B (in W's dtype,
    computed in f32): the same function of the input as the adapted model, without adapters."""
    if not isinstance(params, dict):
        return params
    out = {k: merge(v) for k, v in params.items() if k not in ADAPTER_LEAVES}
    if "lora_a" in params:
        kernel = params["kernel"]
        a = params["lora_a"].astype(jnp.float32)
        b = params["lora_b"].astype(jnp.float32)
        scale = params[SCALE].astype(jnp.float32)
        stacked = scale.ndim
        r = a.shape[-1]
        a2 = a.reshape(*a.shape[:stacked], -1, r)
        b2 = b.reshape(*b.shape[:stacked], r, -1)
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
        delta = delta * scale.reshape(*scale.shape, 1, 1)
        out["kernel"] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(
            kernel.dtype
        )
    return out
