"""Corpus readers: text files, JSON lines, Parquet, Arrow and Hugging Face `save_to_disk` folders.

Every reader streams: columnar files are read one record batch at a time (never a whole table),
so a corpus larger than memory can be tokenized by scripts/prepare_data.py. Nothing here imports
jax or `datasets` (a `datasets` folder is read from its Arrow files and JSON metadata).

Null values of a text column (or a JSON `null` field) are skipped under either policy and
counted: `BadFiles.report` logs their number beside the skipped files. Empty documents are
returned as they are (read_documents leaves them out). The skip/fail policy covers text-format
files only; a jsonl line that is not UTF-8 JSON is always a DataError naming file:line.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from framework.data.sources import CorpusFile, find_files, unique_files
from framework.errors import DataError

pa: Any = None  # pyarrow and pyarrow.parquet, imported on first use (`_pyarrow`)
pq: Any = None


def _pyarrow() -> None:
    """Import pyarrow when a parquet/arrow file is read: text and token data need none (the
    lent GPU machines' image lacks it)."""
    global pa, pq
    if pa is None:
        import pyarrow
        import pyarrow.parquet

        pa, pq = pyarrow, pyarrow.parquet


log = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "arrow", "hf_dataset")
# File name endings of each columnar/line format: folders are searched for these.
SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "arrow": (".arrow",)}
# A folder of plain data files read as hf_dataset: the first ending present wins, so metadata
# .json files beside Parquet shards (a Hub snapshot) are never read as data.
HF_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")
# File-name words that put a file in a split (as `datasets.load_dataset` names them).
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
PARQUET_BATCH_ROWS = 1024  # rows per record batch read from a Parquet file
_ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format starts with it; the stream format does not
_GLOB_CHARS = "*?["


# ----------------------------------------------------------------------------------------------
# Bad files


class BadFiles:
    """What to do with a text-format file that is not UTF-8 text: "fail" (DataError naming it)
    or "skip" (count it; `report` logs one warning). Also counts skipped null values."""

    def __init__(self, policy: Literal["skip", "fail"] = "fail"):
        if policy not in ("skip", "fail"):
            raise DataError(f"bad-file policy must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self.first: str | None = None
        self.nulls = 0
        self.first_null: str | None = None
        self._reported = (0, 0)

    def not_text(self, path: str | Path, why: str) -> None:
        """A file that is not UTF-8 text: raise under "fail", count under "skip"."""
        if self.policy == "fail":
            raise DataError(f"{str(path)!r} is not UTF-8 text: {why}")
        self.skipped += 1
        if self.first is None:
            self.first = str(path)

    def null(self, path: str | Path, count: int = 1) -> None:
        """Null documents skipped in `path` (a null column value or a JSON null field)."""
        if count:
            self.nulls += count
            if self.first_null is None:
                self.first_null = str(path)

    def report(self) -> str | None:
        """Log one warning for the skipped files (and one for null values), if any were skipped
        since the last report; returns the logged text."""
        if (self.skipped, self.nulls) == self._reported:
            return None
        lines = []
        if self.skipped != self._reported[0]:
            lines.append(
                f"skipped {self.skipped} files that are not UTF-8 text (first: {self.first})"
            )
        if self.nulls != self._reported[1]:
            lines.append(f"skipped {self.nulls} null documents (first in: {self.first_null})")
        self._reported = (self.skipped, self.nulls)
        for line in lines:
            log.warning("%s", line)
        return "; ".join(lines)


# ----------------------------------------------------------------------------------------------
# Discovery


def list_inputs(fmt: str, paths: Sequence[str], pattern: str | None = None) -> list[CorpusFile]:
    """The input files of `paths` (files, folders searched recursively, globs) for a format.

    text: `pattern` is the file-name glob inside folders (default "*.py"); jsonl/parquet/arrow:
    folders yield the format's file endings and `pattern` is unused (a file named directly is
    read whatever its name); hf_dataset: `pattern` names the split (default "train")."""
    _check_format(fmt)
    if fmt == "text":
        return find_files(paths, pattern or "*.py")
    found: list[CorpusFile] = []
    for entry in paths:
        if fmt == "hf_dataset":
            found.extend(_hf_inputs(entry, pattern))
        else:
            found.extend(_by_suffix(entry, SUFFIXES[fmt]))
    return unique_files(found)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")


def _by_suffix(entry: str, suffixes: Sequence[str]) -> list[CorpusFile]:
    """find_files for one entry, keeping files with one of `suffixes` (or named directly)."""
    pattern = f"*{suffixes[0]}" if len(suffixes) == 1 else "*"
    files = find_files([entry], pattern)
    named = Path(entry)
    if not any(c in entry for c in _GLOB_CHARS) and named.is_file():
        return files  # a file named directly: the user says which format it is
    kept = [f for f in files if f.path.name.lower().endswith(tuple(suffixes))]
    if not kept:
        raise DataError(f"data path {entry!r} holds no {' or '.join(suffixes)} file")
    return kept


def _hf_inputs(entry: str, split: str | None) -> list[CorpusFile]:
    """The data files of a hf_dataset entry (a folder, a data file, or a glob of them)."""
    if any(c in entry for c in _GLOB_CHARS):
        matches = sorted(glob.glob(entry, recursive=True))
        if not matches:
            raise DataError(f"data path {entry!r}: the glob matches no file")
        return [f for m in matches for f in _hf_inputs(m, split)]
    root = Path(entry)
    if root.is_file():
        if not root.name.lower().endswith(HF_DATA_SUFFIXES):
            raise DataError(
                f"hf_dataset file {entry!r}: expected a {', '.join(HF_DATA_SUFFIXES)} file"
            )
        return [CorpusFile(root.name, root)]
    if not root.is_dir():
        what = "is not a regular file or folder" if root.exists() else "does not exist"
        raise DataError(f"data path {entry!r} {what}")
    if (root / "dataset_dict.json").is_file():
        return _hf_dict(root, split)
    if (root / "state.json").is_file():
        return _hf_saved(root)
    return _hf_plain(root, split)


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise DataError(f"hf_dataset {str(folder)!r}: {path.name} is not readable JSON: {e}") from e


def _hf_dict(root: Path, split: str | None) -> list[CorpusFile]:
    """One split of a `DatasetDict.save_to_disk` folder (keys prefixed with the split)."""
    meta = _read_json(root / "dataset_dict.json", root)
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, list):
        raise DataError(f"hf_dataset {str(root)!r}: dataset_dict.json has no 'splits' list")
    name = split or "train"
    if name not in splits:
        raise DataError(
            f"hf_dataset {str(root)!r} has no split {name!r} (splits: {', '.join(splits)})"
        )
    sub = root / name
    if not (sub / "state.json").is_file():
        raise DataError(f"hf_dataset {str(root)!r}: split folder {name!r} has no state.json")
    return [CorpusFile(f"{name}/{f.key}", f.path) for f in _hf_saved(sub)]


def _hf_saved(root: Path) -> list[CorpusFile]:
    """The Arrow files of a `Dataset.save_to_disk` folder, in state.json's order."""
    state = _read_json(root / "state.json", root)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"hf_dataset {str(root)!r}: state.json lists no '_data_files'")
    out = []
    for item in entries:
        name = item.get("filename") if isinstance(item, dict) else None
        if not isinstance(name, str) or not (root / name).is_file():
            raise DataError(f"hf_dataset {str(root)!r}: data file {name!r} is missing")
        out.append(CorpusFile(name, root / name))
    return out


def _split_words(key: str) -> set[str]:
    """The words of a relative file name ('data/train-00000-of-00002.parquet' -> train, ...)."""
    return set(re.split(r"[-_./\s]+", key.lower()))


def _hf_plain(root: Path, split: str | None) -> list[CorpusFile]:
    """A folder of plain data files: one format (the first of HF_DATA_SUFFIXES present); files
    named for splits (train-*, test/...) select `split` (default train), else all files."""
    files = find_files([str(root)], "*")
    for suffix in HF_DATA_SUFFIXES:
        data = [f for f in files if f.path.name.lower().endswith(suffix)]
        if data:
            break
    else:
        raise DataError(
            f"hf_dataset {str(root)!r}: no state.json, dataset_dict.json "
            f"or {', '.join(HF_DATA_SUFFIXES)} file"
        )
    named = {s for f in data for s, words in SPLIT_WORDS.items() if _split_words(f.key) & {*words}}
    if split is None and not named:
        return data
    wanted = split or "train"
    words = set(SPLIT_WORDS.get(wanted, (wanted.lower(),)))
    chosen = [f for f in data if _split_words(f.key) & words]
    if not chosen:
        raise DataError(
            f"hf_dataset {str(root)!r}: no {suffix} file of split {wanted!r} "
            f"(files name splits: {', '.join(sorted(named)) or 'none'})"
        )
    return chosen


# ----------------------------------------------------------------------------------------------
# Reading


def iter_texts(
    fmt: str, file: CorpusFile, *, field: str = "text", bad: BadFiles
) -> Iterator[bytes | str]:
    """The documents of one file, streamed: text -> the whole file (bytes); jsonl -> `field` of
    each line's object; parquet/arrow/hf_dataset -> the string column `field`, batch by batch."""
    _check_format(fmt)
    kind = _file_kind(fmt, file)
    if kind == "text":
        doc = _read_text(file.path, bad)
        if doc is not None:
            yield doc
    elif kind == "jsonl":
        yield from _jsonl_texts(file.path, field, bad)
    else:
        for column in _column_batches(kind, file.path, field):
            values = column.to_pylist()
            nulls = column.null_count
            if nulls:
                bad.null(file.path, nulls)
                values = [v for v in values if v is not None]
            yield from values


def iter_records(fmt: str, file: CorpusFile, *, bad: BadFiles | None = None) -> Iterator[dict]:
    """The whole records of one file (chat data): jsonl objects, or parquet/arrow rows as dicts,
    streamed batch by batch. `bad` is unused (kept for symmetry with iter_texts): records are
    returned as written, nulls included."""
    del bad
    _check_format(fmt)
    kind = _file_kind(fmt, file)
    if kind == "text":
        raise DataError(f"{str(file.path)!r}: the text format has no records (use jsonl, ...)")
    if kind == "jsonl":
        for _, _, record in _jsonl_objects(file.path):
            yield record
        return
    for batch in _record_batches(kind, file.path, None):
        yield from batch.to_pylist()


def read_documents(
    fmt: str,
    files: Sequence[CorpusFile],
    *,
    field: str = "text",
    bad: BadFiles,
    max_bytes: int | None = None,
) -> list[tuple[str, bytes | str]]:
    """(file key, document) in order until `max_bytes` UTF-8 bytes were read (the last document
    is cut at a character boundary); empty documents are left out. Logs `bad.report()`."""
    docs: list[tuple[str, bytes | str]] = []
    total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        budget = None if max_bytes is None else max_bytes - total
        if _file_kind(fmt, f) == "text":  # read only what is needed of a large text file
            doc = _read_text(f.path, bad, budget)
            if doc:
                docs.append((f.key, doc))
                cut = budget is not None and f.path.stat().st_size > budget
                total = max_bytes if cut else total + len(doc)
            continue
        with contextlib.closing(iter_texts(fmt, f, field=field, bad=bad)) as texts:
            for doc in texts:
                size = len(doc.encode("utf-8")) if isinstance(doc, str) else len(doc)
                if max_bytes is not None and total + size >= max_bytes:
                    doc, size = _cut(doc, max_bytes - total), max_bytes - total
                if doc:
                    docs.append((f.key, doc))
                total += size
                if max_bytes is not None and total >= max_bytes:
                    break
    bad.report()
    return docs


def _cut(doc: bytes | str, n: int) -> bytes | str:
    """The first `n` UTF-8 bytes of a document, backed off to a character boundary."""
    raw = doc if isinstance(doc, bytes) else doc.encode("utf-8")
    end = n
    while 0 < end < len(raw) and raw[end] & 0xC0 == 0x80:  # a continuation byte: mid-character
        end -= 1
    return raw[:end] if isinstance(doc, bytes) else raw[:end].decode("utf-8")


def _file_kind(fmt: str, file: CorpusFile) -> str:
    """How to read a file: its format, or for hf_dataset its file ending."""
    if fmt != "hf_dataset":
        return fmt
    name = file.path.name.lower()
    for kind, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return kind
    raise DataError(f"hf_dataset file {str(file.path)!r}: expected a .parquet/.arrow/.jsonl file")


def _read_text(path: Path, bad: BadFiles, limit: int | None = None) -> bytes | None:
    """A text file's bytes (its first `limit` bytes, cut at a character boundary), or None if
    it is not UTF-8 text and `bad` skips it."""
    with open(path, "rb") as fh:
        data = fh.read() if limit is None else fh.read(limit + 3)
    cut = limit is not None and len(data) > limit
    nul = data.find(b"\0", 0, limit)
    if nul >= 0:
        bad.not_text(path, f"NUL byte at offset {nul} (a binary file?)")
        return None
    if cut:
        data = _cut(data, limit)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.not_text(path, f"invalid byte 0x{data[e.start]:02x} at offset {e.start}")
        return None
    return data


def _jsonl_objects(path: Path) -> Iterator[tuple[int, bytes, dict]]:
    """(line number, raw line, object) of each non-blank line of a JSON-lines file."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            hint = " (one JSON object per line is expected)"
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for non-UTF-8
                hint = hint if line.lstrip()[:1] == b"[" else ""
                raise DataError(f"{path}:{lineno}: not valid JSON: {e}{hint}") from e
            if not isinstance(record, dict):
                got = type(record).__name__
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {got}{hint}")
            yield lineno, line, record


def _jsonl_texts(path: Path, field: str, bad: BadFiles) -> Iterator[str]:
    """`field` of each JSON-lines record; a JSON null is skipped (counted in `bad`)."""
    for lineno, line, record in _jsonl_objects(path):
        if field not in record:
            keys = ", ".join(map(str, record)) or "none"
            raise DataError(f"{path}:{lineno}: no field {field!r} (fields: {keys})")
        text = record[field]
        if text is None:
            bad.null(path)
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {field!r} is a {type(text).__name__}, not a string"
            )
        if b"\\u" in line or b"\\U" in line:  # only a \u escape can make a lone surrogate
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    f"{path}:{lineno}: field {field!r} holds a lone surrogate escape (not Unicode)"
                ) from e
        yield text


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _check_column(path: Path, schema: pa.Schema, field: str) -> None:
    """DataError unless `schema` has a string column `field`."""
    if field not in schema.names:
        raise DataError(
            f"{str(path)!r} has no column {field!r} (columns: {', '.join(schema.names) or 'none'})"
        )
    kind = schema.field(field).type
    if not _is_string(kind):
        raise DataError(f"{str(path)!r}: column {field!r} has type {kind}, not a string")


def _column_batches(kind: str, path: Path, field: str) -> Iterator[pa.Array]:
    """The string column `field` of a parquet/arrow file, one record batch at a time."""
    for batch in _record_batches(kind, path, field):
        yield batch.column(field)


def _record_batches(kind: str, path: Path, field: str | None) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet or arrow file (only column `field` if given, checked to be a
    string column first); Arrow errors become a DataError naming the file."""
    _pyarrow()
    try:
        if kind == "parquet":
            yield from _parquet_batches(path, field)
        else:
            yield from _arrow_batches(path, field)
    except (pa.ArrowException, OSError) as e:
        what = "Parquet file" if kind == "parquet" else "Arrow IPC file or stream"
        raise DataError(f"{str(path)!r} is not a readable {what}: {e}") from e


def _parquet_batches(path: Path, field: str | None) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(path)
    try:
        columns = None
        if field is not None:
            _check_column(path, pf.schema_arrow, field)
            columns = [field]
        yield from pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    finally:
        pf.close()


def _arrow_batches(path: Path, field: str | None) -> Iterator[pa.RecordBatch]:
    """Batches of an Arrow IPC file (random access, "ARROW1" magic) or stream (what
    `datasets.save_to_disk` writes), read one at a time."""
    with pa.OSFile(str(path), "rb") as source:
        is_file_format = source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
        source.seek(0)
        if is_file_format:
            reader = pa.ipc.open_file(source)
            batches: Iterator[pa.RecordBatch] = (
                reader.get_batch(i) for i in range(reader.num_record_batches)
            )
        else:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        if field is not None:
            _check_column(path, reader.schema, field)
        for batch in batches:
            yield batch if field is None else batch.select([field])
