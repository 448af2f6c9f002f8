"""The estimator's answer as text (scripts/estimate.py) and as data (--json), and the advice
an out-of-memory report prints."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from framework.estimate.cards import Card, for_device_kind, mem_fraction
from framework.estimate.estimate import Estimate, estimate
from framework.estimate.fit import Fix, fixes, largest_micro_batch
from framework.train.config import Config

GIB = 2**30
SHOWN = 5  # fixes printed (--json has them all)


@dataclasses.dataclass(frozen=True)
class Answer:
    """An estimate with the searches built on it."""

    config: str
    estimate: Estimate
    max_micro_batch: int | None
    fixes: list[Fix]  # cheapest first; empty when it fits


def answer(
    cfg: Config,
    devices: int,
    gpu: Card,
    fraction: float | None = None,
    name: str = "",
    usable: int | None = None,
) -> Answer:
    """Estimate `cfg` on `devices` GPUs of `gpu`, the largest micro-batch that fits, and (when
    it does not fit) the changes that make it fit. Usable bytes per GPU: `usable` where known
    (a device's allocator limit), else the card's memory x `fraction` (see mem_fraction)."""
    if usable is None:
        usable = int(gpu.memory * mem_fraction(fraction))
    e = estimate(cfg, devices, gpu, usable)
    return Answer(
        config=name,
        estimate=e,
        max_micro_batch=largest_micro_batch(cfg, devices, gpu, usable),
        fixes=[] if e.fits else fixes(cfg, devices, gpu, usable),
    )


def oom_advice(
    cfg: Config, n_devices: int, device_kind: str, limit: int | None
) -> tuple[int | None, str | None]:
    """For an out-of-memory report (framework.train.oom.Report.render): (the predicted bytes
    per device, the cheapest change that fits on the device's `limit`), each None off the
    estimator's cards or when nothing found fits."""
    gpu = for_device_kind(device_kind)
    if gpu is None:
        return None, None
    usable = limit or int(gpu.memory * mem_fraction())
    e = estimate(cfg, n_devices, gpu, usable)
    found = [] if e.fits else fixes(cfg, n_devices, gpu, usable)  # no micro-batch search
    return e.memory.total, found[0].describe() if found else None


def as_text(a: Answer) -> str:
    """The human-readable report."""
    e, m = a.estimate, a.estimate.memory
    mesh = " x ".join(f"{k}={v}" for k, v in e.mesh.items())
    usable = e.usable / GIB
    lines = [
        f"{a.config} on {e.devices} x {e.card.name} (mesh {mesh}; micro-batch {e.micro_batch} "
        f"rows x {e.grad_accum} accumulation steps)",
        "",
        "memory per device                 GiB",
    ]
    rows = [
        ("parameters", m.params),
        ("gradients", m.gradients),
        ("optimizer state", m.optimizer),
        ("gradient accumulator", m.grad_accumulator),
        ("activations kept for backward", m.activations),
        ("attention/loss/remat workspace", m.workspace),
        ("collective buffers (FSDP)", m.collectives),
    ]
    lines += [f"  {what:<31} {b / GIB:8.2f}" for what, b in rows]
    verdict = "fits" if e.fits else "DOES NOT FIT"
    lines.append(
        f"  {'total':<31} {m.total / GIB:8.2f}   of {usable:.1f} usable "
        f"({e.card.memory / GIB:.1f} GiB x {e.usable / e.card.memory:.2f}): {verdict}"
    )
    lines.append(f"  largest activation: {m.largest_activation}")
    s = e.seconds
    lines += [
        "",
        "per step, per device",
        f"  FLOPs        {e.hardware_flops:.3g} ({e.model_flops:.3g} model, the rest remat)",
        f"  HBM bytes    {e.hbm_bytes:.3g} outside the matmuls",
    ]
    for axis, b in e.collective_bytes.items():
        if b:
            link = "network" if axis in e.crossing else "NVLink"
            lines.append(f"  {axis:<12} {b:.3g} bytes of collectives ({link})")
    lines += [
        "",
        f"predicted step {s['step'] * 1e3:.1f} ms = compute {s['compute'] * 1e3:.1f} + memory "
        f"{s['memory'] * 1e3:.1f} + exposed collectives {s['exposed_collectives'] * 1e3:.1f} "
        f"(of {s['collectives'] * 1e3:.1f}); MFU {e.mfu:.1%}",
    ]
    if a.max_micro_batch is None:
        lines.append("largest micro-batch that fits: none (not even one row per device)")
    else:
        lines.append(f"largest micro-batch that fits: {a.max_micro_batch} rows")
    if not e.fits:
        if a.fixes:
            lines.append("to make it fit (cheapest first):")
            lines += [f"  {f.describe()}" for f in a.fixes[:SHOWN]]
            if len(a.fixes) > SHOWN:
                lines.append(f"  (+{len(a.fixes) - SHOWN} more; --json lists them all)")
        else:
            lines.append("no single remat / FSDP / accumulation change fits: add devices")
    return "\n".join(lines)


def as_data(a: Answer) -> dict[str, Any]:
    """The same as JSON-ready data (bytes, FLOPs and seconds unrounded)."""
    e = a.estimate
    memory = dataclasses.asdict(e.memory)
    memory["total"] = e.memory.total

    def clean(x: float) -> float | None:
        return None if isinstance(x, float) and math.isnan(x) else x

    return {
        "config": a.config,
        "card": {**dataclasses.asdict(e.card), "bf16_flops": e.card.bf16_flops},
        "devices": e.devices,
        "mesh": e.mesh,
        "micro_batch": e.micro_batch,
        "grad_accum": e.grad_accum,
        "memory": memory,
        "usable": e.usable,
        "fits": e.fits,
        "model_flops": clean(e.model_flops),
        "hardware_flops": clean(e.hardware_flops),
        "hbm_bytes": e.hbm_bytes,
        "collective_bytes": e.collective_bytes,
        "crossing_nodes": sorted(e.crossing),
        "seconds": {k: clean(v) for k, v in e.seconds.items()},
        "mfu": clean(e.mfu),
        "max_micro_batch": a.max_micro_batch,
        "fixes": [
            {
                "overrides": list(f.overrides),
                "memory_total": f.estimate.memory.total,
                "step_s": f.estimate.seconds["step"],
            }
            for f in a.fixes
        ],
    }
