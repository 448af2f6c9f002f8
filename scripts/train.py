"""Train from a config: `python scripts/train.py CONFIG [key.sub=value ...]`.

User mistakes (bad key, wrong type, missing file, incompatible data, a run too big for the
devices, `checkpoint.resume=never` over existing checkpoints) print one line and exit with status
2; failures of the run or its environment (unreadable checkpoints, NaN, a full disk, a read-only
file system, a denied permission, a dead peer process) print one line and exit with status 1;
XLA running out of device memory prints a report naming the layers and exits with status 3.
`--debug` or FRAMEWORK_DEBUG=1 shows the traceback instead; an internal bug always does.
SIGTERM/SIGINT save a checkpoint and exit 0; rerunning the same command resumes. The run
directory gets the resolved config, metrics, plots and checkpoints/."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback


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
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("FRAMEWORK_DEBUG", "") not in ("", "0"),
        help="show the traceback of every failure (also FRAMEWORK_DEBUG=1)",
    )
    return parser.parse_args(argv)


def _log_framework_messages(debug: bool) -> None:
    """Show the framework's INFO messages (e.g. which kernel `impl=auto` chose) on stderr.
    Without --debug, orbax's own log (through absl) is silenced: on a failed save it repeats,
    with a traceback per thread, the failure that is reported in one line."""
    if not debug:
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("framework")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False


def failure(e: BaseException) -> tuple[int, str] | None:
    """(exit status, one line) for a failure the user or the environment caused, or None for
    an internal bug (shown with its traceback). Wrapped causes count: orbax and tensorstore
    bury a full disk or a denied permission several exceptions deep."""
    from framework.config.loader import config_error_line
    from framework.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DistributedError,
        NonFiniteError,
        OutOfMemoryError,
        ShapeError,
        environment_cause,
    )

    if (found := environment_cause(e)) is not None:
        cause, code = found
        if isinstance(e, ConfigError):  # our own line already names the key and path
            return 1, f"error: {e.message}"
        where = getattr(cause, "filename", None) or _quoted_path(str(cause))
        return 1, f"error: {os.strerror(code)}" + (f": {where}" if where else "")
    if (line := config_error_line(e)) is not None:
        return 2, line
    if isinstance(e, OSError):
        return 2, f"error: {e.filename or ''}: {e.strerror or e}"
    kinds = {
        DataError: (2, "data error"),
        ShapeError: (2, "model/data mismatch"),
        CheckpointError: (1, "checkpoint error"),
        NonFiniteError: (1, "non-finite"),
        DistributedError: (1, "distributed error"),
    }
    if isinstance(e, OutOfMemoryError):  # its report is printed before this line
        return 3, "out of memory: the train step does not fit the device (report above)"
    for kind, (status, prefix) in kinds.items():
        if isinstance(e, kind):
            return status, f"{prefix}: {e}"
    if _out_of_device_memory(e):
        return 3, (
            f"out of device memory ({str(e).splitlines()[0]}): lower data.batch_size, "
            "data.seq_len or the model's size, or spread it over more devices (mesh.*)"
        )
    return None


def _out_of_device_memory(e: BaseException) -> bool:
    """XLA could not allocate: the run is bigger than the estimate `build` checks."""
    import jax

    return isinstance(e, jax.errors.JaxRuntimeError) and str(e).startswith("RESOURCE_EXHAUSTED")


def _quoted_path(text: str) -> str | None:
    """The first quoted absolute path in a message."""
    match = re.search(r'"(/[^"]+)"', text)
    return match.group(1) if match else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _log_framework_messages(args.debug)
    try:
        summary = _train(args)
    except Exception as e:
        from framework.parallel import distributed

        known = failure(e)
        if known is None:  # a failed collective: if a peer died, the watchdog exits with its line
            distributed.settle_peer_failure()
        distributed.announce_failure()  # the other processes stop too
        if known is None:
            raise
        status, line = known
        sys.stdout.flush()
        if args.debug:
            traceback.print_exc()
        else:
            if (report := _report_text(e)) is not None:
                sys.stderr.write(report + "\n")
            sys.stderr.write(" ".join(line.split()) + "\n")
        sys.stderr.flush()
        from framework.errors import environment_cause

        if environment_cause(e) is not None:  # writers may hang on the broken disk at exit
            os._exit(status)
        return status
    return _report(summary)


def _train(args: argparse.Namespace) -> dict:
    """Load the config, build the run, train it: the summary."""
    from framework.config import load_config
    from framework.train import build, train
    from framework.train.config import Config
    from framework.train.signals import stop_signals

    with stop_signals():  # a Ctrl-C while build compiles is a clean stop too
        cfg = load_config(Config, args.config, [*args.overrides, *args.extra])
        return train(build(cfg))


def _report_text(e: BaseException) -> str | None:
    """The multi-line report an error carries; an out-of-memory one with the estimator's
    advice (a predicted need when the step did not compile, the cheapest change that fits)."""
    from framework.errors import OutOfMemoryError

    if not isinstance(e, OutOfMemoryError):
        return getattr(e, "report", None)
    d = e.details
    try:
        from framework.estimate import oom_advice

        return d.render(*oom_advice(d.cfg, d.n_devices, d.device_kind, d.limit))
    except Exception:  # noqa: BLE001 (advice must not hide the report)
        return e.report


def _report(summary: dict) -> int:
    """Print how the run ended (stdout); 0."""
    if summary["stopped"] and summary["step"] == summary["start_step"]:
        print(f"stopped before the first step by {summary['stopped']}; nothing to save")
        return 0
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
    if "sample_before" in summary:
        print("sample before training:\n" + summary["sample_before"])
    if "sample" in summary:
        print("sample:\n" + summary["sample"])
    print(f"run directory: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
