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

from framework.errors import ConfigError

log = logging.getLogger(__name__)

IGNORED = ("run.dir", "run.name", "checkpoint.resume", "checkpoint.resume_params_only")
DATA_STREAM = tuple(
    f"data.{k}"
    for k in (
        "source",
        "paths",
        "file_pattern",
        "tokenizer",
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
Shapes = Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]]


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
    left out."""
    a, b = flatten(saved), flatten(current)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not k.startswith(IGNORED)
    }


def array_shapes(abstract: Mapping[str, Any], items: tuple[str, ...]) -> dict[str, dict]:
    """{item: {leaf path: (shape, dtype)}} of the run's abstract state (non-empty items)."""
    out = {}
    for item in items:
        flat = jax.tree_util.tree_flatten_with_path(abstract[item])[0]
        if flat:
            out[item] = {
                jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype))
                for p, x in flat
            }
    return out


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


def _show(key: str, values: tuple) -> str:
    old, new = (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..." for v in values)
    return f"{key} {old} -> {new}"


def check(
    saved_config: Mapping[str, Any],
    saved_shapes: Shapes,
    config: Mapping[str, Any],
    wanted_shapes: Shapes,
    *,
    params_only: bool,
    where: Path,
) -> None:
    """ConfigError naming the incompatible changes between the checkpoint at `where` and
    `config`; a warning listing the compatible ones. With `params_only` (fine-tuning from
    another run) only the model's arrays must fit."""
    changes = changed_keys(saved_config, config)
    if params_only:
        changes = {k: v for k, v in changes.items() if k.startswith("model.")}
    reasons, blamed = [], set()
    mismatch = first_shape_mismatch(saved_shapes, wanted_shapes)
    if mismatch is not None:
        item, detail = mismatch
        section = "optim." if item == "opt_state" else "model."
        keys = [k for k in changes if k.startswith(section)]
        blamed |= set(keys)
        named = ", ".join(_show(k, changes[k]) for k in keys)
        reasons.append(f"{named} ({detail})" if named else detail)
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
            "Nothing was changed: restore these keys, or set checkpoint.resume=fresh or another "
            f"run.name to start over{hint}"
        )
    compatible = [_show(k, v) for k, v in changes.items() if k not in blamed]
    if compatible:
        log.warning("config changed since %s (compatible): %s", where, ", ".join(compatible))
