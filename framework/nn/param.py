"""Parameters as declarations: a `Param` says shape, logical axes, initializer and dtype.

Everything else (values, logical-axis trees, counts, shapes) is derived from one spec tree,
so nothing about a parameter is written twice.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter before it exists: `axes` has one logical name (or None) per dimension."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Initializer = jax.nn.initializers.normal(0.02)
    dtype: Any = jnp.float32
    # A projection kernel (x @ kernel): how many trailing dims are outputs (the dims between
    # the stacked ones and those are contracted with the input). None: not a projection.
    # LoRA (framework.finetune) adapts only projections.
    out_dims: int | None = None
    stacked: int = 0  # leading dims added by `stack` (one slice per layer)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "axes", tuple(self.axes))
        if len(self.shape) != len(self.axes):
            raise ValueError(f"Param shape {self.shape} and axes {self.axes} differ in rank")
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"Param shape {self.shape} must be positive in every dimension")

    @property
    def ndim(self) -> int:
        return len(self.shape)


def is_param(x: Any) -> bool:
    return isinstance(x, Param)


def path_key(key: jax.Array, path: str) -> jax.Array:
    """A key that depends only on the root key and the leaf's path (crc32 is stable across runs,
    unlike Python's salted `hash`)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(spec: PyTree, key: jax.Array) -> PyTree:
    """Create parameter values. Each leaf's key derives from its path, so adding or removing a
    layer never changes the initial values of the others."""

    def make(path, p: Param):
        return p.init(
            path_key(key, jax.tree_util.keystr(path, simple=True, separator="/")), p.shape, p.dtype
        ).astype(p.dtype)

    return jax.tree_util.tree_map_with_path(make, spec, is_leaf=is_param)


def logical_axes(spec: PyTree) -> PyTree:
    """The same tree with each Param replaced by its tuple of logical axis names."""
    return jax.tree.map(lambda p: p.axes, spec, is_leaf=is_param)


def shapes(spec: PyTree) -> PyTree:
    """The same tree of `jax.ShapeDtypeStruct`, via `jax.eval_shape` (nothing is allocated)."""
    return jax.eval_shape(lambda: init(spec, jax.random.key(0)))


def count(spec_or_params: PyTree) -> int:
    """Number of scalars in a spec tree or a params tree."""
    leaves = jax.tree.leaves(spec_or_params, is_leaf=is_param)
    return sum(math.prod(leaf.shape) for leaf in leaves)


def stack(spec: PyTree, n: int, axis_name: str = "layers") -> PyTree:
    """Give every Param a leading dimension of size `n` named `axis_name`.

    Each of the `n` slices is initialized as the unstacked Param would be (fan-in based
    initializers see the per-layer shape), from its own key split off the leaf's key."""

    def stacked(p: Param) -> Param:
        def init_fn(key, shape, dtype, _inner=p.init):
            return jax.vmap(lambda k: _inner(k, shape[1:], dtype))(jax.random.split(key, shape[0]))

        return Param(
            (n, *p.shape), (axis_name, *p.axes), init_fn, p.dtype, p.out_dims, p.stacked + 1
        )

    return jax.tree.map(stacked, spec, is_leaf=is_param)
