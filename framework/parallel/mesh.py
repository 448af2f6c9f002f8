"""The device mesh from config: axis sizes (data, fsdp, tensor, sequence) and the logical-axis
rules that map parameter and activation dimension names onto those axes.

Layout mistakes (sizes that do not multiply to the device count, a dimension that its mesh
axes do not divide) raise `ConfigError` naming the axis and the sizes, before anything is
compiled."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import pydantic
from jax.sharding import AxisType, Mesh

from framework.config.loader import ConfigError
from framework.parallel.distributed import DistributedConfig
from framework.parallel.logical import partition_spec

AXES = ("data", "fsdp", "tensor", "sequence")

# Data parallel + FSDP over the batch; params sharded over fsdp on "embed" (ZeRO-3);
# Megatron-style tensor parallel on heads / MLP hidden / vocab; sequence parallel activations.
DEFAULT_RULES: dict[str, str | list[str] | None] = {
    "batch": ["data", "fsdp"],
    "seq": "sequence",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "conv_in": None,
    "conv_out": None,
}


class MeshConfig(pydantic.BaseModel):
    """Device mesh: one size per axis (-1 absorbs the remaining devices) and logical rules."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    data: int = pydantic.Field(-1, ge=-1, description="data-parallel replicas (-1: the rest)")
    fsdp: int = pydantic.Field(1, ge=-1, description="params/optimizer state sharded (ZeRO-3)")
    tensor: int = pydantic.Field(1, ge=-1, description="tensor parallel: heads, MLP, vocab")
    sequence: int = pydantic.Field(1, ge=-1, description="activations split along sequence")
    rules: dict[str, str | list[str] | None] = pydantic.Field(
        default_factory=lambda: dict(DEFAULT_RULES),
        description="logical axis name -> mesh axis, list of axes, or null (replicated); "
                    "entries given are merged over the defaults")
    distributed: DistributedConfig = DistributedConfig()

    @pydantic.field_validator("rules", mode="before")
    @classmethod
    def _merge_rules(cls, value: Any) -> Any:
        """Entries given override the defaults one by one instead of replacing the table."""
        return {**DEFAULT_RULES, **value} if isinstance(value, Mapping) else value

    @pydantic.model_validator(mode="after")
    def _check(self):
        sizes = self.sizes()
        if any(s == 0 for s in sizes.values()):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
        if sum(s == -1 for s in sizes.values()) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
        for name, target in self.rules.items():
            targets = [target] if isinstance(target, str) else list(target or [])
            for t in targets:
                if t not in AXES:
                    raise ValueError(f"mesh.rules.{name}: {t!r} is not a mesh axis {AXES}")
        return self

    def sizes(self) -> dict[str, int]:
        """Axis sizes as configured (-1 not yet resolved)."""
        return {a: getattr(self, a) for a in AXES}


def resolve_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Replace -1 by the remaining devices; the product must equal `n_devices`."""
    sizes = cfg.sizes()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    free = [a for a, s in sizes.items() if s == -1]
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh.{free[0]}=-1 cannot absorb the devices: {shown} leaves "
                              f"{n_devices} devices / {fixed} not a whole number")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh sizes {shown} multiply to {fixed}, but there are "
                          f"{n_devices} devices")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default all) with Auto axes, ordered by jax's topology logic."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_size(mesh: Mesh, target: Any) -> int:
    """Devices a rule target (axis name, tuple of names or None) splits a dimension over."""
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[n] for n in names)


def check_divisible(what: str, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                    rules: Mapping[str, Any]) -> None:
    """Raise ConfigError if a dimension of `what` is not divisible by its mesh axes."""
    spec = partition_spec(axes, rules)
    for dim, name, target in zip(shape, axes, spec, strict=False):
        n = axis_size(mesh, target)
        if dim % n:
            names = (target,) if isinstance(target, str) else tuple(target)
            sizes = " x ".join(f"mesh.{t}={mesh.shape[t]}" for t in names)
            raise ConfigError(f"{what}: dimension {name!r} of size {dim} is not divisible by "
                              f"{sizes} ({n} devices)")

