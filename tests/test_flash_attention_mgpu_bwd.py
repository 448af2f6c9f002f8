"""Gradients of the Mosaic GPU (Hopper) flash attention (dq kernel; dk/dv kernel with
transposed products), simulated on the CPU in Mosaic GPU interpret mode against the XLA
reference's vjp. A file of its own so that pytest's two workers share the slow simulations."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mgpu_inputs import TOL, inputs, packed_segments, races_checked

from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.flash_attention import attention_reference

pytestmark = pytest.mark.skipif(mgpu.available() is not None, reason=str(mgpu.available()))


@pytest.mark.parametrize(
    ("shape", "dtype", "causal", "segments", "races"),
    [
        # MQA, causal, race detection on; dq's 3 K/V steps and dk/dv's 4 (query block, head)
        # pairs wrap the 2-slot rings, so slots are refilled
        ((1, 128, 192, 2, 1, 64), jnp.float16, True, False, True),
        # GQA 2, odd lengths (padded inside), kv cache longer than q, packed segments
        ((1, 100, 130, 4, 2, 64), jnp.bfloat16, True, True, False),
        # GQA 4, not causal, segments, odd lengths, head_dim 128
        ((1, 70, 90, 4, 1, 128), jnp.float16, False, True, False),
    ],
    ids=["mqa-causal-f16-races", "gqa2-odd-segments-causal-bf16", "gqa4-segments-d128-f16"],
)
def test_gradients_match_the_reference(shape, dtype, causal, segments, races):
    """dq (per query block over K/V) and dk/dv (per K/V block over the group's query heads and
    blocks, transposed products) against the reference's vjp, f32 reference inputs."""
    b, tq, tk, h, kh, d = shape
    q, k, v = inputs(b, tq, tk, h, kh, d, dtype)
    q_seg, kv_seg = packed_segments(b, tq, tk) if segments else (None, None)
    masks = dict(causal=causal, segment_ids=q_seg, kv_segment_ids=kv_seg)
    do = jax.random.normal(jax.random.key(9), q.shape).astype(dtype)
    checked = races_checked(kernels=3) if races else contextlib.nullcontext(True)
    with checked as interpret:  # forward, dq, dk/dv: each race-checked
        got = jax.vjp(lambda q, k, v: mgpu.flash_attention(q, k, v, **masks, interpret=interpret),
                      q, k, v)[1](do)  # fmt: skip
        jax.block_until_ready(got)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **masks), *f32)[1]
    tol = 2 * TOL[dtype]
    for name, g, w in zip("qkv", got, vjp(do.astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=tol, rtol=tol, err_msg=name)
