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


def forward_smem_bytes(head_dim: int, block_kv: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of one compiled forward CTA: Q, lse and segment ids per compute
    warpgroup, the K/V ring with its segment ids (P stays in registers there)."""
    per_wg = BLOCK_Q * head_dim * itemsize + BLOCK_Q * 4 * 2
    return COMPUTE_WGS * per_wg + stages * block_kv * (2 * head_dim * itemsize + 4)


def _check(q, k, v, block_kv: int, stages: int) -> str | None:
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
    need = forward_smem_bytes(d, block_kv, stages)
    if need > SMEM_BYTES:
        return (
            f"block_kv={block_kv}, stages={stages} at head_dim {d} need {need // 1024} KiB of "
            f"shared memory, over a Hopper CTA's {SMEM_BYTES // 1024} KiB: lower either"
        )
    return None


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
    problem = available() or _check(q, k, v, default_block_kv(q.shape[-1]), DEFAULT_STAGES)
    problem = problem or _check_segments(q, k, segment_ids, kv_segment_ids)
    if problem is None and mask is not None:
        problem = "an arbitrary mask is not supported (causal and segment ids are)"
    if problem is None and window is not None:
        problem = "sliding windows are not supported"
    if problem is None and backward and q.shape[-1] > 128:  # dk, dv: 2 x 64 x d f32 registers
        problem = f"the backward takes head_dim <= 128 (registers), got {q.shape[-1]}"
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

    def allowed(self, q_pos, k_pos, q_seg=None, kv_seg=None) -> jax.Array:
        """Which (query, key) pairs of a block may attend, from same-shape position arrays and
        (with segments) segment ids broadcast to that shape. Only blocks that need a mask
        call this, so the padding check costs nothing elsewhere."""
        allowed = k_pos < self.kv_len
        if self.causal:
            allowed = allowed & (k_pos <= q_pos + self.offset)
        if self.segments:
            allowed = allowed & (q_seg == kv_seg)
        return allowed

    def kv_steps(self, q_start, block_q: int, block_kv: int, n_kv: int):
        """(steps, unmasked): the K/V blocks a query block at q_start visits, and how many of
        them, from the first, need no mask."""
        if self.causal:
            steps = pl.cdiv(q_start + block_q + self.offset, block_kv)
            steps = jnp.clip(steps, 0, n_kv)
            unmasked = jnp.clip(lax.div(q_start + self.offset + 1, block_kv), 0, steps)
        else:
            steps = unmasked = jnp.int32(n_kv)
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
    block_kv = default_block_kv(q.shape[-1]) if block_kv is None else block_kv
    problem = available() or _check(q, k, v, block_kv, stages)
    problem = problem or _check_segments(q, k, segment_ids, kv_segment_ids)
    if problem:
        raise ValueError(f"flash_attention_fwd (Mosaic GPU): {problem}")
    masking = Masking(bool(causal), q.shape[1], k.shape[1], segment_ids is not None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_seg, kv_seg = _segments(segment_ids, kv_segment_ids)
    out, lse = _forward(
        masking, scale, block_kv, stages, interpret,
        *_padded(q, k, v, q_seg, kv_seg, block_kv),
    )  # fmt: skip
    return out[:, : q.shape[1]], lse[..., : q.shape[1]]


def _segments(segment_ids, kv_segment_ids) -> tuple[jax.Array | None, jax.Array | None]:
    if segment_ids is None:
        return None, None
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    return segment_ids.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _padded(q, k, v, q_seg, kv_seg, block_kv: int) -> list[jax.Array | None]:
    """q (and its segment ids) padded to whole forward CTAs, k/v to whole K/V blocks."""
    q, q_seg = _pad_to(q, 1, CTA_Q), _pad_to(q_seg, 1, CTA_Q)
    return [
        q,
        _pad_to(k, 1, block_kv),
        _pad_to(v, 1, block_kv),
        q_seg,
        _pad_to(kv_seg, 1, block_kv),
    ]


def _forward(masking: Masking, scale: float, block_kv: int, stages: int, interpret: Any,
             q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """The forward kernel on block-padded inputs: (out, lse), both padded.

    Per CTA: 128 query rows in two compute warpgroups of 64 (one wgmma M each) and a producer
    warpgroup that streams K/V blocks by TMA into a `stages`-slot ring. A slot's K (V) is
    refilled once both compute warpgroups arrived on its k (v) `consumed` barrier. The compute
    warpgroups ping-pong on a schedule barrier so that one's softmax overlaps the other's
    matmuls. Every barrier phase is waited for by every warpgroup that uses the barrier, in
    order (mbarrier parity), so a warpgroup whose causal range ends early keeps consuming
    (without computing) until the CTA's last block."""
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    groups = h // kh
    n_kv = tk // block_kv
    stages = max(1, min(stages, n_kv))
    dtype = q.dtype
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    # Compiled for a GPU, P is wgmma's register A operand; the interpret mode's wgmma takes
    # shared-memory operands only (jax 0.11-0.12), so there P goes through shared memory.
    compiled = interpret is False

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
        # the CTA's K/V blocks: those its last query row needs (causal: the most)
        cta_steps = masking.kv_steps(qi * CTA_Q + BLOCK_Q, BLOCK_Q, block_kv, n_kv)[0]

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
                if masking.segments:  # every block is masked; its ids share K's slot
                    plgpu.barrier_wait(kvseg_bars.at[slot])
                    kv_seg = plgpu.load(kvseg_smem.at[slot], layout=col_layout)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    segs = ()
                    if masking.segments:
                        segs = (
                            lax.broadcast_in_dim(q_seg, shape, [0]),
                            lax.broadcast_in_dim(kv_seg, shape, [1]),
                        )
                    allowed = masking.allowed(
                        q_start + _iota(shape, 0), step * block_kv + _iota(shape, 1), *segs
                    )
                    s = jnp.where(allowed, s, -jnp.inf)
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

    transforms = _transforms()
    extra = [] if compiled else [
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, block_kv), dtype, transforms=transforms)
    ]  # fmt: skip
    if masking.segments:
        extra += [
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
            plgpu.SMEM((stages, block_kv), jnp.int32),
            (
                plgpu.Barrier(num_arrivals=1, num_barriers=COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            ),
        ]
    call = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
        ],
        scratch_types=[
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
        ],
        grid=(h, tq // CTA_Q, b),
        grid_names=("heads", "q", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        interpret=_interpret(interpret),
    )
    segs = (q_seg, kv_seg) if masking.segments else ()
    return tuple(call(q, k, v, *segs))


def _iota(shape, dim) -> jax.Array:
    """Indices along dim of a wgmma-accumulator-shaped block."""
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


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
    block_kv = default_block_kv(q.shape[-1]) if block_kv is None else block_kv
    problem = available() or _check(q, k, v, block_kv, stages)
    problem = problem or _check_segments(q, k, segment_ids, kv_segment_ids)
    if problem is None and q.shape[-1] > 128:  # dk and dv: 2 x 64 x d f32 in one warpgroup
        problem = f"the backward takes head_dim <= 128 (registers), got {q.shape[-1]}"
    if problem:
        raise ValueError(f"flash_attention (Mosaic GPU): {problem}")
    masking = Masking(bool(causal), q.shape[1], k.shape[1], segment_ids is not None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    opts = _Options(masking, scale, block_kv, stages, interpret)
    q_seg, kv_seg = _segments(segment_ids, kv_segment_ids)
    out = _attention(opts, *_padded(q, k, v, q_seg, kv_seg, block_kv))
    return out[:, : q.shape[1]]


class _Options(NamedTuple):
    masking: Masking
    scale: float
    block_kv: int
    stages: int
    interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(o: _Options, q, k, v, q_seg, kv_seg):
    return _attention_fwd(o, q, k, v, q_seg, kv_seg)[0]


def _attention_fwd(o: _Options, q, k, v, q_seg, kv_seg):
    out, lse = _forward(
        o.masking, o.scale, o.block_kv, o.stages, o.interpret, q, k, v, q_seg, kv_seg
    )
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(o: _Options, res, do):
    from pallas_kernels.flash_attention_mgpu_bwd import backward

    q, k, v, q_seg, kv_seg, out, lse = res
    interpret = _interpret(o.interpret)
    dq, dk, dv = backward(
        q, k, v, q_seg, kv_seg, out, lse, do, masking=o.masking, scale=o.scale,
        block_kv=BLOCK_KV_BWD, stages=o.stages, interpret=interpret, transforms=_transforms(),
    )  # fmt: skip
    return dq, dk, dv, None, None  # segment ids: integers, no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
