"""Shared inputs and interpret-mode helpers of the Mosaic GPU attention tests; the test files
import it as `mgpu_inputs`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention_mgpu as mgpu

TOL = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}  # P is rounded to the input dtype for P @ V


def racing():
    """Interpret-mode parameters with race detection that raises on a race (jax 0.12; jax
    0.11 only records it, checked by `assert_no_races` for the last kernel)."""
    params = mgpu.plgpu.InterpretGPUParams
    if "on_race" in params.__dataclass_fields__:
        return params(detect_races=True, on_race="raise")
    return params(detect_races=True)


def assert_no_races():
    """The race detector's verdict on the last interpreted kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    assert not interpret_pallas_call.get_races().races_found


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
