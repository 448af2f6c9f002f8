"""One run per directory (issue 10 item 3): a second run on a locked run directory is a
ConfigError naming the holder, before `resume=fresh` can delete anything; the lock goes with
the run however it ends, and a lock file left by a killed run is taken over."""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.config import load_config
from framework.errors import ConfigError
from framework.train import Hook, build, train
from framework.train.config import Config
from framework.train.lock import LOCK_FILE, run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"

HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "noon"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LM run whose checkpoints a `resume=fresh` would delete."""
    run_dir = tmp_path_factory.mktemp("locked")
    cfg = load_config(Config, TINY, [f"run.dir={run_dir}", "checkpoint.resume=fresh"])
    out = build(cfg)
    (out.run_dir / "checkpoints" / "10").mkdir(parents=True)
    return out


class Boom(Hook):
    def start(self, ctx):
        raise RuntimeError("boom")


class StopAtStart(Hook):
    def start(self, ctx):
        ctx.stop("test")  # a normal end, without compiling a step


def test_a_held_lock_refuses_the_run_and_fresh_deletes_nothing(run):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run.run_dir / LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on"):
            train(run)
    finally:
        holder.kill()
        holder.wait()
    assert (run.run_dir / "checkpoints" / "10").is_dir()
    assert not (run.run_dir / "config.yaml").exists()  # written only once the lock is held


def test_the_lock_goes_with_the_run_however_it_ends(run, caplog):
    lock = run.run_dir / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "gone", "started": "dawn"}))  # killed run
    with caplog.at_level(logging.WARNING, "framework.train.lock"):
        summary = train(run, [StopAtStart()])
    assert "did not end cleanly (pid 1 on gone, since dawn)" in caplog.text
    assert summary["stopped"] == "test" and lock.read_text() == ""  # released, nobody named
    with pytest.raises(RuntimeError, match="boom"):
        train(run, [Boom()])
    with run_lock(run.run_dir):  # released after the exception too
        assert json.loads(lock.read_text())["pid"] > 1


def test_two_runs_started_together_one_trains_the_other_exits_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), str(TINY), f"run.dir={tmp_path}"]
    cmd.append("train.steps=100000")  # the winner is still running when the loser checks
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    deadline = time.monotonic() + 240
    while all(p.poll() is None for p in procs):  # until the loser has exited
        assert time.monotonic() < deadline, "neither run stopped"
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # the winner stops with a checkpoint, exit 0
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    winner = next(p for p in procs if p.returncode == 0)
    err = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert f"in use by another run (pid {winner.pid} on" in err, err
