"""configs/sft_chat.yaml end to end: generated chat data, a pretrained run, fine-tuning from its
weights with the loss on assistant turns only (small model dimensions, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jax_setup import cpu_env

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plot=false",
]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cpu_env(1),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sft_config_fine_tunes_a_pretrained_run_on_generated_chats(tmp_path):
    chats = tmp_path / "data" / "chat.jsonl"
    _run("scripts/make_chat_data.py", str(chats), "--n", "600")
    runs = [f"run.dir={tmp_path / 'runs'}", *SMALL]
    _run(
        "scripts/train.py",
        "configs/default.yaml",
        *runs,
        "run.name=pre",
        "train.steps=4",
        "data.max_bytes=200000",
        "train.sample_tokens=0",
    )
    done = _run(
        "scripts/train.py",
        "configs/sft_chat.yaml",
        *runs,
        f"data.paths=[{chats}]",
        f"checkpoint.resume={tmp_path / 'runs' / 'pre'}",
        "train.steps=30",
        "train.eval_every=30",
        "train.log_every=5",
    )
    assert "initialized params from" in done.stderr and "step 4" in done.stderr
    assert "sample:\nUser: reverse: lamp\nAssistant: " in done.stdout
    rows = [
        json.loads(x) for x in (tmp_path / "runs/sft_chat/metrics.jsonl").read_text().splitlines()
    ]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    evals = [r["loss"] for r in rows if r["split"] == "eval"]
    assert len(evals) == 1 and train[-1] < train[0], train
