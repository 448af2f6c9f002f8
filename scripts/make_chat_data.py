"""Write a tiny generated chat set (JSONL) that a small byte-level model learns on CPU.

    python scripts/make_chat_data.py data/chat.jsonl --n 2000 --seed 0

Each line is {"messages": [...]}: the user asks to reverse a short word, add two small numbers
or uppercase a word, and the assistant answers with the result only; some conversations open
with a system message, some ask a second question. The same --seed writes the same bytes.
User mistakes print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

WORDS = (
    "cat dog sun moon tree bird fish star rain snow blue red green leaf rock sand wind fire "
    "milk bread apple lemon house road ship boat king queen book pen cup door lamp hat shoe "
    "frog bear wolf lion duck goat corn rice salt gold iron ring bell drum song word code"
).split()
SYSTEMS = ("You are a helpful assistant.", "Answer with the result only.", "Be brief.")
ASKS = {
    "reverse": ("reverse: {w}", "Reverse the word {w}."),
    "add": ("add {a} and {b}", "What is {a} + {b}?"),
    "upper": ("uppercase: {w}", "Write {w} in capital letters."),
}


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(task name, user question, assistant answer) of one random question."""
    kind = rng.choice(sorted(ASKS))
    ask = rng.choice(ASKS[kind])
    if kind == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return kind, ask.format(a=a, b=b), str(a + b)
    word = rng.choice(WORDS)
    answer = word[::-1] if kind == "reverse" else word.upper()
    return kind, ask.format(w=word), answer


def make_records(n: int, seed: int) -> tuple[list[dict], Counter]:
    """`n` conversations from `seed`, and counts of tasks, system messages and second turns."""
    rng = random.Random(seed)
    records, counts = [], Counter()
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
            counts["system"] += 1
        turns = 2 if rng.random() < 0.2 else 1
        counts["two-turn"] += turns == 2
        for _ in range(turns):
            kind, question, answer = _task(rng)
            counts[kind] += 1
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        records.append({"messages": messages})
    return records, counts


def write(out: Path, records: list[dict]) -> None:
    """Write the records as JSONL through a temporary file (never a half-written OUT)."""
    if out.parent.exists() and not out.parent.is_dir():
        raise OSError(f"{str(out.parent)!r} is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        raise OSError(f"{str(out)!r} is a folder")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", metavar="OUT.jsonl", help="the JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="number of conversations (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        records, counts = make_records(args.n, args.seed)
        write(Path(args.out), records)
    except (ValueError, OSError) as e:
        print(f"make_chat_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    tasks = ", ".join(f"{counts[k]} {k}" for k in sorted(ASKS))
    print(
        f"wrote {args.n} conversations to {args.out} (seed {args.seed}; questions: {tasks}; "
        f"{counts['system']} with a system message, {counts['two-turn']} with two turns)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
