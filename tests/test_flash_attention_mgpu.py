"""The Mosaic GPU (Hopper) flash attention, forward and backward, simulated on the CPU in
Mosaic GPU interpret mode (shared memory, TMA, barriers; race detection on) against the XLA
reference, and lowered for an abstract H100. Skipped, with the reason, on a jax without the
Mosaic GPU API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mgpu_inputs import TOL, inputs, packed_segments, races_checked

from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels import flash_attention_mgpu_bwd as bwd
from pallas_kernels.flash_attention import attention_reference

pytestmark = pytest.mark.skipif(mgpu.available() is not None, reason=str(mgpu.available()))


def _reference_lse(q, k, causal, q_seg, kv_seg):
    """log-sum-exp (natural log) of each query's scaled, masked scores: [b, heads, q_len]."""
    tq, h, d = q.shape[1:]
    tk, kh = k.shape[1], k.shape[2]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, h // kh, axis=2)) * d**-0.5
    allowed = jnp.ones((1, 1, tq, tk), bool)
    if causal:
        allowed = allowed & (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq))
    if q_seg is not None:
        allowed = allowed & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return jax.nn.logsumexp(jnp.where(allowed, s, -jnp.inf), axis=-1)


# shape = (batch, q_len, kv_len, heads, kv_heads, head_dim)
@pytest.mark.parametrize(
    ("shape", "dtype", "causal", "segments", "block_kv"),
    [
        ((1, 128, 128, 2, 1, 64), jnp.float16, False, False, 64),  # MQA
        ((1, 100, 150, 8, 1, 64), jnp.bfloat16, True, False, 64),  # GQA 8, odd lengths, cache
        ((2, 64, 192, 4, 1, 64), jnp.float16, True, False, 64),  # kv longer than q, 3 kv blocks
        ((1, 128, 128, 2, 2, 128), jnp.bfloat16, False, True, 128),  # d 128, MHA, segments
        ((1, 128, 64, 8, 2, 64), jnp.float16, True, False, 64),  # GQA 4, q longer: rows, no key
        ((1, 64, 64, 1, 1, 256), jnp.bfloat16, True, False, 64),  # head_dim 256 (forward only)
    ],
    ids=[
        "mqa-f16", "gqa8-odd-causal-bf16", "offset-causal-f16", "d128-segments-bf16",
        "gqa4-empty-rows", "d256-causal-bf16",
    ],
)  # fmt: skip
def test_forward_matches_the_reference(shape, dtype, causal, segments, block_kv):
    b, tq, tk, h, kh, d = shape
    q, k, v = inputs(b, tq, tk, h, kh, d, dtype)
    q_seg, kv_seg = packed_segments(b, tq, tk) if segments else (None, None)
    out, lse = mgpu.flash_attention_fwd(
        q, k, v, causal=causal, segment_ids=q_seg, kv_segment_ids=kv_seg, block_kv=block_kv,
        interpret=True,
    )  # fmt: skip
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = attention_reference(*f32, causal=causal, segment_ids=q_seg, kv_segment_ids=kv_seg)
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=tol, rtol=tol)
    want_lse = _reference_lse(f32[0], f32[1], causal, q_seg, kv_seg)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)


def test_no_races_when_ring_slots_are_refilled():
    """4 K/V blocks through a 3-slot ring (slot 0 refilled), segment ids (read from the slot
    by both compute warpgroups before they release it: without the fence between the read and
    the release this races, on jax 0.11.2 and 0.12.0.1), not causal. The interpret mode checks
    TMA writes against shared-memory loads (the segment ids); it does not check wgmma operands
    (jax 0.12.0.1), so the K/V release protocol itself is a GPU-check item."""
    q, k, v = inputs(1, 128, 256, 2, 1, 64, jnp.float16, seed=3)
    q_seg, kv_seg = packed_segments(1, 128, 256)
    masks = dict(segment_ids=q_seg, kv_segment_ids=kv_seg)
    with races_checked(kernels=1) as interpret:
        out, _ = mgpu.flash_attention_fwd(
            q, k, v, **masks, block_kv=64, stages=3, interpret=interpret
        )
        jax.block_until_ready(out)
    want = attention_reference(*[x.astype(jnp.float32) for x in (q, k, v)], **masks)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(("seq", "segments"), [(256, False), (200, True)])
def test_forward_and_backward_lower_for_an_abstract_h100(seq, segments):
    """Three Mosaic GPU kernels; the shared memory each allocates (the lowering's own count)
    is what forward_smem_bytes / backward_smem_bytes charge for it."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    from framework.parallel.target import abstract_gpu_mesh, export_for_cuda

    q = jax.ShapeDtypeStruct((1, seq, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(q, k, v, seg):
        out = mgpu.flash_attention(q, k, v, causal=True, segment_ids=seg if segments else None)
        return out.astype(jnp.float32).sum()

    allocated, count = [], mosaic_core._smem_tree_size

    def counted(tree):
        allocated.append(count(tree))
        return allocated[-1]

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mosaic_core, "_smem_tree_size", counted)
        with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1})):
            text = export_for_cuda(f, q, kv, kv, seg).mlir_module()
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dq, dk/dv
    # seq >= 2 blocks everywhere: the forward's ring and the backward's two hold 2 stages
    fwd = mgpu.forward_smem_bytes(128, 128, 2, segments)
    scratch = (bwd.dq_scratch, bwd.dkdv_scratch)
    dq, dkdv = (s(128, 64, jnp.bfloat16, segments, mgpu._transforms(), 2) for s in scratch)
    charged = [fwd, mgpu._smem_bytes(dq, reductions=False), mgpu._smem_bytes(dkdv, False)]
    assert sorted(allocated) == sorted(charged), (allocated, charged)
    assert mgpu.backward_smem_bytes(128, 2, 2, segments) == max(charged[1:])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"segments": (1, 32)}, "segment ids"),
        ({"d": 80}, "head_dim"),
        ({"dtype": jnp.float32}, "float16 or bfloat16"),
        ({"kh": 3}, "multiple of kv heads"),
        ({"block_kv": 32}, "block_kv must be"),
        ({"stages": 0}, "stages must be"),
        ({"d": 256, "block_kv": 128, "tk": 256}, "shared memory"),
        ({"d": 128, "block_kv": 128, "stages": 3, "tk": 384}, "shared memory"),  # 232568 B
        ({"d": 128, "block_kv": 128, "stages": 3, "tk": 256}, None),  # 2 blocks: 2 stages
        ({"d": 64, "stages": 12, "tq": 768, "tk": 768, "grad": True}, "backward's stages"),
        ({"d": 256, "grad": True}, "head_dim <= 128"),
    ],
)
def test_unsupported_calls_say_why(change, needle):
    kw = {k: change.pop(k) for k in ("block_kv", "stages") if k in change}
    if "segments" in change:
        kw["segment_ids"] = jnp.zeros(change.pop("segments"), jnp.int32)
    grad = change.pop("grad", False)
    op = mgpu.flash_attention if grad else mgpu.flash_attention_fwd
    dims = dict(b=1, tq=64, tk=64, h=2, kh=1, d=64, dtype=jnp.float16) | change
    q, k, v = inputs(**dims)
    if needle is None:  # accepted: the ring is clamped to the blocks there are
        stages = kw.get("stages", mgpu.DEFAULT_STAGES)
        assert mgpu._problem(q, k, v, None, None, kw.get("block_kv"), stages, grad) is None
        return
    with pytest.raises(ValueError, match=needle):
        op(q, k, v, interpret=True, **kw)
    if not kw:  # what dispatch asks: the same reason, without running anything
        assert needle in mgpu.unsupported(q, k, v, backward=grad)


def test_unsupported_names_what_the_kernels_cannot_take():
    q, k, v = inputs(1, 64, 64, 2, 1, 64, jnp.bfloat16)
    assert mgpu.unsupported(q, k, v) is None
    assert mgpu.unsupported(q, k, v, segment_ids=jnp.zeros((1, 64), jnp.int32)) is None
    assert "window" in mgpu.unsupported(q, k, v, window=16)
    assert "mask" in mgpu.unsupported(q, k, v, mask=jnp.ones((1, 1, 64, 64), bool))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_on_a_hopper_gpu(causal):
    """On a lent H100/H200 (scripts/gpu_check.sh): the compiled kernels, 2k tokens, GQA 4,
    output and gradients."""
    dev = jax.devices()[0]
    if jax.default_backend() != "gpu" or getattr(dev, "compute_capability", "") != "9.0":
        pytest.skip("needs a Hopper GPU (sm90)")
    q, k, v = inputs(2, 2048, 2048, 8, 2, 128, jnp.bfloat16)
    do = jax.random.normal(jax.random.key(9), q.shape).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: mgpu.flash_attention(q, k, v, causal=causal), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal), *f32)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(vjp(do), ref_vjp(do.astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=5e-2, rtol=5e-2)
