"""Tokenize a corpus into a folder of token shards for `data.source: tokens` (memory-mapped).

    python scripts/prepare_data.py stdlib --out data/stdlib_bytes
    python scripts/prepare_data.py corpus/ --format jsonl --tokenizer tok.json --out data/gpt2

INPUTs are what `data.paths` accepts: files, folders (recursive; --pattern for text), globs,
'stdlib'. OUT gets train/shard-*.bin and val/shard-*.bin (raw tokens, uint16 or uint32 as the
vocabulary needs; every document followed by EOS) and, written last, index.json (tokenizer and
its fingerprint, vocab_size, eos_id, dtype, each shard's tokens/documents/bytes, totals); point
`data.paths` at OUT.

Work items are input files; small files are grouped (sorted by key, ~--group-bytes each), so a
corpus of many small files makes few shards. Each item becomes one shard, or several of at most
--shard-tokens tokens (a shard always ends at a document end). The held-out split is by file,
the rule the text loader uses (crc32 of the file key below --val-fraction, at least one file
per side); a single input file is all train. Items run in --workers processes; a rerun into the
same OUT skips the items already done (same inputs and options) and refuses other options.
--max-bytes keeps the first N bytes of the inputs (on disk, files in sorted order; the last file
is cut) for a quick sample. A failed run leaves no index.json and no partial shard. User
mistakes and unreadable inputs print one line naming the file and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from framework.data import readers
from framework.data.shards import (
    INDEX,
    SPLITS,
    TMP_SUFFIX,
    Item,
    Options,
    init_worker,
    read_index,
    record_path,
    tokenize_item,
    write_index,
)
from framework.data.sources import CorpusFile, split_by_file
from framework.data.tokenizers import load_tokenizer, token_dtype
from framework.errors import PATH_ERRNOS, DataError

DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB of uint16 tokens
DEFAULT_GROUP_BYTES = 64 << 20


def _cpus() -> int:
    """CPUs this process may run on (the default --workers)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs or 'stdlib'")
    p.add_argument("--out", required=True, help="output folder (index.json + train/ + val/)")
    p.add_argument("--format", default="text", choices=readers.FORMATS, help="input format")
    p.add_argument("--field", default="text", help="text field/column of jsonl, parquet, arrow")
    p.add_argument(
        "--pattern",
        default=None,
        help="text: file-name glob inside folders (default *.py); hf_dataset: the split",
    )
    p.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizer.json file")
    p.add_argument("--eos-token", default=None, help="EOS token of a tokenizer file")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of files")
    p.add_argument(
        "--workers",
        type=int,
        default=_cpus(),
        help="tokenizing processes (each takes seconds to start: 1 is faster for a small corpus)",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (max)"
    )
    p.add_argument(
        "--group-bytes",
        type=int,
        default=DEFAULT_GROUP_BYTES,
        help="small input files are grouped into items of about this many bytes",
    )
    p.add_argument(
        "--on-bad-file",
        choices=("skip", "fail"),
        default="skip",
        help="a text file that is not UTF-8: skip it (counted) or fail",
    )
    p.add_argument("--max-bytes", type=int, default=None, help="use the first N input bytes")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag in ("workers", "shard_tokens", "group_bytes", "max_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {args.out!r} exists and is not a folder")


def _limit(files: list[CorpusFile], max_bytes: int | None) -> list[tuple[CorpusFile, int, Any]]:
    """(file, size on disk, text budget or None) of the files --max-bytes keeps."""
    out, total = [], 0
    for f in files:
        size = f.path.stat().st_size
        if max_bytes is None:
            out.append((f, size, None))
            continue
        if total >= max_bytes:
            break
        budget = max_bytes - total if total + size > max_bytes else None
        out.append((f, size, budget))
        total += size
    return out


def make_items(
    files: list[CorpusFile], val_fraction: float, group_bytes: int, max_bytes: int | None
) -> list[Item]:
    """Split files into train/val by key, then group each split's files (sorted by key) into
    items of about `group_bytes`; a file cut by --max-bytes ends its item."""
    kept = _limit(files, max_bytes)
    is_val = split_by_file([f.key for f, _, _ in kept], val_fraction)
    items: list[Item] = []
    for split in SPLITS:
        chosen = sorted(
            (k for k, v in zip(kept, is_val, strict=True) if v == (split == "val")),
            key=lambda k: k[0].key,
        )
        group: list[tuple[str, str, int]] = []
        size, first = 0, len(items)
        for f, nbytes, budget in chosen:
            group.append((f.key, str(f.path), nbytes))
            size += nbytes
            if size >= group_bytes or budget is not None:
                items.append(Item(split, len(items) - first, tuple(group), budget))
                group, size = [], 0
        if group:
            items.append(Item(split, len(items) - first, tuple(group)))
    return items


def _settings(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    """What the shards depend on besides the input files: a rerun must use the same."""
    return {  # the tokenizer by its fingerprint: the same file elsewhere is the same
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id,
        "format": args.format,
        "field": args.field,
        "pattern": args.pattern,
        "val_fraction": args.val_fraction,
        "shard_tokens": args.shard_tokens,
        "group_bytes": args.group_bytes,
        "max_bytes": args.max_bytes,
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    """A record's JSON, or None if it is missing or unreadable (the item is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _finished(out: Path, item: Item, settings: dict, itemsize: int, fail: bool) -> dict | None:
    """The item's record if an earlier run finished it with these inputs and settings (every
    shard present, of its recorded size); None if it must be (re)done."""
    record = _read_record(record_path(out, item))
    if record is None or record.get("settings") != settings:
        return None
    if record.get("inputs") != item.inputs or record.get("max_bytes") != item.max_bytes:
        return None
    if fail and record.get("skipped_files"):  # now a bad file must fail the run
        return None
    for shard in record.get("shards", []):
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            return None
    return record


def _check_earlier_run(out: Path, settings: dict) -> None:
    """Refuse an OUT prepared with another tokenizer or other options (index or records)."""
    message = f"{str(out)!r} was prepared with another tokenizer/options; use a new --out"
    if (out / INDEX).is_file():
        index = read_index(out)
        if index.get("options") != settings:
            raise DataError(message)
    for split in SPLITS:
        for path in sorted((out / split).glob("shard-*.json")):
            record = _read_record(path)
            if record is not None and record.get("settings") != settings:
                raise DataError(message)


def _sweep(out: Path, keep: set[str]) -> None:
    """Remove temporary files and the shards/records of OUT not in `keep` (relative paths)."""
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            rel = f"{split}/{path.name}"
            if path.name.endswith(TMP_SUFFIX) or (
                path.name.startswith("shard-")
                and path.suffix in (".bin", ".json")
                and rel not in keep
            ):
                path.unlink(missing_ok=True)


def _kept_files(out: Path, records: dict[Item, dict]) -> set[str]:
    keep = set()
    for item, record in records.items():
        keep.add(record_path(out, item).relative_to(out).as_posix())
        keep.update(s["file"] for s in record["shards"])
    return keep


def _progress(total_bytes: int, done_bytes: int):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        initial=done_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=None,  # off when stderr is not a terminal
        file=sys.stderr,
    )


def _run(
    out: Path, todo: list[Item], options: Options, workers: int, bar, done: dict[Item, dict]
) -> None:
    """Tokenize the items (in a spawn pool if workers > 1), adding their records to `done` as
    they finish (a failure keeps the finished ones for a rerun)."""
    if not todo:
        return
    if workers == 1 or len(todo) == 1:
        init_worker(options)
        for item in todo:
            done[item] = tokenize_item(str(out), item)
            bar.update(sum(s for _, _, s in item.files))
        return
    pool = ProcessPoolExecutor(
        min(workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(options, True),
    )
    try:
        futures = {pool.submit(tokenize_item, str(out), item): item for item in todo}
        for future in as_completed(futures):  # the first failure raises here
            item = futures[future]
            done[item] = future.result()
            bar.update(sum(s for _, _, s in item.files))
    except BaseException:
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the workers now (an item failed: the others' work is not waited for). Python < 3.14
    has no public way; `_processes` is the executor's own map of its worker processes."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _warn(message: str) -> None:
    print(f"prepare_data.py: warning: {message}", file=sys.stderr)


def _totals(shards: list[dict]) -> dict[str, int]:
    return {
        "shards": len(shards),
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }


def prepare(args: argparse.Namespace) -> list[str]:
    """Tokenize and write OUT; returns the summary lines."""
    _check_args(args)
    tok = load_tokenizer(args.tokenizer, args.eos_token)
    dtype = token_dtype(tok.vocab_size)
    files = readers.list_inputs(args.format, args.inputs, args.pattern)
    items = make_items(files, args.val_fraction, args.group_bytes, args.max_bytes)
    settings = _settings(args, tok)
    out = Path(args.out)
    _check_earlier_run(out, settings)
    records: dict[Item, dict] = {}
    for item in items:
        record = _finished(out, item, settings, dtype.itemsize, args.on_bad_file == "fail")
        if record is not None:
            records[item] = record
    todo = [item for item in items if item not in records]
    if todo:
        (out / INDEX).unlink(missing_ok=True)  # the index describes a finished folder only
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out, _kept_files(out, records))  # leftovers of an interrupted run
    options = Options(
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        fmt=args.format,
        field=args.field,
        on_bad_file=args.on_bad_file,
        shard_tokens=args.shard_tokens,
        settings=settings,
    )
    all_bytes = sum(s for item in items for _, _, s in item.files)
    done_bytes = sum(s for item in records for _, _, s in item.files)
    start = time.perf_counter()
    with _progress(all_bytes, done_bytes) as bar:
        try:
            _run(out, todo, options, args.workers, bar, records)
        finally:  # on failure: no temporary file, no shard of an unfinished item
            _sweep(out, _kept_files(out, records))
    seconds = time.perf_counter() - start
    index, _ = _finish(out, args, items, records, tok)
    lines = [
        f"{split}: {t['tokens']:,} tokens, {t['documents']:,} documents, {t['bytes']:,} bytes, "
        f"{t['files']} files, {t['shards']} shards"
        for split, t in index["totals"].items()
        if split in SPLITS
    ]
    done_bytes = sum(s for item in todo for _, _, s in item.files)
    lines.append(
        f"{len(todo)} of {len(items)} items tokenized in {seconds:.1f} s "
        f"({done_bytes / max(seconds, 1e-9) / 1e6:.1f} MB/s of input); "
        f"{index['bytes_per_token']:.3f} bytes/token -> {out / INDEX}"
    )
    return lines


def _finish(
    out: Path, args: argparse.Namespace, items: list[Item], records: dict[Item, dict], tok: Any
) -> tuple[dict[str, Any], int]:
    """Check the result and write index.json; returns (the index, skipped files)."""
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for item in sorted(items, key=lambda i: (i.split, i.index)):
        splits[item.split].extend(records[item]["shards"])
    totals: dict[str, Any] = {split: _totals(shards) for split, shards in splits.items()}
    skipped = sum(r.get("skipped_files", 0) for r in records.values())
    nulls = sum(r.get("null_documents", 0) for r in records.values())
    if skipped:
        first = next(r["first_skipped"] for r in records.values() if r.get("skipped_files"))
        _warn(f"skipped {skipped} files that are not UTF-8 text (first: {first})")
    if nulls:
        _warn(f"skipped {nulls} null documents")
    if not totals["train"]["tokens"]:
        what = "no training documents" if totals["val"]["tokens"] else "no documents"
        raise DataError(f"inputs {' '.join(args.inputs)} hold {what} (every file empty?)")
    for split in SPLITS:
        totals[split]["files"] = sum(len(i.files) for i in items if i.split == split)
    tokens = sum(totals[s]["tokens"] for s in SPLITS)
    nbytes = sum(totals[s]["bytes"] for s in SPLITS)
    totals.update(tokens=tokens, bytes=nbytes, skipped_files=skipped, null_documents=nulls)
    index = {
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "bytes_per_token": nbytes / tokens,
        "splits": splits,
        "totals": totals,
        "options": _settings(args, tok),
    }
    write_index(out, index)
    return index, skipped


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        lines = prepare(args)
    except (DataError, OSError) as e:  # a disk failure (not a path mistake) is status 1
        print(f"prepare_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1 if isinstance(e, OSError) and e.errno not in PATH_ERRNOS else 2
    except BrokenProcessPool:  # a worker was killed (out of memory?)
        print(
            "prepare_data.py: error: a worker process died (killed for memory?); "
            "finished items are kept: rerun to resume, with fewer --workers",
            file=sys.stderr,
        )
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
