"""Batch normalization over the last (channel) axis; running statistics are explicit state.

The statistics are declared with `Param` like parameters, so `framework.nn.init` creates the
state tree too, but they live in a separate pytree that the optimizer never sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework.errors import ShapeError
from framework.nn.basic import ones, zeros
from framework.nn.checks import check_float, check_last_dim
from framework.nn.param import Param


def batch_norm_spec(ch: int) -> dict:
    """Learned per-channel affine transform applied after normalization."""
    return {"scale": Param((ch,), ("conv_out",), ones), "bias": Param((ch,), ("conv_out",), zeros)}


def batch_norm_state_spec(ch: int) -> dict:
    """Running per-channel mean (starts at 0) and variance (starts at 1), used in evaluation."""
    return {"mean": Param((ch,), ("conv_out",), zeros), "var": Param((ch,), ("conv_out",), ones)}


def batch_norm(
    params: dict,
    state: dict,
    x: jax.Array,
    *,
    training: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
) -> tuple[jax.Array, dict]:
    """Normalize x [..., ch] per channel; returns (y in x's dtype, new state).

    training=True uses the (biased) statistics of this batch over every axis but the last and
    returns the running statistics moved towards them: new = momentum * old + (1 - momentum) *
    batch. training=False uses the running statistics and returns `state` itself, unchanged.
    Statistics and normalization are computed in float32 whatever x's dtype.
    """
    check_float(x)
    if x.ndim < 2:
        raise ShapeError(
            f"input must have rank >= 2 (batch, ..., channels), got shape {tuple(x.shape)}"
        )
    check_last_dim(x, params["scale"].shape[0], "input channels")
    xf = x.astype(jnp.float32)
    if training:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)

        def ema(old: jax.Array, new: jax.Array) -> jax.Array:
            new = jax.lax.stop_gradient(new)
            return (momentum * old.astype(jnp.float32) + (1.0 - momentum) * new).astype(old.dtype)

        new_state = {"mean": ema(state["mean"], mean), "var": ema(state["var"], var)}
    else:
        mean = state["mean"].astype(jnp.float32)
        var = state["var"].astype(jnp.float32)
        new_state = state
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype), new_state
