"""Which attention implementation `impl="auto"` runs, per GPU generation and call shape.

The rule, from a table: on Hopper and newer, cuDNN's fused attention where it supports the call
(published at about 1.6x the FlashAttention-2 level our Triton kernel targets, FlashAttention-3
paper, hd128 causal forward); where cuDNN cannot take the call (segment ids, f32, head dims
cuDNN refuses), on Hopper only the Mosaic GPU kernel (wgmma, sm90) where this jax has it and it
takes the call, then the Triton kernel; on older GPUs the Triton kernel; XLA where none can.
A measured entry (`attention_measured.json`, written by `scripts/gpu_check.sh` from benchmarks
on that card) overrides the table for its device, dtype, head dim, masking and nearby sequence
lengths: its winner where it takes the call, else its fastest measured kernel that does.
`choose` is a pure function of the call's
description, so the table is testable on any host."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

MEASURED_PATH = Path(__file__).with_name("attention_measured.json")

# Preference per GPU generation, best first; each impl is taken only if it supports the call.
# "mosaic" (the Mosaic GPU kernels) is for Hopper only: never taken on another generation.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "blackwell": ("cudnn", "triton"),
    "hopper": ("cudnn", "mosaic", "triton"),
    "ada": ("triton",),
    "ampere": ("triton",),
    "other": ("triton",),
}
_GENERATIONS = (  # (generation, device_kind substrings), most specific first
    ("blackwell", ("b100", "b200", "gb200", "b300", "gb300")),
    ("hopper", ("h100", "h200", "h800", "h20", "gh200")),
    ("ada", ("l4", "l40", "rtx 40", "rtx 6000 ada")),
    ("ampere", ("a100", "a800", "a30", "a40", "a10", "rtx 30", "a6000")),
)
# A measured entry applies to sequence lengths within this factor of the measured one.
_SEQ_REACH = 4.0


@dataclasses.dataclass(frozen=True)
class Call:
    """What the dispatch needs to know about one attention call (all static)."""

    device_kind: str  # a GPU's device_kind, e.g. "NVIDIA H100 80GB HBM3", or the platform
    dtype: str  # of q, k and v, e.g. "bfloat16" ("mixed" if they differ)
    head_dim: int
    q_len: int
    kv_len: int
    causal: bool
    segments: bool  # segment_ids or kv_segment_ids given
    mask: bool  # an arbitrary mask given
    triton_ok: bool  # pallas_kernels.flash_attention.supports(...) says yes
    cudnn_available: bool  # a real CUDA backend is present (cuDNN's checks query the device)
    on_gpu: bool = True  # compiling for a GPU (else device_kind names the platform)
    # the Mosaic GPU kernels exist in this jax and flash_attention_mgpu.unsupported(...) is None
    mosaic_ok: bool = False


def generation(device_kind: str) -> str:
    """GPU generation key of PREFERENCE for a device_kind ("other" if unknown)."""
    kind = device_kind.lower()
    for gen, names in _GENERATIONS:
        if any(name in kind for name in names):
            return gen
    return "other"


def cudnn_supports(call: Call) -> bool:
    """Whether jax's cuDNN fused attention takes the call: bf16/f16, causal or no mask, no
    segments, equal q/kv lengths (cuDNN aligns a causal mask differently otherwise), head dim a
    multiple of 8 up to 256 on Hopper and newer (128 before)."""
    max_head_dim = 256 if generation(call.device_kind) in ("hopper", "blackwell") else 128
    return (
        call.cudnn_available
        and call.dtype in ("bfloat16", "float16")
        and not call.segments
        and not call.mask
        and call.q_len == call.kv_len
        and call.head_dim % 8 == 0
        and call.head_dim <= max_head_dim
    )


def _supported(impl: str, call: Call) -> bool:
    mosaic = call.mosaic_ok and generation(call.device_kind) == "hopper"  # wgmma: sm90 only
    return {
        "cudnn": cudnn_supports(call),
        "mosaic": mosaic,
        "triton": call.triton_ok,
        "xla": True,
    }.get(impl, False)


def _measured_best(call: Call, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured entry for this device, dtype, head dim and masking whose sequence length is
    nearest the call's (within _SEQ_REACH), or None."""
    kind = call.device_kind.lower()
    near = [
        e
        for e in entries
        if e.get("device", "").lower() == kind
        and e.get("dtype") == call.dtype
        and e.get("head_dim") == call.head_dim
        and bool(e.get("causal")) == call.causal
        and e.get("seq_len", 0) > 0
        and abs(math.log(e["seq_len"] / max(call.q_len, 1))) <= math.log(_SEQ_REACH)
    ]
    return min(near, key=lambda e: abs(math.log(e["seq_len"] / max(call.q_len, 1))), default=None)


# The kernels a measured entry picks among, and the old names of their benchmark rows:
# "pallas" (files and rows from before the Mosaic kernels were measured) is the Triton kernel.
MEASURED_KERNELS = ("cudnn", "mosaic", "triton")
_OLD_NAMES = {"pallas": "triton"}


def impl_name(impl: str) -> str:
    """A benchmarked or measured impl under its current name ("pallas" -> "triton")."""
    return _OLD_NAMES.get(impl, impl)


def measured_impl(entry: dict[str, Any]) -> str:
    """A measured entry's winner as an impl name."""
    return impl_name(entry.get("best", ""))


def kernel_times(ms: dict[str, Any]) -> dict[str, float]:
    """Forward + backward ms per kernel of MEASURED_KERNELS from a benchmark's per-impl times
    (a measured entry's `ms`): other impls (xla, auto) left out, the faster row where two
    names mean one kernel."""
    times: dict[str, float] = {}
    for impl, t in ms.items():
        name = impl_name(impl)
        if name in MEASURED_KERNELS and isinstance(t, (int, float)):
            times[name] = min(t, times.get(name, t))
    return times


def choose(call: Call, measured: list[dict[str, Any]] = ()) -> tuple[str, str]:
    """(impl, why) for `impl="auto"`: impl is "cudnn", "mosaic", "triton" or "xla". Off a GPU,
    xla; else the nearest measured entry's winner where it takes the call, else the fastest
    kernel of that entry's times (`ms`) that takes it (entries are measured without segment
    ids: a call with them, which cuDNN refuses, gets the faster of the other kernels); else
    the first impl of the generation's PREFERENCE that takes it; else xla."""
    if not call.on_gpu:
        return "xla", f"{call.device_kind}: not compiling for a GPU"
    entry = _measured_best(call, list(measured))
    if entry is not None:
        times = kernel_times(entry.get("ms") or {})
        best = measured_impl(entry)
        why = f"measured {entry.get('measured', '')} at seq {entry['seq_len']}"
        for impl in [best, *sorted(times, key=times.get)]:
            if _supported(impl, call):
                return impl, why if impl == best else f"{why} (fastest that takes the call)"
    gen = generation(call.device_kind)
    for impl in PREFERENCE[gen]:
        if _supported(impl, call):
            return impl, f"{gen} table"
    return "xla", f"{gen} table: no kernel supports the call"


_ENTRY_TYPES = {"device": str, "dtype": str, "head_dim": int, "causal": bool, "seq_len": int}
_IMPLS = ("cudnn", "mosaic", "triton", "xla", "pallas")  # "pallas": older files, = triton


def measured_entries(path: str | None = None) -> tuple[dict[str, Any], ...]:
    """Entries of the measured dispatch file (FRAMEWORK_ATTENTION_MEASURED, else the one beside
    this module); none if it is absent. A damaged file is an error naming it."""
    path = Path(path or os.environ.get("FRAMEWORK_ATTENTION_MEASURED") or MEASURED_PATH)
    if not path.is_file():
        return ()
    stat = path.stat()
    return _read_measured(str(path), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _read_measured(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    """Parsed and checked entries of one version (path, mtime, size) of a measured file."""
    try:
        entries = json.loads(Path(path).read_text())["entries"]
        for i, e in enumerate(entries):
            for field, kind in _ENTRY_TYPES.items():
                if not isinstance(e.get(field), kind):
                    raise ValueError(f"entry {i}: {field} must be a {kind.__name__}")
            if e.get("best") not in _IMPLS:
                raise ValueError(f"entry {i}: best must be one of {_IMPLS}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a measured-dispatch file ({e})") from None
    return tuple(entries)
