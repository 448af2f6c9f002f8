"""Flash attention kernel: parity with the reference (forward and gradients, interpret mode on
CPU), heuristics, errors, and the real Pallas->Triton lowering for CUDA via jax.export.

Tolerances (elementwise |kernel - reference| <= atol + rtol * |reference|):
- f32: atol 2e-5, rtol 1e-4. Measured worst over the f32 cases: 4.8e-6 absolute (dv, values up
  to 13), <= 2.1e-6 relative to |ref| + 1; only the summation order differs (online softmax in
  blocks, exp2), so this is a ~4x margin over f32 round-off, and any masking/indexing bug is
  O(1e-1).
- bf16 (atol = rtol = 1e-2) and f16 (2e-3): against the f32 reference on the same rounded
  inputs, cast to the low dtype. Measured worst: bf16 1.6e-2 absolute at |value| ~4 (one bf16
  ulp; <= 7.7e-3 relative to |ref| + 1), f16 2.0e-3 absolute; the reference run in the low
  dtype (as framework.ops' xla impl does) shows the same errors case by case.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import export_cuda, triton_calls

from pallas_kernels import flash_attention as fa
from pallas_kernels.flash_attention import (
    HEURISTIC_CONFIGS,
    attention_mask,
    attention_reference,
    causal_mask,
    choose_config,
    flash_attention,
    flash_attention_with_lse,
    supports,
)

TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (1e-2, 1e-2), jnp.float16: (2e-3, 2e-3)}


def _inputs(seed: int, b: int, tq: int, tk: int, h: int, kh: int, d: int, dtype):
    """Fresh random normal q, k, v and a cotangent for the output (never zeros)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, kh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, tq, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _segments(seed: int, b: int, t: int, n: int = 3) -> jax.Array:
    """Sorted random segment ids in [0, n) (packed sequences)."""
    return jnp.sort(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, n), axis=1)


def _value_and_grads(fn, q, k, v, do, kw):
    """Jitted (out, dq, dk, dv) of fn(q, k, v, **kw) with cotangent do."""

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (out, *vjp(do))

    return run(q, k, v, do)


def _assert_close(got, want, dtype, names=("out", "dq", "dk", "dv")):
    """Elementwise |got - want| <= atol + rtol * |want| for each named array."""
    atol, rtol = TOL[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), name
        err = np.abs(g - w)
        bad = err > atol + rtol * np.abs(w)
        assert not bad.any(), f"{name}: max abs err {err.max():.3g} (atol {atol}, rtol {rtol})"


def assert_as_accurate_as_xla(fn, q, k, v, do, kw, factor: float = 2.0):
    """Compiled on a GPU in bf16: fn's (out, dq, dk, dv) are each no further from the f32
    reference (max abs error) than `factor` x what XLA's attention computed in the same dtype
    is. A fixed tolerance does not hold there: long reductions (dk/dv of a GQA group over
    thousands of queries) round by more than an elementwise 1e-2."""
    from pallas_kernels.flash_attention import attention_reference

    got = _value_and_grads(fn, q, k, v, do, kw)
    same_dtype = _value_and_grads(attention_reference, q, k, v, do, kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = _value_and_grads(attention_reference, *f32, kw)
    for name, g, x, w in zip(("out", "dq", "dk", "dv"), got, same_dtype, want, strict=True):
        assert g.shape == w.shape and g.dtype == q.dtype, (name, g.shape, g.dtype)
        g, x, w = (np.asarray(a, np.float32) for a in (g, x, w))
        assert np.all(np.isfinite(g)), name
        err, xla_err = np.abs(g - w).max(), np.abs(x - w).max()
        assert err <= factor * xla_err + 1e-3, f"{name}: max abs err {err:.3g}, XLA's {xla_err:.3g}"


# (b, tq, tk, h, kh, d, causal, segments, block_q/block_k override or None)
F32_CASES = {
    "mha-64": (2, 64, 64, 4, 4, 64, False, False, None),
    "causal-odd37-gqa4-blocks16": (1, 37, 37, 4, 1, 64, True, False, (16, 16)),
    "causal-odd61-gqa8-seg-d128": (1, 61, 61, 8, 1, 128, True, True, (16, 32)),
    "seg-odd61-d128": (2, 61, 61, 2, 2, 128, False, True, (32, 16)),
    "causal-d256": (1, 32, 32, 2, 1, 256, True, False, (16, 16)),
    "causal-kv-longer": (1, 24, 61, 4, 2, 64, True, False, (16, 16)),
    "causal-q-longer": (1, 61, 24, 4, 2, 64, True, False, (16, 16)),
    "cross-noncausal": (1, 40, 72, 4, 4, 32, False, False, (16, 32)),
    "head-dim-80-padded": (1, 33, 33, 2, 2, 80, True, False, None),
}


@pytest.mark.parametrize("case", sorted(F32_CASES))
def test_parity_f32(case: str):
    b, tq, tk, h, kh, d, causal, seg, blocks = F32_CASES[case]
    seed = sum(map(ord, case))
    q, k, v, do = _inputs(seed, b, tq, tk, h, kh, d, jnp.float32)
    kw = dict(causal=causal)
    if seg:
        kw["segment_ids"] = _segments(seed + 1, b, tq)
        if tk != tq:
            kw["kv_segment_ids"] = _segments(seed + 2, b, tk)
    blk = dict(block_q=blocks[0], block_k=blocks[1]) if blocks else {}
    got = _value_and_grads(
        lambda q, k, v, **a: flash_attention(q, k, v, **a, **blk), q, k, v, do, kw
    )
    want = _value_and_grads(attention_reference, q, k, v, do, kw)
    _assert_close(got, want, jnp.float32)


LOW_CASES = {
    "bf16-causal-gqa4": (jnp.bfloat16, 1, 61, 61, 4, 1, 64, True, False),
    "bf16-seg-gqa8-d128": (jnp.bfloat16, 1, 48, 48, 8, 1, 128, False, True),
    "bf16-mha": (jnp.bfloat16, 2, 64, 64, 2, 2, 64, False, False),
    "f16-causal": (jnp.float16, 1, 37, 37, 2, 2, 64, True, False),
}


@pytest.mark.parametrize("case", sorted(LOW_CASES))
def test_parity_low_precision(case: str):
    dtype, b, tq, tk, h, kh, d, causal, seg = LOW_CASES[case]
    seed = sum(map(ord, case))
    q, k, v, do = _inputs(seed, b, tq, tk, h, kh, d, dtype)
    kw = dict(causal=causal)
    if seg:
        kw["segment_ids"] = _segments(seed + 1, b, tq)
    got = _value_and_grads(
        lambda q, k, v, **a: flash_attention(q, k, v, block_q=16, block_k=32, **a), q, k, v, do, kw
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = [w.astype(dtype) for w in _value_and_grads(attention_reference, *f32, kw)]
    _assert_close(got, want, dtype)


# (dtype, b, tq, tk, h, kh, d, window, segments, blocks): windows narrower than, equal to and
# wider than a block, end-aligned q/kv lengths, GQA, segments on top of the window.
WINDOW_CASES = {
    "f32-w5-gqa2": (jnp.float32, 2, 40, 40, 4, 2, 32, 5, False, (16, 16)),
    "f32-w16-block-q-longer-kv": (jnp.float32, 1, 24, 61, 2, 1, 64, 16, False, (16, 32)),
    "f32-w23-seg": (jnp.float32, 1, 61, 61, 2, 2, 32, 23, True, (16, 16)),
    "f32-w1-self-only": (jnp.float32, 1, 33, 33, 2, 2, 32, 1, False, (16, 16)),
    "bf16-w9-mqa": (jnp.bfloat16, 1, 48, 48, 4, 1, 64, 9, False, (16, 32)),
}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_sliding_window_parity(case: str):
    """window= (Mistral's sliding window): kernel forward and gradients equal the reference,
    whose mask is checked against a mask written out by hand."""
    dtype, b, tq, tk, h, kh, d, window, seg, (bq, bk) = WINDOW_CASES[case]
    seed = sum(map(ord, case))
    q, k, v, do = _inputs(seed, b, tq, tk, h, kh, d, dtype)
    kw = dict(causal=True, window=window)
    if seg:
        kw["segment_ids"] = _segments(seed + 1, b, tq)
    got = _value_and_grads(
        lambda q, k, v, **a: flash_attention(q, k, v, block_q=bq, block_k=bk, **a), q, k, v, do, kw
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = [w.astype(dtype) for w in _value_and_grads(attention_reference, *f32, kw)]
    _assert_close(got, want, dtype)
    rows = np.arange(tq)[:, None] + (tk - tq)  # each query's absolute (end-aligned) position
    cols = np.arange(tk)[None, :]
    by_hand = (cols <= rows) & (cols > rows - window)
    mask = np.asarray(attention_mask(tq, tk, causal=True, window=window))[0, 0]
    np.testing.assert_array_equal(mask, by_hand)


# GQA fold (forward and dq take a group's query heads per program). The fold's row budget is
# the device table's block_q, so the H100 table (128 rows at head_dim <= 128) lets block_q 16
# fold groups up to 8 here. (dtype, b, tq, tk, h, kh, d, causal, window, segments, configs);
# configs: (block_q, block_k) for all kernels, or per-kernel KernelConfigs.
_FWD_FOLDED_DQ_NOT = {"fwd": fa.KernelConfig(16, 16, 4, 2), "dq": fa.KernelConfig(64, 16, 4, 2)}
FOLD_CASES = {
    "f32-gqa2-noncausal-odd": (jnp.float32, 2, 29, 51, 4, 2, 64, False, None, False, (16, 16)),
    "f32-gqa8-causal-seg-odd": (jnp.float32, 1, 45, 45, 16, 2, 32, True, None, True, (16, 32)),
    "f32-mqa4-window-kv-longer": (jnp.float32, 1, 24, 50, 4, 1, 32, True, 7, False, (16, 16)),
    "bf16-gqa4-causal-d128": (jnp.bfloat16, 1, 53, 53, 8, 2, 128, True, None, False, (16, 32)),
    "bf16-mqa8-window-seg": (jnp.bfloat16, 2, 40, 40, 8, 1, 32, True, 12, True, (16, 16)),
    "f32-gqa4-seg-fwd-folded-dq-not": (
        *(jnp.float32, 1, 37, 37, 8, 2, 32, True, None, True),
        _FWD_FOLDED_DQ_NOT,
    ),
}


def _static(q, k, v, **kw) -> fa._Static:
    """The kernels' static description (fold decisions included) for flash_attention's
    keyword arguments."""
    names = list(inspect.signature(fa._prepare).parameters)[3:]  # after q, k, v
    return fa._prepare(q, k, v, **{n: kw.get(n) for n in names})[0]


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_gqa_fold_parity(case: str):
    """Folded forward/dq (one program per GQA group, rows = positions x heads): output and
    gradients equal the reference with causal, window and segment masks at odd lengths."""
    dtype, b, tq, tk, h, kh, d, causal, window, seg, configs = FOLD_CASES[case]
    seed = sum(map(ord, case))
    q, k, v, do = _inputs(seed, b, tq, tk, h, kh, d, dtype)
    kw = dict(causal=causal, window=window)
    if seg:
        kw["segment_ids"] = _segments(seed + 1, b, tq)
        kw["kv_segment_ids"] = _segments(seed + 2, b, tk)
    blk = dict(device_kind=fa.FAMILY_EXAMPLES["hopper"])
    if isinstance(configs, dict):
        blk["kernel_configs"] = configs
    else:
        blk["block_q"], blk["block_k"] = configs
    st = _static(q, k, v, **kw, **blk)
    assert (st.fold_fwd, st.fold_dq) == (True, configs is not _FWD_FOLDED_DQ_NOT)
    got = _value_and_grads(
        lambda q, k, v, **a: flash_attention(q, k, v, **blk, **a), q, k, v, do, kw
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = [w.astype(dtype) for w in _value_and_grads(attention_reference, *f32, kw)]
    _assert_close(got, want, dtype)


def test_gqa_fold_decision():
    """Folds only power-of-two groups, only up to the table's block_q rows for the kernel, head
    dim, dtype and device; the CPU table (64 rows) keeps the existing cases' coverage of both
    paths: groups 4 at block_q 16 folds, groups 8 does not."""
    h100, bf16 = fa.FAMILY_EXAMPLES["hopper"], jnp.bfloat16
    assert fa._folds("fwd", 16, 8, 128, bf16, h100)  # 128 rows: the H100 forward's block_q
    assert fa._folds("dq", 64, 2, 64, bf16, h100)
    assert not fa._folds("fwd", 32, 8, 128, bf16, h100)  # 256 rows
    assert not fa._folds("fwd", 16, 8, 256, bf16, h100)  # head_dim 256: 64 rows
    assert not fa._folds("fwd", 16, 6, 64, bf16, h100)  # not a power of two
    assert not fa._folds("fwd", 16, 1, 64, bf16, h100)
    assert fa._folds("fwd", 16, 4, 64, jnp.float32, "cpu")
    assert not fa._folds("dq", 16, 8, 64, jnp.float32, "cpu")


def test_window_needs_causal():
    q, k, v, _ = _inputs(0, 1, 16, 16, 2, 2, 32, jnp.float32)
    assert not supports(q, k, v, causal=False, window=4)
    assert supports(q, k, v, causal=True, window=4)
    with pytest.raises(ValueError, match="window=4 needs causal"):
        flash_attention(q, k, v, causal=False, window=4)


def test_reference_mask_argument_and_framework_xla_impl():
    """An explicit `mask` built from causal_mask and segment equality gives what causal= and
    segment_ids= give (also per head, broadcast), and framework.ops' xla impl is this reference."""
    from framework import ops

    q, k, v, _ = _inputs(7, 2, 24, 40, 4, 2, 32, jnp.float32)
    seg, kv_seg = _segments(8, 2, 24), _segments(9, 2, 40)
    kw = dict(causal=True, segment_ids=seg, kv_segment_ids=kv_seg)
    want = attention_reference(q, k, v, **kw)
    explicit = causal_mask(24, 40) & (seg[:, None, :, None] == kv_seg[:, None, None, :])
    assert explicit.shape == attention_mask(24, 40, **kw).shape == (2, 1, 24, 40)
    np.testing.assert_array_equal(explicit, attention_mask(24, 40, **kw))
    np.testing.assert_array_equal(attention_reference(q, k, v, mask=explicit), want)
    per_head = jnp.broadcast_to(explicit, (2, 4, 24, 40))
    np.testing.assert_array_equal(attention_reference(q, k, v, mask=per_head), want)
    got = ops.attention(q, k, v, **kw, impl="xla")
    np.testing.assert_array_equal(got, attention_reference(q, k, v, **kw, precision=None))


def test_fully_masked_rows_and_lse():
    """Rows whose segment has no keys give 0 output, -inf lse and zero dq; lse matches."""
    b, t, h, d = 1, 32, 2, 32
    q, k, v, do = _inputs(11, b, t, t, h, h, d, jnp.float32)
    seg = jnp.where(jnp.arange(t) < 8, 5, 1)[None]  # rows 0..7 in segment 5 ...
    kv_seg = jnp.ones((b, t), jnp.int32)  # ... which no key has
    kw = dict(segment_ids=seg, kv_segment_ids=kv_seg, scale=0.3)
    out, lse = flash_attention_with_lse(q, k, v, block_q=16, block_k=16, **kw)
    assert np.all(np.asarray(out[:, :8]) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :, :8])))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * 0.3
    np.testing.assert_allclose(
        lse[:, :, 8:], jax.nn.logsumexp(logits[:, :, 8:], axis=-1), atol=1e-5, rtol=1e-5
    )
    got = _value_and_grads(
        lambda q, k, v, **a: flash_attention(q, k, v, block_q=16, block_k=16, **a), q, k, v, do, kw
    )
    assert np.all(np.asarray(got[1][:, :8]) == 0.0)
    _assert_close(got, _value_and_grads(attention_reference, q, k, v, do, kw), jnp.float32)


def test_grad_of_scalar_loss_under_jit():
    """jax.grad through a jitted loss works and agrees with the reference."""
    q, k, v, _ = _inputs(3, 1, 40, 40, 4, 2, 64, jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, causal=True)))

    g = jax.jit(jax.grad(lambda *a: loss(flash_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    r = jax.jit(jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2)))(q, k, v)
    _assert_close(g, r, jnp.float32, names=("dq", "dk", "dv"))


# ---------------------------------------------------------------------------------------------
# Heuristics, support and errors


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_heuristic_table_entries_are_valid():
    assert {c["family"] for c in HEURISTIC_CONFIGS} == set(fa.HEURISTIC_TABLE)
    for c in HEURISTIC_CONFIGS:
        cfg = c["config"]
        assert _is_pow2(cfg.block_q) and _is_pow2(cfg.block_k), c
        assert cfg.block_q >= 16 and cfg.block_k >= 16, c
        assert cfg.num_warps in (1, 2, 4, 8, 16) and cfg.num_stages >= 1, c


@pytest.mark.parametrize("device_kind", sorted(fa.FAMILY_EXAMPLES.values()))
def test_choose_config_shrinks_for_short_sequences(device_kind: str):
    for kernel in fa.KERNELS:
        for t, d in ((5, 64), (37, 128), (100, 256), (8192, 128)):
            cfg = choose_config(t, t, d, jnp.bfloat16, device_kind, kernel)
            assert _is_pow2(cfg.block_q) and cfg.block_q >= 16
            assert _is_pow2(cfg.block_k) and cfg.block_k >= 16
            assert cfg.block_q <= max(16, 1 << math.ceil(math.log2(t)))
    h100 = choose_config(8192, 8192, 128, jnp.bfloat16, "NVIDIA H100 80GB HBM3")
    assert h100 == fa.KernelConfig(128, 64, 8, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_config(64, 64, 64, jnp.bfloat16, "cpu", "bogus")


def test_supports():
    q = jnp.zeros((1, 64, 8, 128), jnp.bfloat16)
    k = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    assert supports(q, k, k, causal=True)
    assert supports(q, k, k, segment_ids=jnp.zeros((1, 64), jnp.int32))
    assert not supports(q, k, k, mask=jnp.ones((1, 1, 64, 64), bool))
    assert not supports(q, k.astype(jnp.float32), k)
    assert not supports(
        q, jnp.zeros((1, 64, 3, 128), jnp.bfloat16), jnp.zeros((1, 64, 3, 128), jnp.bfloat16)
    )
    assert not supports(
        jnp.zeros((1, 64, 2, 512)), jnp.zeros((1, 64, 2, 512)), jnp.zeros((1, 64, 2, 512))
    )
    assert not supports(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32))


def test_errors_name_the_constraint():
    q = jnp.ones((1, 32, 2, 64))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, block_q=48)
    with pytest.raises(ValueError, match="head_dim 512"):
        z = jnp.ones((1, 32, 2, 512))
        flash_attention(z, z, z)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(jnp.ones((1, 32, 3, 64)), q, q)
    with pytest.raises(ValueError, match="kv_segment_ids given without segment_ids"):
        flash_attention(q, q, q, kv_segment_ids=jnp.zeros((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="segment ids must be"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 31), jnp.int32))


# ---------------------------------------------------------------------------------------------
# GPU lowering on CPU: the real Pallas -> Triton lowering through jax.export for CUDA.


def _export_fwd_bwd(
    b: int,
    tq: int,
    tk: int,
    h: int,
    kh: int,
    d: int,
    dtype,
    *,
    causal: bool,
    segments: bool = False,
    **kw,
):
    """Export forward + backward for CUDA; returns the StableHLO text."""
    q = jax.ShapeDtypeStruct((b, tq, h, d), dtype)
    kv = jax.ShapeDtypeStruct((b, tk, kh, d), dtype)
    seg = jax.ShapeDtypeStruct((b, tq), jnp.int32)

    def f(q, k, v, do, seg):
        fn = lambda q, k, v: flash_attention(
            q, k, v, causal=causal, interpret=False, segment_ids=seg if segments else None, **kw
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

    return export_cuda(f, q, kv, kv, q, seg)


_LOWER_CASES = [
    (fam, kind, d, causal)
    for fam, kind in sorted(fa.FAMILY_EXAMPLES.items())
    for d in (64, 128, 256)
    for causal in (False, True)
]


@pytest.mark.parametrize("family,device_kind,head_dim,causal", _LOWER_CASES)
def test_lowers_for_cuda_every_heuristic_config(
    family: str, device_kind: str, head_dim: int, causal: bool
):
    """Every table entry (fwd, dq, dkdv kernels), as the heuristics pick it at seq 1024."""
    text = _export_fwd_bwd(
        1, 1024, 1024, 4, 4, head_dim, jnp.bfloat16, causal=causal, device_kind=device_kind
    )
    assert triton_calls(text) == 3  # fwd, dq, dkdv


def test_heuristic_cases_cover_every_config():
    """The lowering parametrization above reaches every HEURISTIC_CONFIGS entry."""
    picked = {
        (fa._family(kind), kernel, choose_config(1024, 1024, d, jnp.bfloat16, kind, kernel))
        for _, kind, d, _ in _LOWER_CASES
        for kernel in fa.KERNELS
    }
    assert {(c["family"], c["kernel"], c["config"]) for c in HEURISTIC_CONFIGS} <= picked


@pytest.mark.parametrize(
    "kw",
    [
        dict(h=8, kh=1, d=128, dtype=jnp.bfloat16, causal=True, segments=True),  # MQA + segments
        dict(h=6, kh=2, d=64, dtype=jnp.float16, causal=False, segments=False),  # GQA 3
        dict(h=2, kh=2, d=64, dtype=jnp.float32, causal=True, segments=False),  # f32 (TF32 dots)
        dict(h=2, kh=1, d=256, dtype=jnp.float32, causal=True, segments=False),  # f32 halved blocks
        dict(h=4, kh=2, d=80, dtype=jnp.bfloat16, causal=True, segments=False),  # padded head dim
        dict(h=4, kh=2, d=64, dtype=jnp.bfloat16, causal=True, segments=False, window=96),
    ],
    ids=["mqa-seg", "gqa3-f16", "f32", "f32-d256", "d80", "window"],
)
def test_lowers_for_cuda_variants(kw):
    """GQA/MQA, segments, dtypes, padded head dim, and short/odd lengths (shrunk blocks)."""
    kw = dict(kw)
    dtype = kw.pop("dtype")
    for t in (1000, 37):
        text = _export_fwd_bwd(
            2,
            t,
            t,
            kw["h"],
            kw["kh"],
            kw["d"],
            dtype,
            causal=kw["causal"],
            segments=kw["segments"],
            device_kind=fa.FAMILY_EXAMPLES["hopper"],
            window=kw.get("window"),
        )
        assert triton_calls(text) == 3


@pytest.mark.parametrize(
    "t,h,kh,d,segments,window",
    [(16, 32, 4, 128, True, None), (37, 8, 4, 64, False, 24), (5, 8, 1, 64, True, None)],
    ids=["gqa8-d128-seg", "gqa2-odd-window", "mqa8-decode"],
)
def test_lowers_for_cuda_gqa_folded(t, h, kh, d, segments, window):
    """Forward and dq folded (a [block_q * groups, d] tile per GQA group) lower for an H100."""
    hopper = fa.FAMILY_EXAMPLES["hopper"]
    q, kv = jnp.zeros((2, t, h, d), jnp.bfloat16), jnp.zeros((2, t, kh, d), jnp.bfloat16)
    st = _static(q, kv, kv, causal=True, interpret=False, device_kind=hopper, window=window)
    assert st.fold_fwd and st.fold_dq
    text = _export_fwd_bwd(
        2,
        t,
        t,
        h,
        kh,
        d,
        jnp.bfloat16,
        causal=True,
        segments=segments,
        window=window,
        device_kind=hopper,
    )
    assert triton_calls(text) == 3


def test_non_power_of_two_block_fails_lowering(monkeypatch):
    """The export check is real: a block the table must never pick (48) fails to lower."""
    monkeypatch.setattr(fa, "choose_config", lambda *a, **k: fa.KernelConfig(48, 48, 4, 2))
    with pytest.raises(ValueError, match="power of 2"):
        _export_fwd_bwd(1, 96, 96, 2, 2, 64, jnp.bfloat16, causal=True)


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU (scripts/gpu_check.sh runs these; deselected on CPU by `-m 'not gpu'`).


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_on_gpu_seq1024(causal: bool):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    q, k, v, do = _inputs(0, 2, 1024, 1024, 8, 2, 128, jnp.bfloat16)
    seg = _segments(1, 2, 1024)
    kw = dict(causal=causal, segment_ids=seg)
    fn = lambda q, k, v, **a: flash_attention(q, k, v, interpret=False, **a)
    assert_as_accurate_as_xla(fn, q, k, v, do, kw)
