"""Transformer feed-forward block: GELU, tanh-approximated or exact (two matrices), or SwiGLU
(three)."""

from __future__ import annotations

import jax

from framework.nn.basic import linear, linear_spec, sub_key
from framework.nn.checks import scope
from framework.parallel.logical import constrain

ACTIVATIONS = ("gelu", "gelu_exact", "swiglu")


def mlp_spec(d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True) -> dict:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown mlp activation {activation!r}; expected one of {ACTIVATIONS}")
    spec = {
        "up": linear_spec(d_model, d_ff, ("embed", "mlp"), bias),
        "down": linear_spec(d_ff, d_model, ("mlp", "embed"), bias),
    }
    if activation == "swiglu":
        spec["gate"] = linear_spec(d_model, d_ff, ("embed", "mlp"), bias)
    return spec


def mlp(
    params: dict, x: jax.Array, activation: str = "gelu", key: jax.Array | None = None
) -> jax.Array:
    """[..., d_model] -> [..., d_model]; SwiGLU when the params have a "gate", else GELU (the
    erf form when activation is "gelu_exact", the tanh approximation otherwise). `key`: the
    LoRA adapters' dropout key (None: none)."""
    with scope("up"):
        h = linear(params["up"], x, sub_key(key, 0))
    if "gate" in params:
        with scope("gate"):
            h = jax.nn.silu(linear(params["gate"], x, sub_key(key, 1))) * h
    else:
        h = jax.nn.gelu(h, approximate=activation != "gelu_exact")
    h = constrain(h, ("batch", "seq", "mlp")) if h.ndim == 3 else h
    with scope("down"):
        return linear(params["down"], h, sub_key(key, 2))
