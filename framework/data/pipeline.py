"""The input pipeline: a config -> (infinite train Loader, deterministic EvalSet, metadata).

Training order is a grain MapDataset over example *indices*:

    range(n) -> shuffle(seed) -> repeat() -> batch(local) -> slice(process::processes) -> take

Global batch k is positions [k*B, (k+1)*B) of the shuffled stream; process p receives the
contiguous block [k*B + p*b, k*B + (p+1)*b) (b = B / processes), i.e. local batch
k*processes + p. Batching before slicing (instead of slicing examples round-robin) keeps each
process's rows contiguous, so concatenating the processes' rows in process order (what
`jax.make_array_from_process_local_data` does) reproduces the single-process batch exactly.
The iterator's position is the global step, so a saved state also restores under a different
process count. The source reads a whole batch of indices in one vectorized gather.
"""

from __future__ import annotations

import atexit
import copy
import logging
import math
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from framework.data import sources
from framework.data.config import DataConfig
from framework.data.sources import TokenArray, WindowSource
from framework.errors import DataError

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class _Take:
    """Index batch -> array batch; a plain picklable object so grain workers can carry it."""

    def __init__(self, source: Any):
        self.source = source

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.source.take(indices)


class Loader:
    """Infinite iterator of process-local training batches with a checkpointable position."""

    def __init__(self, dataset: grain.IterDataset, *, local_batch: int, workers: int = 0):
        self._it = iter(dataset)
        self._workers = workers
        self._copy_out = workers > 0
        if workers:  # stop workers while modules still exist (grain's __del__ needs them)
            atexit.register(_close_at_exit, weakref.ref(self))
        self._step = 0
        self.local_batch = local_batch

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise RuntimeError("the data loader was closed")
        batch = next(self._it)
        self._step += 1
        if self._copy_out:  # worker batches live in shared memory; hand out plain arrays
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: the next `next()` after `set_state` repeats from here."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "workers": self._workers,
            "grain": copy.deepcopy(self._it.get_state()),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at a position returned by `get_state` (of this or an equivalent Loader)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise DataError(
                f"not a data loader state of version {_STATE_VERSION}: {str(state)[:200]}"
            )
        if state.get("workers") != self._workers:
            raise DataError(
                f"the data loader state was saved with data.worker_count="
                f"{state.get('workers')}, this loader has {self._workers}; "
                "grain's state format depends on it"
            )
        self._it.set_state(copy.deepcopy(state["grain"]))
        self._step = int(state["step"])

    def close(self) -> None:
        """Stop grain worker processes, if any (also happens at exit and garbage collection)."""
        if self._it is not None:
            self._it.close()
            self._it = None


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class EvalSet:
    """Held-out batches in a fixed order (no shuffle): the same batches on every call.

    Batches are full global batches (static shapes); a held-out set smaller than one batch is
    cycled to fill exactly one, a larger one drops its last partial batch."""

    def __init__(
        self, source: Any | None, *, batch_size: int, process_index: int, process_count: int
    ):
        self.source = source
        self.batch_size, self.process_index = batch_size, process_index
        self.local_batch = batch_size // process_count

    @property
    def num_examples(self) -> int:
        """Held-out examples (windows for LM data)."""
        return 0 if self.source is None else len(self.source)

    @property
    def num_batches(self) -> int:
        """Global batches one full pass yields."""
        n = self.num_examples
        return 0 if n == 0 else max(1, n // self.batch_size)

    def batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of the first `max_batches` held-out batches (all if None)."""
        count = self.num_batches if max_batches is None else min(max_batches, self.num_batches)
        rows = np.arange(self.local_batch, dtype=np.int64)
        for b in range(count):
            first = b * self.batch_size + self.process_index * self.local_batch
            yield self.source.take((first + rows) % self.num_examples)


def _split_tail(
    segments: list[TokenArray], seq_len: int, val_fraction: float
) -> tuple[WindowSource, WindowSource | None]:
    """Train on the leading windows of one stream and hold out the last `val_fraction`."""
    whole = WindowSource(segments, seq_len)
    n = len(whole)
    n_val = math.ceil(n * val_fraction) if val_fraction > 0 and n >= 2 else 0
    if n_val == 0:
        return whole, None
    return (
        WindowSource(segments, seq_len, 0, n - n_val),
        WindowSource(segments, seq_len, n - n_val, n),
    )


def _text_sources(cfg: DataConfig) -> tuple[Any, Any, dict[str, Any]]:
    tok = sources.load_tokenizer(cfg.tokenizer)
    docs = sources.read_corpus(sources.find_files(cfg.paths, cfg.file_pattern), cfg.max_bytes)
    if not docs:
        raise DataError(f"data.paths {cfg.paths} hold no text (all files empty)")
    is_val = sources.split_by_file([k for k, _ in docs], cfg.val_fraction)
    train_docs = [d for (_, d), v in zip(docs, is_val, strict=True) if not v]
    val_docs = [d for (_, d), v in zip(docs, is_val, strict=True) if v]
    train_tokens = tok.encode_docs(train_docs)
    if val_docs:
        val_tokens = tok.encode_docs(val_docs)
        train = WindowSource([TokenArray(train_tokens)], cfg.seq_len)
        val = WindowSource([TokenArray(val_tokens)], cfg.seq_len)
        measured_bytes, measured_tokens = sum(map(len, val_docs)), len(val_tokens)
    else:  # a single file: hold out the end of its token stream instead
        train, val = _split_tail([TokenArray(train_tokens)], cfg.seq_len, cfg.val_fraction)
        measured_bytes, measured_tokens = sum(map(len, train_docs)), len(train_tokens)
    if cfg.tokenizer == "byte":
        bytes_per_token = 1.0
    else:
        bytes_per_token = measured_bytes / max(measured_tokens, 1)
    return (
        train,
        val,
        {
            "vocab_size": tok.vocab_size,
            "bytes_per_token": bytes_per_token,
            "corpus_tokens": len(train_tokens) + (len(val_tokens) if val_docs else 0),
        },
    )


def _token_files(paths: list[str], dtype: str) -> list[TokenArray]:
    """Token files named directly or found in folders/globs (metadata .json files skipped)."""
    files = [f for f in sources.find_files(paths, "*") if f.path.suffix != ".json"]
    return [TokenArray(path=str(f.path), dtype=dtype) for f in files]


def _token_vocab(arrays: list[TokenArray]) -> tuple[int, dict[str, Any]]:
    """(vocabulary, metadata) of token files: the first file's metadata says the vocabulary,
    else the largest id + 1; one streaming pass checks every id lies in [0, vocabulary)."""
    first = arrays[0].path
    side = sources.read_sidecar(first)
    vocab = side.get("vocab_size")
    vocab_from = f" (vocab_size in {str(sources.sidecar_path(first))!r})"
    if vocab is not None and (type(vocab) is not int or vocab < 1):
        raise DataError(f"vocab_size must be a positive integer, got {vocab!r}{vocab_from}")
    top = max(a.check_ids(vocab, vocab_from) for a in arrays)
    return (top + 1 if vocab is None else int(vocab)), side


def _token_sources(cfg: DataConfig) -> tuple[Any, Any, dict[str, Any]]:
    train_arrays = _token_files(cfg.paths, cfg.token_dtype)
    val_arrays = _token_files(cfg.val_paths, cfg.token_dtype) if cfg.val_paths else []
    vocab, side = _token_vocab(train_arrays + val_arrays)
    if cfg.val_paths:
        train = WindowSource(train_arrays, cfg.seq_len)
        val: WindowSource | None = WindowSource(val_arrays, cfg.seq_len)
    else:
        train, val = _split_tail(train_arrays, cfg.seq_len, cfg.val_fraction)
    return (
        train,
        val,
        {
            "vocab_size": vocab,
            "bytes_per_token": side.get("bytes_per_token"),
            "corpus_tokens": sum(len(a) for a in train_arrays + val_arrays),
        },
    )


def _synthetic_sources(cfg: DataConfig) -> tuple[Any, Any, dict[str, Any]]:
    n_val = max(cfg.batch_size, round(cfg.num_examples * cfg.val_fraction))
    n_val = n_val if cfg.val_fraction > 0 else 0
    if cfg.source == "synthetic_lm":
        make = lambda n, split: sources.SequenceSource(
            sources.synthetic_lm(cfg.vocab_size, n, cfg.seq_len + 1, split)
        )
        meta = {"vocab_size": cfg.vocab_size}
    else:
        make = lambda n, split: sources.ExampleSource(
            *sources.synthetic_classification(cfg.num_classes, cfg.input_shape, n, split)
        )
        meta = {"num_classes": cfg.num_classes, "input_shape": list(cfg.input_shape)}
    return make(cfg.num_examples, 0), (make(n_val, 1) if n_val else None), meta


def describe(cfg: DataConfig) -> dict[str, Any]:
    """What is known about the data without reading it: its kind ("lm": token sequences of
    seq_len, or "classification"), the vocabulary where the config or tokenizer says it (None
    for token files until read), classes and example shape. `build_sources` completes it."""
    if cfg.source == "synthetic_classification":
        return {
            "kind": "classification",
            "vocab_size": None,
            "seq_len": None,
            "num_classes": cfg.num_classes,
            "input_shape": list(cfg.input_shape),
            "bytes_per_token": None,
        }
    vocab = None
    if cfg.source == "synthetic_lm":
        vocab = cfg.vocab_size
    elif cfg.source == "text":
        vocab = sources.load_tokenizer(cfg.tokenizer).vocab_size
    return {
        "kind": "lm",
        "vocab_size": vocab,
        "seq_len": cfg.seq_len,
        "num_classes": None,
        "input_shape": None,
        "bytes_per_token": None,
    }


def build_sources(cfg: DataConfig) -> tuple[Any, Any, dict[str, Any]]:
    """(train source, held-out source or None, metadata) for a config, before any batching."""
    if cfg.source == "text":
        train, val, extra = _text_sources(cfg)
    elif cfg.source == "tokens":
        train, val, extra = _token_sources(cfg)
    else:
        train, val, extra = _synthetic_sources(cfg)
    meta = describe(cfg)
    meta.update({k: v for k, v in extra.items() if k in meta})
    meta.update(
        {
            "train_tokens": int(train.num_tokens),
            "val_tokens": int(val.num_tokens) if val is not None else 0,
            "train_examples": len(train),
            "val_examples": len(val) if val is not None else 0,
        }
    )
    if len(train) < cfg.batch_size:
        if isinstance(train, WindowSource):
            what = (
                f"{len(train)} windows of seq_len+1={cfg.seq_len + 1} tokens (from "
                f"{extra.get('corpus_tokens', 0)} tokens before the held-out split)"
            )
        else:
            what = f"{len(train)} examples"
        raise DataError(
            f"the training data has {what}, fewer than one global batch "
            f"(data.batch_size={cfg.batch_size}); add data or lower "
            f"data.batch_size / data.seq_len"
        )
    _warn_if_no_held_out(cfg, val)
    return train, val, meta


def _warn_if_no_held_out(cfg: DataConfig, val: Any | None) -> None:
    """One warning when held-out data was asked for but holds no example: evaluation is off
    (it would otherwise report nothing, silently)."""
    if (val is not None and len(val)) or not (cfg.val_paths or cfg.val_fraction > 0):
        return
    asked = (
        f"data.val_paths={cfg.val_paths}"
        if cfg.val_paths
        else f"data.val_fraction={cfg.val_fraction}"
    )
    log.warning(
        "%s gives no held-out example (an LM example needs data.seq_len+1=%d tokens): "
        "evaluation is off",
        asked,
        cfg.seq_len + 1,
    )


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 + jaxlib with profiler hooks reads an absl flag when starting workers and
    fails unless flags were parsed (scripts here use argparse): take the flag defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loaders(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> tuple[Loader, EvalSet, dict[str, Any]]:
    """Build this process's train Loader, EvalSet and the data's metadata from a config."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise DataError(
            f"data.batch_size ({cfg.batch_size}) is not divisible by the {process_count} processes"
        )
    local = cfg.batch_size // process_count
    train, val, meta = build_sources(cfg)
    ds = (
        grain.MapDataset.range(len(train))
        .shuffle(seed=cfg.shuffle_seed)
        .repeat()
        .batch(local, drop_remainder=True)
        .slice(slice(process_index, None, process_count))
        .map(_Take(train))
    )
    # Reads are in-memory or memmap gathers: a couple of threads hide them behind the step.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    if cfg.worker_count:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    loader = Loader(it_ds, local_batch=local, workers=cfg.worker_count)
    eval_set = EvalSet(
        val, batch_size=cfg.batch_size, process_index=process_index, process_count=process_count
    )
    return loader, eval_set, meta
