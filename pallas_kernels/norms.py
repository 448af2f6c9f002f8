"""Fused RMSNorm and LayerNorm Pallas kernels (Triton lowering) with Pallas backward kernels.

Rows are the flattened leading dims; each program normalizes a block of `block_rows` rows with
the whole feature dim in one tile, padded to a power of two and masked. Statistics are computed
in f32 and the output is cast back to x's dtype. The forward saves per-row f32 statistics
(rstd, and mean for LayerNorm); the backward recomputes the normalized rows from them, writes dx,
and writes per-program partial dweight/dbias sums that are reduced with `jnp.sum` afterwards.
`rms_norm_reference` / `layer_norm_reference` are the plain-jnp definitions (also framework.ops'
"xla" impls).
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

MAX_DIM = 16384
MIN_BLOCK_DIM = 16
MAX_BLOCK_ROWS = 64
# Partial dweight rows written by the backward are capped so their memory stays bounded.
MAX_BWD_PROGRAMS = 1024

# Per-device target bytes of x held by one program, and the most warps a program may use.
_DEVICE_TILE = {
    "h100": (32768, 16),
    "h200": (32768, 16),
    "b200": (32768, 16),
    "a100": (16384, 8),
    "default": (16384, 8),
}
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Tile of one program: `block_rows` rows by `block_dim` (>= dim) features, and its warps."""

    block_rows: int
    block_dim: int
    num_warps: int


def _pow2_floor(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def _default_device_kind() -> str:
    """The device kind the code being traced is compiled for (see _compat.target_device)."""
    return target_device()[1]


def block_dim_for(dim: int) -> int:
    """Feature tile: the next power of two >= dim (at least 16)."""
    return max(MIN_BLOCK_DIM, next_pow2(int(dim)))


def choose_config(dim: int, dtype: Any, device_kind: str | None = None) -> NormConfig:
    """Heuristic tile for (dim, dtype, device): about a fixed number of bytes of x per program.

    The row count does not enter, so the set of reachable configs stays small enough to
    lower-check every one."""
    tile_bytes, max_warps = device_row(_DEVICE_TILE, device_kind)
    bd = block_dim_for(dim)
    itemsize = jnp.dtype(dtype).itemsize
    block_rows = min(MAX_BLOCK_ROWS, _pow2_floor(max(1, tile_bytes // (bd * itemsize))))
    num_warps = min(max_warps, _pow2_floor(max(1, block_rows * bd // 512)))
    return NormConfig(block_rows, bd, num_warps)


def config_examples(device_kinds: Iterable[str] | None = None) -> dict[NormConfig, tuple]:
    """Every config `choose_config` can return, each with one (dim, dtype, device kind)
    that picks it."""
    kinds = list(device_kinds) if device_kinds is not None else list(_DEVICE_TILE)
    out: dict[NormConfig, tuple] = {}
    d = 1
    while d <= MAX_DIM:
        for dtype in _DTYPES:
            for kind in kinds:
                out.setdefault(choose_config(d, dtype, kind), (d, jnp.dtype(dtype).name, kind))
        d *= 2
    return dict(sorted(out.items(), key=lambda kv: dataclasses.astuple(kv[0])))


def all_configs(device_kinds: Iterable[str] | None = None) -> list[NormConfig]:
    """Every config `choose_config` can return for supported dims, dtypes and devices."""
    return list(config_examples(device_kinds))


def supports(
    x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, **_: object
) -> bool:
    """Whether the kernels handle this call: float x with 1 <= feature dim <= MAX_DIM."""
    if x.ndim < 1 or x.size == 0 or not 1 <= x.shape[-1] <= MAX_DIM:
        return False
    if jnp.dtype(x.dtype) not in [jnp.dtype(t) for t in _DTYPES]:
        return False
    return all(p is None or p.shape == (x.shape[-1],) for p in (weight, bias))


def _resolve_interpret(interpret: bool | None) -> bool:
    """`None` means interpret unless compiling for a GPU."""
    return not on_gpu() if interpret is None else bool(interpret)


def _bwd_steps(n_rows: int, block_rows: int) -> int:
    """Row blocks per backward program: a power of two keeping programs <= MAX_BWD_PROGRAMS."""
    n_blocks = cdiv(n_rows, block_rows)
    return next_pow2(cdiv(n_blocks, MAX_BWD_PROGRAMS))


def _masks(row0, block_rows: int, block_dim: int, n_rows: int, dim: int):
    """Row mask [block_rows], column mask [block_dim] and their 2-D product."""
    rmask = (row0 + jnp.arange(block_rows)) < n_rows
    cmask = jnp.arange(block_dim) < dim
    return rmask, cmask, rmask[:, None] & cmask[None, :]


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, n_rows: int, dim: int, eps: float, layer: bool, has_bias: bool):
    """One row block: statistics in f32, normalized output, and the per-row stats for backward."""
    if layer:
        x_ref, w_ref, *rest = refs
        b_ref = rest.pop(0) if has_bias else None
        y_ref, mean_ref, rstd_ref = rest
    else:
        x_ref, w_ref, y_ref, rstd_ref = refs
    block_rows, block_dim = x_ref.shape
    rmask, cmask, mask = _masks(pl.program_id(0) * block_rows, block_rows, block_dim, n_rows, dim)
    x = load(x_ref, mask=mask, other=0).astype(jnp.float32)
    w = load(w_ref, mask=cmask, other=0).astype(jnp.float32)
    if layer:
        mean = jnp.sum(x, axis=1) / dim
        xc = jnp.where(mask, x - mean[:, None], 0.0)
        rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / dim + eps)
        y = xc * rstd[:, None] * w[None, :]
        if has_bias:
            y = y + load(b_ref, mask=cmask, other=0).astype(jnp.float32)[None, :]
        store(mean_ref, mean, mask=rmask)
    else:
        rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / dim + eps)
        y = x * rstd[:, None] * w[None, :]
    store(y_ref, y.astype(y_ref.dtype), mask=mask)
    store(rstd_ref, rstd, mask=rmask)


def _fwd(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    *,
    eps: float,
    layer: bool,
    cfg: NormConfig,
    interpret: bool,
):
    """Forward pallas_call over row blocks; returns y and the f32 row statistics."""
    n_rows, dim = x.shape
    br, bd = cfg.block_rows, cfg.block_dim
    has_bias = bias is not None
    row_spec = pl.BlockSpec((br, bd), lambda i: (i, 0))
    vec_spec = pl.BlockSpec((bd,), lambda i: (0,))
    stat_spec = pl.BlockSpec((br,), lambda i: (i,))
    stat = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    ins = [x, weight] + ([bias] if has_bias else [])
    in_specs = [row_spec, vec_spec] + ([vec_spec] if has_bias else [])
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [stat] * (2 if layer else 1)
    out_specs = [row_spec] + [stat_spec] * (2 if layer else 1)
    kernel = functools.partial(
        _fwd_kernel, n_rows=n_rows, dim=dim, eps=eps, layer=layer, has_bias=has_bias
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(n_rows, br),),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        name="layer_norm_fwd" if layer else "rms_norm_fwd",
    )(*ins)


# ----------------------------------------------------------------------------------- backward


def _bwd_kernel(*refs, n_rows: int, dim: int, steps: int, layer: bool, has_bias: bool):
    """`steps` row blocks: dx per row, and this program's partial dweight (and dbias) sums."""
    if layer:
        x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, *rest = refs
        db_ref = rest[0] if has_bias else None
    else:
        x_ref, w_ref, dy_ref, rstd_ref, dx_ref, dw_ref = refs
    block_dim = x_ref.shape[1]
    block_rows = x_ref.shape[0] // steps
    base = pl.program_id(0) * (block_rows * steps)
    cmask = jnp.arange(block_dim) < dim
    w = load(w_ref, mask=cmask, other=0).astype(jnp.float32)

    def body(j, carry):
        start = j * block_rows
        rmask, _, mask = _masks(base + start, block_rows, block_dim, n_rows, dim)
        rows = pl.ds(start, block_rows)
        x = load(x_ref.at[rows, :], mask=mask, other=0).astype(jnp.float32)
        dy = load(dy_ref.at[rows, :], mask=mask, other=0).astype(jnp.float32)
        rstd = load(rstd_ref.at[rows], mask=rmask, other=0)
        if layer:
            mean = load(mean_ref.at[rows], mask=rmask, other=0)
            xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        else:
            xhat = x * rstd[:, None]
        g = dy * w[None, :]
        proj = jnp.sum(g * xhat, axis=1, keepdims=True) / dim
        if layer:
            dx = (g - jnp.sum(g, axis=1, keepdims=True) / dim - xhat * proj) * rstd[:, None]
        else:
            dx = (g - xhat * proj) * rstd[:, None]
        store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask=mask)
        dw_acc, db_acc = carry
        return dw_acc + jnp.sum(dy * xhat, axis=0), db_acc + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((block_dim,), jnp.float32)
    dw, db = jax.lax.fori_loop(0, steps, body, (zeros, zeros))
    dw_ref[...] = dw
    if layer and has_bias:
        db_ref[...] = db


def _bwd(x, weight, has_bias: bool, dy, stats, *, layer: bool, cfg: NormConfig, interpret: bool):
    """Backward pallas_call; returns dx and the summed f32 dweight (and dbias) of length dim."""
    n_rows, dim = x.shape
    br, bd = cfg.block_rows, cfg.block_dim
    steps = _bwd_steps(n_rows, br)
    rows = br * steps
    n_prog = cdiv(n_rows, rows)
    row_spec = pl.BlockSpec((rows, bd), lambda i: (i, 0))
    stat_spec = pl.BlockSpec((rows,), lambda i: (i,))
    part_spec = pl.BlockSpec((SQUEEZED, bd), lambda i: (i, 0))
    part = jax.ShapeDtypeStruct((n_prog, bd), jnp.float32)
    in_specs = [row_spec, pl.BlockSpec((bd,), lambda i: (0,)), row_spec]
    in_specs += [stat_spec] * len(stats)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), part]
    out_specs = [row_spec, part_spec]
    if layer and has_bias:
        out_shape.append(part)
        out_specs.append(part_spec)
    kernel = functools.partial(
        _bwd_kernel, n_rows=n_rows, dim=dim, steps=steps, layer=layer, has_bias=has_bias
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n_prog,),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        name="layer_norm_bwd" if layer else "rms_norm_bwd",
    )(x, weight, dy, *stats)
    dx, *parts = outs
    return dx, [p.sum(axis=0)[:dim] for p in parts]


# --------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms_2d(x, weight, eps: float, cfg: NormConfig, interpret: bool):
    """RMSNorm of a [rows, dim] array."""
    return _fwd(x, weight, None, eps=eps, layer=False, cfg=cfg, interpret=interpret)[0]


def _rms_2d_fwd(x, weight, eps, cfg, interpret):
    """Forward saving x, weight and the f32 rstd per row."""
    y, rstd = _fwd(x, weight, None, eps=eps, layer=False, cfg=cfg, interpret=interpret)
    return y, (x, weight, rstd)


def _rms_2d_bwd(eps, cfg, interpret, res, dy):
    """dx and dweight from the backward kernel; eps is already folded into rstd."""
    x, weight, rstd = res
    dx, (dw,) = _bwd(x, weight, False, dy, (rstd,), layer=False, cfg=cfg, interpret=interpret)
    return dx, dw.astype(weight.dtype)


_rms_2d.defvjp(_rms_2d_fwd, _rms_2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ln_2d(x, weight, bias, eps: float, cfg: NormConfig, interpret: bool):
    """LayerNorm of a [rows, dim] array; `bias` may be None."""
    return _fwd(x, weight, bias, eps=eps, layer=True, cfg=cfg, interpret=interpret)[0]


def _ln_2d_fwd(x, weight, bias, eps, cfg, interpret):
    """Forward saving x, weight, bias and the f32 mean and rstd per row."""
    y, mean, rstd = _fwd(x, weight, bias, eps=eps, layer=True, cfg=cfg, interpret=interpret)
    return y, (x, weight, bias, mean, rstd)


def _ln_2d_bwd(eps, cfg, interpret, res, dy):
    """dx, dweight and dbias (None without a bias) from the backward kernel."""
    x, weight, bias, mean, rstd = res
    has_bias = bias is not None
    dx, parts = _bwd(
        x, weight, has_bias, dy, (mean, rstd), layer=True, cfg=cfg, interpret=interpret
    )
    db = parts[1].astype(bias.dtype) if has_bias else None
    return dx, parts[0].astype(weight.dtype), db


_ln_2d.defvjp(_ln_2d_fwd, _ln_2d_bwd)


# ----------------------------------------------------------------------------------- public


def rms_norm_reference(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Plain jnp RMSNorm (kernel tests' ground truth, framework.ops' "xla" impl): statistics
    in f32, output in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm_reference(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *, eps: float = 1e-5
) -> jax.Array:
    """Plain jnp LayerNorm (kernel tests' ground truth, framework.ops' "xla" impl): statistics
    in f32, output in x's dtype; `bias` may be None."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _config(
    x: jax.Array, block_rows: int | None, device_kind: str | None, config: NormConfig | None
) -> NormConfig:
    """Heuristic config for x, with `block_rows` (a power of two) overriding its row count."""
    if config is not None:
        if config.block_dim < x.shape[-1]:
            raise ValueError(f"config.block_dim {config.block_dim} < feature dim {x.shape[-1]}")
        return config
    cfg = choose_config(
        x.shape[-1],
        x.dtype,
        device_kind if device_kind is not None else _default_device_kind(),
    )
    if block_rows is not None:
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"block_rows must be a power of two, got {block_rows}")
        cfg = dataclasses.replace(cfg, block_rows=int(block_rows))
    return cfg


def _check(x: jax.Array, weight: jax.Array, bias: jax.Array | None, name: str) -> None:
    """Raise a clear error for shapes the kernel cannot take."""
    if x.ndim < 1 or not 1 <= x.shape[-1] <= MAX_DIM:
        raise ValueError(f"{name}: feature dim must be in [1, {MAX_DIM}], got shape {x.shape}")
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (x.shape[-1],):
            raise ValueError(f"{name}: {pname} shape {p.shape} != ({x.shape[-1]},)")


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    *,
    eps: float = 1e-6,
    block_rows: int | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    config: NormConfig | None = None,
) -> jax.Array:
    """x / rms(x) * weight over the last axis, fused in one pass per row block (Pallas)."""
    _check(x, weight, None, "rms_norm")
    cfg = _config(x, block_rows, device_kind, config)
    y = _rms_2d(x.reshape(-1, x.shape[-1]), weight, float(eps), cfg, _resolve_interpret(interpret))
    return y.reshape(x.shape)


def layer_norm(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    block_rows: int | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    config: NormConfig | None = None,
) -> jax.Array:
    """(x - mean) / std * weight + bias over the last axis, fused per row block (Pallas)."""
    _check(x, weight, bias, "layer_norm")
    cfg = _config(x, block_rows, device_kind, config)
    y = _ln_2d(
        x.reshape(-1, x.shape[-1]), weight, bias, float(eps), cfg, _resolve_interpret(interpret)
    )
    return y.reshape(x.shape)
