"""Fused linear + cross-entropy kernel: interpret-mode parity with the naive reference (loss, dh,
dw), the chunked jnp fallback, compiled peak memory against the naive logits path, and the CUDA
lowering of every config the heuristic can pick."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import export_cuda, triton_calls

from pallas_kernels import cross_entropy as ce

KEY = jax.random.key(11)
# Interpret-mode kernels are big CPU programs; XLA's -O0 halves their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Errors are max |kernel - reference| / max |reference| per array. Measured (jax 0.10.2 CPU,
# interpret mode): f32 <= 7e-7; bf16 <= 3e-3 (the kernel rounds dlogits to bf16 before the dh / dw
# matmuls, the reference keeps them in f32).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(lead, d, vocab, dtype, i=0):
    """Fresh random normal h, w (scaled so logits are O(1..3)), labels and loss cotangent."""
    k = jax.random.split(jax.random.fold_in(KEY, i), 4)
    h = jax.random.normal(k[0], (*lead, d)).astype(dtype)
    w = (2.0 * jax.random.normal(k[1], (d, vocab)) / np.sqrt(d)).astype(dtype)
    labels = jax.random.randint(k[2], lead, 0, vocab)
    g = jax.random.normal(k[3], lead)
    return h, w, labels, g


def _loss_and_grads(f, h, w, labels, g):
    """f(h, w, labels) and its cotangents dh, dw for the upstream g, as f32 numpy arrays."""

    def run(h, w, labels, g):
        loss, pull = jax.vjp(lambda h, w: f(h, w, labels), h, w)
        return (loss, *pull(g))

    compiled = jax.jit(run).lower(h, w, labels, g).compile(compiler_options=FAST_COMPILE)
    return [np.asarray(a, np.float32) for a in compiled(h, w, labels, g)]


def _assert_rel_close(got, want, tol, what):
    """max |got - want| <= tol * max |want| for loss, dh and dw."""
    for name, a, b in zip(("loss", "dh", "dw"), got, want, strict=True):
        assert a.shape == b.shape, (what, name, a.shape, b.shape)
        err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))
        assert err <= tol, f"{what}: {name} relative error {err:.2e} > {tol:.0e}"


CASES = [
    # (lead, d, vocab, z_loss, dtype, kwargs): ragged tokens and vocab, z-loss on/off, several
    # vocab splits and backward chunks (the lax.scan path), leading dims.
    ((37,), 64, 300, 0.0, jnp.float32, dict(block_tokens=16, block_vocab=128)),
    (
        (37,),
        96,
        1000,
        1e-3,
        jnp.float32,
        dict(block_tokens=16, block_vocab=128, vocab_splits=3, chunk_tokens=16),
    ),
    (
        (3, 13),
        64,
        200,
        1e-2,
        jnp.bfloat16,
        dict(block_tokens=16, block_vocab=64, vocab_splits=2, chunk_tokens=32),
    ),
    ((16,), 16, 20, 0.0, jnp.float32, dict()),  # the CPU heuristic config, tiny extents
]


@pytest.mark.parametrize(
    "lead,d,vocab,z_loss,dtype,kw",
    CASES,
    ids=[f"{c[0]}-d{c[1]}-v{c[2]}-z{c[3]}-{jnp.dtype(c[4]).name}" for c in CASES],
)
def test_parity_loss_and_grads(lead, d, vocab, z_loss, dtype, kw):
    """Fused kernels (interpret mode): loss, dh and dw vs the naive reference."""
    h, w, labels, g = _inputs(lead, d, vocab, dtype, i=d + vocab)
    got = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy(h, w, y, z_loss=z_loss, interpret=True, **kw),
        h,
        w,
        labels,
        g,
    )
    want = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy_reference(h, w, y, z_loss), h, w, labels, g
    )
    _assert_rel_close(got, want, TOL[dtype], "pallas")


@pytest.mark.parametrize("z_loss,dtype", [(0.0, jnp.float32), (1e-2, jnp.bfloat16)])
def test_chunked_jnp_fallback_parity(z_loss, dtype):
    """The pure-jnp chunked path: loss, dh and dw vs the naive reference."""
    h, w, labels, g = _inputs((45,), 96, 333, dtype, i=5)
    got = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy_chunked(h, w, y, z_loss=z_loss, chunk_tokens=16),
        h,
        w,
        labels,
        g,
    )
    want = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy_reference(h, w, y, z_loss), h, w, labels, g
    )
    _assert_rel_close(got, want, TOL[dtype], "chunked")


def test_mixed_dtypes_and_errors():
    """bf16 h with an f32 w computes in f32 and returns each gradient in its input's dtype."""
    h, w, labels, _ = _inputs((17,), 32, 50, jnp.float32, i=9)
    h = h.astype(jnp.bfloat16)
    f = lambda h, w: ce.linear_cross_entropy(h, w, labels, interpret=True)
    loss, dh, dw = jax.eval_shape(
        lambda h, w: (f(h, w), *jax.grad(lambda h, w: f(h, w).sum(), argnums=(0, 1))(h, w)), h, w
    )
    assert (loss.dtype, dh.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert ce.supports(h, w, labels) and not ce.supports(h, w.T, labels)
    with pytest.raises(ValueError, match="labels"):
        ce.linear_cross_entropy(h, w, labels[:-1], interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        ce.linear_cross_entropy(h, w, labels, block_vocab=48, interpret=True)


def test_framework_xla_impls_are_the_references():
    """framework.ops' xla impls call these references; linear_cross_entropy's keeps the logits
    in h's dtype (f32_logits=False), so with bf16 h it rounds them where the ground truth does
    not."""
    from framework import ops

    h, w, labels, _ = _inputs((2, 9), 32, 70, jnp.float32, i=13)
    h16 = h.astype(jnp.bfloat16)
    logits16 = jnp.dot(h16, w.astype(jnp.bfloat16))
    assert logits16.dtype == jnp.bfloat16
    want = ce.cross_entropy_reference(logits16, labels, 1e-3)
    got = ops.linear_cross_entropy(h16, w, labels, z_loss=1e-3, impl="xla")
    np.testing.assert_array_equal(got, want)
    exact = ce.linear_cross_entropy_reference(h16, w, labels, 1e-3)
    assert not np.array_equal(np.asarray(exact), np.asarray(want))
    logits = jnp.dot(h, w)
    np.testing.assert_array_equal(
        ops.cross_entropy(logits, labels, impl="xla"), ce.cross_entropy_reference(logits, labels)
    )
    np.testing.assert_allclose(
        ce.cross_entropy_reference(logits, labels),
        jax.nn.logsumexp(logits, axis=-1)
        - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0],
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------- memory

MEM_T, MEM_D, MEM_V = 8192, 64, 32768


def _temp_bytes(f) -> int:
    """Peak temporary bytes of f compiled for CPU at the memory-test shape (compiled, not run)."""
    sds = jax.ShapeDtypeStruct
    args = (
        sds((MEM_T, MEM_D), jnp.float32),
        sds((MEM_D, MEM_V), jnp.float32),
        sds((MEM_T,), jnp.int32),
    )
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _mean(loss_fn):
    """Scalar mean loss of a per-token loss function."""
    return lambda h, w, y: jnp.mean(loss_fn(h, w, y))


def _value_and_grads(loss_fn):
    """Mean loss and its gradients for h and w."""
    return jax.value_and_grad(_mean(loss_fn), argnums=(0, 1))


@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "forward+backward"])
def test_peak_memory_is_an_eighth_of_naive(with_grad):
    """Fused (interpret-mode kernels, CPU heuristic) and chunked paths vs h @ w + log_softmax.

    At 8192 tokens x 32768 vocab the naive f32 logits alone are 1 GiB. Measured on jax 0.10.2
    CPU: naive 1024 MiB forward / 2048 MiB with gradients; fused 14 / 121 MiB; chunked 64 / 72
    MiB. The fused backward's temporaries are one [chunk, vocab] dlogits buffer (32 MiB on the
    CPU heuristic) plus the copies the interpreter makes of kernel operands."""
    wrap = _value_and_grads if with_grad else _mean
    naive = _temp_bytes(wrap(ce.linear_cross_entropy_reference))
    fused = _temp_bytes(wrap(lambda h, w, y: ce.linear_cross_entropy(h, w, y, interpret=True)))
    chunked = _temp_bytes(
        wrap(lambda h, w, y: ce.linear_cross_entropy_chunked(h, w, y, chunk_tokens=512))
    )
    assert naive >= MEM_T * MEM_V * 4  # the naive path really holds the f32 logits
    assert fused * 8 <= naive, (fused, naive)
    assert chunked * 8 <= naive, (chunked, naive)


# ------------------------------------------------------------------------------ GPU lowering


EXAMPLES = ce.config_examples()


def test_heuristic_configs_are_triton_friendly():
    """Every config has power-of-two tiles >= 16; real shapes and devices map into the set."""
    for cfg, (t, d, v, dtype, kind) in EXAMPLES.items():
        assert ce.choose_config(t, d, v, dtype, kind) == cfg
        for b in (cfg.block_tokens, cfg.block_vocab, cfg.block_k, cfg.block_d):
            assert b >= ce.MIN_BLOCK and b & (b - 1) == 0, cfg
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu"):
        for shape in ((8192, 4096, 128256), (37, 64, 300), (1, 8, 3)):
            assert ce.choose_config(*shape, jnp.bfloat16, kind) in EXAMPLES


@pytest.mark.parametrize(
    "cfg",
    list(EXAMPLES),
    ids=["t{}-v{}-k{}-d{}-w{}-s{}".format(*c.__dict__.values()) for c in EXAMPLES],
)
def test_cuda_lowering_of_every_heuristic_config(cfg):
    """Forward and backward kernels lower to Triton for each config, ragged in every dim, with
    two vocab splits and a multi-chunk backward (lax.scan)."""
    dtype = EXAMPLES[cfg][3]
    sds = jax.ShapeDtypeStruct
    t, d, v = 2 * cfg.block_tokens + 3, 2 * cfg.block_k + 5, 3 * cfg.block_vocab + 7

    def loss(h, w, y):
        return jnp.sum(
            ce.linear_cross_entropy(
                h,
                w,
                y,
                z_loss=1e-4,
                config=cfg,
                interpret=False,
                vocab_splits=2,
                chunk_tokens=cfg.block_tokens,
            )
        )

    text = export_cuda(
        jax.value_and_grad(loss, argnums=(0, 1)),
        sds((t, d), dtype),
        sds((d, v), dtype),
        sds((t,), jnp.int32),
    )
    assert triton_calls(text) == 4  # forward, dlogits, dh, dw


def test_cuda_lowering_at_the_default_plan():
    """The heuristic's own config, splits and chunking at an LLM-sized shape lower for CUDA."""
    sds = jax.ShapeDtypeStruct
    t, d, v = 8192, 4096, 128256

    def loss(h, w, y):
        return jnp.sum(
            ce.linear_cross_entropy(h, w, y, interpret=False, device_kind="NVIDIA H100 80GB HBM3")
        )

    text = export_cuda(
        jax.value_and_grad(loss, argnums=(0, 1)),
        sds((t, d), jnp.bfloat16),
        sds((d, v), jnp.bfloat16),
        sds((t,), jnp.int32),
    )
    assert triton_calls(text) == 4


# -------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "lead,d,vocab,z_loss", [((4096,), 1024, 32000, 1e-4), ((2, 999), 512, 50257, 0.0)]
)
def test_compiled_on_gpu(lead, d, vocab, z_loss, dtype):
    """Compiled (not interpreted) kernels match the reference on a real GPU."""
    h, w, labels, g = _inputs(lead, d, vocab, dtype, i=3)
    got = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy(h, w, y, z_loss=z_loss), h, w, labels, g
    )
    want = _loss_and_grads(
        lambda h, w, y: ce.linear_cross_entropy_reference(h, w, y, z_loss), h, w, labels, g
    )
    _assert_rel_close(got, want, 1e-3 if dtype == jnp.float32 else 3e-2, "gpu")
