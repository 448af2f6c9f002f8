"""Flash attention forward for Hopper (sm90) on Pallas' Mosaic GPU backend: K/V streamed by TMA
through a multi-stage shared-memory ring with barriers, both matmuls on wgmma.

First stage of issue 14: one compute warpgroup per 64-row query block (no warp
specialization or ping-pong yet), causal loop split into unmasked and diagonal blocks, GQA by
indexing the K/V head, f32 accumulation, log-sum-exp returned for a backward. Needs a jax with
`jax.experimental.pallas.mosaic_gpu` (`available()`); tested on the CPU in Mosaic GPU interpret
mode (shared memory, TMA and barriers simulated)."""

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
DTYPES = (jnp.float16, jnp.bfloat16)


def available() -> str | None:
    """None if this jax has the Mosaic GPU API the kernel uses, else why not (one line)."""
    if _MISSING is None:
        return None
    return f"jax {jax.__version__} lacks jax.experimental.pallas.mosaic_gpu ({_MISSING})"


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
    if tq % BLOCK_Q or k.shape[1] % block_kv:
        return f"q_len must be a multiple of {BLOCK_Q} and kv_len of block_kv={block_kv}"
    if stages < 1:
        return f"stages must be >= 1, got {stages}"
    return None


def flash_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_kv: int = 64,
    stages: int = 2,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """(out [b, q_len, heads, d] in q's dtype, lse [b, heads, q_len] f32, natural log).

    q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d] (heads a multiple of kv_heads);
    causal aligns queries to the end of the keys. `stages` K/V blocks are in flight at once.
    interpret: True (or a `plgpu.InterpretGPUParams`, e.g. with detect_races=True) simulates
    the kernel on the CPU."""
    problem = available() or _check(q, k, v, block_kv, stages)
    if problem:
        raise ValueError(f"flash_attention_fwd (Mosaic GPU): {problem}")
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    groups = h // kh
    scale = d**-0.5 if scale is None else float(scale)
    n_kv = tk // block_kv
    stages = max(1, min(stages, n_kv))
    offset = tk - tq  # causal: query row r sees keys <= r + offset
    dtype = q.dtype

    def kernel(
        q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, lse_smem, bars
    ):
        q_bar, k_bars, v_bars = bars
        head, qi, bi = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
        kv_head = lax.div(head, jnp.int32(groups))
        q_start = qi * BLOCK_Q
        if causal:  # the blocks that hold a key this query block may see
            steps = jnp.minimum(pl.cdiv(q_start + BLOCK_Q + offset, block_kv), n_kv)
            full = jnp.clip(lax.div(q_start + offset + 1, block_kv), 0, steps)
        else:
            steps, full = jnp.int32(n_kv), jnp.int32(n_kv)

        def fetch(step, slot):
            rows = (bi, pl.ds(step * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_start, BLOCK_Q), head], q_smem, q_bar)
        for first in range(stages):
            pl.when(first < steps)(functools.partial(fetch, jnp.int32(first), first))

        plgpu.barrier_wait(q_bar)

        def step_body(step, carry, masked: bool):
            acc, m, lsum = carry
            slot = lax.rem(step, jnp.int32(stages))
            plgpu.barrier_wait(k_bars.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32)) * (scale * LOG2E)
            if masked:
                rows = q_start + plgpu.broadcasted_iota(
                    jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA
                )
                cols = step * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA
                )
                s = jnp.where(cols <= rows + offset, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            lsum = lsum * alpha + p.sum(axis=1)
            plgpu.barrier_wait(v_bars.at[slot])

            # P goes through shared memory: the interpret mode's wgmma takes no register
            # operand (jax 0.12.0.1); a register A operand would save this round trip.
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            out = pl.run_scoped(pv, plgpu.ACC((BLOCK_Q, d), jnp.float32))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + out
            # This slot is free again: both wgmmas that read it were waited for (wgmma_wait(0)
            # above; the interpret mode runs wgmma synchronously and cannot see a refill that
            # races an unfinished one, so keep that wait before any refill).
            nxt = step + stages

            @pl.when(nxt < steps)
            def _refill():
                fetch(nxt, slot)

            return acc, m_new, lsum

        acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(
            jnp.full((BLOCK_Q,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
        )
        lsum = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        carry = lax.fori_loop(0, full, functools.partial(step_body, masked=False), (acc, m, lsum))
        acc, m, lsum = lax.fori_loop(full, steps, functools.partial(step_body, masked=True), carry)
        empty = lsum == 0.0
        l_safe = jnp.where(empty, 1.0, lsum)
        q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[bi, pl.ds(q_start, BLOCK_Q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(q_start, BLOCK_Q)])
        plgpu.wait_smem_to_gmem(0)

    transforms = _transforms()
    call = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
        ],
        scratch_types=[
            plgpu.SMEM((BLOCK_Q, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
            plgpu.SMEM((BLOCK_Q, block_kv), dtype, transforms=transforms),
            plgpu.SMEM((BLOCK_Q,), jnp.float32),
            (
                plgpu.Barrier(num_arrivals=1),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            ),
        ],
        grid=(h, tq // BLOCK_Q, b),
        grid_names=("heads", "q", "batch"),
        interpret=_interpret(interpret),
    )
    out, lse = call(q, k, v)
    return out, lse


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
    scale: float | None = None,
    block_kv: int = 64,
    stages: int = 2,
    interpret: Any = False,
) -> jax.Array:
    """Differentiable attention on the Mosaic GPU kernels (forward here, dq and dk/dv in
    flash_attention_mgpu_bwd); arguments as `flash_attention_fwd`."""
    problem = available() or _check(q, k, v, block_kv, stages)
    if problem is None and q.shape[-1] > 128:  # dk and dv: 2 x 64 x d f32 in one warpgroup
        problem = f"the backward takes head_dim <= 128 (registers), got {q.shape[-1]}"
    if problem:
        raise ValueError(f"flash_attention (Mosaic GPU): {problem}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    opts = _Options(bool(causal), scale, block_kv, stages, interpret)
    return _attention(opts, q, k, v)


class _Options(NamedTuple):
    causal: bool
    scale: float
    block_kv: int
    stages: int
    interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(o: _Options, q, k, v):
    return _attention_fwd(o, q, k, v)[0]


def _attention_fwd(o: _Options, q, k, v):
    out, lse = flash_attention_fwd(
        q, k, v, causal=o.causal, scale=o.scale, block_kv=o.block_kv, stages=o.stages,
        interpret=o.interpret,
    )  # fmt: skip
    return out, (q, k, v, out, lse)


def _attention_bwd(o: _Options, res, do):
    from pallas_kernels.flash_attention_mgpu_bwd import backward

    q, k, v, out, lse = res
    return backward(
        q, k, v, out, lse, do, causal=o.causal, scale=o.scale, block_kv=o.block_kv,
        stages=o.stages, interpret=_interpret(o.interpret), transforms=_transforms(),
    )  # fmt: skip


_attention.defvjp(_attention_fwd, _attention_bwd)
