"""Pallas RMSNorm / LayerNorm kernels: interpret-mode parity with the jnp references (forward and
every gradient), the block heuristic, and the CUDA lowering of every config it can pick."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import export_cuda, triton_calls

from pallas_kernels import norms
from pallas_kernels.norms import layer_norm_reference, rms_norm_reference

KEY = jax.random.key(7)
# Measured max |kernel - reference| on these shapes (jax 0.10.2 CPU, interpret mode): f32 <= 6e-6
# (the dweight/dbias sums over up to 130 rows; <= 3e-7 relative to the largest value), bf16
# <= 1.2e-4 (both paths compute in f32 and round once, so at most one bf16 ulp apart).
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# Interpret-mode kernels are big CPU programs; XLA's -O0 halves their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(shape, dtype, i=0):
    """Fresh random normal x, weight near 1, bias and upstream cotangent (never zeros)."""
    k = jax.random.split(jax.random.fold_in(KEY, i), 4)
    dim = shape[-1]
    x = (jax.random.normal(k[0], shape) * 2 + 0.5).astype(dtype)
    w = (1.0 + 0.3 * jax.random.normal(k[1], (dim,))).astype(dtype)
    b = (0.5 * jax.random.normal(k[2], (dim,))).astype(dtype)
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, w, b, dy


def _vjp(f, args, dy):
    """Output and all input cotangents of f at args, as f32 numpy arrays (one compile, -O0)."""

    def run(args, dy):
        y, pull = jax.vjp(f, *args)
        return (y, *pull(dy))

    compiled = jax.jit(run).lower(args, dy).compile(compiler_options=FAST_COMPILE)
    return [np.asarray(a, np.float32) for a in compiled(args, dy)]


def _assert_close(got, want, dtype, what):
    """Per-array assert_allclose with the dtype's tolerance."""
    names = ["y", "dx", "dweight", "dbias"]
    for name, g, w in zip(names, got, want, strict=False):
        np.testing.assert_allclose(g, w, **TOL[dtype], err_msg=f"{what}: {name}")


CASES = [
    # (shape, dtype, block_rows): odd row counts, feature dims 64/96/128/1000, leading dims.
    ((37, 64), jnp.float32, 8),
    ((3, 5, 96), jnp.float32, None),
    ((37, 1000), jnp.float32, 4),
    ((2, 65, 128), jnp.float32, None),
    ((37, 1000), jnp.bfloat16, 16),
    ((3, 5, 96), jnp.bfloat16, None),
]


@pytest.mark.parametrize(
    "shape,dtype,block_rows", CASES, ids=[f"{s}-{jnp.dtype(d).name}-br{b}" for s, d, b in CASES]
)
def test_parity_forward_and_grads(shape, dtype, block_rows):
    """rms_norm, layer_norm and layer_norm without bias: y, dx, dweight, dbias vs XLA."""
    x, w, b, dy = _inputs(shape, dtype, i=len(shape) * 1000 + shape[-1])
    kw = dict(block_rows=block_rows, interpret=True)
    rms = lambda x, w: norms.rms_norm(x, w, eps=1e-6, **kw)
    _assert_close(
        _vjp(rms, (x, w), dy),
        _vjp(lambda x, w: rms_norm_reference(x, w, eps=1e-6), (x, w), dy),
        dtype,
        "rms_norm",
    )
    ln = lambda x, w, b: norms.layer_norm(x, w, b, eps=1e-5, **kw)
    _assert_close(
        _vjp(ln, (x, w, b), dy),
        _vjp(lambda x, w, b: layer_norm_reference(x, w, b, eps=1e-5), (x, w, b), dy),
        dtype,
        "layer_norm",
    )
    ln_nb = lambda x, w: norms.layer_norm(x, w, None, **kw)
    _assert_close(
        _vjp(ln_nb, (x, w), dy),
        _vjp(lambda x, w: layer_norm_reference(x, w), (x, w), dy),
        dtype,
        "layer_norm without bias",
    )


def test_backward_with_several_row_blocks_per_program(monkeypatch):
    """Capping the backward's programs makes each loop over several row blocks (steps > 1)."""
    monkeypatch.setattr(norms, "MAX_BWD_PROGRAMS", 2)
    assert norms._bwd_steps(45, 4) == 8
    x, w, b, dy = _inputs((45, 96), jnp.float32, i=3)
    ln = lambda x, w, b: norms.layer_norm(x, w, b, block_rows=4, interpret=True)
    got = _vjp(ln, (x, w, b), dy)
    _assert_close(got, _vjp(layer_norm_reference, (x, w, b), dy), jnp.float32, "layer_norm steps>1")
    got = _vjp(lambda x, w: norms.rms_norm(x, w, block_rows=4, interpret=True), (x, w), dy)
    _assert_close(got, _vjp(rms_norm_reference, (x, w), dy), jnp.float32, "rms_norm steps>1")


def test_mixed_dtypes_keep_each_dtype():
    """bf16 x with an f32 weight: y and dx in bf16, dweight in f32."""
    x, _, _, dy = _inputs((9, 64), jnp.bfloat16, i=5)
    w = 1.0 + 0.1 * jax.random.normal(jax.random.fold_in(KEY, 99), (64,))
    f = lambda x, w: norms.rms_norm(x, w, interpret=True)
    y, dx, dw = jax.eval_shape(lambda x, w, dy: (f(x, w), *jax.vjp(f, x, w)[1](dy)), x, w, dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    _assert_close(_vjp(f, (x, w), dy), _vjp(rms_norm_reference, (x, w), dy), jnp.bfloat16, "mixed")


def test_heuristic_configs_are_triton_friendly():
    """Every config has power-of-two tiles, and real device kinds map into the enumeration."""
    configs = norms.all_configs()
    assert configs and len(configs) == len(set(configs))
    for cfg in configs:
        assert cfg.block_rows & (cfg.block_rows - 1) == 0 and cfg.block_rows >= 1
        assert cfg.block_dim & (cfg.block_dim - 1) == 0 and cfg.block_dim >= norms.MIN_BLOCK_DIM
        assert cfg.num_warps in (1, 2, 4, 8, 16)
    for dim in (1, 64, 96, 1000, 4096, norms.MAX_DIM):
        for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "cpu"):
            cfg = norms.choose_config(dim, jnp.bfloat16, kind)
            assert cfg in configs and cfg.block_dim >= dim


def test_supports_and_errors():
    """`supports` rejects what the kernels cannot take; bad calls raise clear errors."""
    x = jnp.ones((4, 8), jnp.bfloat16)
    assert norms.supports(x, jnp.ones((8,)))
    assert not norms.supports(jnp.ones((2, norms.MAX_DIM + 1)), None)
    assert not norms.supports(jnp.ones((2, 8), jnp.int32), None)
    assert not norms.supports(x, jnp.ones((7,)))
    with pytest.raises(ValueError, match="weight shape"):
        norms.rms_norm(x, jnp.ones((7,)), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        norms.layer_norm(x, jnp.ones((8,)), block_rows=3, interpret=True)


EXAMPLES = norms.config_examples()


@pytest.mark.parametrize(
    "cfg",
    list(EXAMPLES),
    ids=[f"br{c.block_rows}-bd{c.block_dim}-w{c.num_warps}" for c in EXAMPLES],
)
def test_cuda_lowering_of_every_heuristic_config(cfg):
    """Forward and backward of both norms lower to Triton for each config the heuristic picks."""
    dim, dtype, kind = EXAMPLES[cfg]
    assert norms.choose_config(dim, dtype, kind) == cfg
    dim = max(1, cfg.block_dim * 3 // 4)  # ragged feature dim inside the same tile
    rows = 2 * cfg.block_rows + 1  # ragged row count
    sds = jax.ShapeDtypeStruct
    x, vec = sds((rows, dim), dtype), sds((dim,), dtype)

    def loss(x, w, b):
        y1 = norms.rms_norm(x, w, config=cfg, interpret=False)
        y2 = norms.layer_norm(x, w, b, config=cfg, interpret=False)
        return jnp.sum(y1.astype(jnp.float32) * y2.astype(jnp.float32))

    text = export_cuda(jax.grad(loss, argnums=(0, 1, 2)), x, vec, vec)
    assert triton_calls(text) == 4  # 2 forward + 2 backward kernels


def test_cuda_lowering_rejects_non_power_of_two_tile():
    """The check above is meaningful: a 3-row tile fails the Triton lowering."""
    bad = norms.NormConfig(block_rows=3, block_dim=128, num_warps=4)
    x = jax.ShapeDtypeStruct((7, 100), jnp.float32)
    with pytest.raises(Exception, match="power of 2"):
        export_cuda(lambda x: norms.rms_norm(x, jnp.ones((100,)), config=bad, interpret=False), x)


def _assert_rel_close(got, want, tol):
    """max |got - want| <= tol * max |want|, per array (sums over many rows reorder on GPU)."""
    for g, r in zip(got, want, strict=True):
        assert np.max(np.abs(g - r)) <= tol * max(np.max(np.abs(r)), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1000), (3, 77, 16384), (37, 96)])
def test_compiled_on_gpu(shape, dtype):
    """Compiled (not interpreted) kernels match the references on a real GPU."""
    x, w, b, dy = _inputs(shape, dtype, i=11)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got = _vjp(lambda x, w, b: norms.layer_norm(x, w, b, interpret=False), (x, w, b), dy)
    _assert_rel_close(got, _vjp(layer_norm_reference, (x, w, b), dy), tol)
    got = _vjp(lambda x, w: norms.rms_norm(x, w, interpret=False), (x, w), dy)
    _assert_rel_close(got, _vjp(rms_norm_reference, (x, w), dy), tol)
