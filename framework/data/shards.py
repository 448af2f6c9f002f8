"""Token shards: a folder of raw token files plus index.json, written by scripts/prepare_data.py.

    DIR/index.json              tokenizer, fingerprint, vocab_size, eos_id, dtype, splits, totals
    DIR/train/shard-00000.bin   raw tokens (dtype), whole documents each followed by eos_id
    DIR/train/shard-00000.json  the record of work item 0 (its inputs and shards; for reruns)
    DIR/val/...

A work item (one input file, or a group of small ones) is tokenized by one worker process into
one shard, or several when it exceeds `shard_tokens`; shards are written to a temporary name and
renamed into place, and the item's record last, so a shard with a record is complete. The
index is written after every item, so a folder with index.json is a finished one. Nothing here
imports jax (prepare_data's worker processes import this module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framework.data.sources import CorpusFile, TokenArray
from framework.data.tokenizers import Tokenizer, load_tokenizer, token_dtype
from framework.errors import DataError

INDEX = "index.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TMP_SUFFIX = ".tmp"
_INDEX_KEYS = ("tokenizer", "tokenizer_fingerprint", "vocab_size", "eos_id", "dtype", "splits")


# ----------------------------------------------------------------------------------------------
# index.json


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(path.name + f".{os.getpid()}{TMP_SUFFIX}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_index(out_dir: str | Path, index: dict[str, Any]) -> Path:
    """Write DIR/index.json atomically (the last file prepare_data writes); returns its path."""
    path = Path(out_dir) / INDEX
    write_json(path, {"format_version": FORMAT_VERSION, **index})
    return path


def read_index(path: str | Path) -> dict[str, Any]:
    """The validated index.json of a token folder (DataError naming the file if unusable)."""
    p = Path(path) / INDEX
    if not p.is_file():
        raise DataError(f"{str(path)!r} holds no {INDEX}; prepare it with scripts/prepare_data.py")
    try:
        index = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"token index {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(index, dict):
        raise DataError(f"token index {str(p)!r} is not a JSON object")
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"token index {str(p)!r} has format_version {index.get('format_version')!r}; "
            f"this version reads {FORMAT_VERSION} (prepare the data again)"
        )
    missing = [k for k in _INDEX_KEYS if k not in index]
    if missing:
        raise DataError(f"token index {str(p)!r} lacks {', '.join(missing)}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"token index {str(p)!r}: dtype {index['dtype']!r} is not uint16/uint32")
    vocab, eos = index["vocab_size"], index["eos_id"]
    if type(vocab) is not int or not 1 <= vocab <= np.iinfo(index["dtype"]).max + 1:
        raise DataError(
            f"token index {str(p)!r}: vocab_size {vocab!r} does not fit {index['dtype']}"
        )
    if type(eos) is not int or not 0 <= eos < vocab:
        raise DataError(f"token index {str(p)!r}: eos_id {eos!r} is outside [0, {vocab})")
    splits = index["splits"]
    if not isinstance(splits, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
        for name in SPLITS
        for s in splits.get(name, [])
    ):
        raise DataError(f"token index {str(p)!r}: splits must map train/val to lists of shards")
    return index


def is_token_dir(path: str | Path) -> bool:
    """Whether `path` is a folder prepared by scripts/prepare_data.py (it holds index.json)."""
    return (Path(path) / INDEX).is_file()


# ----------------------------------------------------------------------------------------------
# Reading a token folder


@dataclasses.dataclass(frozen=True)
class TokenDir:
    """A prepared token folder: its train and val shards (memory-mapped) and their metadata."""

    path: Path
    train: list[TokenArray]
    val: list[TokenArray]
    vocab_size: int
    eos_id: int
    bytes_per_token: float | None
    fingerprint: str
    tokenizer: str
    dtype: str
    index: dict[str, Any]


def _check_shard(root: Path, shard: dict[str, Any], itemsize: int) -> Path:
    """The shard's path after checking it exists with the size its token count implies."""
    path = root / shard["file"]
    want = shard["tokens"] * itemsize
    if not path.is_file():
        raise DataError(f"token shard {str(path)!r} is missing (listed in {str(root / INDEX)!r})")
    size = path.stat().st_size
    if size < want:
        raise DataError(f"token shard {str(path)!r} is truncated: {size} bytes, index says {want}")
    if size != want:
        raise DataError(
            f"token shard {str(path)!r} does not match {INDEX}: {size} bytes, index says {want}"
        )
    return path


def open_token_dir(path: str | Path, tokenizer: Tokenizer | None = None) -> TokenDir:
    """Open a prepared folder, checking every shard's size against index.json and, when
    `tokenizer` is given, that the folder was tokenized with the same vocabulary."""
    root = Path(path)
    index = read_index(root)
    if tokenizer is not None and tokenizer.fingerprint != index["tokenizer_fingerprint"]:
        raise DataError(
            f"{str(root)!r} was tokenized with {index['tokenizer']!r} (fingerprint "
            f"{index['tokenizer_fingerprint']}), but the configured tokenizer is "
            f"{tokenizer.name!r} (fingerprint {tokenizer.fingerprint})"
        )
    itemsize = np.dtype(index["dtype"]).itemsize
    arrays = {
        name: [
            TokenArray(path=str(_check_shard(root, s, itemsize)), dtype=index["dtype"])
            for s in index["splits"].get(name, [])
        ]
        for name in SPLITS
    }
    return TokenDir(
        path=root,
        train=arrays["train"],
        val=arrays["val"],
        vocab_size=int(index["vocab_size"]),
        eos_id=int(index["eos_id"]),
        bytes_per_token=index.get("bytes_per_token"),
        fingerprint=index["tokenizer_fingerprint"],
        tokenizer=index["tokenizer"],
        dtype=index["dtype"],
        index=index,
    )


# ----------------------------------------------------------------------------------------------
# Writing shards (runs in prepare_data's worker processes)


@dataclasses.dataclass(frozen=True)
class Options:
    """What a worker needs to tokenize items; plain data, sent once to each worker."""

    tokenizer: str  # "byte" or a tokenizer.json path
    eos_token: str | None
    fmt: str  # a readers.FORMATS name
    field: str  # the text column/key of jsonl/parquet/arrow/hf_dataset
    on_bad_file: str  # "skip" or "fail"
    shard_tokens: int | None  # a shard closes (at a document end) once it holds this many
    settings: dict[str, Any]  # what the output depends on; recorded, a rerun must match it
    batch_bytes: int = 1 << 22  # text encoded per encode_docs call


@dataclasses.dataclass(frozen=True)
class Item:
    """One work item: input files (key, path, size on disk) -> shard(s) `shard-<index>` of a
    split; `max_bytes` caps the text read from its last file (the file --max-bytes cuts)."""

    split: str
    index: int
    files: tuple[tuple[str, str, int], ...]
    max_bytes: int | None = None

    @property
    def name(self) -> str:
        """The base name of its shards and record."""
        return f"shard-{self.index:05d}"

    @property
    def inputs(self) -> list[list[Any]]:
        """[key, size] of each input: a record of other inputs is not reused."""
        return [[key, size] for key, _, size in self.files]


def record_path(out_dir: Path, item: Item) -> Path:
    """Where an item's record lives (beside its first shard)."""
    return out_dir / item.split / f"{item.name}.json"


class ShardWriter:
    """Appends token batches to `<split>/<base>.bin` (then `<base>-001.bin`, ...), starting a
    new shard once one holds `limit` tokens; shards end at document ends, are written under a
    temporary name and renamed into place when complete."""

    def __init__(
        self, out_dir: Path, split: str, base: str, eos_id: int, dtype: Any, limit: int | None
    ):
        self.out_dir, self.split, self.base = out_dir, split, base
        self.eos_id, self.dtype, self.limit = eos_id, np.dtype(dtype), limit
        self.done: list[dict[str, Any]] = []
        self._fh = None
        self._tokens = self._docs = self._bytes = 0

    def _name(self) -> str:
        part = len(self.done)
        return f"{self.split}/{self.base}{f'-{part:03d}' if part else ''}.bin"

    def _tmp(self) -> Path:
        return self.out_dir / f"{self._name()}.{os.getpid()}{TMP_SUFFIX}"

    def _write(self, tokens: np.ndarray, docs: int, nbytes: int) -> None:
        if self._fh is None:
            self._fh = open(self._tmp(), "wb")  # noqa: SIM115 (closed in close()/discard())
        tokens.astype(self.dtype, copy=False).tofile(self._fh)
        self._tokens += len(tokens)
        self._docs += docs
        self._bytes += nbytes

    def close_shard(self) -> None:
        """Finish the current shard (if it holds anything): rename it into place."""
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        name = self._name()
        os.replace(self._tmp(), self.out_dir / name)
        self.done.append(
            {"file": name, "tokens": self._tokens, "documents": self._docs, "bytes": self._bytes}
        )
        self._tokens = self._docs = self._bytes = 0

    def add(self, stream: np.ndarray, doc_bytes: Sequence[int]) -> None:
        """Append encode_docs' stream of len(doc_bytes) documents (their text sizes)."""
        ends = np.flatnonzero(stream == self.eos_id) + 1
        sizes = np.asarray(doc_bytes, dtype=np.int64)
        if len(ends) != len(sizes):  # an EOS id inside a document: write the batch whole
            self._write(stream, len(sizes), int(sizes.sum()))
            ends, sizes = ends[:0], sizes[:0]
        cum = np.concatenate([[0], np.cumsum(sizes)])
        pos, doc = 0, 0
        while doc < len(ends):
            room = len(stream) if self.limit is None else self.limit - self._tokens
            stop = int(np.searchsorted(ends, pos + room, side="right"))
            if stop <= doc:  # the next document does not fit
                if self._tokens:
                    self.close_shard()
                    continue
                stop = doc + 1  # a document longer than a shard: it gets its own
            end = int(ends[stop - 1])
            self._write(stream[pos:end], stop - doc, int(cum[stop] - cum[doc]))
            pos, doc = end, stop
            if self.limit is not None and self._tokens >= self.limit:
                self.close_shard()

    def discard(self) -> None:
        """Remove everything written (a failed item leaves no shard)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._tmp().unlink(missing_ok=True)
        for shard in self.done:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self.done = []


_WORKER: dict[str, Any] = {}


def init_worker(options: Options, quiet_threads: bool = False) -> None:
    """Pool initializer: load the tokenizer once per worker process. With several workers,
    each encodes on one thread (they already use every core)."""
    if quiet_threads:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["options"] = options
    _WORKER["tokenizer"] = load_tokenizer(options.tokenizer, options.eos_token)


def _cut(doc: bytes | str, n: int) -> bytes:
    """The first `n` UTF-8 bytes of a document, backed off to a character boundary."""
    raw = doc if isinstance(doc, bytes) else doc.encode("utf-8")
    while 0 < n < len(raw) and raw[n] & 0xC0 == 0x80:  # a continuation byte: mid-character
        n -= 1
    return raw[:n]


def _documents(item: Item, options: Options, bad: Any) -> Iterator[tuple[bytes | str, int]]:
    """(document, its UTF-8 size) of the item's files in order, the last one's up to
    item.max_bytes of text; empty documents are left out (each would be a lone EOS). Errors
    other than DataError become a DataError naming the input file."""
    from framework.data import readers

    for n, (key, path, _) in enumerate(item.files, 1):
        left = item.max_bytes if n == len(item.files) else None
        texts = readers.iter_texts(
            options.fmt, CorpusFile(key, Path(path)), field=options.field, bad=bad
        )
        try:
            with contextlib.closing(texts):
                for doc in texts:
                    size = len(doc) if isinstance(doc, bytes) else len(doc.encode("utf-8"))
                    if left is not None and size >= left:
                        doc = _cut(doc, left)
                        if doc:
                            yield doc, len(doc)
                        return
                    if size:
                        yield doc, size
                    if left is not None:
                        left -= size
        except DataError:
            raise
        except Exception as e:  # an unreadable file: one line naming it
            raise DataError(f"input {path!r}: {type(e).__name__}: {e}") from e


def tokenize_item(out_dir: str, item: Item) -> dict[str, Any]:
    """Tokenize one item into its shard(s) and write its record (in a worker; `init_worker`
    ran first). Returns the record; on any failure nothing of the item is left behind."""
    from framework.data import readers

    options: Options = _WORKER["options"]
    tok: Tokenizer = _WORKER["tokenizer"]
    root = Path(out_dir)
    (root / item.split).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(
        root, item.split, item.name, tok.eos_id, token_dtype(tok.vocab_size), options.shard_tokens
    )
    bad = readers.BadFiles(options.on_bad_file)
    try:
        batch, sizes, total = [], [], 0
        for doc, size in _documents(item, options, bad):
            batch.append(doc)
            sizes.append(size)
            total += size
            if total >= options.batch_bytes:
                writer.add(tok.encode_docs(batch), sizes)
                batch, sizes, total = [], [], 0
        if batch:
            writer.add(tok.encode_docs(batch), sizes)
        writer.close_shard()
        record = {
            "inputs": item.inputs,
            "max_bytes": item.max_bytes,
            "settings": options.settings,
            "shards": writer.done,
            "skipped_files": bad.skipped,
            "first_skipped": bad.first,
            "null_documents": bad.nulls,
        }
        write_json(record_path(root, item), record)
    except BaseException:
        writer.discard()
        raise
    return record
