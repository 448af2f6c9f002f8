"""Measure input-pipeline throughput (batches/s, tokens/s), to compare with a step's consumption.

    python scripts/bench_data.py                       # default DataConfig(): stdlib, 256 x 32
    python scripts/bench_data.py --batches 500 --set seq_len=1024 --set worker_count=2 --out b.json

Startup (reading + tokenizing the corpus) and the first batch are timed separately from the
steady state. Prints a table and, with --out, writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import pydantic
import yaml

from framework.data import DataConfig, make_loaders
from framework.errors import DataError


def _config(overrides: list[str]) -> DataConfig:
    """DataConfig() with `key=value` overrides (values parsed as YAML)."""
    fields = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--set expects key=value, got {item!r}")
        fields[key.strip()] = yaml.safe_load(value)
    try:
        return DataConfig(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise DataError(f"data.{'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def bench(cfg: DataConfig, n_batches: int, repeats: int) -> dict:
    """Time loader construction, the first batch, and `repeats` runs of `n_batches` batches."""
    t0 = time.perf_counter()
    loader, eval_set, meta = make_loaders(cfg)
    t1 = time.perf_counter()
    batch = next(loader)
    t2 = time.perf_counter()
    items_per_row = cfg.seq_len if "targets" in batch else 1
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        runs.append(time.perf_counter() - start)
    e0 = time.perf_counter()
    n_eval = sum(1 for _ in eval_set.batches(min(eval_set.num_batches, n_batches)))
    e1 = time.perf_counter()
    loader.close()
    best = min(runs)
    rows = loader.local_batch
    return {
        "config": cfg.model_dump(),
        "python": platform.python_version(),
        "startup_s": t1 - t0,
        "first_batch_s": t2 - t1,
        "batches": n_batches,
        "repeats": repeats,
        "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
        "seconds_best": best,
        "seconds_median": sorted(runs)[len(runs) // 2],
        "batches_per_s": n_batches / best,
        "examples_per_s": n_batches * rows / best,
        "tokens_per_s": n_batches * rows * items_per_row / best if items_per_row > 1 else None,
        "eval_batches_per_s": n_eval / (e1 - e0) if n_eval else None,
        "meta": meta,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DataConfig override, e.g. --set seq_len=1024 (repeatable)",
    )
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    try:
        result = bench(_config(args.set), args.batches, args.repeats)
    except DataError as e:
        print(f"bench_data.py: error: {e}", file=sys.stderr)
        return 2
    tok = result["tokens_per_s"]
    rows = [
        ("startup (read + tokenize)", f"{result['startup_s']:.3f} s"),
        ("first batch", f"{result['first_batch_s'] * 1e3:.1f} ms"),
        ("batch shapes", str(result["batch_shapes"])),
        ("batches/s", f"{result['batches_per_s']:,.0f}"),
        ("examples/s", f"{result['examples_per_s']:,.0f}"),
        ("tokens/s", f"{tok:,.0f}" if tok else "-"),
        ("eval batches/s", f"{result['eval_batches_per_s'] or 0:,.0f}"),
        (
            "train/val tokens",
            f"{result['meta']['train_tokens']:,} / {result['meta']['val_tokens']:,}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
