"""Checkpoint integrity (issue 10 items 1, 2, 4): checksums catch flipped bits, damaged
checkpoints are moved aside (never deleted) with a fallback to the one before, and a changed
config is refused or warned about before anything is read or moved."""

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from framework.config import load_config
from framework.errors import CheckpointError, ConfigError
from framework.train import build, train
from framework.train import checkpoint as ckpt
from framework.train.config import Config
from framework.train.integrity import array_checksums
from framework.train.resume import plan_resume, restore_or_init

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
RUN = (
    "checkpoint.every=2",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.sample_tokens=0",
    "train.plot=false",
    "train.progress=false",
)


def _build(run_dir: Path, *overrides: str):
    """One device: orbax then keeps array data in per-process files without a store-level
    checksum of its own (on several devices it merges them into one checksummed blob), so
    the flips below reach the arrays."""
    cfg = load_config(Config, TINY, [f"run.dir={run_dir}", *RUN, *overrides])
    return build(cfg, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("pristine")
    train(_build(run_dir))
    assert ckpt.step_dirs(run_dir / "tiny_lm/checkpoints") == [2, 4]
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _params(run_dir: Path, step: int):
    reader = ckpt.Checkpointer(
        run_dir / "tiny_lm/checkpoints", ckpt.CheckpointConfig(), read_only=True
    )
    try:
        return reader.read_numpy("params", step)[1]
    finally:
        reader.close()


def _same(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _damaged(run_dir: Path) -> list[str]:
    folder = run_dir / "tiny_lm/checkpoints" / ckpt.DAMAGED
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_checksums_catch_every_single_bit_and_ignore_the_layout():
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
        x = jnp.asarray(rng.standard_normal((16, 24)) * 100).astype(dtype)
        base = array_checksums({"x": x})["x"]
        mesh = jax.make_mesh((8,), ("d",))
        sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("d")))
        assert array_checksums({"x": sharded})["x"] == base
        bits = np.asarray(
            jax.lax.bitcast_convert_type(x, jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32)
        )
        for _ in range(20):
            i, j, b = rng.integers(16), rng.integers(24), rng.integers(bits.dtype.itemsize * 8)
            flipped = bits.copy()
            flipped[i, j] ^= flipped.dtype.type(1 << b)
            y = jax.lax.bitcast_convert_type(jnp.asarray(flipped), dtype)
            assert array_checksums({"x": y})["x"] != base
        swapped = x.at[0, :2].set(x[0, 1::-1])  # same values, two positions exchanged
        if x[0, 0] != x[0, 1]:
            assert array_checksums({"x": swapped})["x"] != base


def test_bit_flips_in_saved_params_never_resume_silently(pristine, tmp_path):
    """Random single-bit flips in the newest checkpoint's stored params, until two have been
    caught by a checksum (at most 30 tries): each restore either falls back to step 2 (the
    damaged step moved aside) or, where the flipped bytes are never read (orbax keeps superseded
    data in its append-only store), gives the step-4 params bitwise. Never different params in
    silence."""
    good = _params(pristine, 4)
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    run = _build(run_dir)
    store = pristine / "tiny_lm/checkpoints/4/params"
    files = sorted(f.relative_to(store) for f in store.rglob("d/*") if f.stat().st_size > 1000)
    caught = []
    for _ in range(30):
        _copy(pristine, run_dir)
        target = run_dir / "tiny_lm/checkpoints/4/params" / rng.choice(files)
        data = bytearray(target.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        start = restore_or_init(run, plan_resume(run))
        if int(start.state["step"]) == 4:
            assert _same(jax.device_get(start.state["params"]), good)
            continue
        assert int(start.state["step"]) == 2
        assert ckpt.step_dirs(run_dir / "tiny_lm/checkpoints") == [2]
        (moved,) = _damaged(run_dir)
        caught.append(moved.split("-", 1)[1])
        if caught.count("checksum") == 2:  # values changed on disk: only checksums see it
            break
    assert caught.count("checksum") == 2, caught


def _edit_meta(step_dir: Path, edit) -> None:
    path = step_dir / "meta/metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("item", ["params", "opt_state"])
def test_checksum_mismatch_falls_back_and_moves_the_checkpoint_aside(
    pristine, tmp_path, caplog, item
):
    """An array whose stored bits no longer match its checksum (here: the recorded checksum
    changed instead, the same mismatch) is damage: warning naming the array, fallback to
    step 2, step 4 moved to damaged/4-checksum with all its files."""
    run_dir = _copy(pristine, tmp_path / "run")
    ckpts = run_dir / "tiny_lm/checkpoints"
    leaf = sorted(json.loads((ckpts / "4/meta/metadata").read_text())["checksums"][item])[-1]
    _edit_meta(ckpts / "4", lambda m: m["checksums"][item].update({leaf: "0" * 16}))
    files_before = sorted(p.relative_to(ckpts / "4") for p in (ckpts / "4").rglob("*"))
    run = _build(run_dir)
    start = restore_or_init(run, plan_resume(run))
    assert int(start.state["step"]) == 2
    assert f"checksum mismatch in {item}/{leaf}" in caplog.text
    moved = ckpts / ckpt.DAMAGED / "4-checksum"
    assert f"moved to {moved}" in caplog.text
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files_before
    assert _same(jax.device_get(start.state["params"]), _params(pristine, 2))
    if item != "params":
        return
    # the run trains steps 3-4 again and saves step 4 anew; damaged/ stays out of rotation
    train(run, start=start)
    assert ckpt.step_dirs(ckpts) == [2, 4] and _damaged(run_dir) == ["4-checksum"]
    assert _same(_params(run_dir, 4), _params(pristine, 4))


def test_truncated_data_state_is_moved_aside_not_deleted(pristine, tmp_path, caplog):
    run_dir = _copy(pristine, tmp_path / "run")
    data_file = run_dir / "tiny_lm/checkpoints/4/data/metadata"
    data_file.write_bytes(data_file.read_bytes()[:10])
    run = _build(run_dir)
    assert int(restore_or_init(run, plan_resume(run)).state["step"]) == 2
    (moved,) = _damaged(run_dir)
    assert moved.startswith("4-")
    kept = run_dir / "tiny_lm/checkpoints" / ckpt.DAMAGED / moved
    assert _same(_params(pristine, 4), _read_moved_params(kept))


def _read_moved_params(step_dir: Path):
    """The params of a checkpoint moved to damaged/ (still a readable orbax step directory)."""
    scratch = step_dir.parent.parent.parent / "scratch"
    shutil.copytree(step_dir, scratch / "checkpoints/4")
    return _params_at(scratch, 4)


def _params_at(run: Path, step: int):
    reader = ckpt.Checkpointer(run / "checkpoints", ckpt.CheckpointConfig(), read_only=True)
    try:
        return reader.read_numpy("params", step)[1]
    finally:
        reader.close()


def test_data_state_that_parses_but_does_not_apply_is_damage(pristine, tmp_path, caplog):
    run_dir = _copy(pristine, tmp_path / "run")
    run = _build(run_dir)
    writer = ckpt.Checkpointer(run_dir / "tiny_lm/checkpoints", run.cfg.checkpoint)
    state = restore_or_init(run, plan_resume(run)).state | {"step": jnp.int32(6)}
    config = json.loads((run_dir / "tiny_lm/checkpoints/4/config/metadata").read_text())
    writer.save(state, {"version": 999}, config, {"step": 6, "skipped_steps": 0})
    writer.close()
    start = restore_or_init(run, plan_resume(run))
    assert int(start.state["step"]) == 4
    assert "data position does not apply" in caplog.text
    assert _damaged(run_dir) == ["6-data-state"]


def test_every_checkpoint_damaged_is_an_error_and_stays_one(pristine, tmp_path):
    run_dir = _copy(pristine, tmp_path / "run")
    for step in (2, 4):
        _edit_meta(
            run_dir / f"tiny_lm/checkpoints/{step}",
            lambda m: m["checksums"]["params"].update({"embed/embedding": "0" * 16}),
        )
    run = _build(run_dir)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        restore_or_init(run, plan_resume(run))
    assert _damaged(run_dir) == ["2-checksum", "4-checksum"]
    with pytest.raises(CheckpointError, match="only damaged checkpoints"):
        plan_resume(run)  # a rerun does not silently start from scratch
    fresh = _build(run_dir, "checkpoint.resume=fresh")
    assert plan_resume(fresh) is None and not (run_dir / "tiny_lm/checkpoints").exists()


def test_incompatible_config_change_is_refused_and_touches_nothing(pristine, tmp_path):
    run_dir = _copy(pristine, tmp_path / "run")
    listing = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    cases = {
        "model.d_model=64": r"model.d_model 32 -> 64 \(params/\S+ is float32\[[\d, ]+\] in the "
        r"checkpoint, float32\[[\d, ]+\] now\)",
        "model.param_dtype=bfloat16": "is float32.* in the checkpoint, bfloat16.* now",
        "data.batch_size=8": r"data.batch_size 16 -> 8 \(the checkpoint's data position",
        "optim.clip_norm=null": "optim.clip_norm 1.0 -> None .*resume_params_only=true",
    }
    for override, pattern in cases.items():
        run = _build(run_dir, override)
        with pytest.raises(ConfigError, match=pattern):
            restore_or_init(run, plan_resume(run))
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == listing


def test_compatible_config_change_warns_and_resumes(pristine, tmp_path, caplog):
    run_dir = _copy(pristine, tmp_path / "run")
    run = _build(run_dir, "optim.learning_rate=0.0001", "train.steps=6")
    assert int(restore_or_init(run, plan_resume(run)).state["step"]) == 4
    assert (
        "(compatible): optim.learning_rate" in caplog.text and "train.steps 4 -> 6" in caplog.text
    )


def test_shape_change_through_the_cli_is_one_line_exit_2(pristine, tmp_path):
    run_dir = _copy(pristine, tmp_path / "run")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            str(TINY),
            f"run.dir={run_dir}",
            *RUN,
            "model.n_layers=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 10, done.stderr
    assert "model.n_layers 2 -> 3" in done.stderr.strip().splitlines()[-1]


def test_export_refuses_a_damaged_checkpoint(pristine, tmp_path, capsys):
    run_dir = _copy(pristine, tmp_path / "run")
    _edit_meta(
        run_dir / "tiny_lm/checkpoints/4",
        lambda m: m["checksums"]["params"].update({"embed/embedding": "0" * 16}),
    )
    out = tmp_path / "model.safetensors"
    spec = importlib.util.spec_from_file_location("export", ROOT / "scripts/export_safetensors.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    status = export.main([str(run_dir / "tiny_lm"), "--out", str(out)])  # its exit status
    assert status == 1 and not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is damaged: checksum mismatch in params/embed/embedding" in line
