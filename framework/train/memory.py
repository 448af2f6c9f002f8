"""Refuse a run that cannot fit its devices before anything is allocated or compiled.

A size typo (`model.d_model=1000000000`, `model.max_seq_len=1000000000`, `data.seq_len=1048576`)
would otherwise hang at the first step, abort inside XLA or fill the host's memory. The estimate
is a lower bound (the state's exact per-device bytes plus the least the activations take), so
only a run that surely cannot fit is refused."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from framework.errors import ConfigError

# attention that never holds the seq x seq scores
FLASH_ATTENTION = ("pallas", "triton", "mosaic", "cudnn")
MIN_ACTIVATION_BYTES = 2  # bf16: the least an activation element can take


def state_bytes_per_device(abstract_state: Any) -> tuple[int, str, tuple]:
    """(bytes of the state on one device given its shardings, the largest leaf's path, that
    leaf's global shape)."""
    total, biggest, where, shape = 0, -1, "", ()
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        local = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        size = math.prod(local) * np.dtype(leaf.dtype).itemsize
        total += size
        if size > biggest:
            biggest, shape = size, tuple(leaf.shape)
            where = jax.tree_util.keystr(path, simple=True, separator="/")
    return total, where, shape


def activation_bytes(mcfg: Any, batch: int, seq_len: int | None) -> int:
    """The least a micro-batch's activations take over the whole mesh: each layer's residual
    stream (kept for the backward pass) and, without flash attention (impl xla, or auto off
    GPU), one layer's attention scores.
    0 for models without these fields (the state estimate still applies)."""
    d_model, n_layers = getattr(mcfg, "d_model", None), getattr(mcfg, "n_layers", None)
    if seq_len is None or d_model is None or n_layers is None:
        return 0
    stream = batch * seq_len * d_model * n_layers
    heads = getattr(mcfg, "n_heads", 0)
    flash = mcfg.attention_impl in FLASH_ATTENTION or (
        # on a GPU, auto picks a flash kernel (cuDNN or Pallas) for the causal LM calls
        mcfg.attention_impl == "auto" and jax.default_backend() == "gpu"
    )
    scores = 0 if flash else batch * heads * seq_len**2
    return (stream + scores) * MIN_ACTIVATION_BYTES


def device_memory(device: Any, devices_here: int) -> tuple[int, str]:
    """(bytes one device may use, what limits it): the allocator's limit where jax reports
    one (GPU, TPU), else the host's RAM shared by this process's devices (CPU)."""
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(devices_here, 1), f"host RAM / {devices_here} devices"


def check_fits(cfg: Any, abstract_state: Any, mesh: Mesh, is_lm: bool) -> None:
    """ConfigError naming the keys when the state plus the least activations cannot fit one
    device; call it before init_state or any compile."""
    state, leaf, shape = state_bytes_per_device(abstract_state)
    seq_len = cfg.data.seq_len if is_lm else None
    micro_batch = cfg.data.batch_size // cfg.train.grad_accum  # one micro-batch at a time
    acts = activation_bytes(cfg.model, micro_batch, seq_len) // mesh.size
    here = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit, what = device_memory(here[0], len(here))
    if state + acts <= limit:
        return
    if state >= acts:
        keys = _keys_sized(cfg.model, shape, "model") or ["the model section"]
        cause = f"the largest state leaf {leaf} has shape {list(shape)}: check {', '.join(keys)}"
    else:
        keys = _keys_sized(
            cfg.data, (), "data", names=("batch_size", "seq_len") if is_lm else ("batch_size",)
        )
        keys += _keys_sized(cfg.model, (), "model", names=("d_model", "n_layers", "n_heads"))
        cause = f"activations: check {', '.join(keys)}"
    raise ConfigError(
        f"the run cannot fit: it needs at least {_gib(state + acts)} per device "
        f"({_gib(state)} params and optimizer state, {_gib(acts)} activations) but "
        f"{what} holds {_gib(limit)}; {cause}"
    )


def _keys_sized(
    section_cfg: Any, shape: tuple, section: str, names: tuple[str, ...] | None = None
) -> list[str]:
    """`section.key=value` for the config's integer fields equal to the largest dimension of
    `shape` (the likely typo), or for those in `names`."""
    out = []
    for name, value in section_cfg.model_dump().items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if name in (names or ()) or (names is None and value == max(shape, default=None)):
            out.append(f"{section}.{name}={value}")
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"
