"""Mixtures of sources (framework.data.mixture): weights, stages, exact resume, processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from jax_setup import cpu_env
from mp_launch import distributed_overrides, free_port, run_all

from framework.data import DataConfig, make_loaders
from framework.data.mixture import Mixture

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abc"  # source i's documents are made of LETTERS[i] only: a row names its source


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """Three parquet shards, each with 40 documents of one letter (lengths 20-59)."""
    root = tmp_path_factory.mktemp("shards")
    out = []
    for i, letter in enumerate(LETTERS):
        path = root / f"shard{i}.parquet"
        docs = [letter * (20 + (7 * j) % 40) for j in range(40)]
        pq.write_table(pa.table({"text": docs}), path, row_group_size=10)
        out.append(path)
    return out


def _cfg(shards, weights=(0.5, 0.3, 0.2), stages=(), **kw) -> DataConfig:
    fields = dict(
        sources=[
            {"type": "parquet", "paths": [str(p)], "weight": w}
            for p, w in zip(shards, weights, strict=True)
        ],
        stages=[{"step": s, "weights": list(w)} for s, w in stages],
        seq_len=16,
        batch_size=16,
        val_fraction=0.0,
    )
    return DataConfig(**(fields | kw))


def _source_of_rows(batch: dict) -> np.ndarray:
    """Which source each row came from (its first letter token)."""
    first = np.where(batch["inputs"] < 256, batch["inputs"], 1 << 20).min(axis=1)
    return np.searchsorted([ord(c) for c in LETTERS], first)


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_proportions_over_1000_batches_are_within_2_percent(shards):
    loader, _, meta = make_loaders(_cfg(shards))
    counts = np.zeros(3)
    for _ in range(1000):
        counts += np.bincount(_source_of_rows(next(loader)), minlength=3)
    share = counts / counts.sum()
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.02)
    # systematic sampling is far tighter than the +-2% asked: every batch is floor/ceil of B*w
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.002)
    assert set(meta["sources"]) == {"source0", "source1", "source2"}


def test_each_source_is_read_in_epochs_without_repeats(shards):
    """A source's rows come as whole shuffled epochs (no row twice before every row once)."""
    mix = Mixture([7, 5, 3], [(0, [0.5, 0.3, 0.2])], batch_size=8, seed=3)
    drawn: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for k in range(20):
        source, row = mix.rows(k)
        for s, r in zip(source, row, strict=True):
            drawn[int(s)].append(int(r))
    for s, n in enumerate([7, 5, 3]):  # m draws: every row floor(m/n) or ceil(m/n) times
        seen = np.bincount(drawn[s], minlength=n)
        m = len(drawn[s])
        assert seen.min() >= m // n and seen.max() <= -(-m // n), (s, seen)
    other = Mixture([7, 5, 3], [(0, [0.5, 0.3, 0.2])], batch_size=8, seed=4)
    assert any(not np.array_equal(mix.rows(k)[1], other.rows(k)[1]) for k in range(5))


def test_stages_switch_weights_at_their_step(shards):
    cfg = _cfg(shards, weights=(1, 0, 0), stages=[(5, (0, 0, 1)), (9, (0, 1, 1))])
    loader, _, _ = make_loaders(cfg)
    sources = [_source_of_rows(next(loader)) for _ in range(40)]
    assert all((s == 0).all() for s in sources[:5])
    assert all((s == 2).all() for s in sources[5:9])
    late = np.concatenate(sources[9:])
    assert not (late == 0).any() and abs((late == 1).mean() - 0.5) < 0.02


def test_resume_mid_stage_gives_the_same_next_batches_bitwise(shards):
    cfg = _cfg(shards, stages=[(6, (0.1, 0.1, 0.8))])
    loader, _, _ = make_loaders(cfg)
    for _ in range(8):  # into the second stage
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(6)]
    fresh, _, _ = make_loaders(cfg)
    fresh.set_state(state)
    assert _same([next(fresh) for _ in range(6)], expected)
    # the stream positions after a jump (computed in chunks) equal the batch-by-batch counts
    args = dict(sizes=[11, 13, 17], stages=[(0, [0.2, 0.3, 0.5]), (5000, [1, 1, 1])])
    args |= dict(batch_size=16, seed=0, shuffle=False)
    mix = Mixture(**args)
    running = np.zeros(3, np.int64)
    for k in range(9000):
        if k % 997 == 0:
            np.testing.assert_array_equal(Mixture(**args).cursors(k), running)
        running += np.bincount(mix.rows(k)[0], minlength=3)


def test_processes_take_disjoint_shares_of_the_same_global_batch(shards):
    cfg = _cfg(shards)
    whole = make_loaders(cfg)[0]
    halves = [make_loaders(cfg, process_index=p, process_count=2)[0] for p in range(2)]
    for _ in range(5):
        want = next(whole)
        got = [next(h) for h in halves]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


_WORKER = """
import json, sys
import numpy as np
from jax.experimental import multihost_utils
from framework.config import load_config
from framework.train.config import Config
from framework.train import build
run = build(load_config(Config, sys.argv[1], sys.argv[2:]))
rows = []
for _ in range(3):
    batch = run.put(next(run.train_data))
    rows.append(np.asarray(multihost_utils.process_allgather(batch["inputs"], tiled=True)).tolist())
print(json.dumps(rows))
"""


def test_two_gloo_processes_see_the_one_process_global_batch(shards, tmp_path):
    config = {
        "base": str(ROOT / "configs/tiny/lm.yaml"),
        "run": {"dir": str(tmp_path)},
        "data": {
            "source": "text",
            "sources": [{"type": "parquet", "paths": [str(p)], "weight": 1} for p in shards],
            "seq_len": 16,
            "batch_size": 8,
            "val_fraction": 0.0,
        },
        "model": {"max_seq_len": 16},
        "mesh": {"data": 2},
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(config))
    one = subprocess.run(
        [sys.executable, "-c", _WORKER, str(path), "mesh.data=2"],
        capture_output=True,
        text=True,
        env=cpu_env(2),
        cwd=ROOT,
        timeout=150,
    )
    assert one.returncode == 0, one.stderr
    port = free_port()
    outs = run_all(
        [
            [sys.executable, "-c", _WORKER, str(path), *distributed_overrides(port, i)]
            for i in range(2)
        ],
        cwd=ROOT,
        env=cpu_env(1),
    )
    expected = json.loads(one.stdout.strip().splitlines()[-1])
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"weights": (-0.5, 1, 1)}, "greater than or equal to 0"),
        ({"weights": (0, 0, 0)}, "weights are all zero"),
        ({"weights": (1, 1, 1), "stages": [(3, (0, 0, 0))]}, "not all zero"),
        ({"weights": (1, 1, 1), "stages": [(3, (1, 1))]}, "2 weights for 3 sources"),
        ({"weights": (1, 1, 1), "stages": [(5, (1, 1, 1)), (3, (1, 1, 1))]}, "must increase"),
    ],
)
def test_bad_weights_are_refused(shards, fields, needle):
    with pytest.raises(Exception, match=needle):
        _cfg(shards, **fields)


def test_bad_mixture_through_the_cli_is_one_line_exit_2(shards, tmp_path):
    sources = json.dumps(
        [{"type": "parquet", "paths": [str(shards[0])], "weight": -1}], separators=(",", ":")
    )
    done = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "configs/default.yaml",
            f"run.dir={tmp_path}",
            f"data.sources={sources}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.sources" in lines[0] and "weight" in lines[0], lines


def test_a_data_position_of_another_pipeline_version_is_a_one_line_decision():
    """A checkpoint from before EOS/packing: a ConfigError saying how to take its weights, not
    damage (which would move the checkpoint aside and train from scratch)."""
    from framework.errors import ConfigError
    from framework.train import resume

    with pytest.raises(ConfigError, match="version 1.*resume_params_only=true"):
        resume._apply_data_state(None, {"version": 1, "step": 3})


@pytest.mark.parametrize("cached", [True, False])
def test_epochs_are_permutations_in_both_row_orders(monkeypatch, cached):
    """Array permutations (small sources) and grain's index shuffle (above _CACHED rows)."""
    from framework.data import mixture

    if not cached:
        monkeypatch.setattr(mixture, "_CACHED", 10)
    epochs = mixture._Epochs(37, seed=5)
    rows = epochs(np.arange(3 * 37))
    for e in range(3):
        assert sorted(rows[e * 37 : (e + 1) * 37]) == list(range(37))
    assert not np.array_equal(rows[:37], rows[37:74])  # each epoch reshuffled
    np.testing.assert_array_equal(epochs(np.array([80, 3, 40])), rows[[80, 3, 40]])


def test_cursors_are_right_when_two_threads_extend_them_at_once():
    """grain reads batches on two threads: the chunked cursor cache must not double a chunk."""
    import threading

    args = dict(sizes=[11, 13, 17], stages=[(0, [0.2, 0.3, 0.5])], batch_size=16, seed=0)
    want = Mixture(**args).cursors(2 * 4096 + 5)
    for _ in range(20):
        mix = Mixture(**args)
        threads = [threading.Thread(target=mix.cursors, args=(k,)) for k in (4096, 4097, 8200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_array_equal(mix.cursors(2 * 4096 + 5), want)


def test_checkpoints_from_before_the_new_data_keys_are_not_a_config_change():
    from framework.train import compat

    current = {"data": DataConfig().model_dump(mode="json")}
    old = {"data": {k: v for k, v in current["data"].items() if k not in ("sources", "packing")}}
    assert compat.changed_keys(old, current) == {}
    packed_off = {"data": dict(current["data"], packing=False)}
    assert set(compat.changed_keys(old, packed_off)) == {"data.packing"}
