"""framework.data.readers: every corpus format reads back what was written, columnar files
stream batch by batch, and each bad input is one DataError naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framework.data import readers
from framework.data.readers import BadFiles, iter_records, iter_texts, list_inputs, read_documents
from framework.errors import DataError

datasets.disable_progress_bars()

DOCS = ["héllo wörld", "", "日本語のテキスト 🚀", "line one\nline two\n", 'tab\tand \\ quote "']


def _texts(fmt: str, paths: list[str], pattern: str | None = None, **kw) -> list:
    bad = kw.pop("bad", None) or BadFiles("fail")
    files = list_inputs(fmt, paths, pattern)
    return [t for f in files for t in iter_texts(fmt, f, bad=bad, **kw)]


def _write_jsonl(path: Path, records: list, *, raw_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_arrow(path: Path, table: pa.Table, *, stream: bool, max_chunksize: int = 2) -> Path:
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=max_chunksize):
            writer.write_batch(batch)
    return path


# ----------------------------------------------------------------------------------------------
# Round trips


def test_formats_are_the_known_five():
    assert readers.FORMATS == ("text", "jsonl", "parquet", "arrow", "hf_dataset")
    with pytest.raises(DataError, match="csv"):
        list_inputs("csv", ["x"])


def test_text_files_read_back_as_bytes(tmp_path: Path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    bodies = {"a.txt": "héllo 🚀\n".encode(), "sub/b.txt": b"plain\n", "c.md": b"ignored"}
    for name, body in bodies.items():
        (root / name).write_bytes(body)
    files = list_inputs("text", [str(root)], "*.txt")
    assert [f.key for f in files] == ["a.txt", "sub/b.txt"]
    assert _texts("text", [str(root)], "*.txt") == [bodies["a.txt"], bodies["sub/b.txt"]]
    (root / "d.py").write_bytes(b"x = 1\n")
    assert [f.key for f in list_inputs("text", [str(root)])] == ["d.py"]  # default *.py


def test_jsonl_reads_field_skips_blank_lines_and_finds_json_files(tmp_path: Path):
    root = tmp_path / "data"
    _write_jsonl(root / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[:3])])
    (root / "a.jsonl").write_text(
        (root / "a.jsonl").read_text(encoding="utf-8") + "\n   \n", encoding="utf-8"
    )
    _write_jsonl(root / "sub" / "b.json", [{"body": "ignored", "text": d} for d in DOCS[3:]])
    (root / "notes.txt").write_text("not data")
    files = list_inputs("jsonl", [str(root)])
    assert [f.key for f in files] == ["a.jsonl", "sub/b.json"]
    assert _texts("jsonl", [str(root)]) == DOCS
    assert _texts("jsonl", [str(root / "sub" / "b.json")], field="body") == ["ignored"] * 2
    # a file named directly is read whatever its name; a glob keeps the format's endings
    named = _write_jsonl(tmp_path / "extra.txt", [{"text": "x"}])
    assert _texts("jsonl", [str(named)]) == ["x"]
    assert _texts("jsonl", [str(root / "**" / "*")]) == DOCS


def test_jsonl_null_field_is_skipped_and_counted(tmp_path: Path, caplog):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": None}, {"text": "b"}])
    bad = BadFiles("fail")
    assert _texts("jsonl", [str(path)], bad=bad) == ["a", "b"]
    assert bad.nulls == 1 and bad.skipped == 0
    with caplog.at_level(logging.WARNING, logger="framework.data.readers"):
        bad.report()
        bad.report()  # nothing new: no second warning
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 null documents (first in: {path})"
    ]


def test_parquet_reads_string_column_across_row_groups(tmp_path: Path):
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": pa.array(["z"], pa.large_string())}), tmp_path / "b.parquet")
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 3
    assert _texts("parquet", [str(tmp_path)]) == DOCS + ["z"]
    records = list(iter_records("parquet", list_inputs("parquet", [str(tmp_path)])[0], bad=None))
    assert records == [{"id": i, "text": d} for i, d in enumerate(DOCS)]


def test_parquet_streams_batch_by_batch(tmp_path: Path, monkeypatch):
    """The first document comes back after one small batch was read; reading a whole table or
    row group at once is patched to fail."""
    docs = [f"doc {i} ü" for i in range(20)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=4)
    pulled = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def counting_iter_batches(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    def whole(*args, **kwargs):
        raise AssertionError("read a whole table")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter_batches)
    for name in ("read", "read_row_groups", "read_row_group"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 3)
    (file,) = list_inputs("parquet", [str(tmp_path / "a.parquet")])
    it = iter_texts("parquet", file, bad=BadFiles("fail"))
    assert next(it) == docs[0]
    assert pulled == [3]
    assert [docs[0], *it] == docs
    assert len(pulled) > 5 and max(pulled) <= 3


def test_parquet_null_values_are_skipped(tmp_path: Path):
    pq.write_table(pa.table({"text": ["a", None, "b", None]}), tmp_path / "a.parquet")
    bad = BadFiles("skip")
    assert _texts("parquet", [str(tmp_path)], bad=bad) == ["a", "b"]
    assert bad.nulls == 2 and bad.skipped == 0


@pytest.mark.parametrize("stream", [False, True], ids=["ipc_file", "ipc_stream"])
def test_arrow_file_and_stream_formats(tmp_path: Path, stream: bool):
    table = pa.table({"text": pa.array(DOCS, pa.large_string()), "n": list(range(len(DOCS)))})
    _write_arrow(tmp_path / "a.arrow", table, stream=stream)
    assert (tmp_path / "a.arrow").read_bytes()[:6] == b"ARROW1" or stream
    assert _texts("arrow", [str(tmp_path)]) == DOCS
    (file,) = list_inputs("arrow", [str(tmp_path)])
    assert list(iter_records("arrow", file, bad=None)) == table.to_pylist()


def test_arrow_stream_yields_before_reading_the_rest(tmp_path: Path):
    """A stream cut after its first batches still yields those documents first (nothing reads
    the whole file up front); the damage is then one DataError naming the file."""
    docs = [f"document {i} " * 50 for i in range(40)]
    path = _write_arrow(tmp_path / "a.arrow", pa.table({"text": docs}), stream=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    it = iter_texts("arrow", list_inputs("arrow", [str(path)])[0], bad=BadFiles("fail"))
    assert next(it) == docs[0]
    with pytest.raises(DataError, match="a.arrow"):
        list(it)


def test_hf_dataset_save_to_disk_in_shard_order(tmp_path: Path):
    docs = [f"{i}: {DOCS[i % len(DOCS)]}" for i in range(12)]
    ds = datasets.Dataset.from_dict({"text": docs, "label": list(range(12))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    files = list_inputs("hf_dataset", [str(tmp_path / "ds")])
    assert len(files) == 3 and all(f.key.startswith("data-") for f in files)
    assert _texts("hf_dataset", [str(tmp_path / "ds")]) == docs
    records = [r for f in files for r in iter_records("hf_dataset", f, bad=None)]
    assert records == [{"text": d, "label": i} for i, d in enumerate(docs)]
    # the same Arrow files read as format "arrow" (IPC stream format)
    assert sorted(_texts("arrow", [str(tmp_path / "ds")])) == sorted(docs)


def test_hf_dataset_dict_takes_train_or_the_named_split(tmp_path: Path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1 ✓", "t2"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _texts("hf_dataset", [str(tmp_path / "dd")]) == ["t1 ✓", "t2"]
    assert _texts("hf_dataset", [str(tmp_path / "dd")], "test") == ["e1"]
    keys = [f.key for f in list_inputs("hf_dataset", [str(tmp_path / "dd")], "test")]
    assert keys and all(k.startswith("test/") for k in keys)
    with pytest.raises(DataError, match=r"dd.*no split 'validation' \(splits: train, test\)"):
        list_inputs("hf_dataset", [str(tmp_path / "dd")], "validation")


def test_hf_dataset_folder_of_plain_files(tmp_path: Path):
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"text": ["p1", "p2"]}), plain / "part-0.parquet")
    pq.write_table(pa.table({"text": ["p3"]}), plain / "part-1.parquet")
    (plain / "dataset_infos.json").write_text("{}")  # metadata beside shards: not data
    assert _texts("hf_dataset", [str(plain)]) == ["p1", "p2", "p3"]
    # files named for splits: train by default, another split by name
    hub = tmp_path / "hub"
    _write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", [{"text": "tr"}])
    _write_jsonl(hub / "data" / "validation-00000-of-00001.jsonl", [{"text": "va"}])
    assert _texts("hf_dataset", [str(hub)]) == ["tr"]
    assert _texts("hf_dataset", [str(hub)], "validation") == ["va"]
    with pytest.raises(DataError, match="hub.*split 'test'"):
        list_inputs("hf_dataset", [str(hub)], "test")
    # a data file named directly
    assert _texts("hf_dataset", [str(plain / "part-1.parquet")]) == ["p3"]


def test_hf_dataset_without_the_column_lists_its_columns(tmp_path: Path):
    datasets.Dataset.from_dict({"content": ["a"], "meta": [1]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"data-.*\.arrow.*no column 'text' \(columns: content, me"):
        _texts("hf_dataset", [str(tmp_path / "ds")])
    assert _texts("hf_dataset", [str(tmp_path / "ds")], field="content") == ["a"]


def test_read_documents_stops_at_max_bytes_on_a_character_boundary(tmp_path: Path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "a.txt").write_bytes("ab€".encode())  # 5 bytes: € is 3
    (root / "b.txt").write_bytes(b"0123456789")
    (root / "empty.txt").write_bytes(b"")
    files = list_inputs("text", [str(root)], "*.txt")
    bad = BadFiles("fail")
    assert read_documents("text", files, bad=bad) == [
        ("a.txt", "ab€".encode()),
        ("b.txt", b"0123456789"),
    ]
    assert read_documents("text", files, bad=bad, max_bytes=9) == [
        ("a.txt", "ab€".encode()),
        ("b.txt", b"0123"),
    ]
    assert read_documents("text", files, bad=bad, max_bytes=4) == [("a.txt", b"ab")]  # not mid-€
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "ab€"}, {"text": ""}, {"text": "xyz"}])
    jfiles = list_inputs("jsonl", [str(path)])
    assert read_documents("jsonl", jfiles, bad=bad) == [("d.jsonl", "ab€"), ("d.jsonl", "xyz")]
    assert read_documents("jsonl", jfiles, bad=bad, max_bytes=7) == [
        ("d.jsonl", "ab€"),
        ("d.jsonl", "xy"),
    ]
    assert read_documents("jsonl", jfiles, bad=bad, max_bytes=3) == [("d.jsonl", "ab")]
    pq.write_table(pa.table({"text": ["ü" * 3, "xyz"]}), tmp_path / "p0.parquet", row_group_size=1)
    pq.write_table(pa.table({"text": ["later"]}), tmp_path / "p1.parquet")
    pfiles = list_inputs("parquet", [str(tmp_path)])
    assert read_documents("parquet", pfiles, bad=bad, max_bytes=8) == [
        ("p0.parquet", "üüü"),
        ("p0.parquet", "xy"),
    ]
    assert [d for _, d in read_documents("parquet", pfiles, bad=bad)] == ["üüü", "xyz", "later"]


# ----------------------------------------------------------------------------------------------
# Bad inputs: one DataError naming the path


def test_missing_path_empty_glob_and_no_file_of_the_format(tmp_path: Path):
    for fmt in readers.FORMATS:
        with pytest.raises(DataError, match="nope.*does not exist"):
            list_inputs(fmt, [str(tmp_path / "nope")])
        with pytest.raises(DataError, match=r"\*\.zzz.*glob matches no file"):
            list_inputs(fmt, [str(tmp_path / "*.zzz")])
    (tmp_path / "only.txt").write_text("x")
    for fmt in ("jsonl", "parquet", "arrow", "hf_dataset"):
        with pytest.raises(DataError, match=str(tmp_path)):
            list_inputs(fmt, [str(tmp_path)])


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_missing_and_non_string_columns(tmp_path: Path, fmt: str):
    table = pa.table({"body": ["a"], "n": [1]})
    path = tmp_path / f"a.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        _write_arrow(path, table, stream=False)
    with pytest.raises(DataError, match=rf"a\.{fmt}.*no column 'text' \(columns: body, n\)"):
        _texts(fmt, [str(path)])
    with pytest.raises(DataError, match=rf"a\.{fmt}.*column 'n' has type int64, not a string"):
        _texts(fmt, [str(path)], field="n")
    assert _texts(fmt, [str(path)], field="body") == ["a"]


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_file_that_is_not_of_the_format(tmp_path: Path, fmt: str):
    path = tmp_path / f"junk.{fmt}"
    path.write_bytes(b"definitely not columnar data")
    with pytest.raises(DataError, match=rf"junk\.{fmt}.*not a readable"):
        _texts(fmt, [str(path)])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"caf\xe9 latin-1\n", "invalid byte 0xe9 at offset 3"),
        (b"ab\x00cd", "NUL byte at offset 2"),
    ],
    ids=["not_utf8", "nul_bytes"],
)
def test_text_file_that_is_not_text_fails_or_is_skipped(tmp_path: Path, caplog, body, why):
    (tmp_path / "a.txt").write_bytes(b"good\n")
    (tmp_path / "b.txt").write_bytes(body)
    (tmp_path / "c.txt").write_bytes(body)
    files = list_inputs("text", [str(tmp_path)], "*.txt")
    with pytest.raises(DataError, match=rf"b\.txt.*not UTF-8 text: {why}"):
        _texts("text", [str(tmp_path)], "*.txt")
    with pytest.raises(DataError, match=r"b\.txt"):
        read_documents("text", files, bad=BadFiles("fail"))
    bad = BadFiles("skip")
    with caplog.at_level(logging.WARNING, logger="framework.data.readers"):
        docs = read_documents("text", files, bad=bad)
        bad.report()  # already reported by read_documents: logs nothing more
    assert docs == [("a.txt", b"good\n")]
    assert bad.skipped == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 2 files that are not UTF-8 text (first: {tmp_path / 'b.txt'})"
    ]


def test_bad_jsonl_lines_name_file_and_line(tmp_path: Path):
    cases = {
        "broken.jsonl": (
            [{"text": "ok"}],
            ['{"text": "unterminated'],
            r"broken\.jsonl:2: not valid",
        ),
        "array.json": ([], ['[{"text": "a"}]'], r"array\.json:1: .*one JSON object per line"),
        "scalar.jsonl": ([{"text": "a"}], ["3"], r"scalar\.jsonl:2: expected a JSON object"),
        "nofield.jsonl": ([{"body": "a"}], [], r"nofield\.jsonl:1: no field 'text' \(fields: body"),
        "number.jsonl": ([{"text": "a"}, {"text": 5}], [], r"number\.jsonl:2: .*int, not a string"),
        "list.jsonl": ([{"text": ["a"]}], [], r"list\.jsonl:1: field 'text' is a list"),
        "surrogate.jsonl": ([], ['{"text": "\\ud800"}'], r"surrogate\.jsonl:1: .*surrogate"),
    }
    for name, (records, raw, pattern) in cases.items():
        path = _write_jsonl(tmp_path / name, records, raw_lines=raw)
        with pytest.raises(DataError, match=pattern):
            _texts("jsonl", [str(path)])
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid JSON"):
        _texts("jsonl", [str(latin)])
    with pytest.raises(DataError, match=r"scalar\.jsonl:2"):
        list(
            iter_records(
                "jsonl", list_inputs("jsonl", [str(tmp_path / "scalar.jsonl")])[0], bad=None
            )
        )


def test_bad_files_policy_and_text_records():
    with pytest.raises(DataError, match="'skip' or 'fail'"):
        BadFiles("ignore")
    assert BadFiles("skip").report() is None
    with pytest.raises(DataError, match="text format has no records"):
        list(iter_records("text", readers.CorpusFile("a", Path("a.txt")), bad=None))
