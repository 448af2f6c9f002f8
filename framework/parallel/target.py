"""Compile for a GPU from a host without one: an abstract mesh of named GPUs, and jax.export
for the "cuda" platform under it. Pallas kernels read the abstract device to pick their tiles
and lower through Triton (pallas_kernels._compat.target_device); shardings over the abstract
mesh lower to the same SPMD program a real node would run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

H100 = "NVIDIA H100 80GB HBM3"  # jax's device_kind of an H100 SXM
_SM_COUNTS = {"h100": 132, "h200": 132, "a100": 108, "b200": 148}  # streaming multiprocessors

# Custom calls a GPU export may contain that jax.export does not list as stable: Pallas Triton
# kernels (target name changed across jaxlib releases).
GPU_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def abstract_gpu_mesh(sizes: Mapping[str, int], device_kind: str = H100) -> AbstractMesh:
    """An AbstractMesh of `device_kind` GPUs with these axis sizes (Auto axes, as make_mesh)."""
    cores = next((n for k, n in _SM_COUNTS.items() if k in device_kind.lower()), None)
    device = AbstractDevice(device_kind=device_kind, num_cores=cores, platform="cuda")
    return AbstractMesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        abstract_device=device,
    )


def export_for_cuda(jitted: Callable, *args: Any) -> jax.export.Exported:
    """jax.export of a jitted function for CUDA; call inside `use_abstract_mesh` of an
    abstract_gpu_mesh (the Pallas Triton lowering needs to know the GPU)."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in GPU_CUSTOM_CALLS]
    return jax.export.export(jitted, platforms=["cuda"], disabled_checks=checks)(*args)
