"""Export a run's params to safetensors: `python scripts/export_safetensors.py RUN_DIR
[--step N] --out model.safetensors`.

Keys are the '/'-joined param paths (e.g. `blocks/attn/q/kernel`); the file holds no code
(no pickle). `framework.train.checkpoint.load_safetensors(path)` rebuilds the nested dict.
A checkpoint whose params fail their checksums is refused (one line, exit status 1)."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory (or its checkpoints/ folder)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from framework.errors import CheckpointError, DamagedCheckpointError
    from framework.train.checkpoint import (
        CheckpointConfig,
        Checkpointer,
        checkpoint_dir,
        save_safetensors,
        step_dirs,
    )

    directory = checkpoint_dir(args.run_dir)
    if not step_dirs(directory):
        sys.stderr.write(f"error: no checkpoints in {directory}\n")
        return 2
    reader = Checkpointer(directory, CheckpointConfig(), read_only=True)
    try:
        step, params = reader.read_numpy("params", args.step)
    except CheckpointError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1 if isinstance(e, DamagedCheckpointError) else 2
    finally:
        reader.close()
    out = save_safetensors(params, args.out, metadata={"step": str(step), "source": str(directory)})
    print(f"wrote {out} (step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
