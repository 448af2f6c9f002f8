"""Shape and dtype errors that name the layer path, built up as the error leaves each scope."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp


class ShapeError(ValueError):
    """A wrong input shape or dtype; `path` lists the layer scopes from outermost to innermost."""

    def __init__(self, message: str, path: Sequence[str] = ()):
        self.message = message
        self.path = list(path)
        super().__init__(self._render())

    def _render(self) -> str:
        where = "/".join(self.path) or "<root>"
        return f"{where}: {self.message}"

    def with_prefix(self, name: str) -> ShapeError:
        self.path.insert(0, name)
        self.args = (self._render(),)
        return self


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix `name` to the path of any ShapeError raised inside (at trace time, so free)."""
    try:
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
