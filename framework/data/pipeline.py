"""The input pipeline: a config -> (infinite train Loader, deterministic EvalSet, metadata).

Each source (text files, jsonl, parquet, arrow, Hugging Face datasets, chat data, token files)
is read, tokenized (every document ends with EOS) and cut into rows: packed (segment_ids,
positions, loss mask) or padded, `framework.data.rows`. The training order is a grain
MapDataset over global batch indices k, each mapped by `framework.data.mixture` to rows of the
sources (weights, stages, per-epoch shuffles) and to this process's contiguous share of them,
so concatenating the processes' rows in process order (what
`jax.make_array_from_process_local_data` does) reproduces the single-process batch exactly.
The iterator's position is the global step, so a saved state also restores under a different
process count.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np

from framework.data import readers, shards, sources
from framework.data.config import DataConfig, SourceConfig
from framework.data.mixture import Mixture, MixtureBatches
from framework.data.rows import PackedRows, PaddedRows, split_tail
from framework.data.sources import TokenArray
from framework.data.tokenizers import Tokenizer, load_tokenizer
from framework.errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: batches from the mixture sampler (framework.data.mixture)
_ENDLESS = 1 << 62  # batch indices: training reads batch k at step k, for as long as it runs


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
            "version": STATE_VERSION,
            "step": self._step,
            "workers": self._workers,
            "grain": copy.deepcopy(self._it.get_state()),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at a position returned by `get_state` (of this or an equivalent Loader)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(
                f"not a data loader state of version {STATE_VERSION}: {str(state)[:200]}"
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

    Batches are full global batches (static shapes) mixed from the sources' held-out rows at
    the first stage's weights (sources without held-out rows left out); a held-out set smaller
    than one batch is cycled to fill exactly one, a larger one drops its last partial batch."""

    def __init__(
        self,
        sources: list[Any | None],
        weights: list[float],
        *,
        batch_size: int,
        process_index: int,
        process_count: int,
    ):
        keep = [i for i, v in enumerate(sources) if v is not None and len(v) and weights[i] > 0]
        self.sources = [sources[i] for i in keep]
        self.batch_size, self.local_batch = batch_size, batch_size // process_count
        self._batches = None
        if self.sources:
            mixture = Mixture(
                [len(v) for v in self.sources],
                [(0, [weights[i] for i in keep])],
                batch_size,
                seed=0,
                shuffle=False,
            )
            self._batches = MixtureBatches(self.sources, mixture, process_index, process_count)

    @property
    def num_examples(self) -> int:
        """Held-out examples (rows for LM data)."""
        return sum(len(v) for v in self.sources)

    @property
    def num_batches(self) -> int:
        """Global batches one full pass yields."""
        n = self.num_examples
        return 0 if n == 0 else max(1, n // self.batch_size)

    def batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of the first `max_batches` held-out batches (all if None)."""
        count = self.num_batches if max_batches is None else min(max_batches, self.num_batches)
        for b in range(count):
            yield self._batches(b)


@dataclasses.dataclass
class _Built:
    """One source, tokenized and cut into rows: train rows, held-out rows, and what it holds."""

    train: Any
    val: Any | None
    vocab_size: int
    eos_id: int | None
    tokens: int  # before the held-out split
    text_bytes: int | None  # bytes of text behind `tokens` (None: unknown, e.g. token files)
    fingerprint: str | None = None  # the tokenizer's (None: token files without an index)


def _rows(arrays: list[TokenArray], cfg: DataConfig, eos_id: int | None, masks=None) -> Any:
    """Packed or padded LM rows over token arrays, per data.packing."""
    if cfg.packing:
        return PackedRows(arrays, cfg.seq_len, eos_id, masks)
    return PaddedRows(arrays, cfg.seq_len, eos_id, masks)


def _split(
    cfg: DataConfig, train: list, val: list, eos_id: int | None, masks=None
) -> tuple[Any, Any]:
    """(train rows, held-out rows): `val` when it holds anything, else the tail of `train`."""
    train_masks, val_masks = masks if masks is not None else (None, None)
    if val:
        return _rows(train, cfg, eos_id, train_masks), _rows(val, cfg, eos_id, val_masks)
    return split_tail(_rows(train, cfg, eos_id, train_masks), cfg.val_fraction)


def _by_file(docs: list[tuple[str, Any]], val_fraction: float) -> tuple[list, list]:
    """Documents of training files and of held-out files (crc32 of the file key)."""
    keys = list(dict.fromkeys(k for k, _ in docs))
    held = {k for k, v in zip(keys, sources.split_by_file(keys, val_fraction), strict=True) if v}
    return [d for k, d in docs if k not in held], [d for k, d in docs if k in held]


def _read_texts(
    src: SourceConfig, paths: list[str], cfg: DataConfig
) -> list[tuple[str, bytes | str]]:
    """(file key, document) of a text-like source's files, bad files handled per the config."""
    bad = readers.BadFiles(cfg.on_bad_file)
    files = readers.list_inputs(src.type, paths, src.file_pattern)
    docs = readers.read_documents(
        src.type, files, field=src.text_field, bad=bad, max_bytes=src.max_bytes
    )
    bad.report()
    return docs


def _text_source(src: SourceConfig, cfg: DataConfig, tok: Tokenizer, where: str) -> _Built:
    docs = _read_texts(src, src.paths, cfg)
    if not docs:
        raise DataError(f"{where} ({', '.join(src.paths)}) holds no text documents")
    if src.val_paths:
        val_docs = [d for _, d in _read_texts(src, src.val_paths, cfg)]
        train_docs = [d for _, d in docs]
        docs += [("", d) for d in val_docs]
    else:
        train_docs, val_docs = _by_file(docs, cfg.val_fraction)
    streams = [tok.encode_docs(train_docs), tok.encode_docs(val_docs) if val_docs else None]
    arrays = [[TokenArray(s)] if s is not None else [] for s in streams]
    train, val = _split(cfg, arrays[0], arrays[1], tok.eos_id)
    text_bytes = sum(len(d.encode() if isinstance(d, str) else d) for _, d in docs)
    tokens = sum(len(s) for s in streams if s is not None)
    return _Built(train, val, tok.vocab_size, tok.eos_id, tokens, text_bytes, tok.fingerprint)


def _chat_records(src: SourceConfig, paths: list[str]) -> list[tuple[str, str, list[dict]]]:
    """(file key, file path, its records) of each chat file."""
    files = readers.list_inputs("jsonl", paths, src.file_pattern)
    return [(f.key, str(f.path), list(readers.iter_records("jsonl", f))) for f in files]


def _encode_chat_files(
    files: list, tok: Tokenizer, template: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """One token stream (and its assistant mask) for chat files; errors name the file."""
    from framework.data import chat

    parts = [chat.encode_chats(recs, tok, template, where=path) for _, path, recs in files if recs]
    if not parts:
        return None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _chat_source(src: SourceConfig, cfg: DataConfig, tok: Tokenizer, where: str) -> _Built:
    from framework.data import chat

    template = chat.load_chat_template(tok, cfg.chat_template)
    files = _chat_records(src, src.paths)
    if not any(recs for _, _, recs in files):
        raise DataError(f"{where} ({', '.join(src.paths)}) holds no chat records")
    if src.val_paths:
        train_files, val_files = files, _chat_records(src, src.val_paths)
    else:
        keys = [k for k, _, _ in files]
        held = sources.split_by_file(keys, cfg.val_fraction)
        train_files = [f for f, v in zip(files, held, strict=True) if not v]
        val_files = [f for f, v in zip(files, held, strict=True) if v]
    parts = [_encode_chat_files(fs, tok, template) for fs in (train_files, val_files)]
    arrays = [[TokenArray(p[0])] if p else [] for p in parts]
    masks = tuple([p[1]] if p else None for p in parts)
    train, val = _split(cfg, arrays[0], arrays[1], tok.eos_id, masks)
    tokens = sum(len(p[0]) for p in parts if p)
    return _Built(train, val, tok.vocab_size, tok.eos_id, tokens, None, tok.fingerprint)


def _token_files(
    paths: list[str], dtype: str, tok: Tokenizer | None = None
) -> tuple[list[TokenArray], list[TokenArray], dict]:
    """(train arrays, the prepare_data folders' held-out arrays, metadata) of token paths:
    prepare_data folders (index.json; tokenized by `tok` where given) or .bin/.npy files named
    directly or found in folders."""
    train, val, meta = [], [], {}
    for entry in paths:
        if shards.is_token_dir(entry):
            d = shards.open_token_dir(entry, tok)
            if meta and meta.get("fingerprint") != d.fingerprint:
                raise DataError(
                    f"token folder {entry!r} was tokenized with {d.tokenizer!r} "
                    f"(fingerprint {d.fingerprint}), {meta['from']!r} with another "
                    f"({meta.get('fingerprint')}): one source takes folders of one tokenizer"
                )
            for a in d.train + d.val:
                a.ids_checked = True  # prepare_data.py wrote them within the index's vocabulary
            train += d.train
            val += d.val
            meta = meta or {"vocab_size": d.vocab_size, "eos_id": d.eos_id,
                            "bytes_per_token": d.bytes_per_token, "fingerprint": d.fingerprint,
                            "from": str(Path(entry) / "index.json")}  # fmt: skip
            continue
        files = [f for f in sources.find_files([entry], "*") if f.path.suffix != ".json"]
        inner = next((f for f in files if shards.is_token_dir(f.path.parent.parent)), None)
        if inner is not None:  # its train and val shards would all be read as training tokens
            raise DataError(
                f"data path {entry!r} holds the prepare_data.py folder "
                f"{str(inner.path.parent.parent)!r}: name that folder itself"
            )
        train += [TokenArray(path=str(f.path), dtype=dtype) for f in files]
    if not meta and train:
        meta = sources.read_sidecar(train[0].path)
        meta["from"] = str(sources.sidecar_path(train[0].path))
    return train, val, meta


def _token_source(src: SourceConfig, cfg: DataConfig, tok: Tokenizer | None, where: str) -> _Built:
    train_arrays, dir_val, meta = _token_files(src.paths, cfg.token_dtype, tok)
    val_arrays = _token_files(src.val_paths, cfg.token_dtype, tok)[0] if src.val_paths else dir_val
    vocab = _token_vocab(train_arrays + val_arrays, meta)
    eos_id = meta.get("eos_id")
    if eos_id is None:
        log.warning(
            "%s: the token files record no eos_id (written by an older prepare_data.py?): "
            "rows may run across documents",
            where,
        )
    train, val = _split(cfg, train_arrays, val_arrays, eos_id)
    tokens = sum(len(a) for a in train_arrays + val_arrays)
    bpt = meta.get("bytes_per_token")
    text_bytes = tokens * bpt if bpt else None
    return _Built(train, val, vocab, eos_id, tokens, text_bytes, meta.get("fingerprint"))


def _token_vocab(arrays: list[TokenArray], meta: dict[str, Any]) -> int:
    """The vocabulary of token files: their metadata's, else the largest id + 1; one
    streaming pass checks every id lies in [0, vocabulary), except in prepare_data.py shards
    (a multi-GB corpus is not re-read at every start on every process)."""
    vocab = meta.get("vocab_size")
    vocab_from = f" (vocab_size in {meta.get('from')!r})"
    if vocab is not None and (type(vocab) is not int or vocab < 1):
        raise DataError(f"vocab_size must be a positive integer, got {vocab!r}{vocab_from}")
    tops = [a.check_ids(vocab, vocab_from) for a in arrays if not a.ids_checked]
    return max(tops) + 1 if vocab is None else int(vocab)


def _lm_sources(cfg: DataConfig) -> tuple[list[_Built], list[SourceConfig]]:
    listed = cfg.source_list()
    # token folders are checked against a tokenizer file when one is named, or used by a text
    # source of the mixture (the default 'byte' alone leaves prepared folders to speak for
    # themselves: a saved gpt2_small config.yaml names it)
    needs_tok = cfg.tokenizer != "byte" or any(s.type != "tokens" for s in listed)
    tok = sources_tokenizer(cfg) if needs_tok else None
    built = []
    for i, src in enumerate(listed):
        where = f"data.sources[{i}]" if cfg.sources else f"data.source {src.type!r}"
        if src.type == "tokens":
            built.append(_token_source(src, cfg, tok, where))
        elif src.type == "chat":
            built.append(_chat_source(src, cfg, tok, where))
        else:
            built.append(_text_source(src, cfg, tok, where))
    return built, listed


def sources_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer data.tokenizer / data.eos_token name."""
    return load_tokenizer(cfg.tokenizer, cfg.eos_token)


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
    when token files decide it), classes and example shape. `build_sources` completes it."""
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
    elif all(s.type != "tokens" for s in cfg.source_list()):
        vocab = sources_tokenizer(cfg).vocab_size
    return {
        "kind": "lm",
        "vocab_size": vocab,
        "seq_len": cfg.seq_len,
        "num_classes": None,
        "input_shape": None,
        "bytes_per_token": None,
    }


def _stages(cfg: DataConfig, listed: list[SourceConfig]) -> list[tuple[int, list[float]]]:
    return [(0, [s.weight for s in listed])] + [(st.step, list(st.weights)) for st in cfg.stages]


class Sources(NamedTuple):
    """A config's data before batching: per source its training rows and held-out rows (None
    where it holds none), the mixture stages [(first step, weights)], and the metadata."""

    train: list[Any]
    val: list[Any | None]
    stages: list[tuple[int, list[float]]]
    meta: dict[str, Any]


def build_sources(cfg: DataConfig) -> Sources:
    """Read, tokenize and cut every source of a config into rows."""
    meta = describe(cfg)
    if cfg.source.startswith("synthetic"):
        train, val, extra = _synthetic_sources(cfg)
        meta.update(extra)
        trains, vals, stages, names = [train], [val], [(0, [1.0])], ["synthetic"]
    else:
        built, listed = _lm_sources(cfg)
        trains, vals = [b.train for b in built], [b.val for b in built]
        stages = _stages(cfg, listed)
        names = [s.name or (f"source{i}" if cfg.sources else s.type) for i, s in enumerate(listed)]
        _check_tokens(built, names)
        meta["vocab_size"] = max(b.vocab_size for b in built)
        meta["eos_id"] = next((b.eos_id for b in built if b.eos_id is not None), None)
        weights = np.array(stages[0][1]) / sum(stages[0][1])
        bpt = [b.text_bytes / b.tokens if b.text_bytes and b.tokens else None for b in built]
        if all(x is not None for x in bpt):
            meta["bytes_per_token"] = float(np.dot(weights, bpt))
    meta.update(
        {
            "train_tokens": int(sum(t.num_tokens for t in trains)),
            "val_tokens": int(sum(v.num_tokens for v in vals if v is not None)),
            "train_examples": int(sum(len(t) for t in trains)),
            "val_examples": int(sum(len(v) for v in vals if v is not None)),
            "sources": {
                n: {"train_rows": len(t), "val_rows": len(v) if v is not None else 0}
                for n, t, v in zip(names, trains, vals, strict=True)
            },  # fmt: skip
        }
    )
    _check_enough(cfg, names, trains, stages)
    _warn_if_no_held_out(cfg, vals)
    return Sources(trains, vals, stages, meta)


def _check_tokens(built: list[_Built], names: list[str]) -> None:
    """Sources of one run must come from one tokenizer (fingerprints, where known) and end
    documents with the same EOS id."""
    for what in ("fingerprint", "eos_id"):
        known = {getattr(b, what) for b in built if getattr(b, what) is not None}
        if len(known) > 1:
            raise DataError(
                f"the sources differ in tokenizer {what}: "
                + ", ".join(f"{n}: {getattr(b, what)}" for n, b in zip(names, built, strict=True))
                + " (token files prepared with another tokenizer?)"
            )


def _check_enough(cfg: DataConfig, names: list[str], trains: list[Any], stages) -> None:
    """Every source a stage samples must hold a row; a single source at least one batch."""
    for i, (name, train) in enumerate(zip(names, trains, strict=True)):
        used = any(w[i] > 0 for _, w in stages)
        if used and len(train) == 0:
            raise DataError(
                f"{name} gives no training row (a row needs data.seq_len+1={cfg.seq_len + 1} "
                "tokens packed, or a document of two or more tokens unpacked)"
            )
    if len(trains) == 1 and len(trains[0]) < cfg.batch_size:
        raise DataError(
            f"the training data has {len(trains[0])} rows of data.seq_len+1={cfg.seq_len + 1} "
            f"tokens, fewer than one global batch (data.batch_size={cfg.batch_size}); add data "
            "or lower data.batch_size / data.seq_len"
        )


def _warn_if_no_held_out(cfg: DataConfig, vals: list[Any]) -> None:
    """One warning when held-out data was asked for but holds no example: evaluation is off
    (it would otherwise report nothing, silently)."""
    if any(v is not None and len(v) for v in vals):
        return
    val_paths = cfg.val_paths + [p for s in cfg.sources for p in s.val_paths]
    if not (val_paths or cfg.val_fraction > 0):
        return
    asked = f"val_paths {val_paths}" if val_paths else f"data.val_fraction={cfg.val_fraction}"
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
    trains, vals, stages, meta = build_sources(cfg)
    mixture = Mixture([len(t) for t in trains], stages, cfg.batch_size, cfg.shuffle_seed)
    ds = grain.MapDataset.range(_ENDLESS).map(
        MixtureBatches(trains, mixture, process_index, process_count)
    )
    # Reads are in-memory or memmap gathers: a couple of threads hide them behind the step.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    if cfg.worker_count:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    loader = Loader(it_ds, local_batch=local, workers=cfg.worker_count)
    eval_set = EvalSet(
        vals,
        stages[0][1],
        batch_size=cfg.batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return loader, eval_set, meta
