"""Flash attention for Hopper (sm90) on Pallas' Mosaic GPU backend: K/V streamed by TMA
through a multi-stage shared-memory ring with barriers, every matmul on wgmma.

Forward: per CTA a producer warpgroup (TMA) and two compute warpgroups of 64 query rows that
ping-pong (one's softmax overlaps the other's matmuls); the causal loop is split into
unmasked and masked blocks; GQA by indexing the K/V head; segment ids (packed documents);
any length (padded to whole blocks inside, padded keys masked); f32 accumulation; the
log-sum-exp kept for the backward (flash_attention_mgpu_bwd.py). Needs a jax with
`jax.experimental.pallas.mosaic_gpu` (`available()`); tested on the CPU in Mosaic GPU interpret
mode (shared memory, TMA, barriers and warpgroups simulated, races detected)."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash_attention as fa

try:  # jax >= 0.11 on these machines; absent or incomplete before
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _MISSING = next(
        (n for n in ("kernel", "wgmma", "ACC", "SMEM", "Barrier", "InterpretGPUParams")
         if not hasattr(plgpu, n)),
        None,
    )  # fmt: skip
except ImportError as e:  # pragma: no cover - depends on the installed jax
    plgpu, _MISSING = None, str(e)

LOG2E = math.log2(math.e)
BLOCK_Q = 64  # one warpgroup's wgmma M
COMPUTE_WGS = 2  # forward: compute warpgroups per CTA (plus one producer)
CTA_Q = BLOCK_Q * COMPUTE_WGS  # forward: query rows per CTA
DEFAULT_STAGES = 2
BLOCK_KV_BWD = 64  # the backward's K/V block: dk and dv (2 x 64 x d f32) fill a warpgroup
SMEM_BYTES = 227 * 1024  # shared memory one Hopper CTA may use
DTYPES = (jnp.float16, jnp.bfloat16)


def available() -> str | None:
    """None if this jax has the Mosaic GPU API the kernel uses, else why not (one line)."""
    if _MISSING is None:
        return None
    return f"jax {jax.__version__} lacks jax.experimental.pallas.mosaic_gpu ({_MISSING})"


def default_block_kv(head_dim: int) -> int:
    """The forward's K/V block: 128 keys up to head_dim 128, 64 above (shared memory)."""
    return 128 if head_dim <= 128 else 64


SMEM_ALIGN = 1024  # Mosaic GPU starts every shared-memory buffer on a 1 KiB boundary
REDUCTION_SCRATCH = 128 * 4 * 4  # reserved for cross-thread reductions (plgpu's default)
MBARRIER_BYTES = 8


def _smem_bytes(scratch, reductions: bool = True) -> int:
    """Shared memory Mosaic GPU allocates for `scratch_types` (plgpu.SMEM buffers, each rounded
    up to 1 KiB, and barriers) plus, in a kernel with row reductions, its reduction scratch;
    compared with the lowering's own count by tests/test_flash_attention_mgpu.py."""
    total = REDUCTION_SCRATCH if reductions else 0
    leaves = jax.tree.leaves(scratch, is_leaf=lambda x: isinstance(x, plgpu.Barrier))
    for leaf in leaves:
        if isinstance(leaf, plgpu.Barrier):
            n = leaf.num_barriers  # an int, or a shape tuple
            total += (math.prod(n) if isinstance(n, tuple) else n) * MBARRIER_BYTES
        else:
            size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
            total += -(-size // SMEM_ALIGN) * SMEM_ALIGN
    return total


def forward_smem_bytes(head_dim: int, block_kv: int, stages: int, segments: bool = False) -> int:
    """Shared memory of one compiled forward CTA (f16/bf16): Q and lse per compute warpgroup,
    the K/V ring, with segment ids their ids; P stays in registers there."""
    return _smem_bytes(_forward_scratch(head_dim, block_kv, stages, jnp.bfloat16, segments, True))


def backward_smem_bytes(head_dim: int, kv_stages: int, q_stages: int, segments: bool = False):
    """Shared memory of the larger backward CTA (dq with a `kv_stages` K/V ring, dk/dv with a
    `q_stages` ring of query blocks) at block_kv BLOCK_KV_BWD, f16/bf16."""
    from pallas_kernels.flash_attention_mgpu_bwd import dkdv_scratch, dq_scratch

    args = (head_dim, BLOCK_KV_BWD, jnp.bfloat16, segments, _transforms())
    dq, dkdv = dq_scratch(*args, kv_stages), dkdv_scratch(*args, q_stages)
    return max(_smem_bytes(dq, reductions=False), _smem_bytes(dkdv, reductions=False))


def _smem_problem(what: str, need: int) -> str | None:
    if need <= SMEM_BYTES:
        return None
    return (
        f"{what} need {need} bytes of shared memory, over a Hopper CTA's {SMEM_BYTES}: lower "
        "block_kv or stages"
    )


def _check(q, k, v, block_kv: int, stages: int, segments: bool, backward: bool) -> str | None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        return f"q, k, v must be [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}"
    b, tq, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        return f"k/v {k.shape} do not fit q {q.shape} (heads must be a multiple of kv heads)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes must be float16 or bfloat16 and equal, got {q.dtype}, {k.dtype}, {v.dtype}"
    if d % 64 or d > 256:
        return f"head_dim must be 64, 128, 192 or 256, got {d}"
    if block_kv % 64 or not 64 <= block_kv <= 256:
        return f"block_kv must be 64, 128, 192 or 256 (wgmma K and N), got {block_kv}"
    if stages < 1:
        return f"stages must be >= 1, got {stages}"
    fwd_stages = min(stages, pl.cdiv(k.shape[1], block_kv))  # the ring the kernel allocates
    problem = _smem_problem(
        f"block_kv={block_kv}, stages={fwd_stages} at head_dim {d}",
        forward_smem_bytes(d, block_kv, fwd_stages, segments),
    )
    if problem or not backward:
        return problem
    if d > 128:  # dk and dv: 2 x 64 x d f32 accumulators in one warpgroup's registers
        return f"the backward takes head_dim <= 128 (registers), got {d}"
    kv_stages, q_stages = _backward_stages(stages, tq, k.shape[1], h // k.shape[2])
    return _smem_problem(
        f"the backward's stages={stages} at head_dim {d}",
        backward_smem_bytes(d, kv_stages, q_stages, segments),
    )


def _backward_stages(stages: int, q_len: int, kv_len: int, groups: int) -> tuple[int, int]:
    """The backward's ring depths: dq's K/V ring and dk/dv's (query block, head) ring, each at
    most the blocks there are to stream."""
    n_kv, n_q = pl.cdiv(kv_len, BLOCK_KV_BWD), pl.cdiv(q_len, BLOCK_Q)
    return max(1, min(stages, n_kv)), max(1, min(stages, n_q * groups))


def _check_segments(q, k, segment_ids, kv_segment_ids) -> str | None:
    if segment_ids is None:
        return None if kv_segment_ids is None else "kv_segment_ids needs segment_ids"
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    if segment_ids.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
        return (
            f"segment ids {segment_ids.shape} / {kv_seg.shape} must be [batch, q_len] / "
            f"[batch, kv_len] = {q.shape[:2]} / {k.shape[:2]}"
        )
    return None


def _problem(q, k, v, segment_ids, kv_segment_ids, block_kv, stages, backward) -> str | None:
    """Why the kernels (the forward; with backward, the gradient kernels too) cannot take the
    call, or None; block_kv None means the default."""
    block_kv = default_block_kv(q.shape[-1]) if block_kv is None else block_kv
    return (
        available()
        or _check_segments(q, k, segment_ids, kv_segment_ids)
        or _check(q, k, v, block_kv, stages, segment_ids is not None, backward)
    )


def unsupported(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
    backward: bool = True,
) -> str | None:
    """None if `flash_attention` (forward and, with backward, the gradient kernels) takes the
    call at its default tiles, else why not in one line. Any lengths (padded inside)."""
    problem = _problem(q, k, v, segment_ids, kv_segment_ids, None, DEFAULT_STAGES, backward)
    if problem is None and mask is not None:
        problem = "an arbitrary mask is not supported (causal and segment ids are)"
    if problem is None and window is not None:
        problem = "sliding windows are not supported"
    return problem


class Masking(NamedTuple):
    """Static masking facts the three kernels share. Lengths are the caller's, before padding
    to whole blocks: padded keys (>= kv_len) are masked, padded query rows are cut off."""

    causal: bool
    q_len: int
    kv_len: int
    segments: bool

    @property
    def offset(self) -> int:
        """causal: query row r sees keys <= r + offset (queries aligned to the keys' end)."""
        return self.kv_len - self.q_len

    def mask(self, s, q_start, k_start, q_dim: int, q_seg=None, kv_seg=None) -> jax.Array:
        """The block of scores s (a wgmma accumulator; query positions from q_start along
        q_dim, keys from k_start along the other dim) with disallowed pairs at -inf: causal
        (fa.causal_allowed, the one causal rule), padded keys (>= kv_len) and, with segments,
        other documents. q_seg / kv_seg: the block's segment-id vectors in the layouts that
        broadcast along their dims. Masks are compares of a query vector with a key vector
        broadcast to the block (no full index tiles). Only blocks that need a mask call this,
        so the padding check costs nothing elsewhere."""
        shape, k_dim = s.shape, 1 - q_dim
        k_pos = _bcast(k_start + _iota(shape[k_dim], k_dim), shape, k_dim)
        allowed = k_pos < self.kv_len
        if self.causal:
            q_pos = _bcast(q_start + _iota(shape[q_dim], q_dim), shape, q_dim)
            allowed = allowed & fa.causal_allowed(q_pos, k_pos, self.q_len, self.kv_len)
        if self.segments:
            allowed = allowed & (_bcast(q_seg, shape, q_dim) == _bcast(kv_seg, shape, k_dim))
        return jnp.where(allowed, s, -jnp.inf)

    def padded_rows(self, q_start) -> jax.Array:
        """Whether a query block at q_start holds only padding rows (nothing to compute)."""
        return q_start >= self.q_len

    def kv_steps(self, q_start, block_q: int, block_kv: int, n_kv: int):
        """(steps, unmasked): the K/V blocks a query block at q_start visits (none if its rows
        are all padding), and how many of them, from the first, need no mask."""
        if self.causal:
            steps = pl.cdiv(q_start + block_q + self.offset, block_kv)
            steps = jnp.clip(steps, 0, n_kv)
        else:
            steps = jnp.int32(n_kv)
        steps = jnp.where(self.padded_rows(q_start), 0, steps)  # rows all padding: no work
        if self.causal:
            unmasked = jnp.clip(lax.div(q_start + self.offset + 1, block_kv), 0, steps)
        else:
            unmasked = steps
        if self.segments:
            return steps, jnp.int32(0)
        return steps, jnp.minimum(unmasked, self.kv_len // block_kv)


def _pad_to(x: jax.Array | None, axis: int, multiple: int) -> jax.Array | None:
    """x zero-padded along axis to a multiple of `multiple`."""
    if x is None or x.shape[axis] % multiple == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -x.shape[axis] % multiple)
    return jnp.pad(x, widths)


def flash_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_kv: int | None = None,
    stages: int = DEFAULT_STAGES,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """(out [b, q_len, heads, d] in q's dtype, lse [b, heads, q_len] f32, natural log).

    q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d] (heads a multiple of kv_heads);
    causal aligns queries to the end of the keys; segment_ids [b, q_len] (kv_segment_ids
    [b, kv_len], default segment_ids): tokens attend within their segment. Lengths are padded
    to whole blocks inside. `stages` K/V blocks are in flight at once. interpret: True (or a
    `plgpu.InterpretGPUParams`, e.g. with detect_races=True) simulates the kernel on the CPU."""
    o = _options("flash_attention_fwd", q, k, v, causal, segment_ids, kv_segment_ids, scale,
                 block_kv, stages, interpret, backward=False)  # fmt: skip
    out, lse = _forward(o, *_padded(q, k, v, segment_ids, kv_segment_ids, o.block_kv))
    return out[:, : q.shape[1]], lse[..., : q.shape[1]]


class _Options(NamedTuple):
    masking: Masking
    scale: float
    block_kv: int
    stages: int
    interpret: Any


def _options(name, q, k, v, causal, segment_ids, kv_segment_ids, scale, block_kv, stages,
             interpret, backward: bool) -> _Options:  # fmt: skip
    """The checked call's static options (defaults filled in); a ValueError naming `name` and
    the reason where the kernels cannot take it."""
    problem = _problem(q, k, v, segment_ids, kv_segment_ids, block_kv, stages, backward)
    if problem:
        raise ValueError(f"{name} (Mosaic GPU): {problem}")
    return _Options(
        Masking(bool(causal), q.shape[1], k.shape[1], segment_ids is not None),
        q.shape[-1] ** -0.5 if scale is None else float(scale),
        default_block_kv(q.shape[-1]) if block_kv is None else block_kv,
        stages,
        interpret,
    )


def _padded(q, k, v, segment_ids, kv_segment_ids, block_kv: int) -> list[jax.Array | None]:
    """q (and its segment ids, int32) padded to whole forward CTAs, k/v (and theirs) to whole
    K/V blocks; the segment ids None without segments."""
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg, kv_seg = segment_ids.astype(jnp.int32), kv_seg.astype(jnp.int32)
    q, q_seg = _pad_to(q, 1, CTA_Q), _pad_to(q_seg, 1, CTA_Q)
    return [
        q,
        _pad_to(k, 1, block_kv),
        _pad_to(v, 1, block_kv),
        q_seg,
        _pad_to(kv_seg, 1, block_kv),
    ]


def _forward(o: _Options, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
    """The forward kernel on block-padded inputs: (out, lse), both padded.

    Per CTA: 128 query rows in two compute warpgroups of 64 (one wgmma M each) and a producer
    warpgroup that streams K/V blocks by TMA into a `stages`-slot ring. A slot's K (V) is
    refilled once both compute warpgroups arrived on its k (v) `consumed` barrier. The compute
    warpgroups ping-pong on a schedule barrier so that one's softmax overlaps the other's
    matmuls. Every barrier phase is waited for by every warpgroup that uses the barrier, in
    order (mbarrier parity), so a warpgroup whose causal range ends early keeps consuming
    (without computing) until the CTA's last block."""
    masking, scale, block_kv = o.masking, o.scale, o.block_kv
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    groups = h // kh
    n_kv = tk // block_kv
    stages = max(1, min(o.stages, n_kv))
    dtype = q.dtype
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    # Compiled for a GPU, P is wgmma's register A operand; the interpret mode's wgmma takes
    # shared-memory operands only (jax 0.11-0.12), so there P goes through shared memory.
    compiled = o.interpret is False

    def kernel(q_ref, k_ref, v_ref, *refs):
        if masking.segments:
            qseg_ref, kvseg_ref, *refs = refs
        out_ref, lse_ref, q_smem2, k_smem, v_smem, lse_smem2, bars, *extra = refs
        p_smem2 = None if compiled else extra.pop(0)
        if masking.segments:  # staged in shared memory (jax 0.11 loads no GMEM to registers)
            qseg_smem2, kvseg_smem, (qseg_bars, kvseg_bars) = extra
        q_bars, k_bars, v_bars, k_free, v_free, schedule = bars
        head, qi, bi = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, jnp.int32(groups))
        # the CTA's K/V blocks: those either compute warpgroup needs (the second's, unless its
        # rows are all padding)
        cta_steps = jnp.maximum(
            *(
                masking.kv_steps(qi * CTA_Q + w * BLOCK_Q, BLOCK_Q, block_kv, n_kv)[0]
                for w in (0, 1)
            )
        )

        def rendezvous():  # both compute warpgroups arrive; each waits for the other
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        def end_softmax(slot):  # this softmax is done; wait for V and the other's QK issue
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_wait(schedule)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
            p_smem = None if compiled else p_smem2.at[wg]
            q_start = qi * CTA_Q + wg * BLOCK_Q
            steps, unmasked = masking.kv_steps(q_start, BLOCK_Q, block_kv, n_kv)
            q_rows = (bi, pl.ds(q_start, BLOCK_Q), head)
            plgpu.copy_gmem_to_smem(q_ref.at[q_rows], q_smem, q_bars.at[wg])
            q_seg = None
            if masking.segments:
                qseg_smem = qseg_smem2.at[wg]
                q_rows_seg = qseg_ref.at[bi, pl.ds(q_start, BLOCK_Q)]
                plgpu.copy_gmem_to_smem(q_rows_seg, qseg_smem, qseg_bars.at[wg])
                plgpu.barrier_wait(qseg_bars.at[wg])
                q_seg = plgpu.load(qseg_smem, layout=row_layout)
            plgpu.barrier_wait(q_bars.at[wg])
            pl.when(wg == 1)(rendezvous)  # warpgroup 0 issues its first matmul first

            def step_body(step, carry, masked: bool):
                acc, m, lsum = carry
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    rendezvous()  # the other warpgroup may now use the tensor cores
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                shape = (BLOCK_Q, block_kv)
                s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32)) * (scale * LOG2E)
                kv_seg = None
                if masking.segments:  # every block is masked; its ids share K's slot
                    plgpu.barrier_wait(kvseg_bars.at[slot])
                    kv_seg = plgpu.load(kvseg_smem.at[slot], layout=col_layout)
                    # the generic-proxy read is ordered before the producer's next TMA write
                    # of the slot (async proxy), which the release below allows
                    plgpu.commit_smem()
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = masking.mask(s, q_start, step * block_kv, 0, q_seg, kv_seg)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
                lsum = lsum * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                if compiled:  # P stays in registers as the A operand, O accumulates in place
                    p16 = p.astype(dtype)
                    end_softmax(slot)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        plgpu.wgmma_wait(0)

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:  # the interpret mode's wgmma takes shared-memory operands only
                    p_smem[...] = p.astype(dtype)
                    plgpu.commit_smem()
                    end_softmax(slot)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((BLOCK_Q, d), jnp.float32))
                # Both wgmmas that read this slot were waited for: the producer may refill it.
                # (The interpret mode runs wgmma synchronously and cannot see a refill that
                # races an unfinished one, so keep the waits before these arrivals.)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, lsum

            def idle_step(step, _):  # the CTA's blocks past this warpgroup's causal range
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])
                if masking.segments:
                    plgpu.barrier_wait(kvseg_bars.at[slot])
                rendezvous()
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bars.at[slot])
                rendezvous()
                plgpu.barrier_arrive(v_free.at[slot])

            acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -1e30, jnp.float32), row_layout)
            lsum = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), row_layout)
            carry = lax.fori_loop(
                0, unmasked, functools.partial(step_body, masked=False), (acc, m, lsum)
            )
            acc, m, lsum = lax.fori_loop(
                unmasked, steps, functools.partial(step_body, masked=True), carry
            )
            lax.fori_loop(steps, cta_steps, idle_step, None)
            pl.when(wg == 0)(rendezvous)  # the pair to warpgroup 1's first
            empty = lsum == 0.0
            l_safe = jnp.where(empty, 1.0, lsum)
            q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[q_rows])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(q_start, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(step, slot, wait: bool):
                rows = (bi, pl.ds(step * block_kv, block_kv), kv_head)
                if wait:
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
                if masking.segments:
                    seg_rows = kvseg_ref.at[bi, pl.ds(step * block_kv, block_kv)]
                    plgpu.copy_gmem_to_smem(seg_rows, kvseg_smem.at[slot], kvseg_bars.at[slot])
                if wait:
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])

            for first in range(stages):
                pl.when(first < cta_steps)(
                    functools.partial(fetch, jnp.int32(first), first, wait=False)
                )

            @pl.loop(stages, jnp.maximum(cta_steps, stages))
            def _refill(step):
                fetch(step, lax.rem(step, jnp.int32(stages)), wait=True)

            # Observe the releases of the last blocks too, so that every phase of the free
            # barriers is waited for (jax 0.11's interpret mode checks this at the end).
            @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
            def _drain(step):
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    call = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
        ],
        scratch_types=_forward_scratch(d, block_kv, stages, dtype, masking.segments, compiled),
        grid=(h, tq // CTA_Q, b),
        grid_names=("heads", "q", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=_interpret(o.interpret),
    )
    segs = (q_seg, kv_seg) if masking.segments else ()
    return tuple(call(q, k, v, *segs))


def _forward_scratch(d: int, block_kv: int, stages: int, dtype, segments: bool,
                     compiled: bool) -> list:  # fmt: skip
    """The forward kernel's shared memory and barriers (what `forward_smem_bytes` counts)."""
    transforms = _transforms()
    extra = [] if compiled else [
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, block_kv), dtype, transforms=transforms)
    ]  # fmt: skip
    if segments:
        extra += [
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
            plgpu.SMEM((stages, block_kv), jnp.int32),
            (
                plgpu.Barrier(num_arrivals=1, num_barriers=COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            ),
        ]
    return [
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
        (
            plgpu.Barrier(num_arrivals=1, num_barriers=COMPUTE_WGS),  # Q loaded
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # K slot loaded
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # V slot loaded
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # K slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # V slot free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # ping-pong schedule
        ),
        *extra,
    ]


def _iota(n: int, dim: int) -> jax.Array:
    """0..n-1 as a vector in the layout that broadcasts along `dim` of a wgmma accumulator
    (dim 0: one value per row, WGMMA.reduce(1); dim 1: per column, WGMMA.reduce(0))."""
    layout = plgpu.Layout.WGMMA.reduce(1 - dim)
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=layout)


def _bcast(x: jax.Array, shape, dim: int) -> jax.Array:
    """A vector laid out for `dim` (see `_iota`) broadcast to a wgmma-accumulator block."""
    return lax.broadcast_in_dim(x, shape, [dim])


def _transforms() -> tuple[Any, ...]:
    """Shared-memory layout of wgmma operands: 8 x 64 tiles, 128-byte swizzle (the interpret
    mode simulates it too, so the tests see the GPU's layout)."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _interpret(interpret: Any) -> Any:
    """plgpu.kernel's interpret argument: False, or interpret-mode parameters."""
    return plgpu.InterpretGPUParams() if interpret is True else interpret


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_kv: int | None = None,
    stages: int = DEFAULT_STAGES,
    interpret: Any = False,
) -> jax.Array:
    """Differentiable attention on the Mosaic GPU kernels (forward here, dq and dk/dv in
    flash_attention_mgpu_bwd); arguments as `flash_attention_fwd`."""
    o = _options("flash_attention", q, k, v, causal, segment_ids, kv_segment_ids, scale,
                 block_kv, stages, interpret, backward=True)  # fmt: skip
    out = _attention(o, *_padded(q, k, v, segment_ids, kv_segment_ids, o.block_kv))
    return out[:, : q.shape[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(o: _Options, q, k, v, q_seg, kv_seg):
    return _attention_fwd(o, q, k, v, q_seg, kv_seg)[0]


def _attention_fwd(o: _Options, q, k, v, q_seg, kv_seg):
    out, lse = _forward(o, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(o: _Options, res, do):
    from pallas_kernels.flash_attention_mgpu_bwd import backward

    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = backward(
        q, k, v, q_seg, kv_seg, out, lse, do, masking=o.masking, scale=o.scale,
        stages=o.stages, interpret=_interpret(o.interpret), transforms=_transforms(),
    )  # fmt: skip
    return dq, dk, dv, None, None  # segment ids: integers, no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
