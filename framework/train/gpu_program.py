"""The whole sharded train step as a GPU program, built on a host without GPUs: the config's
real step (kernels, remat, optimizer, shardings) exported with jax.export for CUDA on an
abstract mesh of named GPUs, so what reaches the node's compiler (Triton kernels, shardings,
program size) can be read before renting it. One difference from the node: attention
`impl=auto` takes Pallas here where a Hopper node would take cuDNN (cuDNN's checks need the
local device; framework/ops/attention_dispatch.py)."""

from __future__ import annotations

import collections
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from framework.config import ConfigError
from framework.parallel.mesh import AXES, resolve_sizes
from framework.parallel.sharding import batch_spec
from framework.parallel.target import GPU_CUSTOM_CALLS, H100, abstract_gpu_mesh, export_for_cuda
from framework.train.build import _jit_steps, _plan, lm_meta, model_for
from framework.train.config import Config
from framework.train.optimizer import schedule


def export_train_step(
    cfg: Config, *, devices: int = 8, device_kind: str = H100
) -> jax.export.Exported:
    """The config's jitted, sharded train step exported for `devices` abstract GPUs of
    `device_kind` (mesh sizes from cfg.mesh, -1 resolved against `devices`). Language models
    only: the batch is {"inputs", "targets"} int32 [batch_size, seq_len]."""
    if cfg.mesh.across_nodes.sizes() != {a: 1 for a in AXES}:
        raise ConfigError("mesh.across_nodes: the abstract GPU mesh is one node; leave it unset")
    model = model_for(cfg)
    meta = lm_meta(cfg, "GPU export")
    mesh = abstract_gpu_mesh(resolve_sizes(cfg.mesh, devices), device_kind)
    with jax.sharding.use_abstract_mesh(mesh):
        plan = _plan(cfg, model, meta, None, mesh=mesh)
        lr = schedule(plan.cfg.optim, plan.cfg.train.steps)
        train_step, _ = _jit_steps(
            model, plan.cfg, plan.tx, lr, plan.shardings, plan.mesh, plan.rules
        )
        tokens = (plan.cfg.data.batch_size, plan.cfg.data.seq_len)
        sharding = NamedSharding(mesh, batch_spec(2, plan.rules, sequence=True))
        batch = {
            k: jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=sharding)
            for k in ("inputs", "targets")
        }
        return export_for_cuda(train_step, plan.abstract, batch)


_KERNEL_NAME = re.compile(r'name = "([^"]+)"')
_COLLECTIVE = re.compile(
    r"stablehlo\.(all_gather|reduce_scatter|all_reduce|all_to_all|collective_permute)\b"
)
_GROUP_SIZE = re.compile(r"replica_groups = dense<[^:]*: tensor<\d+x(\d+)xi64>")
_SPLIT_ARG = re.compile(r'sdy\.sharding<@\w+, \[[^\]]*"|mhlo\.sharding = "\{devices=\[')


def summarize(exported: jax.export.Exported) -> dict[str, Any]:
    """Size and contents of an exported GPU program: StableHLO bytes, Triton kernels by name,
    cuDNN and Mosaic GPU calls, inputs split over the mesh, and the collectives written
    explicitly (inside shard_map; XLA adds the rest when it partitions the program on the
    node), counting only those whose groups hold more than one device."""
    text = exported.mlir_module()
    kernels: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if any(t in line for t in GPU_CUSTOM_CALLS):
            found = _KERNEL_NAME.search(line)
            kernels[found.group(1) if found else "?"] += 1
    collectives: collections.Counter[str] = collections.Counter()
    for found in _COLLECTIVE.finditer(text):
        group = _GROUP_SIZE.search(text, found.end(), text.find("\n", found.end()))
        if group is None or int(group.group(1)) > 1:
            collectives[found.group(1)] += 1
    main = text[text.index("func.func public @main") :]
    args = main[: main.index("{\n")].split("%arg")[1:]
    return {
        "platforms": list(exported.platforms),
        "devices": exported.nr_devices,
        "stablehlo_bytes": len(exported.mlir_module_serialized),
        "inputs": len(exported.in_avals),
        "inputs_split": sum(bool(_SPLIT_ARG.search(a)) for a in args),
        "triton_kernels": dict(sorted(kernels.items())),
        "cudnn_calls": text.count("__cudnn$"),
        "mosaic_gpu_calls": text.count("custom_call @mosaic_gpu"),
        "explicit_collectives": dict(sorted(collectives.items())),
    }
