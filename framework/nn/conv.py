"""2-D convolution and pooling over NHWC images: a `conv2d_spec` plus pure apply functions."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from framework.nn.basic import fan_in_init, zeros
from framework.nn.checks import check_float, check_last_dim, check_rank
from framework.nn.param import Param

NHWC = "batch, height, width, channels"
Pair = int | tuple[int, int]
Padding = str | Sequence[tuple[int, int]]


def _pair(v: Pair, what: str) -> tuple[int, int]:
    """Normalize an int or a 2-tuple to (height, width) and reject non-positive sizes."""
    out = (v, v) if isinstance(v, int) else tuple(v)
    if len(out) != 2 or any(int(s) <= 0 for s in out):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return int(out[0]), int(out[1])


def conv2d_spec(in_ch: int, out_ch: int, kernel: Pair = (3, 3), bias: bool = True) -> dict:
    """Declare an HWIO kernel [kh, kw, in, out] (fan-in init over kh*kw*in) and optional bias."""
    kh, kw = _pair(kernel, "kernel")
    spec = {
        "kernel": Param((kh, kw, in_ch, out_ch), (None, None, "conv_in", "conv_out"), fan_in_init)
    }
    if bias:
        spec["bias"] = Param((out_ch,), ("conv_out",), zeros)
    return spec


def conv2d(params: dict, x: jax.Array, *, stride: Pair = 1, padding: Padding = "SAME") -> jax.Array:
    """[batch, h, w, in] -> [batch, h', w', out] cross-correlation, computed in x's dtype."""
    check_float(x)
    check_rank(x, 4, layout=NHWC)
    kernel = params["kernel"]
    check_last_dim(x, kernel.shape[2], "input channels")
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=_pair(stride, "stride"),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if "bias" in params:
        y = y + params["bias"].astype(y.dtype)
    return y


def _window(x: jax.Array, window: Pair, stride: Pair | None) -> tuple[tuple, tuple]:
    """Validate x and build reduce_window dims/strides that leave batch and channels alone."""
    check_float(x)
    check_rank(x, 4, layout=NHWC)
    wh, ww = _pair(window, "window")
    sh, sw = _pair(window if stride is None else stride, "stride")
    return (1, wh, ww, 1), (1, sh, sw, 1)


def _padding(padding: Padding) -> str | tuple:
    """reduce_window wants padding for all four dims; spatial pairs get (0, 0) around them."""
    if isinstance(padding, str):
        return padding
    (ph, pw) = padding
    return ((0, 0), tuple(ph), tuple(pw), (0, 0))


def max_pool(
    x: jax.Array, window: Pair = 2, stride: Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Spatial max over windows (stride defaults to the window); padding never wins the max."""
    dims, strides = _window(x, window, stride)
    lowest = np.array(-np.inf, x.dtype)  # a concrete identity selects max's VJP rule
    return jax.lax.reduce_window(x, lowest, jax.lax.max, dims, strides, _padding(padding))


def avg_pool(
    x: jax.Array, window: Pair = 2, stride: Pair | None = None, padding: Padding = "VALID"
) -> jax.Array:
    """Spatial mean over windows; with padding each output divides by its count of real inputs."""
    dims, strides = _window(x, window, stride)
    pad = _padding(padding)
    zero = np.array(0, x.dtype)
    total = jax.lax.reduce_window(x, zero, jax.lax.add, dims, strides, pad)
    if isinstance(pad, str) and pad.upper() == "VALID":
        return total / (dims[1] * dims[2])
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, zero, jax.lax.add, dims, strides, pad)
    return total / counts
