"""CUDA lowering on CPU for the kernel tests: export through jax.export for the "cuda" platform,
which runs the real Pallas -> Triton lowering, and count the Triton kernel custom calls.

Not a test module (no `test_` prefix); pytest's default import mode puts tests/ on sys.path, so
the test files import it as `cuda_lowering`."""

from __future__ import annotations

import jax
import pytest

# Custom-call target of a Pallas Triton kernel: jaxlib <= 0.10.2 / newer jaxlib.
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def export_cuda(f, *args) -> str:
    """Lower f for CUDA (runs the real Pallas -> Triton lowering) and return the module text."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
    try:
        exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)
    except RuntimeError as e:
        # Newer jaxlib compiles Triton to PTX inside the lowering, through a handler that only
        # the CUDA plugin registers; jaxlib 0.10.2 embeds the Triton IR.
        if "Triton compilation handler" in str(e):
            pytest.skip(f"this jaxlib lowers Pallas/Triton only with the CUDA plugin: {e}")
        raise
    return exported.mlir_module()


def triton_calls(text: str) -> int:
    """Number of Triton kernel custom calls in exported StableHLO."""
    return sum(text.count(t) for t in TRITON_TARGETS)
