"""Write docs/performance.md and performance.json from the GPU check's results:

    python scripts/perf_report.py --results DIR --out DIR [--not-measured]

DIR holds what scripts/gpu_check.sh wrote: kernels.json (bench_kernels.py), step_*.json
(bench_step.py), gpu_tests.log, env.json. `--not-measured` writes the page without numbers
(what the repository ships until a GPU runs the check)."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Any

# (goal, unit, target); H100, bf16, from issues 11 and 14. The attention goals are for our own
# Pallas kernel on Hopper, the Mosaic GPU one (impl=mosaic), not for what impl=auto picks
# (cuDNN where it takes the call); the kernel table lists auto beside it.
GOALS = (
    ("flash attention hd128 causal seq 8k forward, impl=mosaic", "TFLOP/s", 450.0),
    ("flash attention hd128 causal seq 8k backward, impl=mosaic", "TFLOP/s", 350.0),
    ("RMSNorm forward (Pallas)", "TB/s", 2.7),
    ("Llama ~1B train step on one GPU", "MFU %", 45.0),
)
HOW_TO_RUN = """## How to run the check

On a machine with one GPU (the steps' limits add up to 12 minutes; 5 minutes on an H200):

```bash
bash scripts/gpu_check.sh            # writes docs/performance.md, docs/performance.json and
                                     # framework/ops/attention_measured.json
bash scripts/gpu_check.sh --dry-run  # on a CPU: every step with tiny shapes, output to a temp dir
```

It runs, each step under its own time limit: the GPU-marked tests compiled (`pytest -m gpu`),
the kernel benchmarks (`scripts/bench_kernels.py --suite gpu_check`: flash attention forward
and backward, causal, bf16, head dim 128, seq 2k and 8k, 16k tokens per call: Triton, Mosaic
GPU on Hopper, cuDNN, XLA and `auto`; RMSNorm and LayerNorm GB/s vs XLA; fused cross-entropy
time and peak scratch memory vs chunked and XLA at vocab 32k and 128k), and train-step
benchmarks on one GPU for gpt2_small and llama_1b with bf16 compute on synthetic tokens
(`scripts/bench_step.py`: step time, tokens/s, MFU against the card's peak dense bf16
FLOP/s). The attention goals read the Mosaic GPU kernel's rows (our own Pallas kernel). The
measured attention entries go to `framework/ops/attention_measured.json`, which `impl=auto`
reads. Where only one folder comes back from the machine (a lent device's `$OUT`), point both there:
`GPU_CHECK_OUT=$OUT GPU_CHECK_DISPATCH=$OUT/attention_measured.json bash scripts/gpu_check.sh`,
then copy `performance.md`, `performance.json` into docs/ and the dispatch file into
framework/ops/.

## Preparing a GPU machine without network

Machines without network that lack some dependencies (the lent H100/H200 machines have jax
0.11.2 with the CUDA 13 plugin, but not grain, pydantic or tensorboardX) take them as wheels
carried in `.whl/` at the repository root (git-ignored); `gpu_check.sh` installs them into
`/tmp/site` first. Prepare them on a machine with network:

```bash
bash scripts/gpu_wheels.sh   # Python 3.12 manylinux wheels of the missing packages -> .whl/
```
"""


def _load(path: str, problems: list[str]) -> Any:
    """The JSON at path, or None (noted in problems) if it is missing or damaged: a report
    of what was measured is still worth writing after a step timed out."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{os.path.basename(path)}: {type(e).__name__}")
        return None


def reached(kernels: list[dict], steps: dict[str, dict]) -> list[float | None]:
    """The measured value for each of GOALS (None where the results lack it)."""

    def attn(key: str) -> float | None:
        rows = [
            r
            for r in kernels
            if r["op"] == "attention"
            and r["impl"] == "mosaic"
            and r["causal"]
            and r["shape"][1] == 8192
            and r["shape"][4] == 128
            and key in r
        ]
        return rows[0][key] if rows else None

    norm = [r["fwd_gbps"] for r in kernels if r["op"] == "rms_norm" and r["impl"] == "pallas"]
    llama = steps.get("llama_1b", {}).get("mfu")
    return [
        attn("fwd_tflops"),
        attn("bwd_tflops"),
        max(norm) / 1000 if norm else None,
        llama * 100 if isinstance(llama, (int, float)) else None,
    ]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _kernel_table(rows: list[dict]) -> list[str]:
    lines = [
        "| op | impl | shape | dtype | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd GB/s "
        "| scratch MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['op']} | {r['impl']} | {r['shape']} | {r['dtype']} | "
                f"error: {r['error']} | | | | | |"
            )
            continue
        bwd_ms = r.get("bwd_ms", (r["fwd_bwd_ms"] - r["fwd_ms"]) if "fwd_bwd_ms" in r else None)
        cells = [
            r.get("fwd_ms"),
            bwd_ms,
            r.get("fwd_tflops"),
            r.get("bwd_tflops"),
            r.get("fwd_gbps"),
            r.get("fwd_bwd_temp_mib"),
        ]
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['shape']} | {r['dtype']} | "
            + " | ".join(_fmt(c) for c in cells)
            + " |"
        )
    return lines


def _predicted(step: dict[str, Any], device_kind: str) -> dict[str, float]:
    """The estimator's peak bytes and step time for a benchmarked step on one card of this
    kind ({} for a card it does not know, e.g. a dry run's CPU)."""
    from framework.config import load_config
    from framework.estimate import estimate, for_device_kind
    from framework.train.config import Config

    gpu = for_device_kind(device_kind)
    if gpu is None:
        return {}
    cfg = load_config(Config, step["config"], step["overrides"])
    e = estimate(cfg, 1, gpu)
    return {"predicted_peak_bytes": e.memory.total, "predicted_step_s": e.seconds["step"]}


def write(results: str | None, out: str, measured: bool, failed: list[str] = ()) -> dict[str, Any]:
    """Write performance.md and performance.json into `out`; return the JSON object."""
    problems = [f"step failed: {name}" for name in failed]
    env = (_load(os.path.join(results, "env.json"), problems) or {}) if measured else {}
    kernels = []
    if measured:
        kernels = (_load(os.path.join(results, "kernels.json"), problems) or {}).get("rows", [])
    steps = {}
    for path in sorted(glob.glob(os.path.join(results, "step_*.json"))) if measured else []:
        data = _load(path, problems)
        if data and "step_s" in data.get("main", {}):
            step = {**data["main"], "config": data["config"], "overrides": data["overrides"]}
            try:
                step.update(_predicted(step, data["device"]))
            except Exception as e:  # noqa: BLE001 (the measurements must still be reported)
                problems.append(f"{os.path.basename(path)}: no prediction ({type(e).__name__})")
            steps[os.path.basename(path)[5:-5]] = step
        elif data:
            problems.append(f"{os.path.basename(path)}: no step time")
    tests = ""
    log = os.path.join(results, "gpu_tests.log") if measured else ""
    if log and os.path.exists(log):
        tail = [line for line in open(log).read().splitlines() if line.strip()]
        tests = tail[-1] if tail else ""
    values = reached(kernels, steps)
    goals = [
        {"goal": g, "unit": u, "target": t, "reached": v, "met": None if v is None else v >= t}
        for (g, u, t), v in zip(GOALS, values, strict=True)
    ]
    if measured and not env.get("dry_run") and " passed" not in tests:
        problems.append(f"GPU tests: {tests or 'no result'}")
    report = {
        "measured": measured,
        **env,
        "gpu_tests": tests,
        "problems": problems,
        "goals": goals,
        "kernels": kernels,
        "train_steps": steps,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "performance.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = ["# Performance", ""]
    if not measured:
        md += [
            "**Not yet measured: run `bash scripts/gpu_check.sh` on a GPU.** No GPU has been",
            "lent to this project's sessions yet; the goals below are what the check measures.",
            "",
        ]
    else:
        md += [
            f"Measured by `scripts/gpu_check.sh` on {env.get('date', '?')}"
            + (
                " (**dry run on CPU**: interpreted kernels and tiny shapes, not performance)"
                if env.get("dry_run")
                else ""
            )
            + ".",
            "",
            "| card | driver | jax | python |",
            "| --- | --- | --- | --- |",
            f"| {env.get('card', '?')} | {env.get('driver', '?')} | {env.get('jax', '?')} | "
            f"{env.get('python', '?')} |",
            "",
            f"GPU-marked tests: {tests or 'not run'}",
            "",
        ]
        if problems:
            md += ["**Problems:** " + "; ".join(problems) + ".", ""]
    md += ["## Goals (H100, bf16)", "", "| goal | target | reached |", "| --- | --- | --- |"]
    md += [
        f"| {g['goal']} | >= {g['target']:g} {g['unit']} | {_fmt(g['reached'])} |" for g in goals
    ]
    md.append("")
    if kernels:
        md += ["## Kernels", "", *_kernel_table(kernels), ""]
    if steps:
        md += [
            "## Train step (one device)",
            "",
            "Predicted: `scripts/estimate.py` for the same config on one such card "
            "(docs/estimate.md).",
            "",
            "| config | step ms | predicted | peak GiB | predicted | tokens/s | MFU | compile s "
            "| overrides |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in steps.items():
            peak = s.get("measured_peak_bytes")
            md.append(
                f"| {name} | {_fmt(s['step_s'] * 1e3)} | "
                f"{_fmt(s.get('predicted_step_s', math.nan) * 1e3)} | "
                f"{_fmt(peak / 2**30 if peak else None)} | "
                f"{_fmt(s.get('predicted_peak_bytes', math.nan) / 2**30)} | "
                f"{_fmt(s['items_per_s'])} | {_fmt(s.get('mfu'))} | {_fmt(s['compile_s'])} | "
                f"{' '.join(s['overrides'])} |"
            )
        md.append("")
    md.append(HOW_TO_RUN)
    path = os.path.join(out, "performance.md")
    text = "\n".join(md)
    kept = _kept_sections(path, _titles(text))
    with open(path, "w") as f:
        f.write(text + "".join(f"\n{section}" for section in kept))
    return report


def _titles(text: str) -> set[str]:
    return {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}


def _kept_sections(path: str, generated: set[str]) -> list[str]:
    """The `## ` sections of the existing report that this script does not write (e.g. the
    decoding benchmark), so regenerating the GPU part keeps them."""
    if not os.path.exists(path):
        return []
    parts = open(path).read().split("\n## ")[1:]
    return [
        "## " + part.rstrip("\n") + "\n"
        for part in parts
        if part.splitlines()[0].strip() not in generated
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="folder gpu_check.sh wrote its results to")
    parser.add_argument("--out", default="docs", help="folder for performance.md/.json")
    parser.add_argument("--not-measured", action="store_true", help="write the page unmeasured")
    parser.add_argument("--failed", default="", help="space-separated names of failed steps")
    args = parser.parse_args(argv)
    if not args.not_measured and not args.results:
        parser.error("--results is required unless --not-measured")
    write(args.results, args.out, measured=not args.not_measured, failed=args.failed.split())
    print(f"wrote {args.out}/performance.md and performance.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
