"""Run a kernel per shard: a pallas_call has no partitioning rule, so under an active mesh it
runs inside `jax.shard_map` with specs derived from logical axis names (None = replicated)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from framework.parallel import logical

Axes = Sequence[str | None] | None


def per_shard(fn: Callable[..., Any], in_axes: Sequence[Axes], out_axes: Any) -> Callable:
    """`fn` itself outside a mesh; inside one, `fn` mapped over shards of its arguments.

    in_axes has one entry per positional argument: logical names per dimension, or None for an
    argument that is not an array (passed as None) or fully replicated. Dimensions whose
    logical name has no rule are gathered before the call."""
    active = logical.current()
    if active is None:
        return fn
    mesh, rules = active

    def spec(axes: Axes) -> PartitionSpec:
        return PartitionSpec() if axes is None else logical.partition_spec(axes, rules)

    out_specs = jax.tree.map(spec, out_axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(spec(a) for a in in_axes),
        out_specs=out_specs,
        check_vma=False,
    )
