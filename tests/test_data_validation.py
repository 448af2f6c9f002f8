"""Bad data is refused or reported before training (issue 10 item 8): token ids outside the
vocabulary, empty token files, an empty held-out split, FIFOs in a text corpus."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax_setup import cpu_env

from framework.config import load_config
from framework.data import DataConfig, DataError, make_loaders, sources
from framework.data.pipeline import build_sources
from framework.errors import ConfigError
from framework.train import build
from framework.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/lm.yaml")


def _single(cfg):
    """(train rows, held-out rows, metadata) of a one-source config."""
    s = build_sources(cfg)
    return s.train[0], s.val[0], s.meta


def _tokens(path: Path, n: int = 4096, vocab: int = 100, bad: dict[int, int] | None = None):
    """Token ids 0..vocab-1 cycling, with `bad` {index: id} written in; .npy int32 or .bin."""
    ids = (np.arange(n) % vocab).astype(np.int32 if path.suffix == ".npy" else np.uint16)
    for i, v in (bad or {}).items():
        ids[i] = v
    np.save(path, ids) if path.suffix == ".npy" else ids.tofile(path)
    return str(path)


def _cfg(paths: list[str], **kw) -> DataConfig:
    return DataConfig(source="tokens", paths=paths, seq_len=8, batch_size=4, **kw)


def test_negative_id_names_the_file_and_index(tmp_path):
    path = _tokens(tmp_path / "neg.npy", bad={1000: -3})
    with pytest.raises(DataError, match=r"neg\.npy'?: token 1000 has id -3"):
        _single(_cfg([path]))


@pytest.mark.parametrize("in_val", [False, True])
def test_id_beyond_the_metadata_vocabulary(tmp_path, in_val):
    """An id >= the sidecar's vocab_size (today: NaN blamed on an attention bias)."""
    good = _tokens(tmp_path / "good.bin")
    bad = _tokens(tmp_path / "bad.bin", bad={2000: 300})
    first = bad if not in_val else good
    sources.sidecar_path(first).write_text(json.dumps({"vocab_size": 100}))
    cfg = _cfg([bad], val_paths=[]) if not in_val else _cfg([good], val_paths=[bad])
    with pytest.raises(DataError) as e:
        _single(cfg)
    assert "bad.bin" in str(e.value) and "token 2000 has id 300, outside [0, 100)" in str(e.value)
    assert "good.bin.json" in str(e.value) or "bad.bin.json" in str(e.value)


def test_the_first_bad_index_is_found_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHECK_CHUNK", 1000)
    path = _tokens(tmp_path / "t.npy", bad={3456: 250, 3999: -1})
    sources.sidecar_path(path).write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(DataError, match="token 3456 has id 250"):
        _single(_cfg([path]))
    sources.sidecar_path(path).unlink()  # vocabulary from the data: only the negative id is bad
    with pytest.raises(DataError, match="token 3999 has id -1"):
        _single(_cfg([path]))


def test_id_beyond_a_configured_model_vocab_size(tmp_path):
    """Without metadata the data's vocabulary is its largest id + 1; a smaller
    model.vocab_size is refused where both are known (build)."""
    path = _tokens(tmp_path / "t.npy", vocab=100)
    cfg = load_config(
        Config, TINY, ["data.source=tokens", f"data.paths=[{path}]", "model.vocab_size=64"]
    )
    with pytest.raises(ConfigError, match=r"model.vocab_size \(64\).*\(100\)"):
        build(cfg)


@pytest.mark.parametrize("name", ["empty.npy", "empty.bin"])
def test_empty_token_file_is_one_line(tmp_path, name):
    empty = _tokens(tmp_path / name, n=0)
    good = _tokens(tmp_path / "good.npy")
    with pytest.raises(DataError) as e:  # today: "max() arg is an empty sequence"
        _single(_cfg([good], val_paths=[empty]))
    assert str(e.value) == f"token file {empty!r} is empty"


def test_empty_held_out_split_warns_once_that_evaluation_is_off(tmp_path, caplog):
    good = _tokens(tmp_path / "good.npy")
    short = _tokens(tmp_path / "short.npy", n=5)  # fewer than seq_len+1 tokens: no window
    with caplog.at_level(logging.WARNING, logger="framework.data"):
        _, eval_set, meta = make_loaders(_cfg([good], val_paths=[short]))
    assert eval_set.num_batches == 0 and meta["val_examples"] == 0
    warned = [r.getMessage() for r in caplog.records if "evaluation is off" in r.getMessage()]
    assert len(warned) == 1 and "short.npy" in warned[0], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framework.data"):
        _single(_cfg([good], val_fraction=0.0))  # no held-out data asked for: no warning
    assert not [r for r in caplog.records if "evaluation" in r.getMessage()]


def test_fifo_in_a_text_corpus_is_skipped_with_a_warning(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world, " * 400)
    os.mkfifo(corpus / "pipe.txt")
    cfg = DataConfig(
        source="text", paths=[str(corpus)], file_pattern="*.txt", seq_len=8, batch_size=4
    )

    def hung(*_):
        raise TimeoutError("reading the corpus hung on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with caplog.at_level(logging.WARNING, logger="framework.data"):
            train, _, _ = _single(cfg)
        with pytest.raises(DataError, match="not a regular file"):  # a FIFO named directly
            _single(cfg.model_copy(update={"paths": [str(corpus / "pipe.txt")]}))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert len(train) > 0
    assert "pipe.txt" in caplog.text and "not a regular file" in caplog.text


def test_train_script_negative_id_exits_2_with_one_line(tmp_path):
    path = _tokens(tmp_path / "neg.npy", bad={1000: -3})
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/train.py"),
            TINY,
            "data.source=tokens",
            f"data.paths=[{path}]",
            f"run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=cpu_env(8),
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "neg.npy" in lines[0] and "token 1000 has id -3" in lines[0], lines


def test_non_integer_vocab_size_in_the_metadata_is_one_line(tmp_path):
    path = _tokens(tmp_path / "tok.bin")
    sources.sidecar_path(path).write_text(json.dumps({"vocab_size": "100"}))
    with pytest.raises(DataError, match=r"vocab_size must be a positive integer, got '100'"):
        _single(_cfg([path]))
