"""CUDA lowering on CPU for the kernel tests: export through jax.export for the "cuda" platform
under an abstract H100 (no GPU needed), which runs the real Pallas -> Triton lowering, and count
the Triton kernel custom calls.

Not a test module (no `test_` prefix); pytest's default import mode puts tests/ on sys.path, so
the test files import it as `cuda_lowering`."""

from __future__ import annotations

import jax

from framework.parallel.target import GPU_CUSTOM_CALLS, H100, abstract_gpu_mesh, export_for_cuda

__all__ = ["H100", "abstract_gpu_mesh", "export_cuda", "triton_calls"]


def export_cuda(f, *args, device_kind: str = H100) -> str:
    """Lower f for CUDA on one abstract GPU of `device_kind`; return the module text."""
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1}, device_kind)):
        return export_for_cuda(jax.jit(f), *args).mlir_module()


def triton_calls(text: str) -> int:
    """Number of Triton kernel custom calls in exported StableHLO."""
    return sum(text.count(t) for t in GPU_CUSTOM_CALLS)
