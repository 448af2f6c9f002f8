"""scripts/prepare_data.py and framework.data.shards: token shards, index.json, reruns, failures."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from framework.data import shards
from framework.data.sources import find_files, split_by_file
from framework.data.tokenizers import ByteTokenizer, load_tokenizer
from framework.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts/prepare_data.py")
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """12 small distinct text files (two in a subfolder), one empty, one not matching *.txt."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        folder = root / ("sub" if i < 2 else "")
        body = "".join(f"line {j} of file {i}: héllo wörld\n" for j in range(20 + 3 * i))
        (folder / f"doc_{i:02d}.txt").write_text(body)
    (root / "empty.txt").write_text("")
    (root / "skip.md").write_text("not matched\n")
    return root


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    """4 JSON-lines files of 30 documents each."""
    root = tmp_path / "jsonl"
    root.mkdir()
    for f in range(4):
        lines = [
            json.dumps({"text": f"doc {f}.{i} " + "wörds " * (i % 7), "id": i}) for i in range(30)
        ]
        (root / f"part_{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _run(*argv: str, capsys) -> tuple[int, str]:
    """prepare_data's main in this process: (exit status, stdout + stderr)."""
    rc = prepare_data.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _tokens(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, index["dtype"])


def _tokenizer_file(tmp_path: Path, words: int = 50, name: str = "tok.json") -> Path:
    """A tiny word-level tokenizers JSON with <|endoftext|> (ids: [UNK]=0, EOS=1, words)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<|endoftext|>": 1} | {f"w{i}": i + 2 for i in range(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / name
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------------
# Writing


def test_shards_and_index_match_direct_encoding(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    rc, err = _run(
        str(corpus), "--out", str(out), "--pattern", "*.txt", "--val-fraction", "0.3",
        "--workers", "1", capsys=capsys,
    )  # fmt: skip
    assert rc == 0, err
    index = json.loads((out / "index.json").read_text())
    assert index["format_version"] == 1 and index["tokenizer"] == "byte"
    assert (index["vocab_size"], index["eos_id"], index["dtype"]) == (257, 256, "uint16")
    assert index["tokenizer_fingerprint"] == ByteTokenizer.fingerprint
    files = find_files([str(corpus)], "*.txt")
    is_val = split_by_file([f.key for f in files], 0.3)
    tok = ByteTokenizer()
    for split in ("train", "val"):
        docs = [
            f.path.read_bytes()
            for f, v in sorted(zip(files, is_val, strict=True), key=lambda p: p[0].key)
            if v == (split == "val") and f.path.stat().st_size  # the empty file is no document
        ]
        want = tok.encode_docs(docs)
        got = _tokens(out, split)
        np.testing.assert_array_equal(got, want)
        assert got[-1] == 256 and int((got == 256).sum()) == len(docs)
        t = index["totals"][split]
        assert (t["tokens"], t["documents"], t["bytes"]) == (
            len(want),
            len(docs),
            sum(map(len, docs)),
        )
        assert t["files"] == sum(v == (split == "val") for v in is_val)
    assert 1 <= index["totals"]["val"]["documents"] < index["totals"]["train"]["documents"]
    assert index["bytes_per_token"] == index["totals"]["bytes"] / index["totals"]["tokens"]
    # each shard has its record beside it; nothing temporary is left
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "shard-00000.bin",
        "shard-00000.json",
    ]
    assert not list(out.rglob("*.tmp"))
    assert shards.is_token_dir(out) and not shards.is_token_dir(corpus)
    tdir = shards.open_token_dir(out, tok)
    assert [len(a) for a in tdir.train] == [len(_tokens(out, "train"))]
    assert (tdir.vocab_size, tdir.eos_id, tdir.dtype) == (257, 256, "uint16")
    assert tdir.bytes_per_token == index["bytes_per_token"]


def test_pool_groups_and_shard_limit_give_the_same_tokens(tmp_path, jsonl, capsys):
    """--workers 2 (a spawn pool), one item per file, shards of at most ~200 tokens."""
    base = ["--format", "jsonl", "--val-fraction", "0"]
    one = tmp_path / "one"
    assert _run(str(jsonl), "--out", str(one), *base, "--workers", "1", capsys=capsys)[0] == 0
    many = tmp_path / "many"
    rc, err = _run(
        str(jsonl), "--out", str(many), *base, "--workers", "2", "--group-bytes", "1",
        "--shard-tokens", "200", capsys=capsys,
    )  # fmt: skip
    assert rc == 0, err
    np.testing.assert_array_equal(_tokens(many, "train"), _tokens(one, "train"))
    index = json.loads((many / "index.json").read_text())
    parts = index["splits"]["train"]
    assert len(parts) > 8 and index["totals"]["train"]["documents"] == 120
    names = sorted(p.name for p in (many / "train").glob("*.json"))
    assert names == [f"shard-{i:05d}.json" for i in range(4)]  # one record per file (item)
    for shard in parts:
        tokens = np.fromfile(many / shard["file"], dtype=np.uint16)
        assert tokens[-1] == 256 and int((tokens == 256).sum()) == shard["documents"]
        assert len(tokens) == shard["tokens"] and shard["tokens"] < 200 + 80  # one document over
    texts = [
        json.loads(line)["text"]
        for f in sorted(jsonl.iterdir())
        for line in f.read_text().splitlines()
    ]
    np.testing.assert_array_equal(_tokens(one, "train"), ByteTokenizer().encode_docs(texts))
    assert index["totals"]["val"]["tokens"] == 0 and index["splits"]["val"] == []


def test_hf_tokenizer_and_single_file(tmp_path, capsys):
    path = _tokenizer_file(tmp_path)
    text = tmp_path / "one.txt"
    text.write_text("w1 w2 w3 unknown w4\n")
    out = tmp_path / "out"
    rc, err = _run(str(text), "--out", str(out), "--tokenizer", str(path), capsys=capsys)
    assert rc == 0, err
    index = json.loads((out / "index.json").read_text())
    assert index["eos_id"] == 1 and index["vocab_size"] == 52 and index["tokenizer"] == str(path)
    np.testing.assert_array_equal(_tokens(out, "train"), [3, 4, 5, 0, 6, 1])
    assert index["splits"]["val"] == []  # a single input file is all train
    tdir = shards.open_token_dir(out, load_tokenizer(str(path)))
    assert tdir.eos_id == 1 and tdir.val == []


def test_large_vocabulary_is_uint32(tmp_path, capsys):
    path = _tokenizer_file(tmp_path, words=70_000)
    text = tmp_path / "one.txt"
    text.write_text("w69999 w0\n")
    out = tmp_path / "out"
    assert _run(str(text), "--out", str(out), "--tokenizer", str(path), capsys=capsys)[0] == 0
    assert json.loads((out / "index.json").read_text())["dtype"] == "uint32"
    np.testing.assert_array_equal(_tokens(out, "train"), [70_001, 2, 1])


def test_parquet_column(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    texts = [f"row {i} " * (i % 5 + 1) for i in range(50)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), path, row_group_size=16)
    out = tmp_path / "out"
    argv = [str(path), "--out", str(out), "--format", "parquet", "--workers", "1"]
    rc, err = _run(*argv, "--field", "body", capsys=capsys)
    assert rc == 0, err
    np.testing.assert_array_equal(_tokens(out, "train"), ByteTokenizer().encode_docs(texts))
    rc, err = _run(*argv, "--out", str(tmp_path / "other"), capsys=capsys)
    assert rc == 2 and "no column 'text'" in err and "body, n" in err and "data.parquet" in err


def test_max_bytes_cuts_the_inputs(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    rc, err = _run(
        str(corpus), "--out", str(out), "--pattern", "*.txt", "--max-bytes", "5000",
        "--val-fraction", "0", capsys=capsys,
    )  # fmt: skip
    assert rc == 0, err
    files = find_files([str(corpus)], "*.txt")
    want = b"".join(f.path.read_bytes() for f in files)[:5000]
    got = _tokens(out, "train")
    assert bytes(got[got != 256].astype(np.uint8)) == want
    assert json.loads((out / "index.json").read_text())["totals"]["bytes"] == 5000


def test_non_utf8_file_is_skipped_or_fails(tmp_path, corpus, capsys):
    (corpus / "bad.txt").write_bytes(b"caf\xe9\n")
    out = tmp_path / "out"
    argv = [str(corpus), "--out", str(out), "--pattern", "*.txt", "--workers", "1"]
    rc, err = _run(*argv, capsys=capsys)
    assert rc == 0 and "skipped 1 files that are not UTF-8 text" in err and "bad.txt" in err
    assert json.loads((out / "index.json").read_text())["totals"]["skipped_files"] == 1
    # a rerun that must fail on bad files redoes the item that skipped one, and fails
    rc, err = _run(*argv, "--on-bad-file", "fail", capsys=capsys)
    assert rc == 2 and "bad.txt" in err and "not UTF-8" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "index.json").exists()


# ----------------------------------------------------------------------------------------------
# Reruns


def test_rerun_skips_finished_items(tmp_path, jsonl, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [str(jsonl), "--out", str(out), "--format", "jsonl", "--group-bytes", "1"]
    assert _run(*argv, "--workers", "1", capsys=capsys)[0] == 0
    first = (out / "index.json").read_text()
    calls = []

    def counting(out_dir, item):
        calls.append(item)
        return shards.tokenize_item(out_dir, item)

    monkeypatch.setattr(prepare_data, "tokenize_item", counting)
    assert _run(*argv, "--workers", "1", capsys=capsys)[0] == 0
    assert calls == [] and (out / "index.json").read_text() == first
    # a lost shard, and a changed input file: only their items are redone
    record = json.loads((out / "train" / "shard-00001.json").read_text())
    (out / record["shards"][0]["file"]).unlink()
    changed = jsonl / "part_3.jsonl"
    changed.write_text(changed.read_text() + json.dumps({"text": "one more"}) + "\n")
    rc, err = _run(*argv, "--workers", "1", capsys=capsys)
    assert rc == 0, err
    assert sorted(i.files[0][0] for i in calls) == ["part_1.jsonl", "part_3.jsonl"]
    index = json.loads((out / "index.json").read_text())
    assert sum(s["documents"] for s in index["splits"]["train"] + index["splits"]["val"]) == 121


def test_rerun_with_other_tokenizer_or_options_refuses(tmp_path, jsonl, capsys):
    out = tmp_path / "out"
    argv = [str(jsonl), "--out", str(out), "--format", "jsonl", "--workers", "1"]
    assert _run(*argv, capsys=capsys)[0] == 0
    tok = _tokenizer_file(tmp_path)
    for extra in (["--tokenizer", str(tok)], ["--shard-tokens", "100"]):
        rc, err = _run(*argv, *extra, capsys=capsys)
        assert rc == 2 and "was prepared with another tokenizer/options; use a new --out" in err
        assert len(err.strip().splitlines()) == 1
    # also when the earlier run never finished (records but no index)
    (out / "index.json").unlink()
    rc, err = _run(*argv, "--tokenizer", str(tok), capsys=capsys)
    assert rc == 2 and "another tokenizer/options" in err


def test_rerun_with_a_copy_of_the_tokenizer_file_reuses_everything(tmp_path, jsonl, capsys):
    tok = _tokenizer_file(tmp_path)
    copy = tmp_path / "elsewhere" / "tok.json"
    copy.parent.mkdir()
    copy.write_bytes(tok.read_bytes())
    out = tmp_path / "out"
    argv = [str(jsonl), "--out", str(out), "--format", "jsonl", "--workers", "1"]
    assert _run(*argv, "--tokenizer", str(tok), capsys=capsys)[0] == 0
    rc, text = _run(*argv, "--tokenizer", str(copy), capsys=capsys)
    assert rc == 0 and "0 of 2 items tokenized" in text, text


# ----------------------------------------------------------------------------------------------
# Failures


def test_failing_input_leaves_no_index_and_no_shard_of_its_item(
    tmp_path, jsonl, capsys, monkeypatch
):
    bad = jsonl / "part_2.jsonl"
    lines = bad.read_text().splitlines()
    lines[20] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    # small encode batches, so the failing item has finished shards before its bad line
    monkeypatch.setattr(prepare_data, "Options", functools.partial(shards.Options, batch_bytes=64))
    closed = []
    close_shard = shards.ShardWriter.close_shard

    def spy(self):
        closed.append(f"{self.base}/{len(self.done)}" if self._fh else None)
        close_shard(self)

    monkeypatch.setattr(shards.ShardWriter, "close_shard", spy)
    out = tmp_path / "out"
    rc, err = _run(
        str(jsonl), "--out", str(out), "--format", "jsonl", "--group-bytes", "1",
        "--shard-tokens", "50", "--val-fraction", "0", "--workers", "1", capsys=capsys,
    )  # fmt: skip
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{bad}:21" in err and "not valid JSON" in err
    assert not (out / "index.json").exists()
    assert not list(out.rglob("*.tmp"))
    left = sorted(p.name for p in (out / "train").iterdir())
    assert "shard-00002/1" in closed  # the failing item had finished shards ...
    assert not [n for n in left if n.startswith("shard-00002")]  # ... which are gone
    assert "shard-00000.json" in left and "shard-00001.json" in left  # earlier items kept
    # the fixed input reruns into the same folder and only the failed items run
    lines[20] = json.dumps({"text": "fixed"})
    bad.write_text("\n".join(lines) + "\n")
    rc, err = _run(
        str(jsonl), "--out", str(out), "--format", "jsonl", "--group-bytes", "1",
        "--shard-tokens", "50", "--val-fraction", "0", "--workers", "1", capsys=capsys,
    )  # fmt: skip
    assert rc == 0 and "2 of 4 items tokenized" in err, err
    assert json.loads((out / "index.json").read_text())["totals"]["train"]["documents"] == 120


def test_failing_input_in_the_pool(tmp_path, jsonl, capsys):
    (jsonl / "part_1.jsonl").write_text('{"body": "no text field"}\n')
    out = tmp_path / "out"
    rc, err = _run(
        str(jsonl), "--out", str(out), "--format", "jsonl", "--group-bytes", "1",
        "--val-fraction", "0", "--workers", "2", capsys=capsys,
    )  # fmt: skip
    assert rc == 2 and "part_1.jsonl:1" in err and "no field 'text'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "index.json").exists() and not list(out.rglob("*.tmp"))
    assert not list((out / "train").glob("shard-00001*"))


def test_empty_inputs_and_cli_mistakes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    out = tmp_path / "out"
    rc, err = _run(
        str(empty), "--out", str(out), "--pattern", "*.txt", "--workers", "1", capsys=capsys
    )
    assert rc == 2 and "hold no documents" in err and not (out / "index.json").exists()
    rc, err = _run(str(tmp_path / "missing"), "--out", str(out), capsys=capsys)
    assert rc == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    rc, err = _run(str(empty), "--out", str(out), "--val-fraction", "1", capsys=capsys)
    assert rc == 2 and "--val-fraction" in err
    rc, err = _run(str(empty), "--out", str(empty / "a.txt"), capsys=capsys)
    assert rc == 2 and "not a folder" in err


# ----------------------------------------------------------------------------------------------
# Reading: open_token_dir


@pytest.fixture
def prepared(tmp_path, corpus, capsys) -> Path:
    out = tmp_path / "prepared"
    argv = [str(corpus), "--out", str(out), "--pattern", "*.txt", "--workers", "1"]
    assert _run(*argv, capsys=capsys)[0] == 0
    return out


def test_open_token_dir_names_a_truncated_or_missing_shard(prepared):
    shard = prepared / "train" / "shard-00000.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 2)
    with pytest.raises(
        DataError, match=rf"shard-00000.bin' is truncated: {size - 2} bytes, index says {size}"
    ):
        shards.open_token_dir(prepared)
    shard.unlink()
    with pytest.raises(DataError, match=r"train/shard-00000.bin' is missing"):
        shards.open_token_dir(prepared)


def test_open_token_dir_checks_the_tokenizer_and_the_index(tmp_path, prepared):
    tok = load_tokenizer(str(_tokenizer_file(tmp_path)))
    with pytest.raises(
        DataError, match=rf"tokenized with 'byte' \(fingerprint byte-257\).*{tok.fingerprint}"
    ):
        shards.open_token_dir(prepared, tok)
    assert shards.open_token_dir(prepared, ByteTokenizer()).fingerprint == "byte-257"
    index = prepared / "index.json"
    good = json.loads(index.read_text())
    index.write_text("{")
    with pytest.raises(DataError, match="index.json' is not valid JSON"):
        shards.open_token_dir(prepared)
    index.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        shards.open_token_dir(prepared)
    index.write_text(json.dumps({k: v for k, v in good.items() if k != "eos_id"}))
    with pytest.raises(DataError, match="lacks eos_id"):
        shards.open_token_dir(prepared)
    index.write_text(json.dumps({**good, "eos_id": 257}))
    with pytest.raises(DataError, match=r"eos_id 257 is outside \[0, 257\)"):
        shards.open_token_dir(prepared)
    index.write_text(json.dumps({**good, "vocab_size": 70_000}))
    with pytest.raises(DataError, match="vocab_size 70000 does not fit uint16"):
        shards.open_token_dir(prepared)
    with pytest.raises(DataError, match="holds no index.json"):
        shards.open_token_dir(tmp_path)


def test_shard_writer_cuts_at_document_ends(tmp_path):
    (tmp_path / "train").mkdir()
    writer = shards.ShardWriter(tmp_path, "train", "shard-00007", 256, np.uint16, limit=10)
    docs = [b"abc", b"defghijklmnop", b"q", b"rs", b"tuvwxyz"]
    writer.add(ByteTokenizer().encode_docs(docs), [len(d) for d in docs])
    writer.close_shard()
    got = [(s["file"], s["tokens"], s["documents"], s["bytes"]) for s in writer.done]
    assert got == [
        ("train/shard-00007.bin", 4, 1, 3),  # the long document does not fit the rest
        ("train/shard-00007-001.bin", 14, 1, 13),  # longer than a shard: alone
        ("train/shard-00007-002.bin", 5, 2, 3),
        ("train/shard-00007-003.bin", 8, 1, 7),
    ]
    writer.discard()
    assert list((tmp_path / "train").iterdir()) == []


def test_loader_reads_a_prepared_folder(prepared, monkeypatch):
    """data.paths naming the folder: its train shards train, its val split evaluates; its ids
    are not scanned again (prepare_data wrote them in range)."""
    from framework.data import DataConfig, make_loaders
    from framework.data.sources import TokenArray

    def no_scan(*_):
        raise AssertionError("a prepared shard was scanned")

    monkeypatch.setattr(TokenArray, "check_ids", no_scan)

    index = json.loads((prepared / "index.json").read_text())
    cfg = DataConfig(source="tokens", paths=[str(prepared)], seq_len=16, batch_size=4)
    loader, eval_set, meta = make_loaders(cfg)
    with pytest.raises(DataError, match="holds the prepare_data.py folder"):
        make_loaders(cfg.model_copy(update={"paths": [str(prepared.parent)]}))
    try:
        assert meta["vocab_size"] == 257 and eval_set.num_batches >= 1
        assert meta["train_tokens"] <= index["totals"]["train"]["tokens"]
        stream = _tokens(prepared, "train").astype(np.int32)
        row = next(loader)["inputs"][0]
        windows = np.lib.stride_tricks.sliding_window_view(stream, len(row))
        assert (windows == row).all(axis=1).any()  # a window of the train shards
    finally:
        loader.close()


def test_bench_data_step_need_estimate():
    """bench_data.py's roofline: H100 tokens/s = 989e12 x 40% / flops_per_token."""
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "scripts/bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["config"]: r for r in bench.step_need()}
    gpt2 = rows["gpt2_small"]
    assert 7e8 < gpt2["flops_per_token"] < 9e8  # ~6 x 124M params + attention
    assert gpt2["batch_tokens"] == 512 * 1024
    rate = gpt2["h100_tokens_per_s_estimate"]
    assert rate == pytest.approx(989e12 * 0.4 / gpt2["flops_per_token"])
    assert gpt2["h100_step_s_estimate"] == pytest.approx(gpt2["batch_tokens"] / rate)
    assert rows["default"]["flops_per_token"] < gpt2["flops_per_token"] / 100
