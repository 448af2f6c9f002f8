"""Safetensors files read lazily and written tensor by tensor, without torch.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian data. Reading parses the headers, then reads one
tensor at a time on request, so a checkpoint is never loaded whole; bfloat16 comes from
`ml_dtypes` (numpy has none, and `safe_open(framework="numpy")` refuses it). Writing plans
every shard's header first, then asks for one tensor at a time."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from framework.errors import ConfigError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its file, dtype, shape and byte range in the data section."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _header(path: Path) -> tuple[dict, int]:
    """(JSON header, byte offset of the data section) of one safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConfigError(f"{path}: not a safetensors file (header length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


class Reader:
    """All tensors of a local checkpoint (one file or a sharded index), read one at a time."""

    def __init__(self, hf_dir: str | Path):
        """Read every file's header (model.safetensors first, as transformers prefers it,
        else the index and its shards); ConfigError naming what is missing or malformed."""
        hf_dir = Path(hf_dir)
        index = hf_dir / INDEX
        if (hf_dir / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"{index}: not a safetensors index ({e!r})") from None
        else:
            found = sorted(p.name for p in hf_dir.glob("*.bin")) or sorted(
                p.name for p in hf_dir.glob("*.pt*")
            )
            hint = f" (found {found[0]}: pickled weights are not read; save with safetensors)"
            raise ConfigError(f"{hf_dir}: no {SINGLE} or {INDEX}" + (hint if found else ""))
        self.entries: dict[str, Entry] = {}
        self._files: dict[Path, Any] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise ConfigError(f"{index}: shard {name} is missing from {hf_dir}")
            self._add_file(path)
        if weight_map is not None:
            for tensor, name in weight_map.items():
                entry = self.entries.get(tensor)
                if entry is None or entry.file.name != name:
                    raise ConfigError(f"{index}: tensor {tensor} is not in shard {name}")

    def _add_file(self, path: Path) -> None:
        """Record where each tensor of one file lies (checked against the file's size)."""
        header, data_start = _header(path)
        size = path.stat().st_size - data_start
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"{path}: tensor {tensor} has an unsupported header entry {info}"
                ) from None
            if end - start != math.prod(shape) * dtype.itemsize or start < 0 or end > size:
                raise ConfigError(f"{path}: tensor {tensor} lies outside the file (truncated?)")
            self.entries[tensor] = Entry(path, dtype, shape, data_start + start, data_start + end)

    def __contains__(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor of this name."""
        return name in self.entries

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self.entries)

    def get(self, name: str) -> np.ndarray:
        """One tensor, read from its file into a new array (the caller drops it after use;
        plain reads rather than a memory map, so only the page cache holds the files)."""
        entry = self.entries[name]
        if entry.file not in self._files:
            self._files[entry.file] = entry.file.open("rb")
        f = self._files[entry.file]
        out = np.empty(entry.shape, entry.dtype)
        f.seek(entry.start)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != entry.end - entry.start:
            raise ConfigError(f"{entry.file}: tensor {name} is truncated")
        return out

    def close(self) -> None:
        """Close the files."""
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, shape, dtype and a function that produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * self.dtype.itemsize


def _shards(plan: Sequence[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of tensors, each at most `max_bytes` unless one tensor is larger."""
    groups: list[list[Planned]] = [[]]
    used = 0
    for t in plan:
        if groups[-1] and used + t.nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    return groups


def _write_one(path: Path, tensors: Iterable[Planned], metadata: dict[str, str]) -> None:
    """Write one safetensors file, producing and dropping one tensor at a time."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors:
            array = np.ascontiguousarray(t.make(), dtype=t.dtype)
            if array.shape != t.shape:
                raise ValueError(f"{t.name}: produced shape {array.shape}, planned {t.shape}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def write_file(path: Path, plan: Sequence[Planned]) -> Path:
    """Write `plan` as one safetensors file at `path` (torch metadata, as `write`)."""
    _write_one(path, plan, {"format": "pt"})
    return path


def write(out_dir: Path, plan: Sequence[Planned], max_shard_bytes: int) -> list[Path]:
    """Write `plan` as model.safetensors, or as numbered shards plus model.safetensors.index.json
    when it exceeds `max_shard_bytes`; returns the files written."""
    metadata = {"format": "pt"}  # transformers refuses files that do not say they hold torch
    groups = _shards(plan, max_shard_bytes)
    if len(groups) == 1:
        _write_one(out_dir / SINGLE, groups[0], metadata)
        return [out_dir / SINGLE]
    paths, weight_map = [], {}
    for n, group in enumerate(groups, start=1):
        path = out_dir / f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        _write_one(path, group, metadata)
        paths.append(path)
        weight_map |= {t.name: path.name for t in group}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, out_dir / INDEX]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    number = s.rstrip("KMGTIB")
    try:
        value = float(number)
        factor = units[s[len(number) :]]
    except (ValueError, KeyError):
        raise ConfigError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return int(value * factor)
