"""User mistakes through scripts/train.py: exit status 2 and one stderr line naming the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/lm.yaml")


def _run(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        ((TINY, "optim.lerning_rate=0.1"), "did you mean 'learning_rate'"),
        ((TINY, "train.steps=many"), "train.steps"),
        ((TINY, "data.batch_size=-4"), "data.batch_size"),
        ((TINY, "model.n_heads=3"), "n_heads"),
        ((TINY, "data.batch_size=12"), "data.batch_size"),  # 12 rows over 8 devices
        ((str(ROOT / "configs/missing.yaml"),), "missing.yaml"),
        ((TINY, "data.source=text", "data.paths=[/no/such/dir]"), "/no/such/dir"),
        ((TINY, "data.seq_len=64"), "model.max_seq_len"),
        ((TINY, "model.attention_impl=cudnn"), "attention_impl=cudnn"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, needle, tmp_path):
    done = _run(*args, f"run.dir={tmp_path}")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]
    assert "Traceback" not in done.stderr


def test_bad_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: transformer\n  oops: [\n")
    done = _run(str(bad))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "bad.yaml" in done.stderr or "YAML" in done.stderr
