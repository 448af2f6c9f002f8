"""Whether a checkpoint fits the config that resumes it, decided from the checkpoint's saved
config and array metadata before any array is read (a config change is not damage).

Changed keys fall in three groups. Ignored: where the run lives and how it resumes.
Incompatible (refused, nothing touched): any array whose shape or dtype differs (named with the
model/optimizer keys that changed), and data keys that define the training stream the
checkpoint's data position points into. Compatible (one warning listing them): everything else,
e.g. learning rate, train.steps, evaluation cadence, mesh layout, model options that leave every
array's shape and dtype alone."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from framework.data.config import DataConfig
from framework.errors import ConfigError
from framework.train.integrity import leaf_paths

log = logging.getLogger(__name__)

IGNORED = ("run.dir", "run.name", "checkpoint.resume", "mesh.distributed.")  # prefixes
DATA_STREAM = tuple(
    f"data.{k}"
    for k in (
        "source",
        "paths",
        "file_pattern",
        "text_field",
        "sources",
        "stages",
        "packing",
        "on_bad_file",
        "tokenizer",
        "eos_token",
        "chat_template",
        "max_bytes",
        "val_fraction",
        "token_dtype",
        "seq_len",
        "batch_size",
        "shuffle_seed",
        "vocab_size",
        "num_classes",
        "input_shape",
        "num_examples",
        "worker_count",
    )
)
_ABSENT = "<absent>"
# data keys a checkpoint from before they existed lacks: at their default, nothing changed
_DATA_DEFAULTS = {f"data.{k}": v for k, v in DataConfig().model_dump(mode="json").items()}
Shapes = Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]]  # {item: {path: (shape, dtype)}}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every key that differs, ignored ones
    left out, and data keys an older checkpoint lacks when they hold their default."""
    a, b = flatten(saved), flatten(current)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
        and not k.startswith(IGNORED)
        and not (k not in a and k in _DATA_DEFAULTS and b.get(k) == _DATA_DEFAULTS[k])
    }


def shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{leaf path: (shape, dtype name)} of a tree of arrays or array metadata."""
    leaves = jax.tree.leaves(tree)
    return {
        path: (tuple(x.shape), str(np.dtype(x.dtype)))
        for path, x in zip(leaf_paths(tree), leaves, strict=True)
    }


def first_shape_mismatch(saved: Shapes, wanted: Shapes) -> tuple[str, str] | None:
    """(item, "item/path: ... in the checkpoint, ... now") of the first array that differs."""

    def show(entry):
        return "absent" if entry is None else f"{entry[1]}{list(entry[0])}"

    for item in wanted:
        have, want = saved.get(item, {}), wanted[item]
        for path in sorted(have.keys() | want.keys()):
            if have.get(path) != want.get(path):
                return item, (
                    f"{item}/{path} is {show(have.get(path))} in the checkpoint, "
                    f"{show(want.get(path))} now"
                )
    return None


def _shapes_only(shapes: Shapes) -> Shapes:
    return {item: {p: (shape, "") for p, (shape, _) in v.items()} for item, v in shapes.items()}


def _show(key: str, values: tuple) -> str:
    old, new = (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..." for v in values)
    return f"{key} {old} -> {new}"


def check(
    saved_config: Mapping[str, Any],
    saved_arrays: Mapping[str, Any],
    config: Mapping[str, Any],
    wanted_arrays: Mapping[str, Any],
    *,
    params_only: bool,
    where: Path,
) -> None:
    """ConfigError naming the incompatible changes between the checkpoint at `where` (its
    config and array metadata) and `config` with the arrays it needs ({item: tree}; empty
    items are never saved); a warning listing the compatible ones. With `params_only`
    (fine-tuning from another run) only the model's arrays must fit."""
    saved_shapes = {k: shapes_by_path(v) for k, v in saved_arrays.items()}
    wanted_shapes = {k: shapes_by_path(v) for k, v in wanted_arrays.items() if jax.tree.leaves(v)}
    changes = changed_keys(saved_config, config)
    if params_only:
        changes = {k: v for k, v in changes.items() if k.startswith("model.")}
        # Weights taken by another run are cast on reading (e.g. a float32 base stored in
        # bfloat16 under LoRA): only their shapes must fit.
        saved_shapes, wanted_shapes = _shapes_only(saved_shapes), _shapes_only(wanted_shapes)
    reasons, blamed = [], set()
    mismatch = first_shape_mismatch(saved_shapes, wanted_shapes)
    if mismatch is not None:
        item, detail = mismatch
        sections = ("optim.",) if item == "opt_state" else ("model.", "finetune.")
        keys = [k for k in changes if k.startswith(sections)]
        blamed |= set(keys)
        named = ", ".join(_show(k, changes[k]) for k in keys)
        reasons.append(f"{named} ({detail})" if named else detail)
    adapters = [k for k in changes if k.startswith("finetune.") and k not in blamed]
    if adapters:  # the checkpoint's adapters (and their scale) were made by the old settings
        blamed |= set(adapters)
        reasons.append(
            ", ".join(_show(k, changes[k]) for k in adapters)
            + " (the checkpoint's LoRA adapters were made with the old settings)"
        )
    stream = [k for k in changes if k in DATA_STREAM]
    if stream:
        blamed |= set(stream)
        reasons.append(
            ", ".join(_show(k, changes[k]) for k in stream)
            + " (the checkpoint's data position belongs to the old data stream)"
        )
    if reasons:
        hint = (
            "; to fine-tune with another optimizer, start a new run.name with "
            f"checkpoint.resume={where.parent} checkpoint.resume_params_only=true"
            if mismatch is not None and mismatch[0] == "opt_state"
            else ""
        )
        raise ConfigError(
            f"cannot resume from {where}: incompatible config change: {'; '.join(reasons)}. "
            "The checkpoints are left as they are: restore these keys, or set "
            f"checkpoint.resume=fresh or another run.name to start over{hint}"
        )
    compatible = [_show(k, v) for k, v in changes.items() if k not in blamed]
    if compatible:
        log.warning("config changed since %s (compatible): %s", where, ", ".join(compatible))
