"""Export a run (or an imported folder) to a directory transformers loads.

The model comes from the checkpoint's own saved config; the architecture from its fields (the
one it was imported from while it still fits: `hf.json`, found in the run directory, through
`checkpoint.resume` or beside the tokenizer). Tensors are written one at a time, sharded above
`max_shard_bytes`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pydantic
import yaml

from framework.errors import CheckpointError, ConfigError
from framework.hf import config as hfc
from framework.hf import files, target, weights
from framework.hf.convert import SOURCE_FILE, TOKENIZER_FILES
from framework.models.transformer import TransformerConfig
from framework.train.checkpoint import flatten_params

EXPORT_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_SHARD = 5 * 10**9


def _read_run(run_dir: Path, step: int | None) -> tuple[int, dict, dict]:
    """(step, flat numpy params, saved run config) of a run's checkpoint."""
    from framework.train.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir, step_dirs

    if not (run_dir / "config.yaml").is_file() and not step_dirs(checkpoint_dir(run_dir)):
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml or checkpoints/)")
    directory = checkpoint_dir(run_dir)
    if not step_dirs(directory):
        raise ConfigError(f"{run_dir}: no checkpoints in {directory}")
    reader = Checkpointer(directory, CheckpointConfig(), read_only=True)
    try:
        step, saved = reader.read_numpy("config", step)
        _, params = reader.read_numpy("params", step)
    except CheckpointError as e:
        if "no checkpoint for step" in str(e):
            raise ConfigError(str(e)) from None
        raise
    finally:
        reader.close()
    return step, flatten_params(params), saved


def _model_config(saved: dict, flat: dict) -> TransformerConfig:
    """The transformer config saved in the checkpoint (vocab_size from the embedding if
    unset); ConfigError for another model or an invalid one."""
    model = dict(saved.get("model") or {})
    if model.get("name") != "transformer":
        raise ConfigError(
            f"model.name={model.get('name')!r}: only the transformer exports to Hugging Face"
        )
    if model.get("vocab_size") is None:
        model["vocab_size"] = int(flat["embed/embedding"].shape[0])
    try:
        return TransformerConfig.model_validate(model)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(
            f"the checkpoint's model config is invalid (model.{where}: {err['msg']})"
        ) from None


def find_source(run_dir: Path, saved: dict, hops: int = 8) -> tuple[hfc.Source | None, Path | None]:
    """(the import record, the folder holding it) of a run: its own hf.json, else the one of
    the run it was resumed from (followed up to `hops` times), else the one beside its
    tokenizer file."""
    seen: set[Path] = set()
    here, config = run_dir, saved
    for _ in range(hops):
        here = here.absolute()
        if here in seen:
            break
        seen.add(here)
        if (here / SOURCE_FILE).is_file():
            return hfc.Source.from_json(json.loads((here / SOURCE_FILE).read_text())), here
        resume = (config.get("checkpoint") or {}).get("resume", "auto")
        if resume in ("auto", "never", "fresh"):
            break
        here = Path(resume).expanduser()
        here = here.parent if here.name == "checkpoints" else here
        try:
            config = yaml.safe_load((here / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
    tokenizer = (saved.get("data") or {}).get("tokenizer", "byte")
    if tokenizer != "byte" and (Path(tokenizer).parent / SOURCE_FILE).is_file():
        folder = Path(tokenizer).parent
        return hfc.Source.from_json(json.loads((folder / SOURCE_FILE).read_text())), folder
    return None, None


def check_shapes(cfg: TransformerConfig, flat: dict) -> dict:
    """The model's {path: (shape, dtype)}; ConfigError naming a param the checkpoint lacks or
    holds in another shape."""
    shapes = weights.leaf_shapes(cfg)
    for path, (shape, _) in shapes.items():
        if path not in flat or tuple(flat[path].shape) != shape:
            have = list(flat[path].shape) if path in flat else "absent"
            raise ConfigError(
                f"checkpoint param {path} is {have}, the model config says {list(shape)}"
            )
    return shapes


def adapted_kernels(flat: dict) -> list[str]:
    """The '/'-joined paths of the kernels a LoRA run adapts (those with a `lora_a` beside
    them); ConfigError if one lacks lora_b or lora_scale."""
    from framework.finetune import lora

    out = []
    for path in sorted(flat):
        if path.endswith("/lora_a"):
            where = path[: -len("/lora_a")]
            for leaf in ("kernel", *lora.TRAINED, lora.SCALE):  # lora_dropout is optional
                if f"{where}/{leaf}" not in flat:
                    raise ConfigError(f"checkpoint param {where}/{leaf} is absent beside lora_a")
            out.append(f"{where}/kernel")
    return out


def merge_adapters(flat: dict) -> tuple[dict, list[str]]:
    """(`flat` with each LoRA-adapted kernel replaced by W + scale * A @ B and the adapter
    leaves dropped, the kernels merged): `framework.finetune.lora.merge`, one kernel at a
    time, on the host CPU at full f32 matmul precision, cast back to W's dtype."""
    import jax

    from framework.finetune import lora

    kernels = adapted_kernels(flat)
    if not kernels:
        return flat, []
    out = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in lora.ADAPTER_LEAVES}
    cpu = jax.devices("cpu")[0]
    for kernel in kernels:
        where = kernel[: -len("/kernel")]
        group = {leaf: flat[f"{where}/{leaf}"] for leaf in ("kernel", *lora.TRAINED, lora.SCALE)}
        with jax.default_device(cpu), jax.default_matmul_precision("highest"):
            out[kernel] = np.asarray(lora.merge(group)["kernel"])
    return out, kernels


def _plan(cfg: TransformerConfig, family: str, flat: dict, dtype: np.dtype) -> list[files.Planned]:
    """Every HF tensor, produced on demand from the framework leaves."""
    shapes = check_shapes(cfg, flat)
    plan = []
    for rule in weights.rules(cfg, family):
        shape = weights.slice_shape(rule, shapes, rule.fw[0])
        for layer, name in weights.tensors(rule, cfg.n_layers):

            def make(rule=rule, layer=layer) -> np.ndarray:
                parts = [flat[p] if layer is None else flat[p][layer] for p in rule.fw]
                return rule.join(parts).astype(dtype)

            plan.append(files.Planned(name, rule.hf_shape(shape), dtype, make))
    return plan


def _tokenizer_path(saved: dict) -> Path | None:
    """The run's tokenizer.json (None: byte-level); ConfigError if the file is gone."""
    tokenizer = (saved.get("data") or {}).get("tokenizer", "byte")
    if tokenizer == "byte":
        return None
    path = Path(tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {tokenizer} does not exist (needed for export)")
    return path


def _tokenizer_files(path: Path | None, out: Path) -> list[str]:
    """Copy the tokenizer.json at `path` (and the HF tokenizer files beside it); [] if None."""
    if path is None:
        return []
    shutil.copyfile(path, out / "tokenizer.json")
    copied = ["tokenizer.json"]
    for name in TOKENIZER_FILES[1:]:
        if (path.parent / name).is_file():
            shutil.copyfile(path.parent / name, out / name)
            copied.append(name)
    return copied


def _remove_previous_export(out: Path) -> None:
    """Delete what an earlier export into `out` wrote (weights, index, tokenizer and generation
    files): transformers prefers a stale model.safetensors over a new sharded index, and would
    pair the new weights with a stale tokenizer."""
    stale = [out / n for n in (files.SINGLE, files.INDEX, *TOKENIZER_FILES)]
    stale += [out / "generation_config.json", *out.glob("model-*-of-*.safetensors")]
    for path in stale:
        if path.is_file():
            path.unlink()


def _generation_config(hf_config: dict, source_dir: Path | None, out: Path) -> bool:
    """generation_config.json: the imported one, else one with the known special tokens."""
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        shutil.copyfile(source_dir / "generation_config.json", out / "generation_config.json")
        return True
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    tokens = {k: hf_config[k] for k in keys if hf_config.get(k) is not None}
    if not tokens:
        return False
    (out / "generation_config.json").write_text(json.dumps(tokens, indent=2) + "\n")
    return True


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD,
) -> dict[str, Any]:
    """Write `out_dir` (config.json, safetensors, tokenizer and generation files) from a run's
    checkpoint, replacing what an earlier export wrote there; returns a summary. A LoRA run's
    adapters are merged into their kernels (`merged_adapters` names them). ConfigError
    (one line) for a model HF cannot express, or an `out_dir` holding the run's own files."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    got, flat, saved = _read_run(run_dir, step)
    cfg = _model_config(saved, flat)
    source, source_dir = find_source(run_dir, saved)
    name = target.choose(cfg, source.architecture if source else None)
    dtype = dtype or (source.dtype if source and source.dtype else cfg.param_dtype)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    hf_config = target.from_framework(cfg, name, dtype, source)
    flat, merged = merge_adapters(flat)  # a LoRA run: W + alpha / r * A @ B
    plan = _plan(cfg, hfc.ARCHITECTURES[name], flat, EXPORT_DTYPES[dtype])
    tokenizer_path = _tokenizer_path(saved)  # every check passes before anything is written
    check_out(out_dir, [run_dir, source_dir, tokenizer_path.parent if tokenizer_path else None])
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out_dir)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    written = files.write(out_dir, plan, max_shard_bytes)
    tokenizer = _tokenizer_files(tokenizer_path, out_dir)
    generation = _generation_config(hf_config, source_dir, out_dir)
    return {
        "architecture": name,
        "step": got,
        "dtype": dtype,
        "files": [p.name for p in written],
        "tokenizer": tokenizer,
        "generation_config": generation,
        "merged_adapters": merged,
    }


def check_out(out_dir: Path, inputs: list[Path | None]) -> None:
    """ConfigError if `out_dir` is one of the folders the export reads."""
    if any(p is not None and p.resolve() == out_dir.resolve() for p in inputs):
        raise ConfigError(f"--out {out_dir} holds the run's own files; choose another folder")
