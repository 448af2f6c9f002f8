"""The Mosaic GPU (Hopper) flash attention, forward and backward, simulated on the CPU in
Mosaic GPU interpret mode (shared memory, TMA, barriers; race detection on) against the XLA
reference, and lowered for an abstract H100. Skipped, with the reason, on a jax without the
Mosaic GPU API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.flash_attention import attention_reference

pytestmark = pytest.mark.skipif(mgpu.available() is not None, reason=str(mgpu.available()))
TOL = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}  # P is rounded to the input dtype for P @ V


def _racing():
    """Interpret-mode parameters with race detection that raises on a race (jax 0.12; jax
    0.11 only records it, checked by `_assert_no_races` for the last kernel)."""
    params = mgpu.plgpu.InterpretGPUParams
    if "on_race" in params.__dataclass_fields__:
        return params(detect_races=True, on_race="raise")
    return params(detect_races=True)


def _assert_no_races():
    """The race detector's verdict on the last interpreted kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    assert not interpret_pallas_call.get_races().races_found


def _inputs(b, tq, tk, h, kh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, tk, kh, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, tk, kh, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize(
    ("shape", "dtype", "causal"),
    [
        ((1, 128, 128, 2, 1, 64), jnp.float16, False),  # MQA
        ((1, 128, 128, 4, 2, 64), jnp.bfloat16, True),  # GQA 2
        ((2, 64, 192, 4, 1, 64), jnp.float16, True),  # kv longer than q (a cache), 3 kv blocks
        ((1, 128, 128, 2, 2, 128), jnp.bfloat16, False),  # head_dim 128, MHA
        ((1, 128, 64, 8, 2, 64), jnp.float16, True),  # GQA 4, q longer: rows with no key
    ],
    ids=["mqa-f16", "gqa2-causal-bf16", "offset-causal-f16", "d128-bf16", "gqa4-empty-rows"],
)
def test_forward_matches_the_reference(shape, dtype, causal):
    b, tq, tk, h, kh, d = shape
    q, k, v = _inputs(b, tq, tk, h, kh, d, dtype)
    out, lse = mgpu.flash_attention_fwd(q, k, v, causal=causal, interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = attention_reference(*f32, causal=causal)
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=tol, rtol=tol)
    # lse: log-sum-exp of the scaled scores of each query (natural log), [b, heads, q_len]
    s = jnp.einsum("bqhd,bkhd->bhqk", f32[0], jnp.repeat(f32[1], h // kh, axis=2)) * d**-0.5
    if causal:
        allowed = jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq)
        s = jnp.where(allowed, s, -jnp.inf)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(s, axis=-1), atol=tol, rtol=tol)


def test_no_races_with_three_stages_in_flight():
    q, k, v = _inputs(1, 64, 256, 2, 1, 64, jnp.float16, seed=3)
    out, _ = mgpu.flash_attention_fwd(q, k, v, causal=True, stages=3, interpret=_racing())
    _assert_no_races()
    want = attention_reference(*[x.astype(jnp.float32) for x in (q, k, v)], causal=True)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("shape", "dtype", "causal", "races"),
    [
        # MQA, causal, race detection on; dq's 3 K/V steps and dk/dv's 4 (head, query block)
        # pairs wrap the 2-slot rings, so slots are refilled
        ((1, 128, 192, 2, 1, 64), jnp.float16, True, True),
        ((1, 128, 192, 4, 2, 64), jnp.bfloat16, True, False),  # GQA 2, kv cache longer than q
    ],
    ids=["mqa-causal-f16-races", "gqa2-offset-causal-bf16"],
)
def test_gradients_match_the_reference(shape, dtype, causal, races):
    """dq (per query block over K/V) and dk/dv (per K/V block over the group's query heads and
    blocks, transposed products) against the reference's vjp, f32 reference inputs."""
    b, tq, tk, h, kh, d = shape
    q, k, v = _inputs(b, tq, tk, h, kh, d, dtype)
    do = jax.random.normal(jax.random.key(9), q.shape).astype(dtype)
    interpret = _racing() if races else True
    got = jax.vjp(
        lambda q, k, v: mgpu.flash_attention(q, k, v, causal=causal, interpret=interpret), q, k, v
    )[1](do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal), *f32)[1]
    tol = 2 * TOL[dtype]
    for name, g, w in zip("qkv", got, vjp(do.astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=tol, rtol=tol, err_msg=name)
    if races:
        _assert_no_races()


def test_forward_and_backward_lower_for_an_abstract_h100():
    from framework.parallel.target import abstract_gpu_mesh, export_for_cuda

    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        return mgpu.flash_attention(q, k, v, causal=True).astype(jnp.float32).sum()

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh({"x": 1})):
        text = export_for_cuda(f, q, kv, kv).mlir_module()
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tq": 100}, "multiple of 64"),
        ({"d": 80}, "head_dim"),
        ({"dtype": jnp.float32}, "float16 or bfloat16"),
        ({"kh": 3}, "multiple of kv heads"),
        ({"block_kv": 32}, "block_kv must be"),
        ({"stages": 0}, "stages must be"),
        ({"d": 256, "grad": True}, "head_dim <= 128"),
    ],
)
def test_unsupported_calls_say_why(change, needle):
    kw = {k: change.pop(k) for k in ("block_kv", "stages") if k in change}
    op = mgpu.flash_attention if change.pop("grad", False) else mgpu.flash_attention_fwd
    dims = dict(b=1, tq=64, tk=64, h=2, kh=1, d=64, dtype=jnp.float16) | change
    q, k, v = _inputs(**dims)
    with pytest.raises(ValueError, match=needle):
        op(q, k, v, interpret=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_on_a_hopper_gpu(causal):
    """On a lent H100/H200 (scripts/gpu_check.sh): the compiled kernels, 2k tokens, GQA 4,
    output and gradients."""
    dev = jax.devices()[0]
    if jax.default_backend() != "gpu" or getattr(dev, "compute_capability", "") != "9.0":
        pytest.skip("needs a Hopper GPU (sm90)")
    q, k, v = _inputs(2, 2048, 2048, 8, 2, 128, jnp.bfloat16)
    do = jax.random.normal(jax.random.key(9), q.shape).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: mgpu.flash_attention(q, k, v, causal=causal), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal), *f32)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(vjp(do), ref_vjp(do.astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=5e-2, rtol=5e-2)
