"""Make it fit: the largest micro-batch that fits, and the cheapest change (remat policy, FSDP
size, micro-batch with gradient accumulation) that makes a config that does not fit fit, each
priced by its predicted step time."""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic

from framework.errors import ConfigError
from framework.estimate.cards import Card
from framework.estimate.estimate import Estimate, estimate, mesh_sizes
from framework.models.transformer import REMAT_POLICIES
from framework.train.config import Config

Change = dict[str, dict[str, Any]]  # {"model": {"remat": "full"}, ...}
# from least to most recomputation (REMAT_POLICIES' order)
_REMAT_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")
assert set(_REMAT_ORDER) == set(REMAT_POLICIES), "a new remat policy needs a place here"


@dataclasses.dataclass(frozen=True)
class Fix:
    """A change to the config (its key=value overrides) and its estimate."""

    overrides: tuple[str, ...]
    estimate: Estimate

    def describe(self) -> str:
        e = self.estimate
        return (
            f"set {' '.join(self.overrides)}: {e.memory.total / 2**30:.1f} GiB per device, "
            f"step {e.seconds['step'] * 1e3:.0f} ms"
        )


def with_overrides(cfg: Config, change: Change) -> Config:
    """A copy of cfg with section fields replaced, validated like a loaded config (a layout the
    change breaks raises as `load_config` would)."""
    data = cfg.model_dump()
    for section, fields in change.items():
        data[section].update(fields)
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        raise ConfigError(f"{where}: {first['msg']}") from None


def largest_micro_batch(cfg: Config, devices: int, card: Card, usable: int) -> int | None:
    """The largest rows per micro-batch (a multiple of the batch's device count) that fits,
    keeping everything else (accumulation steps included); None when one row per device does
    not fit."""
    sizes = mesh_sizes(cfg, devices)
    shards = sizes["data"] * sizes["fsdp"]
    accum = cfg.train.grad_accum

    def fits(rows_per_device: int) -> bool:
        trial = with_overrides(cfg, {"data": {"batch_size": rows_per_device * shards * accum}})
        return estimate(trial, devices, card, usable).fits

    if not fits(1):
        return None
    lo, hi = 1, 2
    while fits(hi) and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # memory grows linearly with rows: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * shards


def fixes(cfg: Config, devices: int, card: Card, usable: int) -> list[Fix]:
    """Changes that make the config fit, cheapest predicted step first: a stronger remat
    policy, FSDP over more of the devices (2, 4, ... taken from data parallelism), or more
    accumulation steps (the same global batch in smaller micro-batches); then combinations
    where no single change fits."""
    remats = [
        {"model": {"remat": r}} for r in _REMAT_ORDER[_REMAT_ORDER.index(cfg.model.remat) + 1 :]
    ]
    sizes = mesh_sizes(cfg, devices)
    within = {a: s // n for (a, s), n in zip(sizes.items(), _nodes(cfg), strict=True)}
    fsdp, n = [], 2
    # within a node (mesh.* sizes are per node under across_nodes; FSDP stays on NVLink)
    while within["data"] % n == 0 and within["fsdp"] * n <= card.gpus_per_node:
        fsdp.append({"mesh": {"data": within["data"] // n, "fsdp": within["fsdp"] * n}})
        n *= 2
    accum, n = [], cfg.train.grad_accum * 2
    shards = sizes["data"] * sizes["fsdp"]
    while cfg.data.batch_size % n == 0 and (cfg.data.batch_size // n) % shards == 0:
        accum.append({"train": {"grad_accum": n}})
        n *= 2
    found = _fitting(cfg, devices, card, usable, remats + fsdp + accum)
    if not found:
        pairs = [_merge(a, b) for a in remats for b in fsdp + accum]
        pairs += [_merge(a, b) for a in fsdp for b in accum]
        triples = [_merge(_merge(r, f), a) for r in remats for f in fsdp for a in accum]
        found = _fitting(cfg, devices, card, usable, pairs + triples)
    return sorted(found, key=lambda f: f.estimate.seconds["step"])


def _nodes(cfg: Config) -> list[int]:
    return list(cfg.mesh.across_nodes.sizes().values())


def _merge(a: Change, b: Change) -> Change:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _fitting(cfg: Config, devices: int, card: Card, usable: int, changes: list) -> list[Fix]:
    """The changes whose estimate fits (a change the layout refuses is skipped)."""
    out = []
    for change in changes:
        try:
            e = estimate(with_overrides(cfg, change), devices, card, usable)
        except ConfigError:
            continue
        if e.fits:
            keys = tuple(f"{s}.{k}={v}" for s, kv in change.items() for k, v in kv.items())
            out.append(Fix(keys, e))
    return out
