"""Export a config's whole sharded train step for GPUs from this host, no GPU needed:
`python scripts/export_gpu.py CONFIG [--devices 8] [--gpu h100] [--out FILE] [key=value ...]`.

Runs the real Pallas -> Triton lowering against an abstract mesh of `--devices` GPUs and prints
the program's size, its Triton kernels and cuDNN calls, how many inputs are split over the mesh,
and the collectives written explicitly (the rest are added by XLA's partitioner on the node).
`--out FILE.mlir` writes the program's StableHLO text (`.mlirbc`: MLIR bytecode) to read or
feed to XLA tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GPUS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "a100": "NVIDIA A100-SXM4-80GB"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--devices", type=int, default=8, help="GPUs in the abstract mesh")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU kind")
    parser.add_argument("--out", help="write the StableHLO here (.mlir text, .mlirbc bytecode)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles nothing itself
    from framework.config import exit_on_config_error, load_config
    from framework.train.config import Config
    from framework.train.gpu_program import export_train_step, summarize

    start = time.perf_counter()
    with exit_on_config_error():
        cfg = load_config(Config, args.config, args.overrides)
        exported = export_train_step(cfg, devices=args.devices, device_kind=GPUS[args.gpu])
    summary = {"config": args.config, "gpu": GPUS[args.gpu], **summarize(exported)}
    summary["export_s"] = round(time.perf_counter() - start, 2)
    if args.out:
        with open(args.out, "wb") as f:
            bytecode = args.out.endswith(".mlirbc")
            f.write(
                exported.mlir_module_serialized if bytecode else exported.mlir_module().encode()
            )
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{args.config}: train step for {args.devices} x {GPUS[args.gpu]} ({summary['export_s']} s)"
    )
    print(
        f"  StableHLO: {summary['stablehlo_bytes']:,} B; inputs {summary['inputs']}, "
        f"{summary['inputs_split']} split over the mesh"
    )
    kernels = ", ".join(f"{k} x{n}" for k, n in summary["triton_kernels"].items()) or "none"
    print(f"  Triton kernels: {kernels}")
    print(f"  cuDNN calls: {summary['cudnn_calls']}")
    coll = ", ".join(f"{k} x{n}" for k, n in summary["explicit_collectives"].items()) or "none"
    print(f"  explicit collectives (inside shard_map): {coll}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
