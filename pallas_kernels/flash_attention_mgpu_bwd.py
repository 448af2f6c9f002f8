"""Backward kernels of the Mosaic GPU flash attention (pallas_kernels/flash_attention_mgpu.py):
dq per query block over the K/V blocks, dk/dv per K/V block over the group's query heads and
their query blocks, each streamed through a TMA ring with barriers, every product on wgmma.

dk/dv computes the transposed products (S^T = K Q^T, dP^T = V dO^T) so that the resident K/V
block is the M of every matmul. Softmax probabilities and dS go to shared memory as wgmma A
operands. lse arrives in log2 units (+inf for rows with no key: their P is 0)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention_mgpu import (
    BLOCK_KV_BWD,
    BLOCK_Q,
    LOG2E,
    Masking,
    _backward_stages,
    plgpu,
)


def _acc(fn, shape) -> jax.Array:
    """fn(acc_ref) on a fresh f32 wgmma accumulator of `shape`; its value after fn, waited for
    (so the ring slot its operands came from may be refilled right after)."""

    def body(acc_ref):
        fn(acc_ref)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _segment_scratch(segments: bool, resident: tuple, ring: tuple) -> list:
    """With segments: shared memory for the resident block's ids, a ring slot's ids (beside
    the streamed operands), and their barriers; nothing otherwise."""
    if not segments:
        return []
    return [
        plgpu.SMEM(resident, jnp.int32),
        plgpu.SMEM(ring, jnp.int32),
        (
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=1, num_barriers=ring[0]),
        ),
    ]


def dq_scratch(d: int, block_kv: int, dtype, segments: bool, transforms: tuple,
               kv_stages: int) -> list:  # fmt: skip
    """The dq kernel's shared memory and barriers: Q, dO, a K/V ring, dS, lse, delta."""
    return [
        plgpu.SMEM((BLOCK_Q, d), dtype, transforms=transforms),
        plgpu.SMEM((BLOCK_Q, d), dtype, transforms=transforms),
        plgpu.SMEM((kv_stages, block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((kv_stages, block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((BLOCK_Q, block_kv), dtype, transforms=transforms),
        plgpu.SMEM((BLOCK_Q,), jnp.float32),
        plgpu.SMEM((BLOCK_Q,), jnp.float32),
        (
            plgpu.Barrier(num_arrivals=1, num_barriers=4),
            plgpu.Barrier(num_arrivals=1, num_barriers=kv_stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=kv_stages),
        ),
        *_segment_scratch(segments, (BLOCK_Q,), (kv_stages, block_kv)),
    ]


def dkdv_scratch(d: int, block_kv: int, dtype, segments: bool, transforms: tuple,
                 q_stages: int) -> list:  # fmt: skip
    """The dk/dv kernel's shared memory and barriers: K, V, a ring of (Q, dO, lse, delta),
    P^T and dS^T."""
    return [
        plgpu.SMEM((block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((q_stages, BLOCK_Q, d), dtype, transforms=transforms),
        plgpu.SMEM((q_stages, BLOCK_Q, d), dtype, transforms=transforms),
        plgpu.SMEM((q_stages, BLOCK_Q), jnp.float32),
        plgpu.SMEM((q_stages, BLOCK_Q), jnp.float32),
        plgpu.SMEM((block_kv, BLOCK_Q), dtype, transforms=transforms),
        plgpu.SMEM((block_kv, BLOCK_Q), dtype, transforms=transforms),
        (
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
            *(plgpu.Barrier(num_arrivals=1, num_barriers=q_stages) for _ in range(4)),
        ),
        *_segment_scratch(segments, (block_kv,), (q_stages, BLOCK_Q)),
    ]


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, masking: Masking, scale: float,
             stages: int, interpret: Any, transforms: tuple) -> tuple[jax.Array, ...]:  # fmt: skip
    """(dq, dk, dv) of attention(q, k, v) on block-padded inputs given its out, lse (natural
    log) and dout; segment ids None unless masking.segments."""
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    groups, dtype = h // kh, q.dtype
    offset = masking.offset
    c = scale * LOG2E
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)
    block_kv = BLOCK_KV_BWD
    n_kv, n_q = tk // block_kv, tq // BLOCK_Q
    n_q_live = pl.cdiv(masking.q_len, BLOCK_Q)  # query blocks with a real row
    kv_stages, q_stages = _backward_stages(stages, masking.q_len, masking.kv_len, groups)
    segs = (q_seg, kv_seg) if masking.segments else ()
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        if masking.segments:
            qseg_ref, kvseg_ref, *refs = refs
        (
            dq_ref,
            q_smem,
            do_smem,
            k_smem,
            v_smem,
            ds_smem,
            lse_smem,
            delta_smem,
            bars,
            *seg_scratch,
        ) = refs
        in_bars, k_bars, v_bars = bars
        if masking.segments:  # staged in shared memory (jax 0.11 loads no GMEM to registers)
            qseg_smem, kvseg_smem, (qseg_bar, kvseg_bars) = seg_scratch
        head, qi, bi = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
        kv_head = lax.div(head, jnp.int32(groups))
        q_start = qi * BLOCK_Q
        steps, unmasked = masking.kv_steps(q_start, BLOCK_Q, block_kv, n_kv)
        rows = pl.ds(q_start, BLOCK_Q)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_smem, in_bars.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_smem, in_bars.at[1])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rows], lse_smem, in_bars.at[2])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, rows], delta_smem, in_bars.at[3])
        if masking.segments:
            plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qseg_smem, qseg_bar)

        def fetch(step, slot):
            kv = (bi, pl.ds(step * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[kv], v_smem.at[slot], v_bars.at[slot])
            if masking.segments:
                seg = kvseg_ref.at[bi, pl.ds(step * block_kv, block_kv)]
                plgpu.copy_gmem_to_smem(seg, kvseg_smem.at[slot], kvseg_bars.at[slot])

        for first in range(kv_stages):
            pl.when(first < steps)(lambda first=first: fetch(jnp.int32(first), first))
        for i in range(4):
            plgpu.barrier_wait(in_bars.at[i])
        lse = plgpu.load(lse_smem, layout=row_layout)
        dlt = plgpu.load(delta_smem, layout=row_layout)
        q_seg = None
        if masking.segments:
            plgpu.barrier_wait(qseg_bar)
            q_seg = plgpu.load(qseg_smem, layout=row_layout)

        def body(step, dq, masked: bool):
            slot = lax.rem(step, jnp.int32(kv_stages))
            plgpu.barrier_wait(k_bars.at[slot])
            plgpu.barrier_wait(v_bars.at[slot])
            shape = (BLOCK_Q, block_kv)
            s = _acc(lambda r: plgpu.wgmma(r, q_smem, k_smem.at[slot].T), shape) * c
            if masked:
                kv_seg = None
                if masking.segments:  # every block is masked: each waits for its ids
                    plgpu.barrier_wait(kvseg_bars.at[slot])
                    kv_seg = plgpu.load(kvseg_smem.at[slot], layout=col_layout)
                s = masking.mask(s, q_start, step * block_kv, 0, q_seg, kv_seg)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [0]))
            dp = _acc(lambda r: plgpu.wgmma(r, do_smem, v_smem.at[slot].T), shape)
            ds_smem[...] = (p * (dp - lax.broadcast_in_dim(dlt, shape, [0]))).astype(dtype)
            plgpu.commit_smem()
            dq = dq + _acc(lambda r: plgpu.wgmma(r, ds_smem, k_smem.at[slot]), (BLOCK_Q, d))
            nxt = step + kv_stages

            @pl.when(nxt < steps)
            def _refill():
                fetch(nxt, slot)

            return dq

        dq = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, unmasked, functools.partial(body, masked=False), dq)
        dq = lax.fori_loop(unmasked, steps, functools.partial(body, masked=True), dq)
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, head])
        plgpu.wait_smem_to_gmem(0)

    dq = plgpu.kernel(
        dq_kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=dq_scratch(d, block_kv, dtype, masking.segments, transforms, kv_stages),
        grid=(h, n_q, b),
        grid_names=("heads", "q", "batch"),
        interpret=interpret,
    )(q, k, v, do, lse2, delta, *segs)

    def dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        if masking.segments:
            qseg_ref, kvseg_ref, *refs = refs
        dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *refs = refs
        pt_smem, dst_smem, bars, *seg_scratch = refs
        kv_bar, q_bars, do_bars, lse_bars, delta_bars = bars
        if masking.segments:
            kvseg_smem, qseg_smem, (kvseg_bar, qseg_bars) = seg_scratch
        kv_head, kj, bi = lax.axis_index("kv_heads"), lax.axis_index("kv"), lax.axis_index("batch")
        k_start = kj * block_kv
        cols = pl.ds(k_start, block_kv)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, cols, kv_head], k_smem, kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, cols, kv_head], v_smem, kv_bar.at[1])
        if masking.segments:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, cols], kvseg_smem, kvseg_bar)
        # The (query block, head of the group) pairs that see this K/V block, query block
        # major: all (not causal) or from the diagonal on; the first `masked` of them need a
        # mask (the diagonal blocks; all with segments or when the block holds padded keys).
        if masking.causal:
            q_lo = jnp.clip(lax.div(k_start - offset, BLOCK_Q), 0, n_q_live)
            clear = jnp.clip(pl.cdiv(k_start + block_kv - 1 - offset, BLOCK_Q), q_lo, n_q_live)
        else:
            q_lo, clear = jnp.int32(0), jnp.int32(0)
        total = (n_q_live - q_lo) * groups  # query blocks of padding rows only: skipped
        masked = (clear - q_lo) * groups
        if masking.segments:
            masked = total
        elif masking.kv_len % block_kv:
            masked = jnp.where(k_start + block_kv > masking.kv_len, total, masked)

        def pair(t):
            """(query head, first query row) of pair t."""
            return kv_head * groups + lax.rem(t, groups), (q_lo + lax.div(t, groups)) * BLOCK_Q

        def fetch(t, slot):
            head, q_start = pair(t)
            rows = pl.ds(q_start, BLOCK_Q)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_smem.at[slot], q_bars.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_smem.at[slot], do_bars.at[slot])
            plgpu.copy_gmem_to_smem(
                lse_ref.at[bi, head, rows], lse_smem.at[slot], lse_bars.at[slot]
            )
            plgpu.copy_gmem_to_smem(
                delta_ref.at[bi, head, rows], delta_smem.at[slot], delta_bars.at[slot]
            )
            if masking.segments:
                seg = qseg_ref.at[bi, rows]
                plgpu.copy_gmem_to_smem(seg, qseg_smem.at[slot], qseg_bars.at[slot])

        for first in range(q_stages):
            pl.when(first < total)(lambda first=first: fetch(jnp.int32(first), first))
        plgpu.barrier_wait(kv_bar.at[0])
        plgpu.barrier_wait(kv_bar.at[1])
        kv_seg = None
        if masking.segments:
            plgpu.barrier_wait(kvseg_bar)
            kv_seg = plgpu.load(kvseg_smem, layout=row_layout)

        def body(t, carry, masked: bool):
            dk, dv = carry
            slot = lax.rem(t, jnp.int32(q_stages))
            for bars_ in (q_bars, do_bars, lse_bars, delta_bars):
                plgpu.barrier_wait(bars_.at[slot])
            shape = (block_kv, BLOCK_Q)
            q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
            s_t = _acc(lambda r: plgpu.wgmma(r, k_smem, q_slot.T), shape) * c
            if masked:
                q_seg = None
                if masking.segments:  # every pair is masked: each waits for its ids
                    plgpu.barrier_wait(qseg_bars.at[slot])
                    q_seg = plgpu.load(qseg_smem.at[slot], layout=col_layout)
                s_t = masking.mask(s_t, pair(t)[1], k_start, 1, q_seg, kv_seg)
            lse = plgpu.load(lse_smem.at[slot], layout=col_layout)
            dlt = plgpu.load(delta_smem.at[slot], layout=col_layout)
            p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, shape, [1]))
            pt_smem[...] = p_t.astype(dtype)
            plgpu.commit_smem()
            dv = dv + _acc(lambda r: plgpu.wgmma(r, pt_smem, do_slot), (block_kv, d))
            dp_t = _acc(lambda r: plgpu.wgmma(r, v_smem, do_slot.T), shape)
            dst_smem[...] = (p_t * (dp_t - lax.broadcast_in_dim(dlt, shape, [1]))).astype(dtype)
            plgpu.commit_smem()
            dk = dk + _acc(lambda r: plgpu.wgmma(r, dst_smem, q_slot), (block_kv, d))
            nxt = t + q_stages

            @pl.when(nxt < total)
            def _refill():
                fetch(nxt, slot)

            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((block_kv, d), jnp.float32), plgpu.Layout.WGMMA)
        carry = lax.fori_loop(0, masked, functools.partial(body, masked=True), (zeros, zeros))
        dk, dv = lax.fori_loop(masked, total, functools.partial(body, masked=False), carry)
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, cols, kv_head])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, cols, kv_head])
        plgpu.wait_smem_to_gmem(0)

    dk, dv = plgpu.kernel(
        dkdv_kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
        scratch_types=dkdv_scratch(d, block_kv, dtype, masking.segments, transforms, q_stages),
        grid=(kh, n_kv, b),
        grid_names=("kv_heads", "kv", "batch"),
        interpret=interpret,
    )(q, k, v, do, lse2, delta, *segs)
    return dq, dk, dv
