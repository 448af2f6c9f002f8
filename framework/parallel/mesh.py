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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from framework.errors import ConfigError
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


class AcrossNodes(pydantic.BaseModel):
    """How many nodes (processes) each mesh axis spans; the product must equal the process
    count. The per-axis sizes in `mesh` are then the sizes within one node."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    data: int = pydantic.Field(1, ge=1, description="nodes along data (pure DP across nodes)")
    fsdp: int = pydantic.Field(1, ge=1, description="nodes along fsdp")
    tensor: int = pydantic.Field(1, ge=1, description="nodes along tensor (rarely > 1)")
    sequence: int = pydantic.Field(1, ge=1, description="nodes along sequence")

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}


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
        "entries given are merged over the defaults",
    )
    across_nodes: AcrossNodes = pydantic.Field(
        default_factory=AcrossNodes,
        description="node counts per axis; all 1 = sizes above span every device",
    )
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
            raise ConfigError(
                f"mesh.{free[0]}=-1 cannot absorb the devices: {shown} leaves "
                f"{n_devices} devices / {fixed} not a whole number"
            )
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh sizes {shown} multiply to {fixed}, but there are {n_devices} devices"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default all) with Auto axes, ordered by jax's topology logic.

    With `across_nodes` set, each axis is (within-node size) x (node count), laid out so the
    within-node part stays on one host's fast interconnect (NVLink) and only the across-node
    part crosses the network."""
    devices = list(jax.devices() if devices is None else devices)
    auto = (AxisType.Auto,) * len(AXES)
    across = cfg.across_nodes.sizes()
    n_nodes = math.prod(across.values())
    if n_nodes == 1:
        sizes = resolve_sizes(cfg, len(devices))
        return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=auto, devices=devices)
    n_procs = len({d.process_index for d in devices})
    if n_nodes != n_procs:
        shown = " x ".join(f"{a}={s}" for a, s in across.items())
        raise ConfigError(
            f"mesh.across_nodes {shown} multiply to {n_nodes}, but the run has {n_procs} processes"
        )
    within = resolve_sizes(cfg, len(devices) // n_nodes)
    grid = mesh_utils.create_hybrid_device_mesh(
        [within[a] for a in AXES], [across[a] for a in AXES], devices, process_is_granule=True
    )
    return Mesh(grid, AXES, axis_types=auto)


def axis_size(mesh: Mesh, target: Any) -> int:
    """Devices a rule target (axis name, tuple of names or None) splits a dimension over."""
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[n] for n in names)


def check_divisible(
    what: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, Any],
) -> None:
    """Raise ConfigError if a dimension of `what` is not divisible by its mesh axes."""
    spec = partition_spec(axes, rules)
    for dim, name, target in zip(shape, axes, spec, strict=False):
        n = axis_size(mesh, target)
        if dim % n:
            names = (target,) if isinstance(target, str) else tuple(target)
            sizes = " x ".join(f"mesh.{t}={mesh.shape[t]}" for t in names)
            raise ConfigError(
                f"{what}: dimension {name!r} of size {dim} is not divisible by "
                f"{sizes} ({n} devices)"
            )
