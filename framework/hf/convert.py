"""Import a local Hugging Face checkpoint into the framework, and export a run back.

Import reads config.json, then fills each framework leaf (stacked [n_layers, ...] arrays,
allocated once in the param dtype) tensor by tensor, each read from its safetensors file on
request and dropped after use, so the model is held once. `load` returns it in memory;
`import_checkpoint` writes a run-ready folder (config.yaml, a weights-only orbax checkpoint at
step 0, tokenizer files, hf.json). Export (`framework.hf.export`) reads a run's checkpoint and
writes config.json and safetensors that transformers loads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from framework.errors import ConfigError
from framework.hf import config as hfc
from framework.hf import files, weights
from framework.models.transformer import TransformerConfig
from framework.train.checkpoint import unflatten_params

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
SOURCE_FILE = "hf.json"  # what an imported folder was: architecture, dtype, config.json
PARAM_DTYPES = ("float32", "bfloat16", "float16")
BUFFERS = weights.BUFFERS


def _read_params(
    reader: files.Reader, cfg: TransformerConfig, family: str, tied: bool
) -> dict[str, np.ndarray]:
    """{'/'-joined path: array} filled tensor by tensor from `reader` (each read once)."""
    shapes = weights.leaf_shapes(cfg)
    out = {p: np.empty(shape, dtype) for p, (shape, dtype) in shapes.items()}
    base = weights.prefix(family)
    used = set()
    for rule in weights.rules(cfg, family):
        shape = weights.slice_shape(rule, shapes, rule.fw[0])
        want = rule.hf_shape(shape)
        for layer, name in weights.tensors(rule, cfg.n_layers):
            found = next((n for n in (name, name.removeprefix(base)) if n in reader), None)
            if found is None:
                raise ConfigError(f"tensor {name} is missing from the checkpoint")
            tensor = reader.get(found)
            if tensor.shape != want:
                raise ConfigError(
                    f"tensor {found} has shape {list(tensor.shape)}, but config.json implies "
                    f"{list(want)}"
                )
            for path, part in zip(rule.fw, rule.split(tensor, shape), strict=True):
                if layer is None:
                    out[path][...] = part
                else:
                    out[path][layer] = part
            used.add(found)
    for name in reader.names():
        if name in used or name.endswith(BUFFERS) or (tied and name == "lm_head.weight"):
            continue
        raise ConfigError(f"tensor {name} in the checkpoint has no place in the model config.json")
    return out


def _find_tokenizer(hf_dir: Path) -> Path | None:
    """The checkpoint's tokenizer.json, if it has one."""
    path = hf_dir / "tokenizer.json"
    return path if path.is_file() else None


def _model(hf_dir: Path, param_dtype: str) -> tuple[TransformerConfig, hfc.Source]:
    """(model config with `param_dtype`, source record) of a checkpoint's config.json."""
    if param_dtype not in PARAM_DTYPES:
        raise ConfigError(f"param_dtype {param_dtype!r}: expected one of {', '.join(PARAM_DTYPES)}")
    cfg, source = hfc.to_framework(hfc.read_config(hf_dir))
    return cfg.model_copy(update={"param_dtype": param_dtype}), source


def load(
    hf_dir: str | Path, param_dtype: str = "float32"
) -> tuple[TransformerConfig, dict, Path | None]:
    """(model config, params as nested numpy dicts, tokenizer.json path or None) of a local
    Hugging Face checkpoint directory; ConfigError (one line) for anything it cannot read."""
    hf_dir = Path(hf_dir)
    cfg, source = _model(hf_dir, param_dtype)
    flat = _load_flat(hf_dir, cfg, source)
    return cfg, unflatten_params(flat), _find_tokenizer(hf_dir)


def _load_flat(hf_dir: Path, cfg: TransformerConfig, source: hfc.Source) -> dict:
    """{'/'-joined path: array} of the checkpoint's tensors, read one at a time."""
    reader = files.Reader(hf_dir)
    try:
        family = hfc.ARCHITECTURES[source.architecture]
        return _read_params(reader, cfg, family, cfg.tie_embeddings)
    finally:
        reader.close()


def _run_config(cfg: TransformerConfig, out_dir: Path, tokenizer: Path | None) -> dict:
    """A framework config that fine-tunes the imported weights (validated, as plain data)."""
    from framework.train.config import Config

    seq_len = min(cfg.max_seq_len, 1024)
    if tokenizer is not None:
        data: dict[str, Any] = {"source": "text", "tokenizer": str(tokenizer)}
    elif (cfg.vocab_size or 0) >= 256:
        data = {"source": "text", "tokenizer": "byte"}
    else:
        data = {"source": "synthetic_lm", "vocab_size": cfg.vocab_size}
    tree = {
        # not out_dir's own name: a run in runs/ beside an import there would train into the
        # import folder, and its checkpoint rotation would delete the imported weights
        "run": {"name": f"{(out_dir.name or 'imported')[:100]}_finetune"},
        "model": cfg.model_dump(mode="json"),
        "data": data | {"seq_len": seq_len, "batch_size": 8},
        "optim": {"learning_rate": 3e-5, "warmup_steps": 10, "weight_decay": 0.0},
        "train": {"steps": 1000, "eval_every": 200},
        "checkpoint": {"resume": str(out_dir)},
    }
    return Config.model_validate(tree).model_dump(mode="json")


def import_checkpoint(
    hf_dir: str | Path, out_dir: str | Path, *, param_dtype: str = "float32"
) -> dict:
    """Write `out_dir`/config.yaml, checkpoints/0 (weights only, in `param_dtype`), tokenizer
    files and hf.json from a local HF checkpoint; returns a summary. `out_dir` must not hold
    checkpoints."""
    import yaml

    from framework.train.checkpoint import CheckpointConfig, Checkpointer, step_dirs

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).expanduser().absolute()
    cfg, source = _model(hf_dir, param_dtype)
    source = dataclasses.replace(source, path=str(hf_dir.expanduser().absolute()))
    if step_dirs(out_dir / "checkpoints") or (out_dir / "checkpoints").is_file():
        raise ConfigError(f"--out {out_dir} already holds checkpoints; choose a new folder")
    warning = _vocab_warning(_find_tokenizer(hf_dir), cfg)
    flat = _load_flat(hf_dir, cfg, source)  # every check passes before anything is written
    n_params = sum(v.size for v in flat.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES + ("generation_config.json",) if (hf_dir / n).is_file()]
    for name in copied:
        shutil.copyfile(hf_dir / name, out_dir / name)
    tokenizer = out_dir / "tokenizer.json" if "tokenizer.json" in copied else None
    run_config = _run_config(cfg, out_dir, tokenizer)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    (out_dir / SOURCE_FILE).write_text(json.dumps(source.to_json(), indent=2) + "\n")
    params = unflatten_params(flat)
    del flat
    writer = Checkpointer(
        out_dir / "checkpoints", CheckpointConfig(async_save=False), save_concurrent_gb=1
    )
    try:
        state = {"params": params, "opt_state": {}, "model_state": {}}
        meta = {"step": 0, "skipped_steps": 0, "weights_only": True}
        meta |= {"source": f"huggingface {source.architecture}", "from": str(hf_dir.absolute())}
        with _numpy_saved_in_place():
            writer.save(state, {}, run_config, meta)
            writer.wait()
    finally:
        writer.close()
    return {
        "warning": warning,
        "architecture": source.architecture,
        "params": n_params,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "config": str(out_dir / "config.yaml"),
        "checkpoint": str(out_dir / "checkpoints" / "0"),
    }


@contextlib.contextmanager
def _numpy_saved_in_place() -> Iterator[None]:
    """orbax deep-copies host arrays before writing them (a second copy of the model); the
    import saves synchronously and never mutates them, so it writes them as they are."""
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    previous = handlers.get_type_handler(np.ndarray)
    handlers.register_type_handler(
        np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False), override=True
    )
    try:
        yield
    finally:
        handlers.register_type_handler(np.ndarray, previous, override=True)


def _vocab_warning(tokenizer: Path | None, cfg: TransformerConfig) -> str | None:
    """A line when the tokenizer has more ids than the model embeds (training would refuse)."""
    if tokenizer is None:
        return None
    import tokenizers

    try:
        n = tokenizers.Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
        raise ConfigError(f"{tokenizer}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
    if n <= (cfg.vocab_size or 0):
        return None
    return (
        f"tokenizer.json has {n} ids but the model embeds {cfg.vocab_size}: training on text "
        "with it will refuse (data.tokenizer); use token ids below the model's vocabulary"
    )
