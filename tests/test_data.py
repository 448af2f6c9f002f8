"""framework.data: determinism, splits, multi-process sharding, resumable state, token files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest

from framework.data import DataConfig, DataError, make_loaders, readers, sources
from framework.data.pipeline import build_sources
from framework.data.tokenizers import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _single(cfg):
    """(train rows, held-out rows, metadata) of a one-source config."""
    s = build_sources(cfg)
    return s.train[0], s.val[0], s.meta


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of 24 small, distinct text files (some in a subfolder)."""
    root = tmp_path / "corpus"
    for i in range(24):
        sub = root / ("pkg" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{i}_{j}(x):\n    return x * {i} + {j}  # héllo\n" for j in range(40))
        (sub / f"mod_{i:02d}.py").write_text(body)
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture
def arange_npy(tmp_path: Path) -> Path:
    """Token file whose token at position t is t (mod 2**16): windows are easy to check."""
    path = tmp_path / "arange.npy"
    np.save(path, np.arange(20_000, dtype=np.uint16))
    return path


# ----------------------------------------------------------------------------------------------
# Config


def test_config_validates_ranges_and_keys():
    assert DataConfig().paths == ["stdlib"]
    with pytest.raises(pydantic.ValidationError):
        DataConfig(batch_sze=3)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(val_fraction=1.0)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(input_shape=[3, 0])
    with pytest.raises(pydantic.ValidationError, match="token files"):
        DataConfig(source="tokens")
    assert all(f.description for f in DataConfig.model_fields.values())


# ----------------------------------------------------------------------------------------------
# Order, determinism, state


def test_same_seed_same_batches_different_seed_different_order():
    cfg = DataConfig(source="synthetic_lm", seq_len=16, batch_size=8, num_examples=256)
    a, _, _ = make_loaders(cfg)
    b, _, _ = make_loaders(cfg)
    c, _, _ = make_loaders(cfg.model_copy(update={"shuffle_seed": 1}))
    first_a, first_b, first_c = _take(a, 40), _take(b, 40), _take(c, 40)
    assert _same(first_a, first_b)
    assert not np.array_equal(first_a[0]["inputs"], first_c[0]["inputs"])
    # same examples, another order: one epoch (32 batches) holds every sequence once per seed
    rows = lambda bs: sorted(map(bytes, np.concatenate([x["inputs"] for x in bs[:32]])))
    assert rows(first_a) == rows(first_c)


def test_state_roundtrip_reproduces_next_batches(arange_npy):
    cfg = DataConfig(source="tokens", paths=[str(arange_npy)], seq_len=32, batch_size=4)
    loader, _, _ = make_loaders(cfg)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.get_state()))
    expected = _take(loader, 5)
    fresh, _, _ = make_loaders(cfg)
    fresh.set_state(state)
    assert _same(_take(fresh, 5), expected)
    # the position is the global step: a 2-process run resumes at the same global batches
    halves = [make_loaders(cfg, process_index=p, process_count=2)[0] for p in range(2)]
    for h in halves:
        h.set_state(state)
    for want in expected:
        got = np.concatenate([next(h)["inputs"] for h in halves])
        np.testing.assert_array_equal(got, want["inputs"])
    with pytest.raises(DataError):
        fresh.set_state({"step": 3})


def test_lm_windows_and_shifted_targets(arange_npy):
    seq = 32
    cfg = DataConfig(
        source="tokens", paths=[str(arange_npy)], seq_len=seq, batch_size=8, val_fraction=0.1
    )
    loader, eval_set, meta = make_loaders(cfg)
    batch = next(loader)
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (8, seq)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    starts = batch["inputs"][:, 0]
    assert np.all(starts % seq == 0)  # window i starts at token i * seq_len
    np.testing.assert_array_equal(batch["inputs"], starts[:, None] + np.arange(seq))
    np.testing.assert_array_equal(batch["targets"], starts[:, None] + np.arange(1, seq + 1))
    n_windows = (20_000 - 1) // seq
    n_val = math.ceil(n_windows * 0.1)
    assert meta["train_examples"] == n_windows - n_val and meta["val_examples"] == n_val
    # held-out windows are the tail, never served for training
    val_starts = np.concatenate([b["inputs"][:, 0] for b in eval_set.batches(None)])
    assert val_starts.min() >= (n_windows - n_val) * seq
    train_starts = np.concatenate([b["inputs"][:, 0] for b in _take(loader, 200)])
    assert train_starts.max() < (n_windows - n_val) * seq


# ----------------------------------------------------------------------------------------------
# Multi-process sharding


@pytest.mark.parametrize("source", ["tokens", "synthetic_classification"])
def test_processes_split_each_global_batch(arange_npy, source):
    cfg = DataConfig(
        source=source,
        paths=[str(arange_npy)],
        seq_len=16,
        batch_size=8,
        input_shape=[3],
        num_examples=64,
    )
    single, eval_single, _ = make_loaders(cfg)
    procs = [make_loaders(cfg, process_index=p, process_count=2) for p in range(2)]
    for _ in range(12):  # crosses an epoch boundary for the 64-example classification set
        want = next(single)
        parts = [next(loader) for loader, _, _ in procs]
        assert all(len(part["inputs"]) == 4 for part in parts)
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
        if source == "tokens":  # disjoint rows: window starts are unique
            starts = np.concatenate([p["inputs"][:, 0] for p in parts])
            assert len(set(starts.tolist())) == len(starts)
    shards = (e.batches(3) for _, e, _ in procs)
    for want, *parts in zip(eval_single.batches(3), *shards, strict=True):
        np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), want["inputs"])
    with pytest.raises(DataError, match="divisible"):
        make_loaders(cfg, process_index=0, process_count=3)


def test_eval_set_is_deterministic_and_smaller_than_a_batch_is_cycled():
    cfg = DataConfig(
        source="synthetic_classification", batch_size=16, num_examples=256, val_fraction=0.01
    )
    _, eval_set, meta = make_loaders(cfg)
    assert meta["val_examples"] == 16  # at least one global batch
    a, b = list(eval_set.batches(None)), list(eval_set.batches(None))
    assert len(a) == eval_set.num_batches == 1 and _same(a, b)
    assert len(list(eval_set.batches(0))) == 0
    none = make_loaders(cfg.model_copy(update={"val_fraction": 0.0}))[1]
    assert none.num_batches == 0 and list(none.batches(5)) == []


# ----------------------------------------------------------------------------------------------
# Text corpus


def test_split_by_file_is_deterministic_and_disjoint(corpus):
    cfg = DataConfig(paths=[str(corpus)], seq_len=32, batch_size=4, val_fraction=0.2)
    files = sources.find_files(cfg.paths, cfg.file_pattern)
    keys = [f.key for f in files]
    assert keys == sorted(keys) and len(keys) == 24 and "pkg/mod_00.py" in keys
    is_val = sources.split_by_file(keys, 0.2)
    assert is_val == sources.split_by_file(keys, 0.2) and any(is_val) and not all(is_val)
    assert sources.split_by_file(keys[:2], 0.0001) in ([True, False], [False, True])
    # the held-out stream is exactly the held-out files' bytes, in sorted order, each file
    # followed by the byte tokenizer's EOS (256)
    train, val, meta = _single(cfg)
    stream = lambda fs: np.concatenate(
        [np.append(np.frombuffer(f.path.read_bytes(), np.uint8), 256) for f in fs]
    )
    val_files = [f for f, v in zip(files, is_val, strict=True) if v]
    train_files = [f for f, v in zip(files, is_val, strict=True) if not v]
    np.testing.assert_array_equal(val.segments[0].data, stream(val_files))
    np.testing.assert_array_equal(train.segments[0].data, stream(train_files))
    assert meta["train_tokens"] + meta["val_tokens"] <= len(stream(files))
    # a byte cap keeps the first max_bytes of the sorted concatenation
    capped = readers.read_documents("text", files, bad=readers.BadFiles("fail"), max_bytes=1000)
    assert b"".join(d for _, d in capped) == (b"".join(f.path.read_bytes() for f in files))[:1000]


def test_stdlib_bytes_decode_to_python_source():
    files = sources.find_files(["stdlib"])
    keys = [f.key for f in files]
    assert "os.py" in keys and keys == sorted(keys)
    assert not any("site-packages" in k for k in keys)
    cfg = DataConfig(max_bytes=300_000, seq_len=128, batch_size=8)
    loader, eval_set, meta = make_loaders(cfg)
    assert meta["vocab_size"] == 257 and meta["eos_id"] == 256
    assert 0.999 < meta["bytes_per_token"] < 1.0  # one EOS per file
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    text = "".join(ByteTokenizer().decode(row) for b in _take(loader, 4) for row in b["inputs"])
    assert ("def " in text or "import " in text) and "\ufffd" not in text[200:-200]
    assert eval_set.num_batches >= 1


def test_missing_path_and_too_small_corpus(tmp_path, corpus):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="nope"):
        make_loaders(DataConfig(paths=[missing]))
    with pytest.raises(DataError, match="glob matches no file"):
        make_loaders(DataConfig(paths=[str(tmp_path / "*.nothing")]))
    with pytest.raises(DataError, match=r"rows of data.seq_len\+1=1025 tokens.*batch_size=64"):
        make_loaders(DataConfig(paths=[str(corpus)], seq_len=1024, batch_size=64))
    with pytest.raises(DataError, match="does not exist"):
        make_loaders(DataConfig(source="tokens", paths=[missing + ".bin"]))


# ----------------------------------------------------------------------------------------------
# Token files (prepare_data.py: tests/test_prepare_data.py)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_file_is_memory_mapped(tmp_path, dtype):
    path = tmp_path / "toks.bin"
    np.arange(5000, dtype=dtype).tofile(path)
    cfg = DataConfig(
        source="tokens",
        paths=[str(path)],
        token_dtype=dtype,
        seq_len=10,
        batch_size=4,
        val_fraction=0.0,
    )
    train, _, meta = _single(cfg)
    assert isinstance(train.segments[0].data, np.memmap)
    assert meta["vocab_size"] == 5000 and meta["bytes_per_token"] is None
    batch = next(make_loaders(cfg)[0])
    np.testing.assert_array_equal(batch["targets"] - batch["inputs"], 1)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match="multiple of"):
        _single(cfg.model_copy(update={"paths": [str(odd)]}))


def test_npy_token_file_is_memory_mapped(arange_npy):
    cfg = DataConfig(source="tokens", paths=[str(arange_npy)], seq_len=10, batch_size=4)
    train, _, _ = _single(cfg)
    assert isinstance(train.source.segments[0].data, np.memmap)


# ----------------------------------------------------------------------------------------------
# Synthetic tasks


def test_synthetic_lm_is_learnable():
    vocab = 64
    seqs = sources.synthetic_lm(vocab, 512, 65, split=0)
    assert seqs.dtype == np.int32 and seqs.min() >= 0 and seqs.max() < vocab
    # the bigram conditional entropy (what a model can reach) is far below log(vocab)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    h = -(counts * np.log(np.where(p > 0, p, 1))).sum() / counts.sum()
    assert h < 0.4 * math.log(vocab)
    assert not np.array_equal(seqs[:8], sources.synthetic_lm(vocab, 8, 65, split=1))
    np.testing.assert_array_equal(seqs, sources.synthetic_lm(vocab, 512, 65, split=0))


def test_synthetic_classification_is_separable():
    cfg = DataConfig(
        source="synthetic_classification",
        num_classes=5,
        input_shape=[4, 4],
        batch_size=64,
        num_examples=2048,
    )
    loader, eval_set, meta = make_loaders(cfg)
    assert meta["num_classes"] == 5 and meta["vocab_size"] is None
    batch = next(loader)
    assert batch["inputs"].shape == (64, 4, 4) and batch["inputs"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    train, val, _ = _single(cfg)
    x, y = train.inputs.reshape(len(train), -1), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(5)])
    vx = val.inputs.reshape(len(val), -1)
    pred = np.argmin(((vx[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == val.labels).mean() > 0.95


# ----------------------------------------------------------------------------------------------
# Optional: grain worker processes, HF tokenizers


def test_worker_processes_give_the_same_batches(tmp_path):
    path = tmp_path / "toks.bin"
    np.arange(30_000, dtype=np.uint16).tofile(path)
    cfg = DataConfig(source="tokens", paths=[str(path)], seq_len=16, batch_size=8)
    want = _take(make_loaders(cfg)[0], 6)
    loader = make_loaders(cfg.model_copy(update={"worker_count": 1}))[0]
    try:
        got = _take(loader, 3)
        state = json.loads(json.dumps(loader.get_state()))
        got += _take(loader, 3)
        assert _same(got, want)
        loader.set_state(state)
        assert _same(_take(loader, 3), want[3:])
    finally:
        loader.close()


def test_hf_tokenizer(tmp_path, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]
    )
    tok.train([str(p) for p in sorted(corpus.rglob("*.py"))], trainer)
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    cfg = DataConfig(
        paths=[str(corpus)], tokenizer=str(tok_path), seq_len=16, batch_size=4, val_fraction=0.2
    )
    loader, _, meta = make_loaders(cfg)
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["bytes_per_token"] > 1.5
    assert next(loader)["inputs"].max() < meta["vocab_size"]
    eos = tok.token_to_id("<|endoftext|>")
    assert meta["eos_id"] == eos
    # a document that contains the EOS text cannot forge a boundary; each document ends in EOS
    hf = load_tokenizer(str(tok_path))
    stream = hf.encode_docs(["a <|endoftext|> b", "c"])
    assert stream[-1] == eos and (stream == eos).sum() == 2
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    assert load_tokenizer(str(tmp_path / "bare.json")).eos_id is None  # prompts only
    with pytest.raises(DataError, match="no end-of-text token.*data.eos_token"):
        load_tokenizer(str(tmp_path / "bare.json")).encode_docs(["a"])
    assert load_tokenizer(str(tmp_path / "bare.json"), eos_token="a").eos_id == 0
