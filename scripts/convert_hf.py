"""Hugging Face checkpoints in and out of the framework (no torch, no network).

    python scripts/convert_hf.py import HF_DIR --out OUT_DIR [--param-dtype float32]
    python scripts/convert_hf.py export RUN_DIR --out HF_DIR [--step N]
        [--dtype float32|bfloat16|float16] [--max-shard-size 5GB] [--peft]

import: a local transformers checkpoint (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM; config.json, model.safetensors or a sharded index,
tokenizer.json when present) -> OUT_DIR/config.yaml (train from it: `scripts/train.py
OUT_DIR/config.yaml`, which resumes the weights from OUT_DIR), OUT_DIR/checkpoints/0 (weights
only) and the tokenizer files. export: a run directory (or an imported OUT_DIR) -> a folder
`transformers.AutoModelForCausalLM.from_pretrained` loads; a LoRA run (finetune.lora) is
exported with its adapters merged into the kernels, or with --peft as its adapters alone
(adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained`
loads onto the base model). A bad input (no config.json, an
unsupported architecture or config key, a missing shard or tensor, a tensor whose shape
disagrees with config.json, a model no HF class expresses) prints one line and exits with
status 2; an unreadable checkpoint exits with status 1. See docs/hf.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: `import` or `export` and their options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint directory -> framework folder")
    imp.add_argument("hf_dir", help="local transformers checkpoint directory")
    imp.add_argument("--out", required=True, help="folder for config.yaml and checkpoints/")
    imp.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype the params are stored and trained in (model.param_dtype; default float32)",
    )
    exp = sub.add_parser("export", help="framework run directory -> HF checkpoint directory")
    exp.add_argument("run_dir", help="run directory (config.yaml + checkpoints/) or import folder")
    exp.add_argument("--out", required=True, help="folder for config.json and safetensors")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    exp.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype (default: the imported checkpoint's, else the param dtype)",
    )
    exp.add_argument("--max-shard-size", default="5GB", help="shard above this size (5GB)")
    exp.add_argument(
        "--peft",
        action="store_true",
        help="a LoRA run: write its adapters alone in the PEFT format (adapter_config.json, "
        "adapter_model.safetensors; float32 unless --dtype) instead of the merged model",
    )
    for p in (imp, exp):
        p.add_argument(
            "--debug",
            action="store_true",
            default=os.environ.get("FRAMEWORK_DEBUG", "") not in ("", "0"),
            help="show the traceback of every failure (also FRAMEWORK_DEBUG=1)",
        )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Do the conversion and print what was written."""
    if args.command == "import":
        from framework.hf import import_checkpoint

        s = import_checkpoint(args.hf_dir, args.out, param_dtype=args.param_dtype)
        print(f"imported {s['architecture']} ({s['params']:,} params) -> {s['checkpoint']}")
        print(f"tokenizer: {s['tokenizer'] or 'none in the checkpoint'}")
        print(f"train from it: python scripts/train.py {s['config']}")
        if s["warning"]:
            print(f"warning: {s['warning']}")
        return
    if args.peft:
        from framework.hf import export_adapters

        s = export_adapters(args.run_dir, args.out, step=args.step, dtype=args.dtype)
        print(
            f"exported the LoRA adapters of step {s['step']} for {s['architecture']} "
            f"({s['dtype']}, r={s['r']}, lora_alpha={s['lora_alpha']:g}, "
            f"{s['params']:,} params) -> {args.out}"
        )
        print(f"target_modules: {', '.join(s['target_modules'])}")
        print(f"files: {', '.join(s['files'])}")
        return
    from framework.hf import export_run
    from framework.hf.files import parse_size

    s = export_run(
        args.run_dir,
        args.out,
        step=args.step,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    print(f"exported step {s['step']} as {s['architecture']} ({s['dtype']}) -> {args.out}")
    print(f"files: {', '.join(['config.json', *s['files']])}")
    if s["merged_adapters"]:
        n = len(s["merged_adapters"])
        print(f"merged the LoRA adapters into {n} kernels (W + alpha / r * A @ B)")
    if s["tokenizer"]:
        print(f"tokenizer: {', '.join(s['tokenizer'])}")
    else:
        print("tokenizer: the run is byte-level (data.tokenizer=byte): no tokenizer files written")


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit status (2: bad input, 1: unreadable checkpoint or a failing
    disk, each reported in one line on stderr)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        run(args)
    except Exception as e:
        if args.debug:
            raise
        from framework.errors import CheckpointError, ConfigError, environment_cause

        if isinstance(e, ConfigError):
            status, line = 2, f"error: {e.message}"
        elif environment_cause(e) is not None or isinstance(e, CheckpointError):
            status, line = 1, f"error: {' '.join(str(e).split())}"
        elif isinstance(e, OSError):
            status, line = 2, f"error: {e.filename or ''}: {e.strerror or e}"
        else:
            raise
        sys.stderr.write(line + "\n")
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
