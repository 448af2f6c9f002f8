"""Absorbs Pallas API differences between jax releases; also small helpers the kernels share.

The Triton compiler params and the masked load/store moved between jax releases (`plgpu` vs
`pl`, `CompilerParams` vs `TritonCompilerParams`), and the marker of a squeezed block dim
changed; each name here resolves to whichever spelling the installed jax provides.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# `CompilerParams` in current jax; `TritonCompilerParams` in older releases.
CompilerParams = next(
    p
    for p in (
        getattr(plgpu, "CompilerParams", None),
        getattr(plgpu, "TritonCompilerParams", None),
        getattr(pl, "TritonCompilerParams", None),
    )
    if p is not None
)
# Masked load/store: `plgpu.load` / `plgpu.store` in current jax, `pl.load` / `pl.store` before.
load = getattr(plgpu, "load", None) or pl.load
store = getattr(plgpu, "store", None) or pl.store
SQUEEZED = getattr(pl, "squeezed", None)  # older releases spell a squeezed block dim `None`


def cdiv(a: int, b: int) -> int:
    """Ceiling division of static ints."""
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def device_row(table: dict, device_kind: str | None):
    """The entry of a per-device heuristic table whose key occurs in `device_kind` (lowercase
    keys such as "h100"), else its "default" entry."""
    kind = (device_kind or "").lower()
    return next(
        (row for key, row in table.items() if key != "default" and key in kind), table["default"]
    )
