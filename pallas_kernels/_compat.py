"""Absorbs Pallas API differences between jax releases; also small helpers the kernels share.

The Triton compiler params and the masked load/store moved between jax releases (`plgpu` vs
`pl`, `CompilerParams` vs `TritonCompilerParams`), and the marker of a squeezed block dim
changed; each name here resolves to whichever spelling the installed jax provides.
"""

from __future__ import annotations

import jax
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


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def target_device() -> tuple[str, str]:
    """(platform, device_kind) of what the code being traced is compiled for; platform is
    "gpu" for any GPU. Inside `jax.sharding.use_abstract_mesh` with an abstract device (lowering
    for a GPU from a host without one) that device, else jax's default device."""
    abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    device = abstract if abstract is not None else jax.devices()[0]
    platform = "gpu" if device.platform in _GPU_PLATFORMS else device.platform
    return platform, device.device_kind


def on_gpu() -> bool:
    """Whether the code being traced is compiled for a GPU (see target_device)."""
    return target_device()[0] == "gpu"


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
