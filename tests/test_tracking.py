"""Weights & Biases logging (metrics.wandb, framework.train.tracking): offline runs only, no
network. The offline run's `.wandb` file (a LevelDB-style log of protobuf records, which wandb
0.30 has no Python reader for) is read back here, so every key of metrics.jsonl is checked
against what W&B would upload."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import wandb  # in the dev extra: these tests run wherever the suite does
from jax_setup import cpu_env
from wandb.proto import wandb_internal_pb2

from framework.config import load_config
from framework.errors import ConfigError
from framework.train import build, tracking, train
from framework.train.config import Config
from framework.train.hooks import default_hooks

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
SHORT = ["train.steps=10", "train.log_every=5", "train.eval_every=10", "checkpoint.every=5"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    (tmp_path / "wandb_dir").mkdir()


def _train(tmp_path, *overrides):
    cfg = load_config(
        Config, TINY, [f"run.dir={tmp_path / 'runs'}", "metrics.wandb.project=t", *overrides]
    )
    return train(build(cfg))


def _records(path: Path):
    """The protobuf records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks, each a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's tail shorter than a header is padding."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeroed rest of a block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_runs(tmp_path) -> list[Path]:
    """The offline-run folders under $WANDB_DIR/wandb, oldest first."""
    return sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))


def _history(run_folder: Path) -> tuple[str, dict[int, dict]]:
    """(the run id, {step: {key: value}}) of one offline run."""
    (path,) = run_folder.glob("*.wandb")
    run_id, history = None, {}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.setdefault(record.history.step.num, {}).update(items)
    return run_id, history


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_metric_of_metrics_jsonl_reaches_the_wandb_run(tmp_path):
    summary = _train(tmp_path, *SHORT)
    run_dir = Path(summary["run_dir"])
    (folder,) = _offline_runs(tmp_path)
    run_id, history = _history(folder)
    assert run_id == (run_dir / tracking.ID_FILE).read_text().strip()
    records = _jsonl(run_dir)
    assert {r["split"] for r in records} == {"train", "eval"}
    assert len(records) == 3  # train at 5 and 10, eval at 10
    for record in records:
        logged = history[record["step"]]
        for key, value in record.items():
            if key in ("step", "split", "time"):
                continue
            name = f"{record['split']}/{key}"
            assert name in logged, (name, sorted(logged))
            assert logged[name] == pytest.approx(value, rel=1e-6), name
    assert sorted(history) == sorted({r["step"] for r in records})
    # the W&B run's config is the resolved config; its name defaults to run.name
    assert (folder / "files").is_dir()


def test_a_restart_continues_the_same_wandb_run(tmp_path):
    first = _train(tmp_path, *SHORT, "train.stop_at=5")
    assert first["stopped"] == "train.stop_at=5"
    run_dir = Path(first["run_dir"])
    first_id = (run_dir / tracking.ID_FILE).read_text().strip()
    second = _train(tmp_path, *SHORT)
    assert second["start_step"] == 5 and second["step"] == 10
    assert (run_dir / tracking.ID_FILE).read_text().strip() == first_id
    folders = _offline_runs(tmp_path)
    assert len(folders) == 2
    (id_a, hist_a), (id_b, hist_b) = (_history(f) for f in folders)
    assert id_a == id_b == first_id
    assert sorted(hist_a) == [5] and sorted(hist_b) == [10]
    # a run started again from step 0 (no checkpoint) is a new W&B run
    _train(tmp_path, *SHORT, "checkpoint.resume=fresh")
    assert (run_dir / tracking.ID_FILE).read_text().strip() != first_id


def test_run_id_is_reused_only_when_resuming(tmp_path):
    new, resumed = tracking.run_id(tmp_path, 0)
    assert not resumed and (tmp_path / tracking.ID_FILE).read_text().strip() == new
    assert tracking.run_id(tmp_path, 7) == (new, True)
    assert tracking.run_id(tmp_path, 0)[0] != new


def test_other_processes_log_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("wandb.init called on a process other than 0")

    monkeypatch.setattr(wandb, "init", refuse)
    alone = tmp_path / "alone"
    alone.mkdir()
    settings = Config.model_validate(
        {"model": {"name": "transformer"}, "metrics": {"wandb": {"project": "t"}}}
    ).metrics.wandb
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_index", lambda *a, **k: 1)
        tracker = tracking.WandbTracker(settings, alone, run_name="r")
        tracker.write(5, {"loss": 1.0})
        tracker.close()
    assert not tracker.enabled and list(alone.iterdir()) == []
    # a short training with the hooks process 1 gets (a whole training with process_index
    # patched would wait on collectives for the missing process 0)
    cfg = load_config(
        Config, TINY, [f"run.dir={tmp_path / 'runs'}", "metrics.wandb.project=t", *SHORT]
    )
    run = build(cfg)
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_index", lambda *a, **k: 1)
        hooks = default_hooks(run)
    summary = train(run, hooks)
    assert summary["step"] == 10
    run_dir = Path(summary["run_dir"])
    assert not (run_dir / tracking.ID_FILE).exists() and not (run_dir / "metrics.jsonl").exists()
    assert not (tmp_path / "wandb_dir" / "wandb").exists()


def test_nonfinite_values_stay_out_of_wandb_like_tensorboard(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finished")

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    settings = Config.model_validate(
        {"model": {"name": "transformer"}, "metrics": {"wandb": {}}}
    ).metrics.wandb
    with tracking.WandbTracker(settings, tmp_path, run_name="r") as tracker:
        tracker.write(3, {"loss": float("nan"), "grad_norm": 2}, "train")
        tracker.write(3, {"loss": 1.5}, "eval")
    assert logged == [(3, {"train/grad_norm": 2}), (3, {"eval/loss": 1.5}), "finished"]


def test_missing_wandb_is_a_config_error_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r"metrics\.wandb.*pip install -e '\.\[track\]'"):
        tracking.check_available(object())
    tracking.check_available(None)  # off: wandb is never looked for


def test_missing_wandb_exits_2_with_one_line(tmp_path):
    fake = tmp_path / "no_wandb"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\")\n")
    env = cpu_env(8)
    env["PYTHONPATH"] = f"{fake}:{env.get('PYTHONPATH', '')}"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            str(TINY),
            f"run.dir={tmp_path / 'runs'}",
            "metrics.wandb.project=t",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "metrics.wandb" in lines[0] and "pip install -e '.[track]'" in lines[0], lines[0]
    assert "Traceback" not in done.stderr
