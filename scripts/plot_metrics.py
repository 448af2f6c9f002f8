"""Plot a run's metrics: `python scripts/plot_metrics.py RUN_DIR` writes RUN_DIR/plots/*.png."""

from __future__ import annotations

import argparse
import sys

from framework.train.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    """Plot RUN_DIR and print the written paths; return 2 if the run dir or metrics is missing."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="run directory containing metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"plot_metrics: nothing to plot in {args.run_dir}/metrics.jsonl", file=sys.stderr)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
