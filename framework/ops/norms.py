"""`rms_norm` and `layer_norm` over the last axis, computed in f32, returned in x's dtype."""

from __future__ import annotations

import jax

from framework.ops import registry
from framework.ops.sharded import per_shard
from pallas_kernels import norms as kernels
from pallas_kernels._compat import on_gpu

# The plain-XLA impls are the kernels' references.
registry.register("rms_norm", "xla", kernels.rms_norm_reference)
registry.register("layer_norm", "xla", kernels.layer_norm_reference)


# Rows are independent: under a mesh each shard normalizes its own rows; the feature (last)
# dimension is gathered, and so is the weight.
def _rows(x):
    return {3: ("batch", "seq", None), 2: ("batch", None)}.get(x.ndim, (None,) * x.ndim)


def rms_norm_pallas(x, weight, *, eps=1e-6):
    return per_shard(lambda x, w: kernels.rms_norm(x, w, eps=eps), [_rows(x), None], _rows(x))(
        x, weight
    )


def layer_norm_pallas(x, weight, bias=None, *, eps=1e-5):
    return per_shard(
        lambda x, w, b: kernels.layer_norm(x, w, b, eps=eps), [_rows(x), None, None], _rows(x)
    )(x, weight, bias)


def _norm_pallas_ok(x, weight, bias=None, **_):
    return on_gpu() and kernels.supports(x, weight, bias)


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
