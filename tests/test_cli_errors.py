"""Failures through scripts/train.py: one stderr line naming the key or path, exit status 2 for
user mistakes and 1 for the environment's; --debug / FRAMEWORK_DEBUG=1 show the traceback."""

import errno
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax_setup import cpu_env

from framework.config import load_config
from framework.config.loader import parse_value
from framework.errors import CheckpointError, ConfigError
from framework.train import build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/lm.yaml")


def _run(*args, cwd=ROOT):
    env = cpu_env(8)
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
        # refused before anything is allocated (XLA aborted with exit 134)
        ((TINY, "model.d_model=1000000000"), "model.d_model=1000000000"),
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


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    done = _run("--debug", TINY, "run.seed=-1", f"run.dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" in done.stderr and "run.seed" in done.stderr
    monkeypatch.setenv("FRAMEWORK_DEBUG", "1")
    assert _train_script().parse_args([TINY]).debug


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wrapped(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "error, status, needle",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/ckpt/3"), 1, "/ckpt/3"),
        # tensorstore (orbax) reports a full disk as a ValueError carrying the OS error code
        (ValueError("RESOURCE_EXHAUSTED: \"/ckpt/3/d\" [os_error_code='28']"), 1, "/ckpt/3/d"),
        (PermissionError(errno.EPERM, "Operation not permitted", "/ckpt"), 1, "/ckpt"),
        (
            _wrapped(ConfigError("run.dir: cannot create /ro/x"), OSError(errno.EROFS, "ro")),
            1,
            "run.dir",
        ),
        (
            _wrapped(ConfigError("run.dir: cannot create /f/x"), OSError(errno.ENOTDIR, "f")),
            2,
            "run.dir",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file", "/no/data"), 2, "/no/data"),
        (CheckpointError("no checkpoint can be restored"), 1, "checkpoint"),
        (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"), 3, "data.batch_size"),
        (RuntimeError("an internal bug"), None, None),
    ],
)
def test_failures_map_to_one_line_and_status(error, status, needle):
    known = _train_script().failure(error)
    if status is None:
        assert known is None  # shown with its traceback
        return
    assert known[0] == status and needle in known[1] and "\n" not in known[1]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("run.name=" + "a" * 300, "run.name"),
        ("run.name=../escaped", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.seed=1234567890123456789012345678901234567890", "run.seed"),
        ("mesh.distributed.coordinator_address=not-a-host:xx", "coordinator_address"),
    ],
)
def test_invalid_run_keys_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Config, TINY, [override])


def test_unquoted_glob_override_is_a_string():
    assert parse_value("*.txt") == "*.txt"
    cfg = load_config(Config, TINY, ["data.file_pattern=*.txt"])
    assert cfg.data.file_pattern == "*.txt"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.max_seq_len=1000000000"], "model.max_seq_len=1000000000"),
        (["model.d_model=1000000000"], "model.d_model=1000000000"),
        (["data.seq_len=1048576", "model.max_seq_len=1048576"], "data.seq_len=1048576"),
    ],
)
def test_runs_too_big_for_the_devices_are_refused_before_allocating(overrides, needle):
    cfg = load_config(Config, TINY, overrides)
    with pytest.raises(ConfigError, match=f"cannot fit.*{needle}"):
        build(cfg)
