"""Plot a run's `metrics.jsonl` to PNGs (loss, throughput) so a run can be read at a glance.

Uses matplotlib's Agg canvas directly (no pyplot), so it never touches global backend state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file, skipping blank lines and a truncated last line (killed run)."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a write cut short by a kill
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return records


def _series(
    records: list[dict[str, Any]], key: str, split: str | None
) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in records of `split` (None: any split); null becomes NaN."""
    steps, values = [], []
    for r in records:
        if key in r and (split is None or r.get("split") == split):
            v = r[key]
            steps.append(int(r["step"]))
            values.append(math.nan if v is None else float(v))
    return steps, values


def _save(fig: Any, path: Path) -> Path:
    """Render a Figure through the Agg canvas to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write run_dir/plots/{loss,throughput}.png from run_dir/metrics.jsonl; return written paths.

    A plot whose metrics never appear in the file is skipped. Raises FileNotFoundError when the
    run dir or its metrics.jsonl is missing.
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_path}")
    records = read_metrics(metrics_path)
    out_dir = run_dir / "plots"
    written: list[Path] = []

    train_loss = _series(records, "loss", "train")
    eval_loss = _series(records, "loss", "eval")
    eval_bpb = _series(records, "bits_per_byte", "eval")
    if train_loss[0] or eval_loss[0] or eval_bpb[0]:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_panels = 2 if eval_bpb[0] else 1
        fig = Figure(figsize=(7, 3.5 * n_panels))
        ax = fig.add_subplot(n_panels, 1, 1)
        if train_loss[0]:
            ax.plot(*train_loss, label="train", linewidth=1)
        if eval_loss[0]:
            ax.plot(*eval_loss, label="eval", marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if train_loss[0] or eval_loss[0]:
            ax.legend()
        if eval_bpb[0]:
            ax2 = fig.add_subplot(n_panels, 1, 2, sharex=ax)
            ax2.plot(*eval_bpb, marker="o", markersize=3, color="tab:green")
            ax2.set_xlabel("step")
            ax2.set_ylabel("eval bits/byte")
            ax2.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "loss.png"))

    tps = _series(records, "tokens_per_s", "train")
    step_time = _series(records, "step_time", "train")
    if tps[0] or step_time[0]:
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 7))
        ax = fig.add_subplot(2, 1, 1)
        ax.plot(*tps, linewidth=1)
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
        ax2.plot(*step_time, linewidth=1, color="tab:orange")
        ax2.set_xlabel("step")
        ax2.set_ylabel("step time (s)")
        ax2.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "throughput.png"))
    return written
