"""Faults in a 2-process run: a survivor of a dead peer exits within the heartbeat timeout with
one line and status 1 (not jax's SIGABRT and C++ stack); a SIGTERM to one process stops every
process at the same step with a checkpoint, each naming the signal."""

import signal
import sys
import time
from pathlib import Path

from mp_launch import distributed_overrides, free_port, start_all, stop_all

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5


def _start(tmp_path: Path) -> list:
    """Two processes training the tiny LM "forever"; returns once both are stepping."""
    port = free_port()
    commands = [
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            str(ROOT / "configs/tiny/lm.yaml"),
            f"run.dir={tmp_path}",
            "train.steps=100000",
            "train.log_every=1",
            *distributed_overrides(port, i),
            f"mesh.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
        ]
        for i in range(2)
    ]
    procs = start_all(commands, tmp_path, cwd=ROOT)
    metrics = tmp_path / "tiny_lm" / "metrics.jsonl"
    deadline = time.time() + 90  # process 0 logs every step once training runs
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), (tmp_path / "p0.err").read_text()
        time.sleep(0.5)
    return procs


def test_survivor_of_a_killed_peer_exits_1_with_one_line(tmp_path):
    procs = _start(tmp_path)
    try:
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        rc = procs[0].wait(timeout=HEARTBEAT_S * 4)
        waited = time.time() - killed_at
    finally:
        stop_all(procs)
    err = (tmp_path / "p0.err").read_text()
    assert rc == 1, err[-2000:]  # not -6 (SIGABRT)
    assert waited < HEARTBEAT_S * 2, waited
    last = err.strip().splitlines()[-1]
    assert "process 1 of 2 stopped responding" in last, err[-2000:]
    assert "Check failure" not in err and "Terminating process" not in err, err[-2000:]


def test_sigterm_to_one_process_stops_both_naming_the_signal(tmp_path):
    procs = _start(tmp_path)
    try:
        procs[1].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=60) for p in procs]
    finally:
        stop_all(procs)
    outs = [(tmp_path / f"p{i}.out").read_text() for i in range(2)]
    assert rcs == [0, 0], [(tmp_path / f"p{i}.err").read_text()[-2000:] for i in range(2)]
    for out in outs:
        assert "stopped by SIGTERM" in out, out
