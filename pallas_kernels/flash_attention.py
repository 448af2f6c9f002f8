"""Flash attention (FlashAttention-2) for the Pallas Triton backend: forward, backward, heuristics.

Layout: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim], heads a
multiple of kv_heads (GQA/MQA via index maps, K/V are never repeated). Sequences that are not a
multiple of the block are zero-padded here and masked in the kernels (padded keys are never
attended, padded query rows are dropped); head dims that are not a power of two >= 16 are
zero-padded (exact: zero columns change neither q.k nor the output). Softmax runs in f32 in the
base-2 domain (exp2 with log2(e) folded into the scale); dots accumulate in f32. f32 inputs use
the dot's DEFAULT precision, which the Triton lowering maps to TF32 on GPU (IEEE in interpret
mode on CPU).

Kernels (grid order puts the block index first so neighbouring programs share K/V in L2):
- forward: grid (q_blocks, batch, heads); loops over K/V blocks, writes out and log-sum-exp.
- dq: grid (q_blocks, batch, heads); loops over K/V blocks.
  GQA fold (forward and dq, each on its own): where the group size is a power of two and
  block_q * groups stays within the rows the heuristic table gives that kernel (`_folds`), the
  grid is (q_blocks, batch, kv_heads) and one program takes the group's query heads together:
  its Q tile is [block_q, groups, d] reshaped to [block_q * groups, d] (row = position * groups
  + head), so every K/V tile it loads serves the whole group. Masks use each row's position.
- dk/dv: grid (kv_blocks, batch, kv_heads); loops over the query heads of the group and their
  query blocks, so the GQA sum over a group happens in registers.
Causal runs skip K/V (or Q) blocks that are fully masked and split every loop into a masked part
(diagonal, padding, segments) and an unmasked part that pays for no mask at all.

`attention_reference` is the one plain-jnp attention (kernel tests' ground truth and
framework.ops' "xla" impl); `causal_allowed` is the one causal rule (kernels, `causal_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import autotune as _autotune
from pallas_kernels._compat import CompilerParams, next_pow2, on_gpu, target_device

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for masking
MAX_HEAD_DIM = 256
MIN_BLOCK = 16
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KERNELS = ("fwd", "dq", "dkdv")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes and Triton launch parameters for one kernel (fwd, dq or dkdv)."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


# Per device family: rows (max head_dim, {kernel: (block_q, block_k, num_warps, num_stages)}).
# For dq the query block stays resident and the loop walks K/V blocks; for dkdv the K/V block
# stays resident and the loop walks query blocks (so dkdv prefers a small block_q). Chosen from
# the FlashAttention-2 / Triton tutorial settings and shared-memory budgets; not tuned on a GPU.
_Row = tuple[int, dict[str, tuple[int, int, int, int]]]
HEURISTIC_TABLE: dict[str, tuple[_Row, ...]] = {
    "hopper": (
        (64, {"fwd": (128, 128, 4, 3), "dq": (128, 32, 4, 3), "dkdv": (32, 128, 4, 3)}),
        (128, {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (32, 128, 8, 2)}),
        (256, {"fwd": (64, 32, 4, 2), "dq": (64, 32, 8, 1), "dkdv": (32, 64, 8, 1)}),
    ),
    "ampere": (
        (64, {"fwd": (128, 64, 4, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)}),
        (128, {"fwd": (128, 64, 8, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)}),
        (256, {"fwd": (64, 32, 4, 1), "dq": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1)}),
    ),
    "gpu": (
        (64, {"fwd": (64, 64, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)}),
        (128, {"fwd": (64, 64, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)}),
        (256, {"fwd": (32, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}),
    ),
    # Interpret mode: bigger blocks mean fewer (slow) grid steps; warps/stages are ignored.
    "cpu": ((256, {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)}),),
}

# A device_kind string that maps to each family (used by tests to lower every configuration).
FAMILY_EXAMPLES = {
    "hopper": "NVIDIA H100 80GB HBM3",
    "ampere": "NVIDIA A100-SXM4-80GB",
    "gpu": "NVIDIA L4",
    "cpu": "cpu",
}


def _family(device_kind: str) -> str:
    """Device family key of HEURISTIC_TABLE for a jax `device_kind` string."""
    kind = device_kind.lower()
    if kind == "cpu" or "cpu" in kind:
        return "cpu"
    if any(name in kind for name in ("h100", "h200", "h800", "h20", "gh200")):
        return "hopper"
    if any(name in kind for name in ("a100", "a800", "a30")):
        return "ampere"
    return "gpu"


def _padded_head_dim(head_dim: int) -> int:
    """Head dim the kernels run with: next power of two, at least MIN_BLOCK."""
    return max(MIN_BLOCK, next_pow2(head_dim))


def heuristic_configs() -> list[dict[str, Any]]:
    """Every (family, head_dim bound, kernel) entry the heuristics can pick, for lowering tests."""
    rows = []
    for family, table in HEURISTIC_TABLE.items():
        for max_d, kernels in table:
            for kernel, cfg in kernels.items():
                rows.append(
                    dict(
                        family=family,
                        device_kind=FAMILY_EXAMPLES[family],
                        head_dim=max_d,
                        kernel=kernel,
                        config=KernelConfig(*cfg),
                    )
                )
    return rows


HEURISTIC_CONFIGS = heuristic_configs()


def _table_config(head_dim: int, dtype: Any, device_kind: str, kernel: str) -> KernelConfig:
    """The table's config for `kernel` before any clamping to the sequence lengths: blocks
    halved for f32 at head_dim > 128 on GPUs (the table is sized for 2-byte dtypes)."""
    family = _family(device_kind)
    table = HEURISTIC_TABLE[family]
    d = _padded_head_dim(head_dim)
    row = next((cfg for max_d, cfg in table if d <= max_d), table[-1][1])
    block_q, block_k, num_warps, num_stages = row[kernel]
    if family != "cpu" and jnp.dtype(dtype).itemsize >= 4 and d > 128:
        # f32 tiles take twice the shared memory of the bf16 ones the table is sized for.
        block_q, block_k = max(MIN_BLOCK, block_q // 2), max(MIN_BLOCK, block_k // 2)
    return KernelConfig(block_q, block_k, num_warps, num_stages)


def choose_config(
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype: Any = jnp.bfloat16,
    device_kind: str | None = None,
    kernel: str = "fwd",
) -> KernelConfig:
    """(block_q, block_k, num_warps, num_stages) for `kernel` from the per-device table.

    Blocks shrink (to a power of two >= 16) for sequences shorter than the table's block, and
    halve for f32 at head_dim > 128 on GPUs (the table is sized for 2-byte dtypes). block_q
    counts query positions of one head; where the forward or dq folds a GQA group
    (`_folds`), its tile has block_q * groups rows."""
    if kernel not in KERNELS:
        raise ValueError(f"choose_config: kernel must be one of {KERNELS}, got {kernel!r}")
    if device_kind is None:
        device_kind = target_device()[1]
    block_q, block_k, num_warps, num_stages = dataclasses.astuple(
        _table_config(head_dim, dtype, device_kind, kernel)
    )
    block_q = min(block_q, max(MIN_BLOCK, next_pow2(q_len)))
    block_k = min(block_k, max(MIN_BLOCK, next_pow2(kv_len)))
    return KernelConfig(block_q, block_k, num_warps, num_stages)


def _folds(
    kernel: str, block_q: int, groups: int, head_dim: int, dtype: Any, device_kind: str
) -> bool:
    """Whether the forward or dq kernel takes a GQA group's query heads in one program.

    Only for a power-of-two group (Triton tiles are powers of two) and while the folded tile,
    block_q * groups rows, has no more rows than the table's own block_q for this kernel, head
    dim, dtype and device: the table sizes registers and shared memory for that M, so a fold
    fills a tile the sequence length had shrunk (short or decode-like queries, small autotune
    candidates) and never grows one past what the table would use."""
    if groups == 1 or groups & (groups - 1):
        return False
    return block_q * groups <= _table_config(head_dim, dtype, device_kind, kernel).block_q


# ----------------------------------------------------------------------------------------------
# Masks and the reference


def causal_allowed(q_pos: Any, kv_pos: Any, q_len: int, kv_len: int) -> jax.Array:
    """True where the query at q_pos may attend the key at kv_pos: queries are aligned to the
    end of the keys (query r sees keys <= r + kv_len - q_len), so a KV cache works."""
    return kv_pos <= q_pos + (kv_len - q_len)


def window_allowed(q_pos: Any, kv_pos: Any, q_len: int, kv_len: int, window: int) -> jax.Array:
    """True where the key is among the `window` latest positions up to the (end-aligned) query's
    own: kv_pos > q_pos + (kv_len - q_len) - window."""
    return kv_pos > q_pos + (kv_len - q_len) - window


def effective_window(window: int | None, kv_len: int) -> int | None:
    """The causal sliding window, or None where it masks nothing: a window of kv_len or more
    keeps every key causal attention keeps (the latest query sees keys kv_len - 1 .. 0)."""
    return None if window is None or window >= kv_len else int(window)


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
    """[1, 1, q_len, kv_len] bool (True = attend), queries aligned to the end of the keys."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None]
    kv_pos = jnp.arange(kv_len)[None, :]
    return causal_allowed(q_pos, kv_pos, q_len, kv_len)[None, None]


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """[batch|1, heads|1, q_len, kv_len] bool (True = attend) combining the requested masks;
    `mask` is any bool array broadcastable to [batch, heads, q_len, kv_len]; `window` keeps the
    latest `window` keys of each (end-aligned) query, itself included."""
    allowed = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    if causal:
        allowed = allowed & causal_mask(q_len, kv_len)
    if window is not None:
        q_pos = jnp.arange(q_len)[:, None]
        kv_pos = jnp.arange(kv_len)[None, :]
        allowed = allowed & window_allowed(q_pos, kv_pos, q_len, kv_len, window)[None, None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        allowed = allowed & (segment_ids[:, None, :, None] == kv_seg[:, None, None, :])
    if mask is not None:
        allowed = allowed & mask
    return allowed


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """Plain jnp attention: the kernel tests' ground truth and framework.ops' "xla" impl.

    f32 logits and softmax, fully masked rows give 0, output in q's dtype; `mask` (bool,
    broadcastable to [batch, heads, q_len, kv_len]) is what the kernel cannot take. precision
    HIGHEST keeps f32 dots exact on GPUs for tests; the xla impl passes None (backend default)."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = h // kh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, groups, d)
    logits = (
        jnp.einsum(
            "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32, precision=precision
        )
        * scale
    )
    allowed = attention_mask(
        t,
        s,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        window=window,
    )  # [b|1, 1|h, t, s] -> [b|1, 1|kh, 1|groups, t, s]
    allowed = (
        allowed.reshape(allowed.shape[0], 1, 1, t, s)
        if allowed.shape[1] == 1
        else allowed.reshape(allowed.shape[0], kh, groups, t, s)
    )
    logits = jnp.where(allowed, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allowed.any(axis=-1, keepdims=True), probs, 0.0)  # fully masked rows -> 0
    out = jnp.einsum(
        "bkgts,bskd->btkgd",
        probs.astype(v.dtype),
        v,
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    return out.reshape(b, t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Kernels


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static (hashable) description of one call: lengths, masking, blocks, launch params."""

    scale: float
    causal: bool
    q_len: int  # true (unpadded) lengths
    kv_len: int
    groups: int
    has_segments: bool
    window: int | None  # sliding window (keys within the last `window` positions), causal only
    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig
    fold_fwd: bool  # the forward / dq take a GQA group per program (`_folds`)
    fold_dq: bool
    interpret: bool

    @property
    def offset(self) -> int:
        """Causal diagonal offset: query row r sees keys <= r + offset (end-aligned)."""
        return self.kv_len - self.q_len


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(
    st: _Static,
    q_start,
    k_start,
    bq: int,
    bk: int,
    q_seg,
    kv_seg,
    *,
    keys_first: bool = False,
    heads: int = 1,
) -> jax.Array:
    """[bq * heads, bk] bool, True where attention is allowed (causal, window, key padding,
    segments); heads > 1: the rows of a folded GQA tile, row r at query position
    q_start + r // heads (q_seg holds the bq positions' ids); keys_first: the mask laid out
    [bk, bq] (for the transposed products of dk/dv)."""
    q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)
    if heads > 1:
        q_pos = q_start + lax.div(jnp.arange(bq * heads, dtype=jnp.int32), heads)
        if q_seg is not None:
            q_seg = jnp.broadcast_to(q_seg[:, None], (bq, heads)).reshape(bq * heads)
    k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
    if keys_first:
        rows, cols = q_pos[None, :], k_pos[:, None]
    else:
        rows, cols = q_pos[:, None], k_pos[None, :]
    allowed = cols < st.kv_len  # padded keys (a no-op when kv_len is a multiple of bk)
    if st.causal:
        allowed = allowed & causal_allowed(rows, cols, st.q_len, st.kv_len)
    if st.window is not None:
        allowed = allowed & window_allowed(rows, cols, st.q_len, st.kv_len, st.window)
    if q_seg is not None:
        qs = q_seg[None, :] if keys_first else q_seg[:, None]
        ks = kv_seg[:, None] if keys_first else kv_seg[None, :]
        allowed = allowed & (qs == ks)
    return allowed


def _cdiv0(x, d: int):
    """ceil(x / d) for a traced int, clamping negative x to 0."""
    return lax.div(jnp.maximum(x, 0) + (d - 1), d)


def _floordiv0(x, d: int):
    """floor(x / d) for a traced int, clamping negative x to 0."""
    return lax.div(jnp.maximum(x, 0), d)


def _kv_range(st: _Static, q_start, bq: int, bk: int, nk: int):
    """K/V block range [n_start, n_end) for a query block, and n_full: blocks [n_start, n_full)
    need no mask. A sliding window starts at the block of the first row's oldest key and masks
    every block it visits."""
    kv_pad_free = st.kv_len // bk  # blocks without padded keys
    if st.causal:
        n_end = jnp.minimum(_cdiv0(q_start + bq + st.offset, bk), nk)
        n_full = jnp.minimum(_floordiv0(q_start + st.offset + 1, bk), n_end)
        n_full = jnp.minimum(n_full, kv_pad_free)
    else:
        n_end = nk
        n_full = min(kv_pad_free, nk)
    if st.has_segments:
        n_full = 0
    if st.window is not None:
        n_start = jnp.minimum(_floordiv0(q_start + st.offset - st.window + 1, bk), n_end)
        return n_start, n_start, n_end
    return 0, n_full, n_end


def _q_range(st: _Static, k_start, bq: int, bk: int, nq: int):
    """Query block range [q_lo, q_hi) for a K/V block; blocks [q_lo, q_full) need the mask (with
    a sliding window: all of them, up to the last query whose window reaches the block)."""
    if st.causal:
        q_lo = jnp.minimum(_floordiv0(k_start - st.offset, bq), nq)
        q_full = jnp.minimum(_cdiv0(k_start + bk - 1 - st.offset, bq), nq)
        q_full = jnp.maximum(q_full, q_lo)
    else:
        q_lo = 0
        q_full = jnp.int32(0)
    if st.kv_len % bk:
        q_full = jnp.where(k_start + bk > st.kv_len, nq, q_full)
    if st.has_segments:
        q_full = nq
    if st.window is not None:
        q_hi = jnp.minimum(_cdiv0(k_start + bk - 1 - st.offset + st.window, bq), nq)
        q_hi = jnp.maximum(q_hi, q_lo)
        return q_lo, q_hi, q_hi
    return q_lo, q_full, nq


def _rows(x: jax.Array) -> jax.Array:
    """A folded GQA block [block_q, groups, ...] as tile rows [block_q * groups, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _fwd_kernel(*refs, st: _Static, nq: int, nk: int):
    """One query block (of one head, or of a folded GQA group): online softmax over K/V
    blocks; writes out and lse (natural log)."""
    if st.has_segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = st.fwd.block_q, st.fwd.block_k
    heads = st.groups if st.fold_fwd else 1
    # Causal: the last query blocks do the most work, so launch them first.
    i = nq - 1 - pl.program_id(0) if st.causal else pl.program_id(0)
    q_start = i * bq
    q = _rows(q_ref[...]) if heads > 1 else q_ref[...]
    q_seg = qs_ref[...] if qs_ref is not None else None
    scale2 = st.scale * LOG2E

    def body(j, carry, masked: bool):
        acc, m, lsum = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * scale2
        if masked:
            kv_seg = ks_ref[pl.ds(k_start, bk)] if ks_ref is not None else None
            allowed = _mask(st, q_start, k_start, bq, bk, q_seg, kv_seg, heads=heads)
            s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # m starts finite, so exp2 below never NaNs
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        lsum = lsum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, lsum

    rows, d = q.shape
    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    n_start, n_full, n_end = _kv_range(st, q_start, bq, bk, nk)
    carry = lax.fori_loop(n_start, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    acc, m, lsum = carry
    empty = lsum == 0.0  # fully masked rows: output 0, lse -inf
    out = (acc / jnp.where(empty, 1.0, lsum)[:, None]).astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, lsum))) * LN2)
    if heads > 1:  # rows back to [block_q, groups, d] and lse to its [groups, block_q] block
        out, lse = out.reshape(bq, heads, d), lse.reshape(bq, heads).T
    o_ref[...] = out
    lse_ref[...] = lse


def _dq_kernel(*refs, st: _Static, nq: int, nk: int):
    """dq for one query block (of one head, or of a folded GQA group), looping over K/V blocks
    (lse in log2 units, +inf if empty)."""
    if st.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = st.dq.block_q, st.dq.block_k
    heads = st.groups if st.fold_dq else 1
    i = nq - 1 - pl.program_id(0) if st.causal else pl.program_id(0)
    q_start = i * bq
    if heads > 1:  # [block_q, groups, d] blocks and [groups, block_q] rows as tile rows
        q, do = _rows(q_ref[...]), _rows(do_ref[...])
        lse, delta = _rows(lse_ref[...].T), _rows(delta_ref[...].T)
    else:
        q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qs_ref[...] if qs_ref is not None else None
    scale2 = st.scale * LOG2E

    def body(j, dq, masked: bool):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * scale2
        if masked:
            kv_seg = ks_ref[pl.ds(k_start, bk)] if ks_ref is not None else None
            allowed = _mask(st, q_start, k_start, bq, bk, q_seg, kv_seg, heads=heads)
            s = jnp.where(allowed, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    n_start, n_full, n_end = _kv_range(st, q_start, bq, bk, nk)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(n_start, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
    dq = (dq * st.scale).astype(dq_ref.dtype)
    dq_ref[...] = dq.reshape(bq, heads, dq.shape[-1]) if heads > 1 else dq


def _dkdv_kernel(*refs, st: _Static, nq: int):
    """dk, dv for one K/V block, summed over the group's query heads and their query blocks."""
    if st.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), qs_ref, ks_ref = (
            refs,
            None,
            None,
        )
    bq, bk = st.dkdv.block_q, st.dkdv.block_k
    j = pl.program_id(0)
    k_start = j * bk
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = ks_ref[...] if ks_ref is not None else None
    scale2 = st.scale * LOG2E

    # Every product keeps the resident K/V block in M (block_k rows): S^T = K Q^T and
    # dP^T = V dO^T instead of Q K^T and dO V^T, so with block_q = 32 the matmuls still have
    # M = block_k (Hopper's wgmma wants M >= 64), and dV += P^T dO, dK += dS^T Q need no
    # transposed operand.
    def body(i, carry, g, masked: bool):
        dk, dv = carry
        q_start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        s_t = _dot_nt(k, q) * scale2  # [bk, bq]
        if masked:
            q_seg = qs_ref[pl.ds(q_start, bq)] if qs_ref is not None else None
            allowed = _mask(st, q_start, k_start, bq, bk, q_seg, kv_seg, keys_first=True)
            s_t = jnp.where(allowed, s_t, -jnp.inf)
        p_t = jnp.exp2(s_t - lse[None, :])
        dv = dv + _dot(p_t.astype(do.dtype), do)
        dp_t = _dot_nt(v, do)  # [bk, bq]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    q_lo, q_full, q_hi = _q_range(st, k_start, bq, bk, nq)

    def group_body(g, carry):
        carry = lax.fori_loop(q_lo, q_full, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(q_full, q_hi, functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    if st.groups == 1:
        dk, dv = group_body(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, st.groups, group_body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(cfg: KernelConfig) -> Any:
    """Triton compiler params for a kernel config."""
    return CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _query_specs(st: _Static, fold: bool, bq: int, nq: int, tk: int, d: int):
    """BlockSpecs of the forward and dq grids (q_blocks, batch, head programs): per-head or,
    folded, per-GQA-group blocks of q-shaped arrays and of [b, h, q] rows, the whole K/V of the
    program's KV head, and the query / key segment ids.

    Folded, program hi covers query heads hi * groups .. hi * groups + groups - 1, which share
    KV head hi; else program hi is query head hi, reading KV head hi // groups."""
    block_heads = st.groups if fold else None  # a group's heads, or one (squeezed) head
    per_kv = 1 if fold else st.groups  # head programs per KV head
    qi = (lambda i: nq - 1 - i) if st.causal else (lambda i: i)
    q_spec = pl.BlockSpec((None, bq, block_heads, d), lambda i, bi, hi: (bi, qi(i), hi, 0))
    kv_spec = pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, hi // per_kv, 0))
    row_spec = pl.BlockSpec((None, block_heads, bq), lambda i, bi, hi: (bi, hi, qi(i)))
    seg_specs = [
        pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qi(i))),
        pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
    ]
    return q_spec, kv_spec, row_spec, seg_specs


def _forward(st: _Static, q, k, v, q_seg, kv_seg):
    """pallas_call of the forward kernel on padded inputs: (out, lse [b, h, q_pad] f32)."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, bk = st.fwd.block_q, st.fwd.block_k
    nq, nk = tq // bq, tk // bk
    q_spec, kv_spec, row_spec, seg_specs = _query_specs(st, st.fold_fwd, bq, nq, tk, d)
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if st.has_segments:
        in_specs += seg_specs
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk),
        grid=(nq, b, h // st.groups if st.fold_fwd else h),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
        ],
        compiler_params=_params(st.fwd),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(*args)


def _backward(st: _Static, q, k, v, q_seg, kv_seg, out, lse, do):
    """pallas_calls of the dq and dk/dv kernels on padded inputs: (dq, dk, dv)."""
    b, tq, h, d = q.shape
    tk, kh, groups = k.shape[1], k.shape[2], st.groups
    # delta = rowsum(dO * O) in f32; lse to log2 units, +inf for empty rows so p = exp2(-inf) = 0.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)

    bq, bk = st.dq.block_q, st.dq.block_k
    nq, nk = tq // bq, tk // bk
    q_spec, kv_spec, row_spec, seg_specs = _query_specs(st, st.fold_dq, bq, nq, tk, d)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse2, delta]
    if st.has_segments:
        in_specs += seg_specs
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
        grid=(nq, b, h // groups if st.fold_dq else h),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st.dq),
        interpret=st.interpret,
        name="flash_attention_dq",
    )(*args)

    bq, bk = st.dkdv.block_q, st.dkdv.block_k
    nq, nk = tq // bq, tk // bk
    q_spec = pl.BlockSpec((None, tq, groups, d), lambda j, bi, ki: (bi, 0, ki, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    row_spec = pl.BlockSpec((None, groups, tq), lambda j, bi, ki: (bi, ki, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse2, delta]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, tq), lambda j, bi, ki: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)),
        ]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, nq=nq),
        grid=(nk, b, kh),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(st.dkdv),
        interpret=st.interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, q_seg, kv_seg):
    """Differentiable attention on padded inputs (the custom_vjp boundary)."""
    return _forward(st, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(st: _Static, q, k, v, q_seg, kv_seg):
    """custom_vjp forward: the kernel's output plus residuals (inputs, out, lse)."""
    out, lse = _forward(st, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(st: _Static, res, do):
    """custom_vjp backward: dq, dk, dv from the Pallas kernels; no cotangent for segment ids."""
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(st, q, k, v, q_seg, kv_seg, out, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public API


def _check(q, k, v, segment_ids, kv_segment_ids, causal=True, window=None) -> str | None:
    """Why the kernel cannot handle this call, or None if it can."""
    if window is not None and (not causal or int(window) < 1):
        return f"window={window} needs causal=True and window >= 1"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return (
            f"expects rank-4 q/k/v [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, "
            f"{v.shape}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "empty sequence"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return (
            f"q/k/v must share one dtype of float32/bfloat16/float16, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    if segment_ids is None and kv_segment_ids is not None:
        return "kv_segment_ids given without segment_ids"
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        if segment_ids.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
            return (
                f"segment ids must be [batch, q_len] / [batch, kv_len], got "
                f"{segment_ids.shape}, {kv_seg.shape}"
            )
        if not (
            jnp.issubdtype(segment_ids.dtype, jnp.integer)
            and jnp.issubdtype(kv_seg.dtype, jnp.integer)
        ):
            return "segment ids must be integers"
    return None


def supports(
    q: Any,
    k: Any,
    v: Any,
    *,
    segment_ids: Any = None,
    kv_segment_ids: Any = None,
    mask: Any = None,
    scale: Any = None,
    causal: Any = True,
    window: Any = None,
    **_: Any,
) -> bool:
    """Whether `flash_attention` handles this call (for `auto` dispatch); never raises."""
    if mask is not None:
        return False
    try:
        if scale is not None:
            float(scale)
        return _check(q, k, v, segment_ids, kv_segment_ids, causal, window) is None
    except Exception:  # noqa: BLE001 - anything odd (tracers as scale, bad objects): say no
        return False


def _prepare(
    q,
    k,
    v,
    causal,
    segment_ids,
    kv_segment_ids,
    scale,
    block_q,
    block_k,
    num_warps,
    num_stages,
    interpret,
    device_kind,
    window=None,
    kernel_configs=None,
):
    """Validate, choose blocks, pad: (static config, padded q, k, v, q_seg, kv_seg).
    `kernel_configs` {kernel: KernelConfig} sets a kernel's whole config (the autotuner's
    choice); the block/warp arguments override the heuristics of the others."""
    problem = _check(q, k, v, segment_ids, kv_segment_ids, causal, window)
    if problem:
        raise ValueError(f"flash_attention: {problem}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk is not None and (blk < MIN_BLOCK or blk & (blk - 1)):
            raise ValueError(
                f"flash_attention: {name}={blk} must be a power of two >= "
                f"{MIN_BLOCK} (Triton block and dot-operand constraints)"
            )
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    if interpret is None:
        interpret = not on_gpu()
    if device_kind is None:
        device_kind = "cpu" if interpret else target_device()[1]

    unknown = set(kernel_configs or {}) - set(KERNELS)
    if unknown:
        raise ValueError(f"flash_attention: kernel_configs keys must be in {KERNELS}: {unknown}")
    for kernel, c in (kernel_configs or {}).items():
        for name, blk in (("block_q", c.block_q), ("block_k", c.block_k)):
            if blk < MIN_BLOCK or blk & (blk - 1):
                raise ValueError(
                    f"flash_attention: kernel_configs[{kernel!r}].{name}={blk} must be a power "
                    f"of two >= {MIN_BLOCK} (Triton block and dot-operand constraints)"
                )

    def cfg(kernel: str) -> KernelConfig:
        if kernel_configs and kernel in kernel_configs:
            return kernel_configs[kernel]
        c = choose_config(tq, tk, d, q.dtype, device_kind, kernel)
        return KernelConfig(
            block_q or c.block_q,
            block_k or c.block_k,
            num_warps or c.num_warps,
            num_stages or c.num_stages,
        )

    fwd, dq, dkdv = cfg("fwd"), cfg("dq"), cfg("dkdv")
    # Blocks are powers of two, so padding to the largest one makes every kernel's grid exact.
    tq_pad = -(-tq // max(fwd.block_q, dq.block_q, dkdv.block_q)) * max(
        fwd.block_q, dq.block_q, dkdv.block_q
    )
    tk_pad = -(-tk // max(fwd.block_k, dq.block_k, dkdv.block_k)) * max(
        fwd.block_k, dq.block_k, dkdv.block_k
    )
    d_pad = _padded_head_dim(d)
    q = jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0), (0, d_pad - d)))
    k = jnp.pad(k, ((0, 0), (0, tk_pad - tk), (0, 0), (0, d_pad - d)))
    v = jnp.pad(v, ((0, 0), (0, tk_pad - tk), (0, 0), (0, d_pad - d)))
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tq_pad - tq)))
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, tk_pad - tk)))
    st = _Static(
        scale=scale,
        causal=bool(causal),
        q_len=tq,
        kv_len=tk,
        groups=h // kh,
        has_segments=segment_ids is not None,
        window=effective_window(window, tk),  # causal and >= 1 (checked above)
        fwd=fwd,
        dq=dq,
        dkdv=dkdv,
        fold_fwd=_folds("fwd", fwd.block_q, h // kh, d, q.dtype, device_kind),
        fold_dq=_folds("dq", dq.block_q, h // kh, d, q.dtype, device_kind),
        interpret=bool(interpret),
    )
    return st, q, k, v, q_seg, kv_seg


# Tiles the autotuner tries per kernel (clamped to the sequence lengths), beside the heuristic:
# the forward and dq keep a query block resident (large block_q), dk/dv a K/V block (large
# block_k, the M of all its products).
TUNING_TILES = {
    "fwd": ((128, 64), (128, 128), (64, 64), (64, 32)),
    "dq": ((128, 32), (128, 64), (64, 32), (64, 64)),
    "dkdv": ((32, 128), (64, 128), (32, 64), (64, 64), (128, 128)),
}


def tuning_candidates(
    q_len: int, kv_len: int, head_dim: int, dtype: Any, device_kind: str, kernel: str = "fwd"
) -> list[KernelConfig]:
    """Configurations the autotuner times for one kernel: the heuristic's choice first, then
    the kernel's TUNING_TILES at 4 and 8 warps, clamped to the sequence lengths, deduplicated."""
    base = choose_config(q_len, kv_len, head_dim, dtype, device_kind, kernel)
    out = [base]
    for bq, bk in TUNING_TILES[kernel]:
        for warps in (4, 8):
            bq_c = min(bq, max(MIN_BLOCK, next_pow2(q_len)))
            bk_c = min(bk, max(MIN_BLOCK, next_pow2(kv_len)))
            cand = KernelConfig(bq_c, bk_c, warps, base.num_stages)
            if cand not in out:
                out.append(cand)
    return out


def _tuned_configs(
    q, k, causal, has_segments, scale, interpret, device_kind, window=None
) -> dict[str, KernelConfig]:
    """Autotune each kernel on its own for these shapes: the forward timed alone, dq and dk/dv
    in the forward+backward step with the other kernels at their heuristics."""
    kind = device_kind or target_device()[1]
    shape_q, shape_k, dtype = tuple(q.shape), tuple(k.shape), jnp.dtype(q.dtype)
    key = {
        "q": shape_q,
        "kv": shape_k,
        "dtype": dtype.name,
        "causal": bool(causal),
        "segments": has_segments,
        **({"window": int(window)} if window is not None else {}),
    }
    rng = np.random.default_rng(0)
    qc, kc, vc = (
        rng.standard_normal(s, np.float32).astype(dtype) for s in (shape_q, shape_k, shape_k)
    )
    seg = jnp.ones(shape_q[:2], jnp.int32) if has_segments else None
    specs = [jax.ShapeDtypeStruct(x.shape, dtype) for x in (qc, kc, vc)]

    def make_run(kernel: str, cand: dict[str, int]):
        # numpy inputs and an AOT-compiled executable run eagerly even while the caller is
        # being traced under jit (a plain jitted call there would be staged, not run).
        def f(q, k, v):
            return flash_attention(
                q,
                k,
                v,
                causal=causal,
                segment_ids=seg,
                window=window,
                scale=scale,
                interpret=interpret,
                device_kind=device_kind,
                autotune=False,
                kernel_configs={kernel: KernelConfig(**cand)},
            )

        def step(q, k, v):
            if kernel == "fwd":
                return f(q, k, v)
            out, vjp = jax.vjp(f, q, k, v)
            return vjp(out)

        compiled = jax.jit(step).lower(*specs).compile()
        return lambda: compiled(qc, kc, vc)

    tuned = {}
    for kernel in KERNELS:
        cands = [
            dataclasses.asdict(c)
            for c in tuning_candidates(shape_q[1], shape_k[1], shape_q[3], dtype, kind, kernel)
        ]
        run = functools.partial(make_run, kernel)
        tuned[kernel] = KernelConfig(**_autotune.tune(f"flash_attention_{kernel}", key, cands, run))
    return tuned


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    autotune: bool | None = None,
    kernel_configs: dict[str, KernelConfig] | None = None,
) -> jax.Array:
    """Flash attention (differentiable via Pallas backward kernels); output in q's dtype.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]. causal aligns
    queries to the end of the keys (a KV cache works); segment_ids [batch, q_len] restrict
    attention to equal ids (kv_segment_ids [batch, kv_len] defaults to segment_ids); fully
    masked rows give 0. window (causal only): each query sees its `window` latest keys, itself
    included (sliding-window attention; blocks outside the band are skipped). scale defaults
    to head_dim**-0.5. block_q/block_k/num_warps/num_stages override the heuristics
    (choose_config) for all three kernels, kernel_configs {"fwd"|"dq"|"dkdv": KernelConfig}
    one kernel's whole config; device_kind picks the heuristics' device (default: the default
    device). interpret=None interprets on CPU. autotune (default: env PALLAS_AUTOTUNE=1) times
    a few configurations of each kernel once per shape and device and caches the fastest
    (pallas_kernels.autotune); explicit blocks or kernel_configs disable it.
    """
    if causal and window is not None and window >= 1:  # else _prepare refuses it
        window = effective_window(window, k.shape[1])  # no masked band where none is needed
    # Timing needs the device being compiled for: no autotuning for an abstract target.
    local = target_device()[1] == jax.devices()[0].device_kind
    explicit = block_q is not None or block_k is not None or kernel_configs is not None
    if _autotune.enabled(autotune) and not explicit and local:
        kernel_configs = _tuned_configs(
            q, k, causal, segment_ids is not None, scale, interpret, device_kind, window
        )
    st, qp, kp, vp, q_seg, kv_seg = _prepare(
        q,
        k,
        v,
        causal,
        segment_ids,
        kv_segment_ids,
        scale,
        block_q,
        block_k,
        num_warps,
        num_stages,
        interpret,
        device_kind,
        window,
        kernel_configs,
    )
    out = _flash(st, qp, kp, vp, q_seg, kv_seg)
    return out[:, : q.shape[1], :, : q.shape[3]]


def flash_attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """Forward only (not differentiable): (out, lse) with lse [batch, heads, q_len] f32.

    Fully masked rows have lse = -inf. Takes flash_attention's keyword arguments."""
    names = (
        "causal",
        "segment_ids",
        "kv_segment_ids",
        "scale",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
        "device_kind",
        "window",
    )
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"flash_attention_with_lse: unexpected arguments {sorted(unknown)}")
    st, qp, kp, vp, q_seg, kv_seg = _prepare(q, k, v, *(kwargs.get(n) for n in names))
    out, lse = _forward(st, qp, kp, vp, q_seg, kv_seg)
    return out[:, : q.shape[1], :, : q.shape[3]], lse[:, :, : q.shape[1]]
