"""Where examples come from: text corpora, token files, synthetic tasks; all random access.

A source here is anything with `len(source)` and `source.take(indices) -> batch dict`: the
pipeline shuffles and shards *indices*, and a source turns a batch of indices into arrays in
one vectorized read. Nothing in this module imports jax (grain worker processes import it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import logging
import os
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framework.data.config import STDLIB
from framework.errors import DataError

log = logging.getLogger(__name__)

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CHECK_CHUNK = 1 << 22  # tokens per vectorized id check: a few MB, so a huge file never loads whole
_SYNTHETIC_SEED = 20240229  # the synthetic tasks are fixed data; shuffle_seed only orders them


# ----------------------------------------------------------------------------------------------
# Corpus discovery and reading


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One corpus file: `key` is its path relative to the entry that found it (split hashing)."""

    key: str
    path: Path


def stdlib_root() -> Path:
    """The Python standard library's source folder (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _regular(path: Path) -> bool:
    """Whether `path` is a regular file (or a link to one); warns naming anything else, since
    reading a FIFO, socket or device would block or never end."""
    if path.is_file():
        return True
    log.warning("skipping %s: not a regular file (a FIFO, socket, device or broken link)", path)
    return False


def _walk(root: Path, pattern: str) -> list[CorpusFile]:
    """Regular files under `root` matching `pattern`, sorted by relative path; skips installed
    packages."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if fnmatch.fnmatch(name, pattern) and _regular(path):
                found.append(CorpusFile(path.relative_to(root).as_posix(), path))
    return sorted(found, key=lambda f: f.key)


def find_files(paths: Sequence[str], pattern: str = "*.py") -> list[CorpusFile]:
    """Expand files, folders (recursive, `pattern`), globs and 'stdlib' into a sorted file list."""
    out: list[CorpusFile] = []
    for entry in paths:
        if entry == STDLIB:
            files = _walk(stdlib_root(), "*.py")
        elif any(c in entry for c in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"data path {entry!r}: the glob matches no file")
            files = []
            for m in matches:
                p = Path(m)
                if p.is_dir():
                    files.extend(_walk(p, pattern))
                elif _regular(p):
                    files.append(CorpusFile(p.as_posix(), p))
        else:
            p = Path(entry)
            if p.is_dir():
                files = _walk(p, pattern)
            elif p.is_file():
                files = [CorpusFile(p.name, p)]
            elif p.exists():
                raise DataError(f"data path {entry!r} is not a regular file or folder")
            else:
                raise DataError(f"data path {entry!r} does not exist")
        if not files:
            raise DataError(f"data path {entry!r} holds no file matching {pattern!r}")
        out.extend(files)
    return unique_files(out)


def unique_files(files: Sequence[CorpusFile]) -> list[CorpusFile]:
    """Files in order, each real file once (a file reached through two entries or links)."""
    seen: set[Path] = set()
    unique = []
    for f in files:
        resolved = f.path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(f)
    return unique


def split_by_file(keys: Sequence[str], val_fraction: float) -> list[bool]:
    """Which files are held out: crc32(key) below the fraction; >= 1 per side if >= 2 files."""
    if val_fraction <= 0 or len(keys) < 2:
        return [False] * len(keys)
    u = [zlib.crc32(k.encode()) / 2**32 for k in keys]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    return is_val


# ----------------------------------------------------------------------------------------------
# Token files


class TokenArray:
    """A 1-D token array in memory or memory-mapped from a .bin/.npy file.

    File-backed arrays map lazily and travel to grain worker processes as (path, dtype),
    never as their contents (an np.memmap would otherwise be copied whole)."""

    def __init__(
        self, data: np.ndarray | None = None, *, path: str | None = None, dtype: str = "uint16"
    ):
        self.path, self.dtype = path, dtype
        self.ids_checked = False  # prepare_data.py shards: written in range, not scanned again
        self._data = data
        if data is None:
            self._data = self._open()
        self.length = int(self._data.shape[0])

    def _open(self) -> np.ndarray:
        path = self.path
        p = Path(path)
        if not p.is_file():
            raise DataError(f"token file {path!r} does not exist")
        if p.suffix == ".npy":
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise DataError(f"token file {path!r} is not a readable .npy array: {e}") from e
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise DataError(
                    f"token file {path!r} must hold a 1-D integer array, "
                    f"got shape {arr.shape} dtype {arr.dtype}"
                )
            if arr.shape[0] == 0:
                raise DataError(f"token file {path!r} is empty")
            return arr
        if p.suffix != ".bin":
            raise DataError(f"token file {path!r}: expected a .bin or .npy file")
        size, itemsize = p.stat().st_size, np.dtype(self.dtype).itemsize
        if size == 0:
            raise DataError(f"token file {path!r} is empty")
        if size % itemsize:
            raise DataError(
                f"token file {path!r} has {size} bytes, not a multiple of "
                f"{itemsize} ({self.dtype}); is data.token_dtype right?"
            )
        return np.memmap(p, dtype=self.dtype, mode="r")

    @property
    def data(self) -> np.ndarray:
        """The tokens (maps the file on first use in this process)."""
        if self._data is None:
            self._data = self._open()
        return self._data

    def __len__(self) -> int:
        return self.length

    def check_ids(self, vocab: int | None, vocab_from: str = "") -> int:
        """The largest id, after checking every id is >= 0 and below `vocab` where known
        (`vocab_from` says where it comes from): a DataError names the file and the first bad
        index. Scans in chunks, so a multi-GB memmap is read once and never loaded whole."""
        data = self.data
        may_be_negative = np.issubdtype(data.dtype, np.signedinteger)
        top = -1
        for start in range(0, len(data), _CHECK_CHUNK):
            chunk = data[start : start + _CHECK_CHUNK]
            hi = int(chunk.max())
            if (may_be_negative and int(chunk.min()) < 0) or (vocab is not None and hi >= vocab):
                self._raise_bad_id(chunk.astype(np.int64), start, vocab, vocab_from)
            top = max(top, hi)
        return top

    def _raise_bad_id(self, chunk: np.ndarray, start: int, vocab: int | None, vocab_from: str):
        """The DataError for the first id of `chunk` (at offset `start`) outside [0, vocab)."""
        bad = chunk < 0 if vocab is None else (chunk < 0) | (chunk >= vocab)
        i = int(np.argmax(bad))
        allowed = "ids must be >= 0" if vocab is None else f"outside [0, {vocab}){vocab_from}"
        raise DataError(
            f"token file {self.path!r}: token {start + i} has id {int(chunk[i])}, {allowed}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_data"] = None
        return state


def sidecar_path(token_file: str) -> Path:
    """Optional metadata JSON beside a .bin/.npy token file ({"vocab_size", "eos_id",
    "bytes_per_token"}; prepare_data.py folders keep theirs in index.json instead)."""
    return Path(str(token_file) + ".json")


def read_sidecar(token_file: str) -> dict[str, Any]:
    """The token file's metadata (vocab_size, bytes_per_token, ...) or {} if none was written."""
    p = sidecar_path(token_file)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"token metadata {str(p)!r} is not valid JSON: {e}") from e


# ----------------------------------------------------------------------------------------------
# Random-access sources


class SequenceSource:
    """Independent token sequences [N, L+1] (synthetic LM): index i -> row i."""

    def __init__(self, sequences: np.ndarray):
        self.sequences = sequences

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences."""
        return int(self.sequences.size)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{"inputs", "targets"}: int32 [n, L], targets are inputs shifted left by one."""
        w = self.sequences[np.asarray(indices, dtype=np.int64)]
        return {
            "inputs": np.ascontiguousarray(w[:, :-1], dtype=np.int32),
            "targets": np.ascontiguousarray(w[:, 1:], dtype=np.int32),
        }


class ExampleSource:
    """Labelled examples (classification): index i -> (inputs[i], labels[i])."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    num_tokens = 0

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{"inputs": float32 [n, *shape], "labels": int32 [n]}."""
        idx = np.asarray(indices, dtype=np.int64)
        return {"inputs": self.inputs[idx], "labels": self.labels[idx]}


# ----------------------------------------------------------------------------------------------
# Synthetic tasks


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SYNTHETIC_SEED, *keys]))


def markov_chain(vocab_size: int, branching: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sparse random Markov chain: each token has `branching` possible successors.

    Returns (successors [V, k] int, cumulative probabilities [V, k]); its entropy rate is at
    most log(k), far below log(V), so a model that learns it drives the loss well down."""
    rng = _rng(0, vocab_size)
    succ = rng.integers(vocab_size, size=(vocab_size, branching))  # repeats merge; still sparse
    probs = rng.dirichlet(np.ones(branching), size=vocab_size)
    return succ, np.cumsum(probs, axis=1)


def synthetic_lm(vocab_size: int, num: int, length: int, split: int) -> np.ndarray:
    """`num` sequences of `length` tokens walked on the fixed chain; `split` seeds the walk."""
    succ, cdf = markov_chain(vocab_size)
    rng = _rng(1, split, vocab_size)
    out = np.empty((num, length), dtype=np.int32)
    cur = rng.integers(vocab_size, size=num)
    out[:, 0] = cur
    k = succ.shape[1]
    for t in range(1, length):
        choice = np.minimum((rng.random(num)[:, None] > cdf[cur]).sum(axis=1), k - 1)
        cur = succ[cur, choice]
        out[:, t] = cur
    return out


def synthetic_classification(
    num_classes: int, shape: Sequence[int], num: int, split: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around fixed random class means (unit noise), labels uniform."""
    dim = int(np.prod(shape))
    means = _rng(2, num_classes, dim).normal(size=(num_classes, dim))
    rng = _rng(3, split, num_classes, dim)
    labels = rng.integers(num_classes, size=num).astype(np.int32)
    x = means[labels] + rng.normal(size=(num, dim))
    return x.reshape(num, *shape).astype(np.float32), labels
