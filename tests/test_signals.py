"""Stop signals (issue 10 item 6): a Ctrl-C during the first compile is a clean stop (it
segfaulted), a second signal never cuts a checkpoint save short, a third aborts."""

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from jax_setup import cpu_env

from framework.config import load_config
from framework.train import build, signals, train
from framework.train.config import Config, TrainConfig
from framework.train.context import Context
from framework.train.hooks import StopOnSignal
from framework.train.resume import plan_resume, restore_or_init
from framework.train.signals import STOP, stop_signals

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
_NO_RUN = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig()))  # for a bare Context


def test_first_signal_stops_second_warns_third_aborts(monkeypatch, caplog):
    before = signal.getsignal(signal.SIGTERM)
    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    with caplog.at_level(logging.WARNING, "framework.train.signals"), stop_signals():
        with stop_signals():  # nested (scripts/train.py, then train()): one shared state
            assert signal.getsignal(signal.SIGINT) is STOP
            signal.raise_signal(signal.SIGTERM)  # the real handler, not a call
            ctx = Context(run=_NO_RUN, state={}, step=5)
            StopOnSignal()(ctx)
            assert ctx.stop_reason == "SIGTERM"
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: a save goes on
            assert "already stopping (saving a checkpoint)" in caplog.text
            assert not exits
            signal.raise_signal(signal.SIGTERM)
            assert exits == [130] and "aborting now" in caplog.text
        assert STOP.signum == signal.SIGTERM  # the inner block keeps what the outer records
    assert signal.getsignal(signal.SIGTERM) == before
    assert STOP.signum is None and STOP.count == 0  # the next run in this process starts clean


def _train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    script = ROOT / "scripts/train.py"
    return [sys.executable, str(script), str(TINY), f"run.dir={run_dir}", *overrides]


def _wait_for(done, proc: subprocess.Popen, err: Path, timeout: float = 300) -> None:
    """Until `done()` holds, while `proc` (writing its stderr to `err`) runs."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, err.read_text()[-3000:]
        assert time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.01)


def test_sigint_during_the_first_compile_stops_cleanly_5_of_5(tmp_path):
    procs, errs = [], []
    for i in range(5):  # together: about one try's wall time for five
        errs.append(tmp_path / f"{i}.err")
        with open(errs[-1], "w") as err:
            cmd = _train_cmd(tmp_path / str(i))
            env = cpu_env(cache=False)  # a compile for the signal to interrupt, not a cache hit
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            )
    try:
        waiting = set(range(5))
        deadline = time.monotonic() + 240
        while waiting:  # each as soon as train() has locked its directory: init compiles next
            for i in sorted(waiting):
                if (tmp_path / str(i) / "tiny_lm" / ".lock").exists():
                    procs[i].send_signal(signal.SIGINT)
                    waiting.discard(i)
                else:
                    assert procs[i].poll() is None, errs[i].read_text()[-3000:]
            assert time.monotonic() < deadline, f"no lock after 240 s: {sorted(waiting)}"
            time.sleep(0.01)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for proc, out, err in zip(procs, outs, errs, strict=True):
        text = err.read_text()
        assert proc.returncode == 0, text[-3000:]  # it was -11 (segfault) or -2
        assert "stopped before the first step by SIGINT" in out, out
        assert "Traceback" not in text, text[-3000:]


def test_second_sigterm_during_the_save_leaves_a_checkpoint_that_resumes(tmp_path):
    overrides = ("train.steps=100000", "train.log_every=1", "checkpoint.async_save=false")
    err_path = tmp_path / "err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            _train_cmd(tmp_path, *overrides), stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        metrics = tmp_path / "tiny_lm/metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text(), proc, err_path)
        proc.send_signal(signal.SIGTERM)
        # the save follows the step this interrupts
        _wait_for(lambda: "SIGTERM received" in err_path.read_text(), proc, err_path)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 0, err[-3000:]  # it was -15, or -2 with no save
    assert "already stopping (saving a checkpoint)" in err, err[-3000:]
    assert "stopped by SIGTERM at step" in out, out
    step = int(out.split("at step ")[1].split(";")[0])
    cfg = load_config(Config, TINY, [f"run.dir={tmp_path}", *overrides])
    run = build(cfg)
    start = restore_or_init(run, plan_resume(run))  # verifies every checksum
    assert int(start.state["step"]) == step


@pytest.fixture(autouse=True)
def _no_signal_left():
    """Every test leaves the process's stop state as it found it."""
    yield
    assert STOP.signum is None


def test_a_stop_during_build_touches_nothing(tmp_path):
    """A signal that arrived before train() (during build's compiles): the run ends before the
    resume plan, so checkpoint.resume=fresh deletes nothing and no config is written."""
    overrides = [f"run.dir={tmp_path}", "checkpoint.resume=fresh", "train.steps=2"]
    run = build(load_config(Config, TINY, overrides))
    kept = run.run_dir / "checkpoints" / "7"
    kept.mkdir(parents=True)
    with stop_signals():
        signal.raise_signal(signal.SIGTERM)
        summary = train(run)
    assert summary["stopped"] == "SIGTERM" and summary["step"] == summary["start_step"] == 0
    assert kept.is_dir() and not (run.run_dir / "config.yaml").exists()
