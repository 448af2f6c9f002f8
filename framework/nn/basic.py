"""Linear, embedding, dropout: the smallest layers, each a `spec` plus a pure `apply`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from framework.nn.checks import check_float, check_int, check_last_dim
from framework.nn.param import Param
from framework.parallel.logical import constrain

fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def linear_spec(
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None] = (None, None),
    bias: bool = True,
    init=fan_in_init,
) -> dict:
    """y = x @ kernel (+ bias); kernel [d_in, d_out] with logical `axes`."""
    spec = {"kernel": Param((d_in, d_out), axes, init, out_dims=1)}
    if bias:
        spec["bias"] = Param((d_out,), (axes[1],), zeros)
    return spec


def linear(params: dict, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x @ kernel (+ LoRA term, `key` its dropout key) (+ bias)."""
    check_float(x)
    check_last_dim(x, params["kernel"].shape[0])
    y = jnp.einsum("...i,io->...o", x, params["kernel"].astype(x.dtype))
    y = y + low_rank(params, x, key)
    if "bias" in params:
        y = y + params["bias"].astype(y.dtype)
    return y


def low_rank(params: dict, x: jax.Array, key: jax.Array | None = None) -> jax.Array | float:
    """The LoRA term of a projection whose params hold adapters (framework.finetune): scale *
    (dropout(x) @ lora_a) @ lora_b, contracting x's trailing dims with lora_a's leading ones;
    0 when there are none. Never forms the [in, out] product, so the frozen kernel gets no
    gradient matmul. The dropout (rate `lora_dropout`, where the params hold one) needs `key`:
    None (evaluation, decoding) applies none."""
    if "lora_a" not in params:
        return 0.0
    if key is not None and "lora_dropout" in params:
        rate = params["lora_dropout"].astype(jnp.float32)
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
    a, b = params["lora_a"].astype(x.dtype), params["lora_b"].astype(x.dtype)
    h = jnp.tensordot(x, a, axes=a.ndim - 1)
    return jnp.tensordot(h, b, axes=1) * params["lora_scale"].astype(x.dtype)


def sub_key(key: jax.Array | None, i: int) -> jax.Array | None:
    """The i-th key derived from `key` (None stays None): one per projection of a layer."""
    return None if key is None else jax.random.fold_in(key, i)


def embedding_spec(vocab: int, dim: int, axes=("vocab", "embed"), std: float = 0.02) -> dict:
    return {"embedding": Param((vocab, dim), axes, jax.nn.initializers.normal(std))}


def embed(params: dict, tokens: jax.Array, dtype=None) -> jax.Array:
    """Look up rows of the table: [...] int -> [..., dim]."""
    check_int(tokens, "tokens")
    # Gather from a whole table (FSDP all-gathers weights for compute anyway): the partitioner
    # cannot gather rows of a vocab/embed-split table into batch-split activations without a
    # full rematerialization. A no-op without a mesh.
    table = constrain(params["embedding"], (None, None))
    return jnp.take(table.astype(dtype or table.dtype), tokens, axis=0)


def attend(params: dict, x: jax.Array) -> jax.Array:
    """Tied unembedding: [..., dim] -> [..., vocab] logits using the same table."""
    check_float(x)
    table = params["embedding"]
    check_last_dim(x, table.shape[1])
    return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; key=None (evaluation) or rate=0 returns x unchanged."""
    if key is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
