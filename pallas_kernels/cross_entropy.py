"""Fused linear + softmax cross-entropy for large vocabularies (Pallas, Triton lowering).

loss[t] = logsumexp(h[t] @ w) - (h[t] @ w)[labels[t]] (+ z_loss * logsumexp**2), never holding
the f32 logits of the whole batch:

- Forward: one Pallas kernel over a (token block, vocab split) grid. Each program computes
  logit tiles [block_tokens, block_vocab] with a K-loop over d and keeps an online (max, sum of
  exp, label logit) per token; the per-split partials ([splits, tokens], tiny) are combined in
  jnp into logsumexp and the loss. Splitting the vocab keeps the GPU busy when tokens are few.
- Backward (custom_vjp): tokens are processed in chunks (`lax.scan`) so the only large
  temporary is one chunk's logit gradient [chunk, vocab] in the compute dtype. Per chunk, three
  Pallas kernels: (1) recompute each logit tile and write dlogits = g * ((1 + 2 z lse) *
  softmax - onehot); (2) dh = dlogits @ w.T, accumulated over vocab blocks in registers;
  (3) dw += h.T @ dlogits, accumulated over the chunk's token blocks in registers and added to
  the running f32 dw (aliased in place). No cross-program reduction is needed, so no atomics.

`linear_cross_entropy_chunked` is the same algorithm in plain jnp (lax.scan over token chunks,
custom_vjp) for backends or shapes the kernels do not take; `linear_cross_entropy_reference`
(full logits, through `cross_entropy_reference`) is the naive ground truth and, like
`cross_entropy_reference`, framework.ops' "xla" impl.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._compat import (
    SQUEEZED,
    CompilerParams,
    cdiv,
    device_row,
    load,
    next_pow2,
    on_gpu,
    store,
    target_device,
)

_NEG = -1e30  # finite "minus infinity": a fully masked tile must not produce inf - inf = nan
_F32 = jnp.float32
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MIN_BLOCK = 16  # Triton dot operands need every dim >= 16


@dataclasses.dataclass(frozen=True)
class CEConfig:
    """Tile sizes (all powers of two >= 16) and Triton launch params of the CE kernels.

    block_tokens x block_vocab is a logit tile, block_k the d-step of its K-loop, block_d the
    d-width of a dh / dw output tile in the backward matmul kernels."""

    block_tokens: int
    block_vocab: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class _DeviceRow:
    """Heuristic table row: largest tiles, launch params, programs to fill the device, memory."""

    block_tokens: int
    block_vocab: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    target_programs: int
    chunk_bytes: int
    min_chunk: int


_MIB = 1 << 20
# chunk_bytes bounds the backward's [chunk, vocab] dlogits buffer; min_chunk keeps chunks long
# enough that re-reading and re-writing the f32 dw once per chunk stays cheap next to the matmuls.
_DEVICE_TABLE = {
    "h100": _DeviceRow(64, 128, 64, 64, 4, 3, 264, 128 * _MIB, 1024),
    "h200": _DeviceRow(64, 128, 64, 64, 4, 3, 264, 128 * _MIB, 1024),
    "a100": _DeviceRow(64, 128, 32, 64, 4, 2, 216, 128 * _MIB, 1024),
    "default": _DeviceRow(32, 128, 32, 32, 4, 2, 128, 32 * _MIB, 128),
}


def _clamp_block(block: int, extent: int) -> int:
    """`block`, shrunk (power of two, >= 16) when the extent is smaller than it."""
    return max(MIN_BLOCK, min(block, next_pow2(max(int(extent), 1))))


def choose_config(
    n_tokens: int, dim: int, vocab: int, dtype: Any, device_kind: str | None = None
) -> CEConfig:
    """Heuristic tiles for (tokens, d, vocab, dtype, device); f32 halves the K-step."""
    row = device_row(_DEVICE_TABLE, device_kind)
    block_k = row.block_k // 2 if jnp.dtype(dtype).itemsize >= 4 else row.block_k
    return CEConfig(
        block_tokens=_clamp_block(row.block_tokens, n_tokens),
        block_vocab=_clamp_block(row.block_vocab, vocab),
        block_k=_clamp_block(max(block_k, MIN_BLOCK), dim),
        block_d=_clamp_block(row.block_d, dim),
        num_warps=row.num_warps,
        num_stages=row.num_stages,
    )


def config_examples(device_kinds: Iterable[str] | None = None) -> dict[CEConfig, tuple]:
    """Every config `choose_config` can return, each with one (tokens, d, vocab, dtype, device
    kind) that picks it; extents range over powers of two up to 256, past which no block shrinks."""
    kinds = list(device_kinds) if device_kinds is not None else list(_DEVICE_TABLE)
    extents = [1 << i for i in range(0, 9)]
    out: dict[CEConfig, tuple] = {}
    for kind in kinds:
        for dtype in _DTYPES:
            for t in extents:
                for d in extents:
                    for v in extents:
                        out.setdefault(
                            choose_config(t, d, v, dtype, kind),
                            (t, d, v, jnp.dtype(dtype).name, kind),
                        )
    return dict(sorted(out.items(), key=lambda kv: dataclasses.astuple(kv[0])))


def all_configs(device_kinds: Iterable[str] | None = None) -> list[CEConfig]:
    """Every config `choose_config` can return for any shape, dtype and listed device."""
    return list(config_examples(device_kinds))


def _plan(
    n_tokens: int,
    vocab: int,
    cfg: CEConfig,
    itemsize: int,
    device_kind: str | None,
    vocab_splits: int | None,
    chunk_tokens: int | None,
) -> tuple[int, int]:
    """(vocab splits of the forward grid, backward token chunk) for this problem size."""
    row = device_row(_DEVICE_TABLE, device_kind)
    n_vb = cdiv(vocab, cfg.block_vocab)
    if vocab_splits is None:
        n_tb = cdiv(n_tokens, cfg.block_tokens)
        vocab_splits = min(n_vb, next_pow2(cdiv(row.target_programs, n_tb)))
    vocab_splits = max(1, min(int(vocab_splits), n_vb))
    vocab_splits = cdiv(n_vb, cdiv(n_vb, vocab_splits))  # no split left without a vocab block
    bt = cfg.block_tokens
    if chunk_tokens is None:
        per_token = n_vb * cfg.block_vocab * itemsize
        chunk_tokens = max(row.min_chunk, row.chunk_bytes // per_token)
    chunk_tokens = cdiv(max(int(chunk_tokens), 1), bt) * bt
    chunk_tokens = min(chunk_tokens, cdiv(n_tokens, bt) * bt)
    return vocab_splits, chunk_tokens


def _resolve_interpret(interpret: bool | None) -> bool:
    """`None` means interpret when running on CPU."""
    return not on_gpu() if interpret is None else bool(interpret)


def _params(cfg: CEConfig):
    """Triton compiler params for a config."""
    return CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _padded(n: int, block: int) -> int:
    """n rounded up to a multiple of block."""
    return cdiv(n, block) * block


# ------------------------------------------------------------------------------------ forward


def _logit_tile(h_ref, w_ref, col_off, rmask, cmask, *, dim: int, block_k: int, cdt):
    """f32 logits of one [rows, block_vocab] tile: K-loop over d of h[:, k] @ w[k, cols]."""
    bt, bv = rmask.shape[0], cmask.shape[0]
    n_k = h_ref.shape[1] // block_k

    def body(k, acc):
        kk = pl.ds(k * block_k, block_k)
        kmask = (k * block_k + jnp.arange(block_k)) < dim
        hk = load(h_ref.at[:, kk], mask=rmask[:, None] & kmask[None, :], other=0)
        wk = load(w_ref.at[kk, pl.ds(col_off, bv)], mask=kmask[:, None] & cmask[None, :], other=0)
        return acc + jnp.dot(hk.astype(cdt), wk.astype(cdt), preferred_element_type=_F32)

    return jax.lax.fori_loop(0, n_k, body, jnp.zeros((bt, bv), _F32))


def _fwd_kernel(
    h_ref,
    w_ref,
    lab_ref,
    m_ref,
    se_ref,
    t_ref,
    *,
    n_tokens: int,
    dim: int,
    vocab: int,
    blocks_per_split: int,
    block_vocab: int,
    block_k: int,
    cdt,
):
    """Online (max, sum exp, label logit) over this split's vocab blocks for one token block."""
    bt = h_ref.shape[0]
    rmask = (pl.program_id(0) * bt + jnp.arange(bt)) < n_tokens
    labels = load(lab_ref, mask=rmask, other=-1)
    split_col0 = pl.program_id(1) * (blocks_per_split * block_vocab)

    def body(j, carry):
        m, se, t = carry
        cols = split_col0 + j * block_vocab + jnp.arange(block_vocab)
        cmask = cols < vocab
        acc = _logit_tile(
            h_ref, w_ref, j * block_vocab, rmask, cmask, dim=dim, block_k=block_k, cdt=cdt
        )
        logits = jnp.where(cmask[None, :], acc, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        p = jnp.where(cmask[None, :], jnp.exp(logits - m_new[:, None]), 0.0)
        se = se * jnp.exp(m - m_new) + jnp.sum(p, axis=1)
        hit = cols[None, :] == labels[:, None]
        t = t + jnp.sum(jnp.where(hit, acc, 0.0), axis=1)
        return m_new, se, t

    init = (jnp.full((bt,), _NEG, _F32), jnp.zeros((bt,), _F32), jnp.zeros((bt,), _F32))
    m, se, t = jax.lax.fori_loop(0, blocks_per_split, body, init)
    store(m_ref, m, mask=rmask)
    store(se_ref, se, mask=rmask)
    store(t_ref, t, mask=rmask)


def _forward(h, w, labels, cfg: CEConfig, splits: int, interpret: bool):
    """Per-token f32 logsumexp and label logit via the forward kernel and a jnp combine."""
    n_tokens, dim = h.shape
    vocab = w.shape[1]
    bt, bv, bk = cfg.block_tokens, cfg.block_vocab, cfg.block_k
    dp = _padded(dim, bk)
    per_split = cdiv(cdiv(vocab, bv), splits)
    cdt = jnp.promote_types(h.dtype, w.dtype)
    kernel = functools.partial(
        _fwd_kernel,
        n_tokens=n_tokens,
        dim=dim,
        vocab=vocab,
        blocks_per_split=per_split,
        block_vocab=bv,
        block_k=bk,
        cdt=cdt,
    )
    part = jax.ShapeDtypeStruct((splits, n_tokens), _F32)
    part_spec = pl.BlockSpec((SQUEEZED, bt), lambda i, s: (s, i))
    m, se, t = pl.pallas_call(
        kernel,
        out_shape=[part] * 3,
        grid=(cdiv(n_tokens, bt), splits),
        in_specs=[
            pl.BlockSpec((bt, dp), lambda i, s: (i, 0)),
            pl.BlockSpec((dp, per_split * bv), lambda i, s: (0, s)),
            pl.BlockSpec((bt,), lambda i, s: (i,)),
        ],
        out_specs=[part_spec] * 3,
        interpret=interpret,
        compiler_params=_params(cfg),
        name="linear_ce_fwd",
    )(h, w, labels)
    m_max = jnp.max(m, axis=0)
    lse = m_max + jnp.log(jnp.sum(se * jnp.exp(m - m_max[None]), axis=0))
    return lse, jnp.sum(t, axis=0)


# ----------------------------------------------------------------------------------- backward


def _dlogits_kernel(
    h_ref,
    w_ref,
    lab_ref,
    lse_ref,
    g_ref,
    dl_ref,
    *,
    dim: int,
    vocab: int,
    block_k: int,
    z_loss: float,
    cdt,
):
    """One tile of dlogits = g * ((1 + 2 z lse) * softmax - onehot), logits recomputed."""
    bt, bv = dl_ref.shape
    cols = pl.program_id(1) * bv + jnp.arange(bv)
    cmask = cols < vocab
    rmask = jnp.ones((bt,), jnp.bool_)
    acc = _logit_tile(h_ref, w_ref, 0, rmask, cmask, dim=dim, block_k=block_k, cdt=cdt)
    lse = lse_ref[...]
    p = jnp.where(cmask[None, :], jnp.exp(acc - lse[:, None]), 0.0)
    if z_loss:
        p = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    onehot = (cols[None, :] == lab_ref[...][:, None]).astype(_F32)
    dl = (p - onehot) * g_ref[...][:, None]
    store(dl_ref, dl.astype(dl_ref.dtype), mask=jnp.broadcast_to(cmask[None, :], (bt, bv)))


def _dh_kernel(dl_ref, w_ref, dh_ref, *, dim: int, vocab: int, block_vocab: int, cdt):
    """dh tile [block_tokens, block_d] = sum over vocab blocks of dlogits @ w[d_tile].T."""
    bt, bd = dh_ref.shape
    dmask = (pl.program_id(1) * bd + jnp.arange(bd)) < dim

    def body(j, acc):
        cols = pl.ds(j * block_vocab, block_vocab)
        cmask = (j * block_vocab + jnp.arange(block_vocab)) < vocab
        dl = load(
            dl_ref.at[:, cols], mask=jnp.broadcast_to(cmask[None, :], (bt, block_vocab)), other=0
        )
        wt = load(w_ref.at[:, cols], mask=dmask[:, None] & cmask[None, :], other=0)
        return acc + jax.lax.dot_general(
            dl.astype(cdt), wt.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=_F32
        )

    n_v = dl_ref.shape[1] // block_vocab
    acc = jax.lax.fori_loop(0, n_v, body, jnp.zeros((bt, bd), _F32))
    store(dh_ref, acc.astype(dh_ref.dtype), mask=jnp.broadcast_to(dmask[None, :], (bt, bd)))


def _dw_kernel(h_ref, dl_ref, dw_in_ref, dw_ref, *, dim: int, vocab: int, block_tokens: int, cdt):
    """dw tile [block_d, block_vocab] += sum over the chunk's token blocks of h.T @ dlogits."""
    bd, bv = dw_ref.shape
    dmask = (pl.program_id(0) * bd + jnp.arange(bd)) < dim
    cmask = (pl.program_id(1) * bv + jnp.arange(bv)) < vocab
    mask = dmask[:, None] & cmask[None, :]

    def body(i, acc):
        rows = pl.ds(i * block_tokens, block_tokens)
        hk = load(
            h_ref.at[rows, :], mask=jnp.broadcast_to(dmask[None, :], (block_tokens, bd)), other=0
        )
        dl = load(
            dl_ref.at[rows, :], mask=jnp.broadcast_to(cmask[None, :], (block_tokens, bv)), other=0
        )
        return acc + jax.lax.dot_general(
            hk.astype(cdt), dl.astype(cdt), (((0,), (0,)), ((), ())), preferred_element_type=_F32
        )

    n_t = h_ref.shape[0] // block_tokens
    acc = jax.lax.fori_loop(0, n_t, body, jnp.zeros((bd, bv), _F32))
    # dw_in aliases dw: read the old tile right before overwriting it, through the same pointer
    # tensor and mask, so each element is read and then written by the same thread.
    store(dw_ref, acc + load(dw_in_ref, mask=mask, other=0), mask=mask)


def _backward_chunk(h, w, labels, lse, g, dw, *, cfg: CEConfig, z_loss: float, interpret: bool):
    """One token chunk (rows a multiple of block_tokens): returns (dh chunk, updated f32 dw)."""
    chunk, dim = h.shape
    vocab = w.shape[1]
    bt, bv, bk, bd = cfg.block_tokens, cfg.block_vocab, cfg.block_k, cfg.block_d
    cdt = jnp.promote_types(h.dtype, w.dtype)
    dp, vp = _padded(dim, bk), _padded(vocab, bv)
    n_t, n_v, n_d = chunk // bt, vp // bv, cdiv(dim, bd)
    vec = pl.BlockSpec((bt,), lambda i, j: (i,))
    dl = pl.pallas_call(
        functools.partial(
            _dlogits_kernel, dim=dim, vocab=vocab, block_k=bk, z_loss=z_loss, cdt=cdt
        ),
        out_shape=jax.ShapeDtypeStruct((chunk, vocab), cdt),
        grid=(n_t, n_v),
        in_specs=[
            pl.BlockSpec((bt, dp), lambda i, j: (i, 0)),
            pl.BlockSpec((dp, bv), lambda i, j: (0, j)),
            vec,
            vec,
            vec,
        ],
        out_specs=pl.BlockSpec((bt, bv), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_params(cfg),
        name="linear_ce_dlogits",
    )(h, w, labels, lse, g)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, dim=dim, vocab=vocab, block_vocab=bv, cdt=cdt),
        out_shape=jax.ShapeDtypeStruct((chunk, dim), h.dtype),
        grid=(n_t, n_d),
        in_specs=[
            pl.BlockSpec((bt, vp), lambda i, k: (i, 0)),
            pl.BlockSpec((bd, vp), lambda i, k: (k, 0)),
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, k: (i, k)),
        interpret=interpret,
        compiler_params=_params(cfg),
        name="linear_ce_dh",
    )(dl, w)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, dim=dim, vocab=vocab, block_tokens=bt, cdt=cdt),
        out_shape=jax.ShapeDtypeStruct((dim, vocab), _F32),
        grid=(n_d, n_v),
        in_specs=[
            pl.BlockSpec((chunk, bd), lambda k, j: (0, k)),
            pl.BlockSpec((chunk, bv), lambda k, j: (0, j)),
            pl.BlockSpec((bd, bv), lambda k, j: (k, j)),
        ],
        out_specs=pl.BlockSpec((bd, bv), lambda k, j: (k, j)),
        input_output_aliases={2: 0},
        interpret=interpret,
        compiler_params=_params(cfg),
        name="linear_ce_dw",
    )(h, dl, dw)
    return dh, dw


def _backward(h, w, labels, lse, g, *, cfg: CEConfig, chunk: int, z_loss: float, interpret: bool):
    """dh and dw over token chunks (lax.scan); padded tokens carry g = 0."""
    n_tokens, dim = h.shape
    n_chunks = cdiv(n_tokens, chunk)
    pad = n_chunks * chunk - n_tokens

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    step = functools.partial(_backward_chunk, cfg=cfg, z_loss=z_loss, interpret=interpret)
    xs = (split(h), split(labels), split(lse), split(g.astype(_F32)))

    def body(dw, x):
        hc, lc, lsec, gc = x
        dhc, dw = step(hc, w, lc, lsec, gc, dw)
        return dw, dhc

    dw0 = jnp.zeros(w.shape, _F32)
    if n_chunks == 1:
        dw, dh = body(dw0, tuple(x[0] for x in xs))
        dh = dh[None]
    else:
        dw, dh = jax.lax.scan(body, dw0, xs)
    return dh.reshape(n_chunks * chunk, dim)[:n_tokens], dw.astype(w.dtype)


# --------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _fused(h, w, labels, z_loss: float, cfg: CEConfig, splits: int, chunk: int, interpret: bool):
    """Per-token loss of [tokens, d] hidden states against a [d, vocab] unembedding."""
    return _fused_fwd(h, w, labels, z_loss, cfg, splits, chunk, interpret)[0]


def _fused_fwd(h, w, labels, z_loss, cfg, splits, chunk, interpret):
    """Loss plus residuals (h, w, labels, f32 lse) for the recomputing backward."""
    lse, label_logit = _forward(h, w, labels, cfg, splits, interpret)
    return _loss_from_lse(lse, label_logit, z_loss), (h, w, labels, lse)


def _fused_bwd(z_loss, cfg, splits, chunk, interpret, res, g):
    """dh and dw from the chunked backward kernels; labels get no cotangent."""
    h, w, labels, lse = res
    dh, dw = _backward(
        h, w, labels, lse, g, cfg=cfg, chunk=chunk, z_loss=z_loss, interpret=interpret
    )
    return dh, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------- public


def supports(h: jax.Array, w: jax.Array, labels: jax.Array | None = None, **_: object) -> bool:
    """Whether the kernels take this call: float h [..., d] and w [d, vocab], d and vocab >= 1."""
    ok_dtypes = [jnp.dtype(t) for t in _DTYPES]
    return (
        h.ndim >= 1
        and w.ndim == 2
        and h.shape[-1] == w.shape[0]
        and h.size > 0
        and w.shape[1] >= 1
        and jnp.dtype(h.dtype) in ok_dtypes
        and jnp.dtype(w.dtype) in ok_dtypes
        and (labels is None or labels.shape == h.shape[:-1])
    )


def _check(h: jax.Array, w: jax.Array, labels: jax.Array) -> None:
    """Raise a clear error for inconsistent shapes."""
    if w.ndim != 2 or h.ndim < 1 or h.shape[-1] != w.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: h {h.shape} and w {w.shape} need h [..., d] and w [d, vocab]"
        )
    if labels.shape != h.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels {labels.shape} != h leading dims {h.shape[:-1]}"
        )


def linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    z_loss: float = 0.0,
    block_tokens: int | None = None,
    block_vocab: int | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    config: CEConfig | None = None,
    vocab_splits: int | None = None,
    chunk_tokens: int | None = None,
) -> jax.Array:
    """Per-token f32 loss of softmax(h @ w) against labels, without full-batch f32 logits.

    h: [..., d] any float dtype; w: [d, vocab]; labels: int [...] in [0, vocab) (others give
    loss = logsumexp). Returns f32 [...]. `block_*`/`config` override the heuristic tiles,
    `vocab_splits` the forward grid's vocab split, `chunk_tokens` the backward token chunk."""
    _check(h, w, labels)
    lead = labels.shape
    h2 = h.reshape(-1, h.shape[-1])
    n_tokens = h2.shape[0]
    if n_tokens == 0:
        return jnp.zeros(lead, _F32)
    if device_kind is None:
        device_kind = target_device()[1]
    cdt = jnp.promote_types(h.dtype, w.dtype)
    cfg = config or choose_config(n_tokens, h.shape[-1], w.shape[1], cdt, device_kind)
    for name, val in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
        if val is not None:
            if val < MIN_BLOCK or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {val}")
            cfg = dataclasses.replace(cfg, **{name: int(val)})
    splits, chunk = _plan(
        n_tokens, w.shape[1], cfg, jnp.dtype(cdt).itemsize, device_kind, vocab_splits, chunk_tokens
    )
    loss = _fused(
        h2,
        w,
        labels.reshape(-1).astype(jnp.int32),
        float(z_loss),
        cfg,
        splits,
        chunk,
        _resolve_interpret(interpret),
    )
    return loss.reshape(lead)


# --------------------------------------------------------------------------- jnp references


def _f32_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """f32 logits h @ w of the promoted inputs, accumulated in f32."""
    return jnp.dot(h, w, preferred_element_type=_F32).astype(_F32)


def _label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits[..., label] per position: the label's logit."""
    return jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _loss_from_lse(lse: jax.Array, label_logit: jax.Array, z_loss: float) -> jax.Array:
    """The per-token loss from f32 logsumexp and label logit: lse - label logit + z lse**2."""
    loss = lse - label_logit
    return loss + z_loss * jnp.square(lse) if z_loss else loss


def cross_entropy_reference(logits: jax.Array, labels: jax.Array, z_loss: float = 0.0) -> jax.Array:
    """Softmax cross-entropy of [..., vocab] logits in f32 (framework.ops' "xla" impl)."""
    logits = logits.astype(_F32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return _loss_from_lse(lse, _label_logit(logits, labels), z_loss)


def linear_cross_entropy_reference(
    h: jax.Array, w: jax.Array, labels: jax.Array, z_loss: float = 0.0, *, f32_logits: bool = True
) -> jax.Array:
    """Naive ground truth: full logits h @ w, then cross_entropy_reference.

    f32_logits=True (kernel tests) takes f32 logits of the promoted inputs, as the kernels do;
    False is framework.ops' "xla" impl: w cast to h's dtype and logits in h's dtype, which
    halves the full-logits buffer for bf16 activations (the loss is still f32)."""
    logits = _f32_logits(h, w) if f32_logits else jnp.dot(h, w.astype(h.dtype))
    return cross_entropy_reference(logits, labels, z_loss)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(h, w, labels, z_loss: float):
    """Chunked jnp path on [n_chunks, chunk, d] inputs."""
    return _chunked_fwd(h, w, labels, z_loss)[0]


def _chunked_fwd(h, w, labels, z_loss):
    """Per-chunk logsumexp and label logit (lax.map), keeping only lse for the backward."""

    def one(x):
        hc, lc = x
        logits = _f32_logits(hc, w)
        return jax.nn.logsumexp(logits, axis=-1), _label_logit(logits, lc)

    lse, label_logit = jax.lax.map(one, (h, labels))
    return _loss_from_lse(lse, label_logit, z_loss), (h, w, labels, lse)


def _chunked_bwd(z_loss, res, g):
    """dh per chunk and dw accumulated in f32 over chunks (lax.scan), logits recomputed."""
    h, w, labels, lse = res

    def body(dw, x):
        hc, lc, lsec, gc = x
        p = jnp.exp(_f32_logits(hc, w) - lsec[:, None])
        if z_loss:
            p = p * (1.0 + 2.0 * z_loss * lsec)[:, None]
        dl = (p - jax.nn.one_hot(lc, w.shape[1], dtype=_F32)) * gc[:, None]
        dl = dl.astype(jnp.promote_types(h.dtype, w.dtype))
        dh = jnp.dot(dl, w.T, preferred_element_type=_F32).astype(h.dtype)
        return dw + jnp.dot(hc.T, dl, preferred_element_type=_F32), dh

    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, _F32), (h, labels, lse, g))
    return dh, dw.astype(w.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def linear_cross_entropy_chunked(
    h: jax.Array, w: jax.Array, labels: jax.Array, *, z_loss: float = 0.0, chunk_tokens: int = 1024
) -> jax.Array:
    """Same loss as `linear_cross_entropy` in plain jnp, scanning token chunks (no Pallas)."""
    _check(h, w, labels)
    lead = labels.shape
    h2 = h.reshape(-1, h.shape[-1])
    n = h2.shape[0]
    chunk = max(1, min(int(chunk_tokens), n))
    n_chunks = cdiv(n, chunk)
    pad = n_chunks * chunk - n
    lab = labels.reshape(-1).astype(jnp.int32)
    if pad:
        h2 = jnp.pad(h2, ((0, pad), (0, 0)))
        lab = jnp.pad(lab, (0, pad))
    loss = _chunked(h2.reshape(n_chunks, chunk, -1), w, lab.reshape(n_chunks, chunk), float(z_loss))
    return loss.reshape(-1)[:n].reshape(lead)
