"""Where a run starts: `checkpoint.resume` applied to what the run directory holds.

`plan_resume` decides (and, for `fresh`, deletes) before any compile; `restore_or_init`
returns the state to start from, restored onto the run's own shardings (so a checkpoint loads
onto any mesh), with the data position and the skipped-step count of the checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from framework import nn
from framework.data.pipeline import STATE_VERSION as DATA_STATE_VERSION
from framework.errors import CheckpointError, ConfigError
from framework.finetune import lora
from framework.train import checkpoint as ckpt
from framework.train import compat
from framework.train.build import Run
from framework.train.integrity import leaf_paths
from framework.train.step import State, split_trainable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Start:
    """The state a run starts from and what the checkpoint said about it."""

    state: State
    skipped_steps: int = 0


def plan_resume(run: Run) -> Path | None:
    """The checkpoint folder to restore from (None: start fresh); ConfigError for `never`
    over existing checkpoints or a resume path without checkpoints, CheckpointError when the
    run's only checkpoints are damaged ones (never a silent start from scratch)."""
    cc, run_dir = run.cfg.checkpoint, run.run_dir
    own = ckpt.checkpoint_dir(run_dir)
    existing = ckpt.step_dirs(own)
    if cc.resume == "never" and existing:
        raise ConfigError(
            f"checkpoint.resume=never, but the run directory {run_dir} already has "
            f"checkpoints (steps {existing}); use checkpoint.resume=auto to continue it, "
            "checkpoint.resume=fresh to delete them and start over, or another run.name"
        )
    if cc.resume == "fresh":
        if own.exists() and jax.process_index() == 0:
            log.warning("checkpoint.resume=fresh: deleting %s", own)
            ckpt.remove_checkpoints(run_dir)
        return None
    if existing:  # auto, or a path whose fine-tuning run was itself interrupted
        return own
    damaged = own / ckpt.DAMAGED
    if damaged.is_dir() and any(damaged.iterdir()):
        raise CheckpointError(
            f"{own} holds only damaged checkpoints (in {damaged}); move that folder elsewhere "
            "to keep it, then set checkpoint.resume=fresh to start over (it deletes checkpoints/)"
        )
    if cc.resume in ckpt.KEYWORDS:
        return None
    source = ckpt.checkpoint_dir(Path(cc.resume).expanduser())
    if not ckpt.step_dirs(source):
        raise ConfigError(
            f"checkpoint.resume: {cc.resume!r} is neither auto/never/fresh "
            f"nor a run directory with checkpoints (looked in {source})"
        )
    return source


def restore_or_init(run: Run, source: Path | None) -> Start:
    """Restore the newest good checkpoint of `source` (data position included), else a
    fresh state. With `resume_params_only` from another run: its params, a fresh optimizer."""
    if source is None:
        return Start(run.init_state())
    own = source == ckpt.checkpoint_dir(run.run_dir)
    # a LoRA run takes only the weights of another run (its optimizer state has no adapters)
    takes_weights = run.cfg.checkpoint.resume_params_only or run.cfg.finetune.lora is not None
    params_only = takes_weights and not own
    reader = ckpt.Checkpointer(source, run.cfg.checkpoint, read_only=True)
    try:
        if not params_only and _weights_only(reader):
            log.warning(
                "%s holds weights only (no optimizer state or data position, e.g. an imported "
                "checkpoint): taking its params with a fresh optimizer at step 0",
                source,
            )
            params_only = True
        found = _newest_good(run, reader, params_only=params_only, own=own)
    finally:
        reader.close()
    if found is None:  # only temporary (unfinished) step directories: nothing to resume
        log.warning("no complete checkpoint in %s; starting from scratch", source)
        return Start(run.init_state())
    step, arrays, meta = found
    if params_only:  # no random init: it would compile and hold a second copy of the params
        # a LoRA base (its adapters read too) becomes plain weights, then the run's dtypes
        arrays["params"] = lora.merge(arrays["params"])
        base = _base_state(run, params_only)
        params, model_state = (
            _cast_dropping(arrays, k, base[k]) for k in ("params", "model_state")
        )
        if run.cfg.finetune.lora is not None:  # the base's weights, fresh adapters
            params = lora.deep_merge(params, _fresh_adapters(run))
        init_opt = jax.jit(
            lambda p: run.tx.init(split_trainable(run.model, p)[0]),
            out_shardings=run.shardings["opt_state"],
        )
        state = {
            "step": jax.device_put(np.int32(0), run.shardings["step"]),
            "params": params,
            "opt_state": init_opt(params),
            "model_state": model_state,
        }
        log.warning("initialized params from %s step %d (fine-tuning from step 0)", source, step)
        return Start(state)
    log.warning("resumed from %s step %d", source, step)
    step_array = jax.device_put(np.int32(meta["step"]), run.shardings["step"])
    return Start(arrays | {"step": step_array}, int(meta.get("skipped_steps", 0)))


def _cast_dropping(arrays: dict, item: str, like: Any) -> Any:
    """arrays[item] in `like`'s dtypes, leaf by leaf, each saved-dtype leaf released once cast
    (a float32 base stored in bfloat16 never holds both whole trees)."""
    leaves, treedef = jax.tree.flatten(arrays.pop(item))
    out = []
    for i, target in enumerate(jax.tree.leaves(like)):
        out.append(leaves[i].astype(target.dtype))
        leaves[i] = None
    return jax.tree.unflatten(treedef, out)


def _fresh_adapters(run: Run) -> dict:
    """The LoRA adapters' initial values (the same as a fresh state's), created sharded."""
    spec = lora.adapters_only(run.model.spec(run.cfg.model))
    shardings = lora.adapters_only(run.shardings["params"])
    init = jax.jit(lambda key: nn.init(spec, key), out_shardings=shardings)
    return init(jax.random.key(run.cfg.run.seed))


def _base_state(run: Run, params_only: bool) -> dict:
    """The abstract state of the weights taken from another run: without adapters (a LoRA
    run adds fresh ones)."""
    if not params_only:
        return run.abstract_state
    return dict(run.abstract_state, params=lora.strip(run.abstract_state["params"]))


def _read_target(run: Run, saved: dict, params_only: bool) -> dict:
    """The abstract state a checkpoint is read into. Another run's weights are read in their
    saved dtypes (checksums verify; cast after) and with its LoRA adapters, if it has any
    (merged into its kernels after reading)."""
    abstract = _base_state(run, params_only)
    if not params_only:
        return abstract
    replicated = NamedSharding(run.mesh, PartitionSpec())
    saved_params = saved.get("params")  # orbax's tree metadata: a dict of dicts inside
    saved_adapters = lora.adapters_only(dict(saved_params) if saved_params else {}) or {}
    adapters = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
        saved_adapters,
    )
    params = lora.deep_merge(abstract["params"], adapters)
    return dict(abstract) | {
        "params": _in_saved_dtypes(params, saved.get("params", {})),
        "model_state": _in_saved_dtypes(abstract["model_state"], saved.get("model_state", {})),
    }


def _weights_only(reader: ckpt.Checkpointer) -> bool:
    """Whether the newest checkpoint is marked weights-only in its meta (an unreadable meta is
    not: the restore then finds the damage)."""
    steps = reader.steps()
    if not steps:
        return False
    try:
        meta = reader.read_json("meta", steps[-1])
    except ckpt.Damaged:
        return False
    return isinstance(meta, dict) and bool(meta.get("weights_only"))


def _newest_good(
    run: Run, reader: ckpt.Checkpointer, *, params_only: bool, own: bool
) -> tuple[int, dict, dict] | None:
    """(step, arrays, meta) of the newest checkpoint that fits the config (ConfigError if it
    does not), reads, matches its checksums and whose data position applies; each damaged
    newer one is moved aside (own run) or skipped (another run's). Every process takes each
    decision together: a shard that fails on one process is damage for all."""
    config = run.cfg.model_dump(mode="json")
    damaged = []
    for step in reversed(reader.steps()):
        found, damage = _attempt(_read, run, reader, step, config, params_only)
        damage = _agreed(damage)
        if damage is None:  # the checksums are a collective: only once every process has read
            arrays, data_state, meta = found
            damage = _agreed(_attempt(reader.verify, meta, arrays, data_state)[1])
            if damage is None and data_state is not None:
                damage = _agreed(_attempt(_apply_data_state, run, data_state)[1])
        if damage is None:
            _sync_after_moves(bool(damaged) and own)
            return step, arrays, meta
        damaged.append(_set_aside(reader, step, damage, move=own))
    _sync_after_moves(bool(damaged) and own)
    if damaged:
        advice = (
            "move checkpoints/damaged elsewhere to keep it, then set checkpoint.resume=fresh"
            if own
            else "resume from another run"
        )
        raise CheckpointError(
            f"every checkpoint in {reader.directory} is damaged ({'; '.join(damaged)}); {advice}"
        )
    return None


def _read(
    run: Run,
    reader: ckpt.Checkpointer,
    step: int,
    config: dict,
    params_only: bool,
) -> tuple[dict, dict | None, dict]:
    """Check the step's saved config against the run's (ConfigError), then read it (another
    run's weights as `_read_target` says)."""
    saved = reader.array_metadata(step)
    abstract = _read_target(run, saved, params_only)
    items = ("params", "model_state") if params_only else ckpt.ARRAY_ITEMS
    compat.check(
        reader.read_json("config", step),
        saved,
        config,
        {k: abstract[k] for k in items},
        params_only=params_only,
        where=reader.step_path(step),
    )
    return reader.restore(step, abstract, params_only=params_only)


def _in_saved_dtypes(abstract: Any, saved: Any) -> Any:
    """The abstract tree with each leaf in the dtype the checkpoint holds it in (by path)."""
    dtypes = {p: d for p, (_, d) in compat.shapes_by_path(saved).items()}
    leaves, treedef = jax.tree.flatten(abstract)
    return jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(x.shape, dtypes.get(path, x.dtype), sharding=x.sharding)
            for path, x in zip(leaf_paths(abstract), leaves, strict=True)
        ],
    )


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, ckpt.Damaged | None]:
    """(fn's result, None), or (None, the `Damaged` it raised); other errors propagate."""
    try:
        return fn(*args), None
    except ckpt.Damaged as e:
        return None, e


def _agreed(damage: ckpt.Damaged | None) -> ckpt.Damaged | None:
    """This process's finding, or damage seen by another process, so that all decide alike."""
    if jax.process_count() == 1:
        return damage
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(damage is not None))
    if damage is None and np.any(flags):
        return ckpt.Damaged("unreadable", "unreadable on another process")
    return damage


def _apply_data_state(run: Run, data_state: dict) -> None:
    """Position the loader; a position that parses but does not apply is damage, one from an
    older version of the data pipeline a user decision (ConfigError: nothing is moved)."""
    version = data_state.get("version") if isinstance(data_state, dict) else None
    if isinstance(version, int) and 1 <= version < DATA_STATE_VERSION:  # an older pipeline's
        raise ConfigError(
            f"the checkpoint's data position was written by data pipeline version {version}, "
            f"this one reads version {DATA_STATE_VERSION} (documents now end with EOS, rows "
            "are packed): start a new run from its weights with checkpoint.resume=<that run> "
            "checkpoint.resume_params_only=true (byte-level weights do not fit: the byte "
            "vocabulary is now 257 ids)"
        )
    try:
        run.train_data.set_state(data_state)
    except Exception as e:  # DataError, or grain's own errors for a malformed state
        raise ckpt.Damaged("data-state", f"data position does not apply: {e}") from e


def _set_aside(reader: ckpt.Checkpointer, step: int, damage: ckpt.Damaged, *, move: bool) -> str:
    """Warn about a damaged checkpoint and (own run, process 0) move it to damaged/."""
    path = reader.step_path(step)
    if not move:
        log.warning("checkpoint %s is damaged (%s); skipping it", path, damage)
        return f"step {step}: {damage}"
    target = f"{reader.directory / ckpt.DAMAGED}/ (by process 0)"
    if jax.process_index() == 0:
        target = reader.move_aside(step, damage.reason)
    log.warning(
        "checkpoint %s is damaged (%s); moved to %s, falling back to the one before",
        path,
        damage,
        target,
    )
    return f"step {step}: {damage}, moved to {target}"


def _sync_after_moves(moved: bool) -> None:
    """Every process waits until process 0 has moved damaged checkpoints aside."""
    if moved and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("framework-damaged-checkpoints-moved")
