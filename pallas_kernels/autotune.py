"""A small autotuner: time a few kernel configurations once per (kernel, shapes, dtype, device)
and persist the fastest in a JSON cache, so later runs (and other processes) reuse the choice.

Enabled per call or with PALLAS_AUTOTUNE=1; the cache lives at PALLAS_AUTOTUNE_CACHE (default
~/.cache/pallas_kernels/autotune.json). `make_run` must run eagerly even when called while a
jit is tracing: build inputs with numpy and call an AOT-compiled executable."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

CACHE_ENV = "PALLAS_AUTOTUNE_CACHE"
ENABLE_ENV = "PALLAS_AUTOTUNE"


def enabled(flag: bool | None) -> bool:
    """An explicit flag wins; None reads PALLAS_AUTOTUNE."""
    return flag if flag is not None else os.environ.get(ENABLE_ENV, "") == "1"


def cache_path() -> Path:
    default = Path.home() / ".cache" / "pallas_kernels" / "autotune.json"
    return Path(os.environ.get(CACHE_ENV, default))


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged cache: re-tune (and rewrite it)


def _store(path: Path, cache: dict[str, Any]) -> None:
    """Atomic write, so concurrent processes never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def tune(
    kernel: str,
    key: dict[str, Any],
    candidates: Sequence[dict[str, Any]],
    make_run: Callable[[dict[str, Any]], Callable[[], Any]],
    *,
    reps: int = 3,
    path: Path | None = None,
) -> dict[str, Any]:
    """The fastest of `candidates` for this key, from the cache or by timing each once.

    make_run(candidate) returns a no-argument function that runs the kernel on concrete inputs.
    A candidate that fails to compile or run is skipped; if all fail, the first is returned
    (the caller's heuristic) and nothing is cached."""
    path = cache_path() if path is None else path
    entry_key = json.dumps(
        {"kernel": kernel, "device": jax.devices()[0].device_kind, **key},
        sort_keys=True,
        default=str,
    )
    cache = _load(path)
    if entry_key in cache:
        return cache[entry_key]["config"]
    timings: list[tuple[float, dict[str, Any]]] = []
    for cand in candidates:
        try:
            timings.append((_median_seconds(make_run(cand), reps), cand))
        except Exception:  # noqa: BLE001 - an invalid tile for this shape: skip it
            continue
    if not timings:
        return dict(candidates[0])
    best_time, best = min(timings, key=lambda t: t[0])
    cache = _load(path)  # re-read: another process may have written meanwhile
    cache[entry_key] = {
        "config": dict(best),
        "seconds": best_time,
        "tried": [{"config": dict(c), "seconds": s} for s, c in timings],
    }
    _store(path, cache)
    return dict(best)
