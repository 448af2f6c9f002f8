"""Input checks that raise ShapeError, and `scope`, which names the layer path in those errors
and in the compiled program (jax.named_scope)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from framework.errors import ShapeError


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Name a layer: prefix `name` to the path of any ShapeError raised inside, and open
    `jax.named_scope(name)` so HLO op names and profiler traces carry the same path."""
    try:
        with jax.named_scope(name):
            yield
    except ShapeError as e:
        raise e.with_prefix(name) from None


def check_last_dim(x: Any, expected: int, what: str = "input") -> None:
    """Raise ShapeError unless x.shape[-1] == expected."""
    if x.ndim == 0 or x.shape[-1] != expected:
        raise ShapeError(f"{what} must have last dimension {expected}, got shape {tuple(x.shape)}")


def check_rank(x: Any, rank: int, what: str = "input", layout: str = "") -> None:
    if x.ndim != rank:
        hint = f" ({layout})" if layout else ""
        raise ShapeError(f"{what} must have rank {rank}{hint}, got shape {tuple(x.shape)}")


def check_float(x: Any, what: str = "input") -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"{what} must be floating point, got dtype {x.dtype}")


def check_int(x: Any, what: str = "input") -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ShapeError(f"{what} must be integer, got dtype {x.dtype}")
