"""Bytes one device holds during a train step, from the config alone (nothing allocated).

The state (params, optimizer state) is exact: its shapes and shardings come from the same plan
`framework.train.build` makes, over an abstract mesh of the target's devices. Gradients are
the trainable params' bytes under the same shardings. Activations are what jax itself says the
backward keeps: `saved_residuals` of one device's share of the loss (its rows, its sequence
slice, its heads / MLP columns / vocabulary slice under tensor parallelism), traced under the
remat policy and with the kernels the target would run (flash attention and the fused loss on a
GPU). The transient workspace on top is the largest of: the last op's cotangent (the loss
backward), one layer's activations rebuilt by remat, and an FSDP-gathered layer of weights."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from framework import nn
from framework.errors import ConfigError
from framework.models.registry import Model
from framework.train.step import combine, split_trainable

try:  # the same function behind jax.ad_checkpoint.print_saved_residuals (jax 0.10 - 0.12)
    from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
except ImportError:  # pragma: no cover - a future jax; the estimate says it cannot count
    _saved_residuals = None


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device, by what holds them."""

    params: int
    optimizer: int
    gradients: int
    grad_accumulator: int  # the summed gradients of micro-batches (train.grad_accum > 1)
    activations: int  # kept for the backward under the remat policy
    workspace: int  # the largest transient on top: loss backward, a rematerialized layer
    collectives: int  # FSDP: one layer's gathered weights (and the next one's, prefetched)
    largest_activation: str  # where the biggest saved activation comes from

    @property
    def total(self) -> int:
        return (
            self.params
            + self.optimizer
            + self.gradients
            + self.grad_accumulator
            + self.activations
            + self.workspace
            + self.collectives
        )


def local_model_config(mcfg: Any, tensor: int, rules: Mapping[str, Any]) -> Any:
    """The model one device computes under tensor parallelism: the query/KV heads, MLP width
    and vocabulary that `rules` map to the tensor axis divided by it (Megatron-style; the
    build's plan has already refused sizes the axis does not divide). Models without these
    fields are unchanged."""
    if tensor == 1 or not hasattr(mcfg, "n_heads"):
        return mcfg

    def split(axis: str) -> bool:
        target = rules.get(axis)
        return target == "tensor" or (isinstance(target, list | tuple) and "tensor" in target)

    sizes = {
        "heads": ("n_heads", mcfg.n_heads),
        "kv_heads": ("n_kv_heads", mcfg.kv_heads),
        "mlp": ("d_ff", mcfg.d_ff),
        "vocab": ("vocab_size", mcfg.vocab_size),
    }
    update = {field: n // tensor for axis, (field, n) in sizes.items() if split(axis)}
    heads, kv = update.get("n_heads", mcfg.n_heads), update.get("n_kv_heads", mcfg.kv_heads)
    # replicated KV heads beside split query heads: the local query heads' share of them
    update["n_kv_heads"] = math.gcd(heads, kv)
    return mcfg.model_copy(update={"head_dim": mcfg.head_size, **update})


def saved_activations(model: Model, mcfg: Any, batch: dict) -> list[tuple[int, tuple, str]]:
    """(bytes, shape, what) of each activation the backward of the loss keeps, for these
    abstract inputs; the params themselves (residuals 'from the argument', the trainable and
    the frozen ones) are not counted."""
    if _saved_residuals is None:
        raise ConfigError(
            f"jax {jax.__version__} has no jax._src.ad_checkpoint.saved_residuals, which the "
            "estimator reads activations from (jax 0.10 to 0.12 have it)"
        )
    params = jax.eval_shape(lambda k: nn.init(model.spec(mcfg), k), jax.random.key(0))
    trainable, frozen = split_trainable(model, params)

    def loss(train, frozen, batch):
        return model.loss(combine(train, frozen), batch, mcfg, key=None)[0]

    out = []
    for aval, what in _saved_residuals(loss, trainable, frozen, batch):
        if "from the argument" in what or not hasattr(aval, "shape"):
            continue
        size = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
        out.append((size, tuple(aval.shape), f"{aval.str_short()} {what.split(' from ')[0]}"))
    return out


def lm_batch(rows: int, seq_len: int) -> dict:
    """Abstract token batch {"inputs", "targets"} [rows, seq_len] int32."""
    tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    return {"inputs": tokens, "targets": tokens}
