"""scripts/gpu_check.sh: the dry run completes on a CPU and writes a well-formed report; without
a GPU the real run refuses with one line; the measured-dispatch writer merges entries."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

from jax_setup import cpu_env

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra) -> dict:
    env = cpu_env(1)  # one CPU device, the session's other XLA flags and compilation cache
    return {**env, "PYTHON": os.environ.get("PYTHON", "python"), **extra}


def test_dry_run_writes_the_report(tmp_path):
    import sys

    measured = ROOT / "framework/ops/attention_measured.json"
    before = measured.read_bytes() if measured.exists() else None
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=_env(GPU_CHECK_OUT=str(tmp_path), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("gpu_tests", "kernels", "step_tiny"):
        assert f"gpu_check: {name} exit 0" in done.stdout, done.stdout[-3000:]
    report = json.loads((tmp_path / "performance.json").read_text())
    assert report["measured"] and report["dry_run"] and report["card"] == "cpu"
    ops = {(r["op"], r["impl"]) for r in report["kernels"] if "error" not in r}
    for op in ("attention", "rms_norm", "layer_norm", "linear_cross_entropy"):
        assert (op, "pallas") in ops and (op, "xla") in ops, ops
    assert report["train_steps"]["tiny"]["step_s"] > 0
    assert [g["goal"] for g in report["goals"]][0].startswith("flash attention")
    md = (tmp_path / "performance.md").read_text()
    assert "dry run on CPU" in md and "| rms_norm | pallas |" in md and "| tiny |" in md
    # The dry run never touches the committed dispatch file (its entries go to GPU_CHECK_OUT).
    assert (measured.read_bytes() if measured.exists() else None) == before
    assert json.loads((tmp_path / "attention_measured.json").read_text()) == {"entries": []}


def test_real_run_without_a_gpu_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=_env(GPU_CHECK_OUT=str(tmp_path), PYTHON=__import__("sys").executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no GPU backend (jax says 'cpu'); use --dry-run on a CPU"
    ]
    assert not any(tmp_path.iterdir())


def test_dispatch_entries_pick_the_faster_kernel_and_merge(tmp_path):
    bench = _script("bench_kernels")
    row = dict(op="attention", shape=[2, 8192, 16, 16, 128], causal=True, dtype="bfloat16")
    rows = [
        {**row, "impl": "pallas", "fwd_ms": 3.0, "bwd_ms": 9.0},
        {**row, "impl": "cudnn", "fwd_ms": 2.0, "bwd_ms": 6.0},
        {**row, "impl": "xla", "fwd_ms": 20.0, "bwd_ms": 60.0},
        {**row, "impl": "auto", "fwd_ms": 2.0, "bwd_ms": 6.0},
        {**row, "shape": [8, 2048, 16, 16, 128], "impl": "pallas", "fwd_ms": 1, "bwd_ms": 2},
    ]
    entries = bench.dispatch_entries(rows, "NVIDIA H100 80GB HBM3")
    # Only the 8k shape has both kernels timed; cuDNN's 8 ms beats Pallas's 12.
    assert len(entries) == 1
    e = entries[0]
    assert (e["device"], e["seq_len"], e["best"]) == ("nvidia h100 80gb hbm3", 8192, "cudnn")
    assert e["ms"] == {"pallas": 12.0, "cudnn": 8.0, "xla": 80.0}
    path = tmp_path / "measured.json"
    other = {**e, "seq_len": 2048, "best": "pallas"}
    path.write_text(json.dumps({"entries": [other, {**e, "best": "pallas"}]}))
    bench.merge_dispatch(str(path), entries)
    merged = json.loads(path.read_text())["entries"]
    assert sorted((m["seq_len"], m["best"]) for m in merged) == [(2048, "pallas"), (8192, "cudnn")]
