"""Train from a config: `python scripts/train.py CONFIG [key.sub=value ...]`.

User mistakes (bad key, wrong type, missing file, incompatible data, `checkpoint.resume=never`
over existing checkpoints) print one line and exit with status 2; checkpoints that exist but
cannot be read print one line and exit with status 1. SIGTERM/SIGINT save a checkpoint and exit
0; rerunning the same command resumes. The run directory gets the resolved config, metrics,
plots and checkpoints/."""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override (same as a positional key=value)",
    )
    return parser.parse_args(argv)


def _log_framework_messages() -> None:
    """Show the framework's INFO messages (e.g. which kernel `impl=auto` chose) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("framework")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _log_framework_messages()
    from framework.config import exit_on_config_error, load_config
    from framework.config.loader import _die
    from framework.errors import CheckpointError, DataError, NonFiniteError
    from framework.train import build, train
    from framework.train.config import Config

    with exit_on_config_error():
        cfg = load_config(Config, args.config, [*args.overrides, *args.extra])
        try:
            run = build(cfg)
        except DataError as e:
            _die(f"data error: {e}")
        try:
            summary = train(run)
        except (CheckpointError, NonFiniteError) as e:
            kind = "checkpoint error" if isinstance(e, CheckpointError) else "non-finite"
            sys.stderr.write(f"{kind}: {e}\n")
            return 1
    if summary["stopped"]:
        print(
            f"stopped by {summary['stopped']} at step {summary['step']}; checkpoint saved "
            f"in {summary['run_dir']}/checkpoints; rerun the same command to resume"
        )
        return 0
    if summary["eval"]:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in summary["eval"].items() if isinstance(v, float)
        )
        print(f"final eval at step {summary['step']}: {shown}")
    if "sample" in summary:
        print("sample:\n" + summary["sample"])
    print(f"run directory: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
