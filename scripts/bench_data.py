"""Measure data throughput (tokenizing, prepare_data, the loader) beside what a step consumes.

    python scripts/bench_data.py                       # default DataConfig(): stdlib, 256 x 32
    python scripts/bench_data.py --batches 500 --set seq_len=1024 --set worker_count=2 --out b.json
    python scripts/bench_data.py --only tokenize --tokenizer gpt2/tokenizer.json

Tokenizing: encode_docs on a sample of the stdlib corpus (--sample-bytes, in prepare_data's 4 MB
batches) with the byte tokenizer, a byte-level BPE of 8192 ids trained here on the sample (a
stand-in for a real BPE vocabulary) and, with --tokenizer, that file; then prepare_data.py end
to end (reading, tokenizing, writing shards; pool start-up included) with --workers 1 and 2.
Loader: startup (reading + tokenizing the corpus) and the first batch are timed separately from
the steady state. The step's need is an estimate, not a measurement: tokens/s one H100 trains
at 40% MFU of 989e12 bf16 dense FLOP/s, for the default config and gpt2_small's shape. Prints
tables and, with --out, writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import pydantic
import yaml

from framework.data import DataConfig, make_loaders
from framework.data.readers import BadFiles, read_documents
from framework.data.sources import find_files
from framework.data.tokenizers import load_tokenizer
from framework.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM
ASSUMED_MFU = 0.40
BATCH_BYTES = 1 << 22  # prepare_data's encode_docs batches (framework.data.shards.Options)
SECTIONS = ("tokenize", "prepare", "loader", "need")


def _config(overrides: list[str]) -> DataConfig:
    """DataConfig() with `key=value` overrides (values parsed as YAML)."""
    fields = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--set expects key=value, got {item!r}")
        fields[key.strip()] = yaml.safe_load(value)
    try:
        return DataConfig(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise DataError(f"data.{'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def bench(cfg: DataConfig, n_batches: int, repeats: int) -> dict:
    """Time loader construction, the first batch, and `repeats` runs of `n_batches` batches."""
    t0 = time.perf_counter()
    loader, eval_set, meta = make_loaders(cfg)
    t1 = time.perf_counter()
    batch = next(loader)
    t2 = time.perf_counter()
    items_per_row = cfg.seq_len if "targets" in batch else 1
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        runs.append(time.perf_counter() - start)
    e0 = time.perf_counter()
    n_eval = sum(1 for _ in eval_set.batches(min(eval_set.num_batches, n_batches)))
    e1 = time.perf_counter()
    loader.close()
    best = min(runs)
    rows = loader.local_batch
    return {
        "config": cfg.model_dump(),
        "python": platform.python_version(),
        "startup_s": t1 - t0,
        "first_batch_s": t2 - t1,
        "batches": n_batches,
        "repeats": repeats,
        "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
        "seconds_best": best,
        "seconds_median": sorted(runs)[len(runs) // 2],
        "batches_per_s": n_batches / best,
        "examples_per_s": n_batches * rows / best,
        "tokens_per_s": n_batches * rows * items_per_row / best if items_per_row > 1 else None,
        "eval_batches_per_s": n_eval / (e1 - e0) if n_eval else None,
        "meta": meta,
    }


def _sample(max_bytes: int) -> list[bytes | str]:
    """The stdlib corpus' first `max_bytes` bytes of documents (files in sorted order)."""
    quiet = logging.getLogger("framework.data.readers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the skipped-files warning: prepare_data's runs say it too
    try:
        docs = read_documents(
            "text", find_files(["stdlib"]), bad=BadFiles("skip"), max_bytes=max_bytes
        )
    finally:
        quiet.setLevel(level)
    return [d for _, d in docs]


def _train_bpe(docs: list[bytes | str], path: Path, vocab: int = 8192) -> str:
    """A byte-level BPE trained on the sample, saved to `path` (a stand-in tokenizer file)."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (d.decode("utf-8") if isinstance(d, bytes) else d for d in docs)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def bench_tokenize(spec: str, docs: list[bytes | str], repeats: int) -> dict:
    """encode_docs throughput in prepare_data's batches of BATCH_BYTES (best of `repeats`)."""
    tok = load_tokenizer(spec)
    batches, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] if batch else []
    nbytes = sum(len(d) for d in docs)
    runs, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sum(len(tok.encode_docs(b)) for b in batches)
        runs.append(time.perf_counter() - start)
    best = min(runs)
    return {
        "tokenizer": spec if spec == "byte" else Path(spec).name,
        "vocab_size": tok.vocab_size,
        "bytes": nbytes,
        "tokens": tokens,
        "seconds": best,
        "tokens_per_s": tokens / best,
        "mb_per_s": nbytes / best / 1e6,
        "bytes_per_token": nbytes / tokens,
    }


def bench_prepare(spec: str, sample_bytes: int, workers: int) -> dict:
    """prepare_data.py end to end on the stdlib sample (in ~8 items, a fresh folder)."""
    script = importlib.util.spec_from_file_location(
        "prepare_data", ROOT / "scripts/prepare_data.py"
    )
    module = importlib.util.module_from_spec(script)
    script.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as out:
        argv = ["stdlib", "--out", out, "--tokenizer", spec, "--workers", str(workers)]
        argv += ["--max-bytes", str(sample_bytes), "--group-bytes", str(sample_bytes // 8)]
        start = time.perf_counter()
        messages = io.StringIO()
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            rc = module.main(argv)
        seconds = time.perf_counter() - start
        if rc:
            raise DataError(f"prepare_data.py {' '.join(argv)}: {messages.getvalue().strip()}")
        index = json.loads((Path(out) / "index.json").read_text())
    totals = index["totals"]
    return {
        "tokenizer": spec if spec == "byte" else Path(spec).name,
        "workers": workers,
        "seconds": seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "mb_per_s": totals["bytes"] / seconds / 1e6,
        "items": sum(len(v) for v in index["splits"].values()),
    }


def step_need() -> list[dict]:
    """Tokens/s one H100 consumes at ASSUMED_MFU, from the registered transformer's
    flops_per_token: tokens per batch / step time, step time = batch FLOPs / achieved FLOP/s
    (so the rate itself does not depend on the batch)."""
    from framework.config.loader import load_config
    from framework.models import get
    from framework.train.config import Config

    rows = []
    for name in ("default", "gpt2_small"):
        cfg = load_config(Config, ROOT / "configs" / f"{name}.yaml")
        model = cfg.model
        if model.vocab_size is None:  # the data's vocabulary: the byte tokenizer's
            model = model.model_copy(update={"vocab_size": load_tokenizer("byte").vocab_size})
        fpt = get(model.name).flops_per_token(model, cfg.data.seq_len)
        batch_tokens = cfg.data.batch_size * cfg.data.seq_len
        step_s = batch_tokens * fpt / (H100_BF16_FLOPS * ASSUMED_MFU)
        rows.append(
            {
                "config": name,
                "flops_per_token": fpt,
                "batch_tokens": batch_tokens,
                "h100_step_s_estimate": step_s,
                "h100_tokens_per_s_estimate": batch_tokens / step_s,
            }
        )
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _print_tokenize(result: dict) -> None:
    rows = [
        (
            f"encode_docs {r['tokenizer']} (vocab {r['vocab_size']})",
            f"{r['tokens_per_s'] / 1e6:7.2f} M tokens/s  {r['mb_per_s']:7.1f} MB/s  "
            f"{r['bytes_per_token']:.2f} bytes/token",
        )
        for r in result.get("tokenize", [])
    ] + [
        (
            f"prepare_data {r['tokenizer']} --workers {r['workers']}",
            f"{r['tokens_per_s'] / 1e6:7.2f} M tokens/s  {r['mb_per_s']:7.1f} MB/s  "
            f"({r['seconds']:.1f} s, {r['items']} items)",
        )
        for r in result.get("prepare", [])
    ]
    if rows:
        print(f"tokenizing {result['sample_bytes'] / 1e6:.0f} MB of stdlib (one process each):")
        print(_table(rows))


def _print_need(rows: list[dict]) -> None:
    print(
        f"the step's need (estimate: one H100, {H100_BF16_FLOPS:.3g} bf16 FLOP/s at "
        f"{ASSUMED_MFU:.0%} MFU, FLOPs from flops_per_token; nothing measured):"
    )
    print(
        _table(
            [
                (
                    f"{r['config']} ({r['flops_per_token']:.3g} FLOP/token, "
                    f"{r['batch_tokens']:,} tokens/batch)",
                    f"{r['h100_tokens_per_s_estimate'] / 1e6:7.2f} M tokens/s  "
                    f"(step {r['h100_step_s_estimate'] * 1e3:.1f} ms)",
                )
                for r in rows
            ]
        )
    )
    print(
        "(a model as small as the default does not reach 40% MFU: its real need is lower; "
        "the rate does not depend on the batch: tokens per batch / step time)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DataConfig override, e.g. --set seq_len=1024 (repeatable)",
    )
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--tokenizer", help="also benchmark this tokenizer.json")
    p.add_argument("--sample-bytes", type=int, default=16_000_000, help="stdlib bytes to tokenize")
    p.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only these parts (repeatable)"
    )
    args = p.parse_args(argv)
    if args.batches < 1 or args.repeats < 1 or args.sample_bytes < 8:
        p.error("--batches and --repeats must be >= 1, --sample-bytes >= 8")
    sections = args.only or SECTIONS
    out: dict = {"python": platform.python_version(), "sample_bytes": args.sample_bytes}
    try:
        if "tokenize" in sections or "prepare" in sections:
            out |= _bench_tokenizers(args, sections)
        if "loader" in sections:
            out["loader"] = bench(_config(args.set), args.batches, args.repeats)
        if "need" in sections:
            out["need"] = step_need()
    except DataError as e:
        print(f"bench_data.py: error: {e}", file=sys.stderr)
        return 2
    _print_tokenize(out)
    if "loader" in out:
        _print_loader(out["loader"])
    if "need" in out:
        _print_need(out["need"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


def _bench_tokenizers(args: argparse.Namespace, sections) -> dict:
    """The tokenize and prepare sections: byte, the BPE stand-in, and --tokenizer."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = _sample(args.sample_bytes)
        specs = ["byte", _train_bpe(docs, Path(tmp) / "bpe-8k.json")]
        specs += [args.tokenizer] if args.tokenizer else []
        if "tokenize" in sections:
            out["tokenize"] = [bench_tokenize(s, docs, args.repeats) for s in specs]
        if "prepare" in sections:
            out["prepare"] = [bench_prepare(s, args.sample_bytes, w) for s in specs for w in (1, 2)]
    return out


def _print_loader(result: dict) -> None:
    tok = result["tokens_per_s"]
    rows = [
        ("startup (read + tokenize)", f"{result['startup_s']:.3f} s"),
        ("first batch", f"{result['first_batch_s'] * 1e3:.1f} ms"),
        ("batch shapes", str(result["batch_shapes"])),
        ("batches/s", f"{result['batches_per_s']:,.0f}"),
        ("examples/s", f"{result['examples_per_s']:,.0f}"),
        ("tokens/s", f"{tok:,.0f}" if tok else "-"),
        ("eval batches/s", f"{result['eval_batches_per_s'] or 0:,.0f}"),
        (
            "train/val tokens",
            f"{result['meta']['train_tokens']:,} / {result['meta']['val_tokens']:,}",
        ),
    ]
    print("loader:")
    print(_table(rows))


if __name__ == "__main__":
    sys.exit(main())
