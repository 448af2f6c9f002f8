"""Shardings for the train state and batches, derived from the model's logical axes.

Params: `nn.logical_axes(spec)` -> rules -> NamedSharding. Optimizer state mirrors the params
(optax keeps moments in trees shaped like the params), so each opt-state leaf takes the sharding
of the param whose path its own path ends with and whose shape it has; anything else (counts,
factored second moments) is replicated. Batches put each process's rows on its devices."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from framework import nn
from framework.config.loader import ConfigError
from framework.parallel.logical import partition_spec
from framework.parallel.mesh import axis_size, check_divisible

PyTree = Any


def _path(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def spec_shardings(spec: PyTree, mesh: Mesh, rules: Mapping[str, Any], what: str) -> PyTree:
    """NamedSharding per Param of a spec tree; ConfigError if a dimension does not divide."""

    def one(path, p: nn.Param) -> NamedSharding:
        check_divisible(f"{what} {'/'.join(_path(path))}", p.shape, p.axes, mesh, rules)
        return NamedSharding(mesh, partition_spec(p.axes, rules))

    return jax.tree_util.tree_map_with_path(one, spec, is_leaf=nn.param.is_param)


def mirror_shardings(
    tree_shapes: PyTree, params_spec: PyTree, param_sh: PyTree, mesh: Mesh
) -> PyTree:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror params by path suffix."""
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    flat_spec = jax.tree_util.tree_flatten_with_path(params_spec, is_leaf=nn.param.is_param)[0]
    flat_sh = jax.tree.leaves(param_sh)
    for (path, p), sh in zip(flat_spec, flat_sh, strict=True):
        by_path[_path(path)] = (p.shape, sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf) -> NamedSharding:
        keys = _path(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree_shapes)


def state_shardings(
    model: Any,
    mcfg: Any,
    init_fn: Callable[[jax.Array], dict],
    mesh: Mesh,
    rules: Mapping[str, Any],
) -> dict:
    """Shardings for the state dict {"step", "params", "opt_state", "model_state"}."""
    spec = model.spec(mcfg)
    params = spec_shardings(spec, mesh, rules, "param")
    model_state = spec_shardings(model.state_spec(mcfg), mesh, rules, "model state")
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return {
        "step": NamedSharding(mesh, PartitionSpec()),
        "params": params,
        "opt_state": mirror_shardings(shapes["opt_state"], spec, params, mesh),
        "model_state": model_state,
    }


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


def batch_shardings(
    batch_like: Mapping[str, Any], mesh: Mesh, rules: Mapping[str, Any], *, sequence: bool
) -> dict[str, NamedSharding]:
    """The shardings `put_batch` gives, for jit's in_shardings."""
    return {
        k: NamedSharding(mesh, batch_spec(np.ndim(v), rules, sequence=sequence))
        for k, v in batch_like.items()
    }


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
