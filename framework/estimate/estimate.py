"""`estimate(cfg, devices, card)`: per-device memory, FLOPs, HBM and collective bytes of one
train step, and the step time a roofline of the card predicts, from the config alone.

Memory is framework.estimate.memory's. Time: matmul FLOPs (the model's count plus what the
remat policy recomputes) at the card's calibrated matmul rate, plus memory-bound traffic
(optimizer update, activations written and read outside the matmuls) at its calibrated HBM
rate, plus the part of the collectives the compute cannot hide (XLA overlaps them with
compute: exposed = max(0, collectives - compute)). Activations scale with the rows a device
computes, so one trace at one row per device prices every micro-batch size."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from framework import finetune
from framework.config import ConfigError
from framework.estimate.cards import (
    HBM_EFFICIENCY,
    LINK_EFFICIENCY,
    LOSS_EFFICIENCY,
    MATMUL_EFFICIENCY,
    Card,
)
from framework.estimate.memory import (
    Memory,
    lm_batch,
    local_model_config,
    saved_activations,
)
from framework.models import REGISTRY
from framework.models.transformer import attention_flops_per_token, layer_matmul_params
from framework.parallel.mesh import AXES, resolve_sizes
from framework.parallel.target import abstract_gpu_mesh
from framework.train.build import _plan, lm_meta, model_for
from framework.train.config import Config
from framework.train.memory import state_bytes_per_device
from framework.train.step import split_trainable

RECOMPUTE_LIVE = 0.7  # share of a rematerialized layer live at once in its backward (fitted)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One config on `devices` GPUs of one card: everything per device, per optimizer step."""

    card: Card | None  # None: the host's own devices (CPU checks against the compiler)
    devices: int
    mesh: dict[str, int]
    micro_batch: int  # rows per micro-batch over the whole mesh
    grad_accum: int
    memory: Memory
    usable: int  # bytes jax may use on one device (0: unknown)
    model_flops: float  # the model's FLOPs (for MFU)
    hardware_flops: float  # plus what remat recomputes
    hbm_bytes: float  # memory-bound traffic outside the matmuls
    collective_bytes: dict[str, float]  # sent per device, per mesh axis
    crossing: frozenset[str]  # mesh axes whose collectives cross nodes (the network)
    seconds: dict[str, float]  # compute, memory, collectives, exposed collectives, step
    mfu: float

    @property
    def fits(self) -> bool:
        return self.usable == 0 or self.memory.total <= self.usable


def mesh_sizes(cfg: Config, devices: int) -> dict[str, int]:
    """Total size of each mesh axis on `devices` devices (within-node sizes x node counts)."""
    across = cfg.mesh.across_nodes.sizes()
    nodes = math.prod(across.values())
    if devices % nodes:
        raise ConfigError(
            f"--devices {devices} is not a multiple of the {nodes} nodes set in mesh.across_nodes"
        )
    within = resolve_sizes(cfg.mesh, devices // nodes)
    return {a: within[a] * across[a] for a in AXES}


def abstract_mesh(sizes: dict[str, int], card: Card | None) -> AbstractMesh:
    """An abstract mesh of the card's GPUs (kernels then trace as on that GPU), or of the
    host's own platform where `card` is None."""
    if card is not None:
        return abstract_gpu_mesh(sizes, card.device_kind)
    return AbstractMesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes)
    )


@dataclasses.dataclass(frozen=True)
class _Activations:
    """What the backward keeps, as fixed bytes + bytes per row a device computes."""

    kept: tuple[float, float]  # (fixed, per row): saved for the backward
    loss: tuple[float, float]  # the largest logits-sized one (the loss's)
    recompute: tuple[float, float]  # one layer's activations remat rebuilds
    largest: str

    def at(self, rows: int, fsdp: int) -> tuple[float, float, float]:
        """(kept, loss, recompute) bytes for `rows` rows on a device; the fixed part is the
        weights' compute-dtype copies, sharded like the weights over the FSDP axis."""
        return tuple(
            fixed / fsdp + rows * per_row
            for fixed, per_row in (self.kept, self.loss, self.recompute)
        )


@functools.lru_cache(maxsize=64)
def _activations(
    model_cfg_json: str, model_name: str, lora: str, seq: int, card: Card | None
) -> _Activations:
    """Traced at one and two rows of `seq` tokens (activations are linear in the rows); the
    arguments are hashable so that searching over meshes and batches traces each model once."""
    cfg = _model_cfg(model_cfg_json, model_name)
    model = _model(model_name, lora)
    layers = getattr(cfg, "n_layers", 1)
    vocab = getattr(cfg, "vocab_size", None)
    one = {a: 1 for a in AXES}
    points, traces = [], []
    with jax.sharding.use_abstract_mesh(abstract_mesh(one, card)):
        for rows in (1, 2):
            saved = saved_activations(model, cfg, lm_batch(rows, seq))
            every = saved_activations(
                model, cfg.model_copy(update={"remat": "none"}), lm_batch(rows, seq)
            )
            kept = sum(b for b, _, _ in saved)
            recompute = max(sum(b for b, _, _ in every) - kept, 0) / layers
            points.append((kept, recompute))
            traces.append(saved)
    (k1, r1), (k2, r2) = points
    linear = lambda a, b: (2 * a - b, b - a)  # noqa: E731 - (fixed, per row) from 1 and 2 rows
    grows = _growing(*traces)
    # the loss's: logits-sized (the vocabulary last, growing with the rows; the unembedding's
    # compute-dtype copy does not); a fused loss keeps none
    logits = max((b for b, shape, _ in grows if vocab and shape[-1:] == (vocab,)), default=0)
    largest = max(grows, default=(0, (), "nothing"))[2] + " (for one row)"
    return _Activations(linear(k1, k2), (0.0, float(logits)), linear(r1, r2), largest)


def _growing(one_row: list, two_rows: list) -> list[tuple[int, tuple, str]]:
    """The one-row trace's activations that grow with the rows (their bytes double from one
    row to two; the weights' compute-dtype copies do not)."""
    if len(one_row) != len(two_rows):  # not the same program: no pairing
        return []
    return [a for a, b in zip(one_row, two_rows, strict=True) if b[0] == 2 * a[0] > 0]


def _model_cfg(json: str, name: str) -> Any:
    return REGISTRY[name].config.model_validate_json(json)


def _model(name: str, lora: str) -> Any:
    """The registered model, with LoRA adapters as build.model_for wraps it (from hashable
    arguments: the activation trace is cached on them)."""
    model = REGISTRY[name]
    return finetune.wrap(model, finetune.LoraConfig.model_validate_json(lora)) if lora else model


def estimate(cfg: Config, devices: int, card: Card | None, usable: int = 0) -> Estimate:
    """The estimate for `cfg` on `devices` devices of `card` (None: the host's own devices,
    for checking against XLA's memory analysis); `usable` bytes per device (0: unknown)."""
    model = model_for(cfg)
    meta = lm_meta(cfg, "the estimator")
    sizes = mesh_sizes(cfg, devices)
    mesh = abstract_mesh(sizes, card)
    with jax.sharding.use_abstract_mesh(mesh):
        plan = _plan(cfg, model, meta, None, mesh=mesh)
    cfg, state = plan.cfg, plan.abstract
    mcfg = cfg.model
    seq = cfg.data.seq_len
    accum = cfg.train.grad_accum
    micro = cfg.data.batch_size // accum
    batch_shards = sizes["data"] * sizes["fsdp"]
    rows = -(-micro // batch_shards)
    seq_local = seq // sizes["sequence"]

    params = _bytes(state["params"])
    optimizer = _bytes(state["opt_state"]) + _bytes(state["model_state"])
    grads = _bytes(split_trainable(model, state["params"])[0])
    local = local_model_config(mcfg, sizes["tensor"], cfg.mesh.rules)
    lora = cfg.finetune.lora.model_dump_json() if cfg.finetune.lora is not None else ""
    acts = _activations(local.model_dump_json(), mcfg.name, lora, seq_local, card)
    kept, loss, recompute = acts.at(rows, sizes["fsdp"])
    layers = getattr(mcfg, "n_layers", 1)
    compute_bytes = np.dtype(mcfg.compute_dtype).itemsize
    # the weights one device multiplies with, in the compute dtype: its shard, gathered over FSDP
    gathered = _elements(state["params"]) * sizes["fsdp"] * compute_bytes
    blocks = state["params"].get("blocks") if isinstance(state["params"], dict) else None
    layer = _elements(blocks) * sizes["fsdp"] * compute_bytes / layers if blocks else 0
    fsdp = sizes["fsdp"]
    memory = Memory(
        params=params,
        optimizer=optimizer,
        gradients=grads,
        grad_accumulator=grads if accum > 1 else 0,
        activations=int(kept),
        workspace=int(max(2 * loss, RECOMPUTE_LIVE * recompute)),
        collectives=int(2 * layer * (fsdp - 1) / fsdp),
        largest_activation=acts.largest,
    )

    # FLOPs per device per step
    tokens = cfg.data.batch_size * seq
    per_token = model.flops_per_token(mcfg, seq) if model.flops_per_token else math.nan
    model_flops = per_token * tokens / devices
    hardware_flops = model_flops + _recompute_flops(mcfg, seq) * tokens / devices
    # memory-bound traffic: the optimizer reads params, grads, state and writes params, state;
    # every activation is written and read in the forward and again as a cotangent
    everything = kept + recompute * layers
    hbm = 2 * (params + optimizer) + 2 * grads + 4 * everything * accum
    coll = _collective_bytes(sizes, mcfg, gathered, grads, compute_bytes, rows, seq_local, accum)
    crossing = crossing_axes(cfg, sizes, devices, card) if card else frozenset()
    # the unembedding + cross-entropy (6 x d_model x vocab per token) runs in the fused loss
    # kernel on a GPU, at its own rate
    vocab, width = getattr(mcfg, "vocab_size", None), getattr(mcfg, "d_model", None)
    loss_flops = 6.0 * width * vocab * tokens / devices if vocab and width else 0.0
    secs = _seconds(card, hardware_flops - loss_flops, loss_flops, hbm, coll, crossing)
    peak = card.bf16_flops if card is not None else math.nan
    return Estimate(
        card=card,
        devices=devices,
        mesh=sizes,
        micro_batch=micro,
        grad_accum=accum,
        memory=memory,
        usable=usable,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        hbm_bytes=hbm,
        collective_bytes=coll,
        crossing=crossing,
        seconds=secs,
        mfu=model_flops / (secs["step"] * peak),
    )


def _bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    return state_bytes_per_device(tree)[0]


def _elements(tree: Any) -> int:
    """Elements of one device's shards of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))


def _recompute_flops(mcfg: Any, seq: int) -> float:
    """FLOPs per token the remat policy adds: the whole forward of each layer (full) or the
    attention forward, which the dot-saving policies do not keep on a GPU (a flash kernel is
    no dot). (XLA's attention under save_dots keeps its score products: counted all the same.)"""
    if not hasattr(mcfg, "n_layers") or mcfg.remat == "none":
        return 0.0
    attention_forward = attention_flops_per_token(mcfg, seq) / 3
    if mcfg.remat == "full":
        return 2.0 * mcfg.n_layers * layer_matmul_params(mcfg) + attention_forward
    return attention_forward


def _collective_bytes(
    sizes: dict[str, int],
    mcfg: Any,
    gathered: float,
    grads: float,
    compute_bytes: int,
    rows: int,
    seq_local: int,
    accum: int,
) -> dict[str, float]:
    """Bytes each device sends per step, per mesh axis, for ring collectives, per micro-batch
    (XLA places them inside the accumulation loop). FSDP gathers the `gathered` weights twice
    (forward, backward) and reduce-scatters the gradients (`grads`: one device's shard);
    data and sequence parallelism all-reduce the gradient shards; tensor parallelism
    all-reduces each layer's two outputs forward and backward; sequence parallelism also
    gathers each layer's keys and values (and scatters their gradients)."""
    t, f, d, s = sizes["tensor"], sizes["fsdp"], sizes["data"], sizes["sequence"]
    ring = lambda n: (n - 1) / n  # noqa: E731
    out = {a: 0.0 for a in AXES}
    out["fsdp"] = (2 * gathered + grads * f) * ring(f) * accum
    out["data"] = 2 * grads * ring(d) * accum
    out["sequence"] = 2 * grads * ring(s) * accum
    layers = getattr(mcfg, "n_layers", 0)
    if layers:
        act = rows * seq_local * mcfg.d_model * compute_bytes
        out["tensor"] = 4 * 2 * act * ring(t) * layers * accum
        kv = rows * seq_local * s * (mcfg.kv_heads // t) * mcfg.head_size * compute_bytes
        out["sequence"] += 2 * 2 * kv * ring(s) * layers * accum
    return out


def crossing_axes(cfg: Config, sizes: dict[str, int], devices: int, card: Card) -> frozenset[str]:
    """Mesh axes whose collectives cross nodes: those `mesh.across_nodes` spreads over nodes;
    with none set and more devices than a node holds, the outermost axis larger than one."""
    across = cfg.mesh.across_nodes.sizes()
    crossing = frozenset(a for a in AXES if across[a] > 1)
    if not crossing and devices > card.gpus_per_node:
        crossing = frozenset({next(a for a in AXES if sizes[a] > 1)})
    return crossing


def _seconds(
    card: Card | None,
    flops: float,
    loss_flops: float,
    hbm: float,
    coll: dict[str, float],
    crossing: frozenset,
) -> dict[str, float]:
    """Roofline seconds per step: compute (matmuls, and the fused loss at its own rate),
    memory, collectives (NVLink, or the network for the `crossing` axes) and the part of them
    compute cannot hide; NaN without a card."""
    if card is None:
        keys = ("compute", "memory", "collectives", "exposed_collectives", "step")
        return dict.fromkeys(keys, math.nan)
    compute = flops / (card.bf16_flops * MATMUL_EFFICIENCY)
    compute += loss_flops / (card.bf16_flops * LOSS_EFFICIENCY)
    memory = hbm / (card.hbm * HBM_EFFICIENCY)
    collectives = sum(
        b / ((card.network if a in crossing else card.nvlink) * LINK_EFFICIENCY)
        for a, b in coll.items()
    )
    exposed = max(0.0, collectives - compute)
    return {
        "compute": compute,
        "memory": memory,
        "collectives": collectives,
        "exposed_collectives": exposed,
        "step": compute + memory + exposed,
    }
