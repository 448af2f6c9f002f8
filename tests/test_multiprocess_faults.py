"""If one process of a multi-process run dies, the others exit with an error naming the cause
within the configured heartbeat timeout instead of hanging."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mp_launch import distributed_overrides, free_port

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5


def test_survivor_exits_when_a_peer_is_killed(tmp_path):
    port = free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )

    def start(i):
        log = open(tmp_path / f"p{i}.log", "w")
        return subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts/train.py"),
                str(ROOT / "configs/tiny/lm.yaml"),
                f"run.dir={tmp_path}",
                "train.steps=100000",
                "train.log_every=1",
                *distributed_overrides(port, i),
                f"mesh.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    procs = [start(0), start(1)]
    try:
        metrics = tmp_path / "tiny_lm" / "metrics.jsonl"
        deadline = time.time() + 90  # wait until training runs (process 0 logs every step)
        while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        rc = procs[0].wait(timeout=HEARTBEAT_S * 6 + 30)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = (tmp_path / "p0.log").read_text()
    print(f"survivor exited after {waited:.1f} s with {rc}")
    assert rc != 0
    assert waited < HEARTBEAT_S * 6 + 30
    assert "another task died" in log or "heartbeat" in log, log[-2000:]
