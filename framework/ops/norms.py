"""`rms_norm` and `layer_norm` over the last axis, computed in f32, returned in x's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework.ops import registry
from framework.ops.sharded import per_shard


def rms_norm_xla(x, weight, *, eps=1e-6):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm_xla(x, weight, bias=None, *, eps=1e-5):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


registry.register("rms_norm", "xla", rms_norm_xla)
registry.register("layer_norm", "xla", layer_norm_xla)


# Rows are independent: under a mesh each shard normalizes its own rows; the feature (last)
# dimension is gathered, and so is the weight.
def _rows(x):
    return {3: ("batch", "seq", None), 2: ("batch", None)}.get(x.ndim, (None,) * x.ndim)


def rms_norm_pallas(x, weight, *, eps=1e-6):
    from pallas_kernels.norms import rms_norm as kernel

    return per_shard(lambda x, w: kernel(x, w, eps=eps), [_rows(x), None], _rows(x))(x, weight)


def layer_norm_pallas(x, weight, bias=None, *, eps=1e-5):
    from pallas_kernels.norms import layer_norm as kernel

    return per_shard(lambda x, w, b: kernel(x, w, b, eps=eps), [_rows(x), None, None], _rows(x))(
        x, weight, bias
    )


def _norm_pallas_ok(x, weight, bias=None, **_):
    from pallas_kernels.norms import supports

    return jax.default_backend() == "gpu" and supports(x, weight, bias)


registry.register("rms_norm", "pallas", rms_norm_pallas, auto_if=_norm_pallas_ok)
registry.register("layer_norm", "pallas", layer_norm_pallas, auto_if=_norm_pallas_ok)


def rms_norm(
    x: jax.Array, weight: jax.Array, *, eps: float = 1e-6, impl: str = "auto"
) -> jax.Array:
    """x / rms(x) * weight over the last axis."""
    fn = registry.resolve("rms_norm", impl, (x.shape, str(x.dtype)), x, weight, eps=eps)
    return fn(x, weight, eps=eps)


def layer_norm(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    impl: str = "auto",
) -> jax.Array:
    """(x - mean) / std * weight + bias over the last axis."""
    fn = registry.resolve("layer_norm", impl, (x.shape, str(x.dtype)), x, weight, bias, eps=eps)
    return fn(x, weight, bias, eps=eps)
