"""Make it fit: the largest micro-batch that fits, and the cheapest change (remat policy, FSDP
size, micro-batch with gradient accumulation) that makes a config that does not fit fit, each
priced by its predicted step time."""

from __future__ import annotations

import dataclasses
from typing import Any

from framework.estimate.cards import Card
from framework.estimate.estimate import Estimate, estimate, mesh_sizes
from framework.train.config import Config

STRONGER_REMAT = {
    "none": ("save_dots", "save_dots_no_batch", "full"),
    "save_dots": ("save_dots_no_batch", "full"),
    "save_dots_no_batch": ("full",),
    "full": (),
}


@dataclasses.dataclass(frozen=True)
class Fix:
    """A change to the config (key=value overrides) and its estimate."""

    overrides: tuple[str, ...]
    estimate: Estimate

    def describe(self) -> str:
        e = self.estimate
        return (
            f"set {' '.join(self.overrides)}: {e.memory.total / 2**30:.1f} GiB per device, "
            f"step {e.seconds['step'] * 1e3:.0f} ms"
        )


def with_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """A copy of cfg with section fields replaced: {"model": {"remat": "full"}, ...}."""
    update = {s: getattr(cfg, s).model_copy(update=v) for s, v in overrides.items()}
    return cfg.model_copy(update=update)


def largest_micro_batch(cfg: Config, devices: int, card: Card, usable: int) -> int | None:
    """The largest rows per micro-batch (a multiple of the batch's device count) that fits,
    holding everything else; None when not even one row per device fits."""
    sizes = mesh_sizes(cfg, devices)
    shards = sizes["data"] * sizes["fsdp"]

    def fits(rows_per_device: int) -> bool:
        micro = rows_per_device * shards
        trial = with_overrides(cfg, {"data": {"batch_size": micro}, "train": {"grad_accum": 1}})
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
    policy, every device in FSDP (data=1), or more accumulation steps (the same global batch in
    smaller micro-batches); then combinations of these where no single change fits."""
    remats = [{"model": {"remat": r}} for r in STRONGER_REMAT.get(cfg.model.remat, ())]
    sizes = mesh_sizes(cfg, devices)
    fsdp = []
    if sizes["data"] > 1:
        fsdp = [{"mesh": {"data": 1, "fsdp": sizes["data"] * sizes["fsdp"]}}]
    accum = []
    n = cfg.train.grad_accum * 2
    shards = sizes["data"] * sizes["fsdp"]
    while cfg.data.batch_size % n == 0 and (cfg.data.batch_size // n) % shards == 0:
        accum.append({"train": {"grad_accum": n}})
        n *= 2
    singles = remats + fsdp + accum
    found = _fitting(cfg, devices, card, usable, singles)
    if not found:
        combos = [_merge(a, b) for a in remats + fsdp for b in fsdp + accum if a is not b]
        combos += [_merge(_merge(r, f), a) for r in remats for f in fsdp for a in accum]
        found = _fitting(cfg, devices, card, usable, combos)
    return sorted(found, key=lambda f: f.estimate.seconds["step"])


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _fitting(cfg, devices, card, usable, changes) -> list[Fix]:
    out = []
    for change in changes:
        e = estimate(with_overrides(cfg, change), devices, card, usable)
        if e.fits:
            keys = tuple(f"{s}.{k}={v}" for s, kv in change.items() for k, v in kv.items())
            out.append(Fix(keys, e))
    return out
