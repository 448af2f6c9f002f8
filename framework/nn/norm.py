"""LayerNorm and RMSNorm layers over the last axis; the math lives in framework.ops."""

from __future__ import annotations

import jax

from framework import ops
from framework.nn.basic import ones, zeros
from framework.nn.checks import check_float, check_last_dim
from framework.nn.param import Param


def layer_norm_spec(dim: int, bias: bool = True, axis: str = "embed") -> dict:
    spec = {"scale": Param((dim,), (axis,), ones)}
    if bias:
        spec["bias"] = Param((dim,), (axis,), zeros)
    return spec


def layer_norm(params: dict, x: jax.Array, *, eps: float = 1e-5, impl: str = "auto"):
    check_float(x)
    check_last_dim(x, params["scale"].shape[0])
    return ops.layer_norm(x, params["scale"], params.get("bias"), eps=eps, impl=impl)


def rms_norm_spec(dim: int, axis: str = "embed") -> dict:
    return {"scale": Param((dim,), (axis,), ones)}


def rms_norm(params: dict, x: jax.Array, *, eps: float = 1e-6, impl: str = "auto"):
    check_float(x)
    check_last_dim(x, params["scale"].shape[0])
    return ops.rms_norm(x, params["scale"], eps=eps, impl=impl)
