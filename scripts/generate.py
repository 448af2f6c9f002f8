"""Generate text: `python scripts/generate.py RUN_DIR_OR_HF_DIR --prompt "..." [--max-new-tokens N
--temperature T --top-k K --top-p P --seed S --step N --show-prompt]` prints the continuation.

RUN_DIR is a training run directory (config.yaml and checkpoints/; the newest checkpoint's
params unless --step; the tokenizer named by the config's data.tokenizer). HF_DIR is a
transformers checkpoint directory (config.json; imported with `framework.hf.load`). Generation
uses the KV-cache decoder (`framework.generate`) on one device and stops at the tokenizer's /
config's EOS when known. Bad input (a missing directory, no checkpoint, a prompt too long for
the context, bad flag values) prints one line and exits with status 2; a damaged checkpoint or
a failure of the environment exits with status 1."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_NEW_TOKENS = 100


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; bad flag values exit with status 2."""
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="training run directory or transformers checkpoint dir")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, fewer if the context is full)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--show-prompt", action="store_true", help="print the prompt too")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("FRAMEWORK_DEBUG", "") not in ("", "0"),
        help="show the traceback of every failure (also FRAMEWORK_DEBUG=1)",
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


@dataclasses.dataclass
class Loaded:
    """A model ready to generate: config, host params, tokenizer and end-of-text ids."""

    cfg: Any  # TransformerConfig
    params: Any
    tokenizer: Any
    eos_ids: list[int]
    source: str


def _usage_error(message: str) -> Exception:
    from framework.errors import ConfigError

    return ConfigError(message)


def _own_eos(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS (the byte tokenizer's 256; tokenizer_config.json's eos_token or a
    well-known end-of-text token of a tokenizer file), if it has one."""
    return [] if tokenizer.eos_id is None else [tokenizer.eos_id]


def _hf_eos(hf_dir: Path) -> list[int]:
    """eos_token_id of config.json and generation_config.json (an id or a list of ids)."""
    out: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = hf_dir / name
        if not f.is_file():
            continue
        value = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def _find_tokenizer(spec: str, run_dir: Path) -> str:
    """'byte', or the tokenizer file as given, relative to the run directory, or inside it."""
    if spec == "byte":
        return spec
    for candidate in (Path(spec), run_dir / spec, run_dir / Path(spec).name):
        if candidate.is_file():
            return str(candidate)
    raise _usage_error(f"tokenizer file {spec!r} (data.tokenizer of {run_dir}) not found")


def load_run(run_dir: Path, step: int | None) -> Loaded:
    """A training run directory: its model config, newest (or `step`) params and tokenizer."""
    from framework import models
    from framework.config.loader import load_yaml_tree, validate
    from framework.data import load_tokenizer
    from framework.errors import ConfigError
    from framework.models.transformer import TransformerConfig
    from framework.train.checkpoint import CheckpointConfig, Checkpointer, step_dirs

    directory = next(
        (d for d in (run_dir / "checkpoints", run_dir) if step_dirs(d)), run_dir / "checkpoints"
    )
    if not step_dirs(directory):
        raise _usage_error(f"no checkpoints in {directory}")
    reader = Checkpointer(directory, CheckpointConfig(), read_only=True)
    try:
        if (run_dir / "config.yaml").is_file():
            tree = load_yaml_tree(run_dir / "config.yaml")
        else:  # every checkpoint also holds the resolved config
            tree = reader.read_numpy("config", step)[1]
        step, params = reader.read_numpy("params", step)
    finally:
        reader.close()
    model = tree.get("model") if isinstance(tree, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    if name != "transformer":
        raise _usage_error(f"generation needs a transformer language model; model.name={name!r}")
    try:
        cfg = validate(models.get(name).config, model)
    except ConfigError as e:
        raise _usage_error(f"model section of {run_dir}: {e.message}") from None
    assert isinstance(cfg, TransformerConfig)
    if cfg.vocab_size is None:
        raise _usage_error(f"{run_dir}/config.yaml has no model.vocab_size (not a resolved config)")
    from framework.finetune import lora

    params = lora.merge(params)  # a LoRA run's adapters folded in (no-op without)
    spec = _find_tokenizer(str((tree.get("data") or {}).get("tokenizer", "byte")), run_dir)
    tokenizer = load_tokenizer(spec, (tree.get("data") or {}).get("eos_token"))
    # an imported folder keeps generation_config.json; else the tokenizer's own EOS
    eos = _hf_eos(run_dir) or _own_eos(tokenizer)
    return Loaded(cfg, params, tokenizer, eos, f"{directory} step {step}")


def load_hf(hf_dir: Path) -> Loaded:
    """A transformers checkpoint directory, through `framework.hf.load`."""
    try:
        from framework.hf import load
    except ImportError as e:
        raise _usage_error(f"{hf_dir} is a transformers checkpoint, but {e}") from None
    from framework.data import load_tokenizer

    cfg, params, tokenizer_path = load(hf_dir)
    if tokenizer_path is None:
        raise _usage_error(f"{hf_dir} has no tokenizer.json: cannot encode the prompt")
    tokenizer = load_tokenizer(str(tokenizer_path))
    return Loaded(cfg, params, tokenizer, _hf_eos(hf_dir) or _own_eos(tokenizer), str(hf_dir))


def load(path: str, step: int | None = None) -> Loaded:
    """A run directory (config.yaml / checkpoints) or a transformers directory (config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise _usage_error(f"{path} is not a directory")
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return load_hf(p)
    if not (p / "config.yaml").is_file() and not (p / "checkpoints").is_dir():
        raise _usage_error(
            f"{path} is neither a run directory (config.yaml, checkpoints/) nor a transformers "
            "checkpoint (config.json)"
        )
    return load_run(p, step)


def _continuation(tokenizer: Any, prompt: list[int], new: list[int]) -> str:
    """Text of `new` after `prompt` (decoded together, so word boundaries survive)."""
    whole, head = tokenizer.decode(prompt + new), tokenizer.decode(prompt)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new)


def run(args: argparse.Namespace) -> str:
    """Load, generate and return the continuation's text (ConfigError for bad input)."""
    import jax

    from framework.generate import check_lengths, generate

    loaded = load(args.path, args.step)
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise _usage_error("the prompt is empty (it encodes to no token)")
    n = args.max_new_tokens
    if n is None:
        n = DEFAULT_NEW_TOKENS
        if cfg.position == "learned":
            n = max(1, min(n, cfg.max_seq_len - len(prompt)))
    check_lengths(cfg, [len(prompt)], n)
    new = generate(
        loaded.params,
        cfg,
        [prompt],
        max_new_tokens=n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=loaded.eos_ids or None,
        key=jax.random.key(args.seed),
    )[0]
    text = _continuation(tokenizer, prompt, new)
    return args.prompt + text if args.show_prompt else text


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the continuation; 2 for user mistakes, 1 for damaged checkpoints."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from framework.errors import (
        CheckpointError,
        ConfigError,
        DamagedCheckpointError,
        DataError,
        ShapeError,
    )

    try:
        text = run(args)
    except (ConfigError, DataError, ShapeError, CheckpointError, OSError) as e:
        if args.debug:
            raise
        status = 1 if isinstance(e, DamagedCheckpointError | OSError) else 2
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return status
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
