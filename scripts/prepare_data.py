"""Tokenize text into token files for `data.source: tokens` (memory-mapped at training time).

    python scripts/prepare_data.py stdlib --out data/train.bin --val-out data/val.bin
    python scripts/prepare_data.py 'corpus/**/*.txt' --out t.bin --tokenizer tok.json --dtype uint32

INPUTs are what `data.paths` accepts: files, folders (recursive, --pattern), globs, 'stdlib'.
A .bin output is raw tokens of --dtype; a .npy output is a NumPy array. Beside each output a
`<out>.json` records the tokenizer, vocab_size and bytes_per_token, which the loader reads.
The validation split is by file, the same rule the text loader uses (one file: its tail).
User mistakes print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from framework.data.sources import (
    find_files,
    load_tokenizer,
    read_corpus,
    sidecar_path,
    split_by_file,
)
from framework.errors import DataError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs or 'stdlib'")
    p.add_argument("--out", required=True, help="training tokens (.bin or .npy)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizers JSON file")
    p.add_argument(
        "--dtype",
        choices=["uint16", "uint32"],
        default="uint16",
        help="token dtype (uint16 holds vocabularies up to 65536)",
    )
    p.add_argument("--val-out", help="validation tokens (.bin or .npy), split off by file")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="held-out share of files with --val-out (default 0.05)",
    )
    p.add_argument("--pattern", default="*.py", help="file-name glob inside folders")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes")
    return p.parse_args(argv)


def _write(path: str, tokens: np.ndarray, meta: dict) -> None:
    """Write tokens as raw .bin or .npy, plus the metadata JSON beside them."""
    out = Path(path)
    if out.suffix not in (".bin", ".npy"):
        raise DataError(f"output {path!r} must end in .bin or .npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, tokens, allow_pickle=False)
    else:
        tokens.tofile(out)
    sidecar_path(path).write_text(json.dumps(meta, indent=2) + "\n")


def prepare(args: argparse.Namespace) -> list[str]:
    """Tokenize and write; returns one summary line per written file."""
    if args.val_fraction is not None and not args.val_out:
        raise DataError("--val-fraction needs --val-out")
    val_fraction = (0.05 if args.val_fraction is None else args.val_fraction) if args.val_out else 0
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise DataError(f"--max-bytes must be positive, got {args.max_bytes}")
    tok = load_tokenizer(args.tokenizer)
    limit = np.iinfo(args.dtype).max + 1
    if tok.vocab_size > limit:
        raise DataError(
            f"tokenizer vocabulary {tok.vocab_size} does not fit {args.dtype} "
            f"(at most {limit} ids); use --dtype uint32"
        )
    docs = read_corpus(find_files(args.inputs, args.pattern), args.max_bytes)
    if not docs:
        raise DataError(f"inputs {args.inputs} hold no text (all files empty)")
    is_val = split_by_file([k for k, _ in docs], val_fraction)
    parts = {
        "train": [d for (_, d), v in zip(docs, is_val, strict=True) if not v],
        "val": [d for (_, d), v in zip(docs, is_val, strict=True) if v],
    }
    streams = {name: tok.encode_docs(ds).astype(args.dtype) for name, ds in parts.items()}
    nbytes = {name: sum(map(len, ds)) for name, ds in parts.items()}
    if args.val_out and not parts["val"]:  # a single input file: hold out its tail
        train = streams["train"]
        cut = len(train) - math.ceil(len(train) * val_fraction)
        streams = {"train": train[:cut], "val": train[cut:]}
        share = cut / max(len(train), 1)
        nbytes = {
            "train": round(nbytes["train"] * share),
            "val": nbytes["train"] - round(nbytes["train"] * share),
        }
    lines = []
    for name, path in (("train", args.out), ("val", args.val_out)):
        if path is None:
            continue
        tokens = streams[name]
        if len(tokens) == 0:
            raise DataError(f"the {name} split is empty; give more input or change --val-fraction")
        meta = {
            "tokenizer": args.tokenizer,
            "vocab_size": tok.vocab_size,
            "dtype": args.dtype,
            "num_tokens": int(len(tokens)),
            "num_bytes": int(nbytes[name]),
            "bytes_per_token": nbytes[name] / len(tokens),
            "files": sum(1 for v in is_val if v == (name == "val")),
        }
        _write(path, tokens, meta)
        lines.append(
            f"{name}: {len(tokens):,} tokens ({nbytes[name]:,} bytes, {meta['files']} "
            f"files) -> {path}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        lines = prepare(args)
    except (DataError, OSError) as e:
        print(f"prepare_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
