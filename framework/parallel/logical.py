"""Logical axis names -> mesh axes. Layers constrain activations by logical names; outside an
`activate(mesh, rules)` block that is a no-op, so single-device code pays nothing."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, Any]  # logical name -> mesh axis name, tuple of names, or None

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "framework_logical_rules", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Make `mesh` and `rules` the ones `constrain` uses (while tracing inside this block)."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) made active by `activate`, or None outside any."""
    return _ACTIVE.get()


def partition_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    used: set[str] = set()
    out = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; does nothing when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(axes, rules)))
