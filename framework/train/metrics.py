"""Training metrics: a JSONL + TensorBoard writer, a progress display, peak FLOP/s and MFU.

`metrics.jsonl` is the source of truth (one flushed JSON object per line, so a killed run keeps
everything logged so far); TensorBoard is a convenience view of the same scalars.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np

PEAK_FLOPS_ENV = "FRAMEWORK_PEAK_FLOPS"

# Keys the writer puts in every record itself; a metric with one of these names would clobber it.
_RESERVED_KEYS = frozenset({"step", "split", "time", "nonfinite"})


def to_number(name: str, value: Any) -> int | float:
    """Turn a Python/numpy/jax scalar into a plain int or float so it can be JSON-encoded."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise TypeError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        return int(arr.item())
    try:
        if arr.dtype.kind in "cUSOM":  # complex, strings, objects, datetimes
            raise TypeError
        return float(arr.astype(np.float64).item())  # astype handles bfloat16 (kind "V")
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a real number, got {arr.dtype}") from None


def scalars(numbers: Mapping[str, int | float], split: str) -> dict[str, int | float]:
    """The finite values of `to_number`-converted metrics as `split/name` tags, as TensorBoard
    and W&B take them (non-finite ones stay in the JSONL only, as null)."""
    return {
        f"{split}/{name}": number
        for name, number in numbers.items()
        if not (isinstance(number, float) and not math.isfinite(number))
    }


def trim_records(path: Path, step: int) -> int:
    """Prepare `path` for a run resuming at `step`: keep the records of steps <= `step` (the run
    writes later steps again, so none is duplicated) and drop lines that do not parse (a write
    torn by a kill). Rewritten atomically; returns the number of lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsWriter:
    """Append scalar metrics to `run_dir/metrics.jsonl` and to TensorBoard (`run_dir/tensorboard`).

    Non-finite values are written as JSON `null` and their names listed under `"nonfinite"`, so
    every line stays standard JSON (they are not sent to TensorBoard). With `enabled=False`
    (every process but 0) all methods are no-ops and nothing is created on disk.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            trim_records(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported only when TensorBoard is on

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        """Append one record `{"step", "split", "time", **metrics}` and flush it to disk."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        clash = _RESERVED_KEYS.intersection(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved by MetricsWriter")
        now = time.time()
        step = int(step)
        record: dict[str, Any] = {"step": step, "split": split, "time": now}
        numbers = {name: to_number(name, value) for name, value in metrics.items()}
        nonfinite = [k for k, v in numbers.items() if isinstance(v, float) and not math.isfinite(v)]
        record.update({k: None if k in nonfinite else v for k, v in numbers.items()})
        if self._tb is not None:  # non-finite values go only to the JSONL (as null)
            for tag, number in scalars(numbers, split).items():
                self._tb.add_scalar(tag, float(number), global_step=step, walltime=now)
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format_duration(seconds: float) -> str:
    """Render a duration compactly for the ETA field: 45s, 1m02s, 2h03m, 1d04h."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
    """Show step, loss, tokens/s and ETA: a tqdm bar on a TTY, else one plain line per update.

    Reads `metrics["loss"]` and `metrics["tokens_per_s"]` when present. `stream` defaults to
    stderr. With `enabled=False` (every process but 0) nothing is shown.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._t_start = time.monotonic()
        self._anchor: tuple[float, int] | None = None  # (time, step) of the first update
        self._bar: Any = None
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
            )

    def _eta(self, step: int, metrics: Mapping[str, float]) -> float:
        """Seconds left, from the wall-clock rate since the first update (excludes compile)."""
        now = time.monotonic()
        remaining = max(self.total_steps - step, 0)
        if self._anchor is None:
            self._anchor = (now, step)
            if "step_time" in metrics:
                return remaining * float(metrics["step_time"])
            t0, s0 = self._t_start, self.start_step
        else:
            t0, s0 = self._anchor
        if step <= s0 or now <= t0:
            return math.nan
        return remaining * (now - t0) / (step - s0)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Report progress at `step` (called once per log interval by the trainer)."""
        if not self.enabled:
            return
        step = int(step)
        fields = []
        if "loss" in metrics:
            fields.append(f"loss {float(metrics['loss']):.4f}")
        if "tokens_per_s" in metrics:
            fields.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(" | ".join(fields), refresh=True)
            return
        eta = self._eta(step, metrics)
        line = " | ".join(
            [f"step {step}/{self.total_steps}", *fields, f"eta {_format_duration(eta)}"]
        )
        print(line, file=self.stream, flush=True)

    def log(self, message: str) -> None:
        """Print a message without breaking the tqdm bar (e.g. eval results)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar (if any); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Dense (no structured sparsity) peak FLOP/s per device, from vendor datasheets. "float32" is the
# non-tensor-core rate; "tfloat32" is the TF32 tensor-core rate, which XLA may use for f32 matmuls
# at default precision on Ampere and newer. Matched by substring of `device.device_kind`, first
# match wins, so more specific names come first ("GH200"/"H200 NVL" before "H200", "L40S"/"L40"
# before "L4", "H100 PCIe" before "H100").
_ACCEL_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (
        "GH200",
        "NVIDIA GH200",
        {"bfloat16": 989e12, "float16": 989e12, "tfloat32": 494.7e12, "float32": 67e12},
    ),
    (
        "H200 NVL",
        "NVIDIA H200 NVL",
        {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    ),
    (
        "H200",
        "NVIDIA H200 SXM",
        {"bfloat16": 989e12, "float16": 989e12, "tfloat32": 494.7e12, "float32": 67e12},
    ),
    (
        "H100 PCIe",
        "NVIDIA H100 PCIe",
        {"bfloat16": 756e12, "float16": 756e12, "tfloat32": 378e12, "float32": 51e12},
    ),
    (
        "H100 NVL",
        "NVIDIA H100 NVL",
        {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    ),
    (
        "H100",
        "NVIDIA H100 SXM",
        {"bfloat16": 989e12, "float16": 989e12, "tfloat32": 494.7e12, "float32": 67e12},
    ),
    (
        "A100",
        "NVIDIA A100",
        {"bfloat16": 312e12, "float16": 312e12, "tfloat32": 156e12, "float32": 19.5e12},
    ),
    (
        "L40S",
        "NVIDIA L40S",
        {"bfloat16": 362e12, "float16": 362e12, "tfloat32": 183e12, "float32": 91.6e12},
    ),
    (
        "L40",
        "NVIDIA L40",
        {"bfloat16": 181e12, "float16": 181e12, "tfloat32": 90.5e12, "float32": 90.5e12},
    ),
    (
        "L4",
        "NVIDIA L4",
        {"bfloat16": 121e12, "float16": 121e12, "tfloat32": 60e12, "float32": 30.3e12},
    ),
    ("V100", "NVIDIA V100 (no bf16 tensor cores)", {"float16": 125e12, "float32": 15.7e12}),
    ("TPU v6 lite", "Google TPU v6e", {"bfloat16": 918e12, "float16": 918e12}),
    ("TPU v5 lite", "Google TPU v5e", {"bfloat16": 197e12, "float16": 197e12}),
    ("TPU v5", "Google TPU v5p", {"bfloat16": 459e12, "float16": 459e12}),
    ("TPU v4", "Google TPU v4", {"bfloat16": 275e12, "float16": 275e12}),
)

_DTYPES = ("bfloat16", "float16", "tfloat32", "float32")
_CPU_CLOCK_HZ = 2.5e9
_CPU_FLOPS_PER_CYCLE = 32  # f32, AVX2: 2 FMA units x 8 lanes x 2 FLOP


def peak_flops_per_device(
    device: jax.Device | None = None, dtype: str = "bfloat16"
) -> tuple[float, str]:
    """Return (peak dense FLOP/s of one device, where the number came from), for MFU.

    `$FRAMEWORK_PEAK_FLOPS` overrides everything. Unknown accelerators give NaN (so MFU shows
    as null rather than a made-up number); CPUs get a stated rough estimate.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"${PEAK_FLOPS_ENV}={override!r} is not a number") from None
        if not value > 0:
            raise ValueError(f"${PEAK_FLOPS_ENV}={override!r} must be positive")
        return value, f"${PEAK_FLOPS_ENV}"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if device is None:
        device = jax.devices()[0]
    kind = device.device_kind

    if device.platform == "cpu":
        n_cpu_devices = max(len(jax.local_devices(backend="cpu")), 1)
        cores = (os.cpu_count() or 1) / n_cpu_devices
        peak = cores * _CPU_CLOCK_HZ * _CPU_FLOPS_PER_CYCLE
        return peak, (
            f"CPU estimate: {cores:g} cores/device ({os.cpu_count()} cores / {n_cpu_devices} "
            f"CPU devices) x {_CPU_CLOCK_HZ / 1e9:g} GHz assumed x {_CPU_FLOPS_PER_CYCLE} "
            f"f32 FLOP/cycle (AVX2 FMA), used for every dtype"
        )

    return table_peak_flops(kind, dtype)


def table_peak_flops(device_kind: str, dtype: str = "bfloat16") -> tuple[float, str]:
    """(the datasheet's peak dense FLOP/s of an accelerator named `device_kind` as jax names
    it, where it came from); NaN for a kind or dtype the table lacks."""
    for needle, name, peaks in _ACCEL_PEAKS:
        if needle.lower() in device_kind.lower():
            if dtype in peaks:
                note = " (non-tensor-core)" if dtype == "float32" else ""
                return peaks[dtype], f"table: {name} dense {dtype}{note}"
            return math.nan, f"table: {name} has no {dtype} peak; set ${PEAK_FLOPS_ENV}"
    return math.nan, f"unknown device kind {device_kind!r}; set ${PEAK_FLOPS_ENV}"


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak FLOP/s."""
    if n_devices <= 0:
        raise ValueError(f"n_devices must be positive, got {n_devices}")
    if math.isnan(peak_per_device):
        return math.nan
    if peak_per_device <= 0:
        raise ValueError(f"peak_per_device must be positive, got {peak_per_device}")
    return tokens_per_s * flops_per_token / (n_devices * peak_per_device)
