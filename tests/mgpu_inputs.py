"""Shared inputs and interpret-mode helpers of the Mosaic GPU attention tests; the test files
import it as `mgpu_inputs`."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention_mgpu as mgpu

TOL = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}  # P is rounded to the input dtype for P @ V


@contextlib.contextmanager
def races_checked(kernels: int):
    """Interpret-mode parameters with race detection, for every kernel run inside: jax 0.12
    raises at a race (on_race="raise"); jax 0.11 keeps only the latest kernel's detector
    state, so each kernel's state is recorded here and all are checked at exit. Exactly
    `kernels` kernels must have run (so a check that saw nothing cannot pass)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    params = mgpu.plgpu.InterpretGPUParams
    racing = params(detect_races=True)
    if "on_race" in params.__dataclass_fields__:
        racing = params(detect_races=True, on_race="raise")
    states, cls = [], gpu_callbacks.GPURaceDetectionState

    def recorded(*args, **kwargs):
        states.append(cls(*args, **kwargs))
        return states[-1]

    gpu_callbacks.GPURaceDetectionState = recorded
    try:
        yield racing
    finally:
        gpu_callbacks.GPURaceDetectionState = cls
    assert len(states) == kernels, f"{len(states)} kernels interpreted, expected {kernels}"
    assert not any(state.races_found for state in states), "a race was detected"


def inputs(b, tq, tk, h, kh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, tk, kh, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, tk, kh, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def packed_segments(b, tq, tk, seed=1):
    """Packed-row segment ids: random document boundaries per row (the queries are the keys'
    last tq positions, as in a cache), so some documents span K/V blocks and some do not."""
    cuts = jax.random.uniform(jax.random.key(seed), (b, tk)) < 6 / tk
    kv_seg = jnp.cumsum(cuts, axis=1).astype(jnp.int32)
    return kv_seg[:, tk - tq :], kv_seg
