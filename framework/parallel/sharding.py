"""Shardings from logical axes: trees of axis-name tuples -> NamedSharding via the rules, and
batches placed with each process's rows on its own devices. Knows meshes and logical names only
(not layers or models): callers pass `nn.logical_axes(spec)` and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from framework.errors import ConfigError
from framework.parallel.logical import partition_spec
from framework.parallel.mesh import axis_size, check_divisible

PyTree = Any


def logical_shardings(
    axes: PyTree, shapes: PyTree, mesh: Mesh, rules: Mapping[str, Any], what: str
) -> PyTree:
    """NamedSharding per leaf of `shapes` (anything with .shape), from the matching tuple of
    logical names in `axes`; ConfigError naming the leaf if a dimension does not divide."""

    def one(path, shape, leaf_axes) -> NamedSharding:
        where = f"{what} {jax.tree_util.keystr(path, simple=True, separator='/')}"
        check_divisible(where, shape.shape, leaf_axes, mesh, rules)
        return NamedSharding(mesh, partition_spec(leaf_axes, rules))

    return jax.tree_util.tree_map_with_path(one, shapes, axes)


def batch_spec(ndim: int, rules: Mapping[str, Any], *, sequence: bool) -> PartitionSpec:
    """Batch dim over the "batch" rule; dim 1 over the "seq" rule for token arrays."""
    axes = ("batch", "seq") if sequence and ndim >= 2 else ("batch",)
    return partition_spec(axes + (None,) * (ndim - len(axes)), rules)


def check_batch(mesh: Mesh, rules: Mapping[str, Any], batch_size: int, seq_len: int | None) -> None:
    """ConfigError unless the global batch (and sequence) divide over their mesh axes."""
    spec = partition_spec(("batch", "seq"), rules)
    n = axis_size(mesh, spec[0])
    if batch_size % n:
        names = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in _names(spec[0]))
        raise ConfigError(
            f"data.batch_size ({batch_size}) is not divisible by {names} "
            f"({n} devices share the batch)"
        )
    if seq_len is not None and seq_len % axis_size(mesh, spec[1]):
        names = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in _names(spec[1]))
        raise ConfigError(f"data.seq_len ({seq_len}) is not divisible by {names}")


def _names(target: Any) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def put_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Mapping[str, Any], *, sequence: bool
) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays sharded over the mesh (no host gathers)."""
    out = {}
    for k, v in batch.items():
        sh = NamedSharding(mesh, batch_spec(np.ndim(v), rules, sequence=sequence))
        out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v))
    return out


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes each device holds of a tree of arrays, from their addressable shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def shard_bytes(shapes: PyTree, shardings: PyTree) -> int:
    """Bytes one device holds of a tree of shapes under `shardings`, without allocating."""
    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(sh.shard_shape(s.shape))) * np.dtype(s.dtype).itemsize
    return total
