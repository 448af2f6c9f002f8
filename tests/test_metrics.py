"""Metrics writer, progress display, peak FLOP/s / MFU, and run plots."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.train.metrics import (
    PEAK_FLOPS_ENV,
    MetricsWriter,
    Progress,
    mfu,
    peak_flops_per_device,
    trim_records,
)
from framework.train.plots import plot_run

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(10, {"loss": jnp.float32(2.5), "tokens_per_s": np.float64(1234.0), "tokens": 640})
        w.write(20, {"loss": 1.5, "bits_per_byte": 1.1}, split="eval")
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [10, 20]
    assert [r["split"] for r in recs] == ["train", "eval"]
    assert recs[0]["loss"] == 2.5 and recs[0]["tokens_per_s"] == 1234.0 and recs[0]["tokens"] == 640
    assert isinstance(recs[0]["time"], float) and recs[1]["bits_per_byte"] == 1.1


def test_jsonl_appends_and_nonfinite_is_null(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": 1.0})
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # a resumed run appends
        w.write(2, {"loss": float("nan"), "grad_norm": jnp.inf, "lr": 1e-3})
    recs = _lines(tmp_path / "metrics.jsonl")
    assert len(recs) == 2
    assert recs[1]["loss"] is None and recs[1]["grad_norm"] is None
    assert sorted(recs[1]["nonfinite"]) == ["grad_norm", "loss"] and recs[1]["lr"] == 1e-3
    assert "nonfinite" not in recs[0]


def test_writer_rejects_reserved_and_non_scalar(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 3.0})
        with pytest.raises(TypeError, match="scalar"):
            w.write(1, {"loss": np.ones(3)})


def test_disabled_writer_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricsWriter(run, enabled=False) as w:
        w.write(1, {"loss": 1.0})
    assert not run.exists()


def test_tensorboard_event_file(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_plain_lines():
    stream = io.StringIO()
    p = Progress(1000, start_step=100, stream=stream)
    p.update(120, {"loss": 2.34123, "tokens_per_s": 12345.0, "step_time": 0.5})
    p.update(140, {"loss": 2.2, "tokens_per_s": 12000.0})
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 120/1000 | loss 2.3412 | 12,345 tok/s | eta ")
    assert lines[0].endswith("eta 7m20s")  # 880 steps left x 0.5 s from step_time
    assert all("tok/s" in ln and "eta" in ln and "loss" in ln for ln in lines)


def test_progress_disabled_prints_nothing():
    stream = io.StringIO()
    p = Progress(10, enabled=False, stream=stream)
    p.update(5, {"loss": 1.0})
    p.log("hello")
    p.close()
    assert stream.getvalue() == ""


def test_mfu_arithmetic():
    # 1e5 tok/s x 6e9 FLOP/tok = 6e14 FLOP/s over 2 x 1e15 peak = 0.3
    assert mfu(1e5, 6e9, 2, 1e15) == pytest.approx(0.3)
    assert math.isnan(mfu(1e5, 6e9, 2, math.nan))
    with pytest.raises(ValueError):
        mfu(1e5, 6e9, 0, 1e15)


def test_peak_flops_cpu_and_override(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    peak, source = peak_flops_per_device(jax.devices("cpu")[0])
    assert peak > 0 and math.isfinite(peak) and "CPU" in source
    peak_default, _ = peak_flops_per_device()
    assert peak_default > 0
    monkeypatch.setenv(PEAK_FLOPS_ENV, "1.5e14")
    assert peak_flops_per_device() == (1.5e14, f"${PEAK_FLOPS_ENV}")
    monkeypatch.setenv(PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError):
        peak_flops_per_device()


def test_plot_run_writes_pngs(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(10, 110, 10):
            w.write(step, {"loss": 3.0 / step**0.2, "tokens_per_s": 1e4 + step, "step_time": 0.1})
            if step % 50 == 0:
                w.write(step, {"loss": 3.1 / step**0.2, "bits_per_byte": 1.2}, split="eval")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 110, "spl')  # a line cut short by a killed run is skipped
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["loss.png", "throughput.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC


def test_plot_script_missing_dir_exits_2(tmp_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "not found" in res.stderr


def test_resuming_trims_replayed_steps_and_a_torn_line(tmp_path):
    """A run resumed at step 10 rewrites steps 11+: their old records and a torn last line go,
    so no step appears twice and the file parses (and plots) after the restart."""
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (5, 10, 15):
            w.write(step, {"loss": 1.0 / step})
        w.write(10, {"loss": 0.5}, split="eval")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "spl')  # cut short by a kill
    assert trim_records(tmp_path / "metrics.jsonl", 10) == 2
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=10) as w:
        w.write(15, {"loss": 0.07})
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in recs] == [
        (5, "train"),
        (10, "train"),
        (10, "eval"),
        (15, "train"),
    ]
    assert recs[-1]["loss"] == 0.07
    assert plot_run(tmp_path)
