"""Will a config fit on N GPUs of a kind, and how fast will it step? Runs on a CPU in seconds,
allocating nothing: `python scripts/estimate.py CONFIG --gpu h100 --devices 8 [key=value ...]`.

Prints per device: parameters, gradients, optimizer state, activations kept for the backward
under the remat policy, workspace, collective buffers and the total against the card's usable
memory; the step's FLOPs, HBM bytes and collective bytes per mesh axis; a roofline step time
and its MFU; the largest micro-batch that fits; and, if it does not fit, the cheapest changes
that do. `--json` prints the same as data. docs/estimate.md explains how to read it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--gpu", default="h100", help="card: h100, h200 or a100 (default h100)")
    parser.add_argument("--devices", type=int, default=8, help="GPUs in all (default 8)")
    parser.add_argument(
        "--mem-fraction",
        type=float,
        default=None,
        help="share of GPU memory jax may use (default $XLA_PYTHON_CLIENT_MEM_FRACTION, else "
        "jax's 0.75)",
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    # only traces: never initializes (nor preallocates) an accelerator, even on a GPU node
    os.environ["JAX_PLATFORMS"] = "cpu"
    logging.getLogger("framework.ops").setLevel(logging.ERROR)  # the host's kernel notes

    from framework.config import ConfigError, exit_on_config_error, load_config
    from framework.estimate import answer, as_data, as_text, card
    from framework.train.config import Config

    with exit_on_config_error():
        if args.devices < 1:
            raise ConfigError(f"--devices must be at least 1, got {args.devices}")
        cfg = load_config(Config, args.config, args.overrides)
        gpu = card(args.gpu)
        result = answer(cfg, args.devices, gpu, args.mem_fraction, name=args.config)
    print(json.dumps(as_data(result), indent=2) if args.json else as_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
