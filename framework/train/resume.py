"""Where a run starts: `checkpoint.resume` applied to what the run directory holds.

`plan_resume` decides (and, for `fresh`, deletes) before any compile; `restore_or_init`
returns the state to start from, restored onto the run's own shardings (so a checkpoint loads
onto any mesh), with the data position and the skipped-step count of the checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from framework.errors import CheckpointError, ConfigError, DataError
from framework.train import checkpoint as ckpt
from framework.train import compat
from framework.train.build import Run
from framework.train.step import State

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
            f"{own} holds only damaged checkpoints (in {damaged}); set "
            "checkpoint.resume=fresh to start over (it deletes them)"
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
    params_only = run.cfg.checkpoint.resume_params_only and not own
    reader = ckpt.Checkpointer(source, run.cfg.checkpoint, read_only=True)
    try:
        found = _newest_good(run, reader, params_only=params_only, own=own)
    finally:
        reader.close()
    if found is None:  # only temporary (unfinished) step directories: nothing to resume
        log.warning("no complete checkpoint in %s; starting from scratch", source)
        return Start(run.init_state())
    step, arrays, meta = found
    if params_only:
        state = run.init_state() | {
            "params": arrays["params"],
            "model_state": arrays["model_state"],
        }
        init_opt = jax.jit(run.tx.init, out_shardings=run.shardings["opt_state"])
        state["opt_state"] = init_opt(arrays["params"])
        log.warning("initialized params from %s step %d (fine-tuning from step 0)", source, step)
        return Start(state)
    log.warning("resumed from %s step %d", source, step)
    step_array = jax.device_put(np.int32(meta["step"]), run.shardings["step"])
    return Start(arrays | {"step": step_array}, int(meta.get("skipped_steps", 0)))


def _newest_good(
    run: Run, reader: ckpt.Checkpointer, *, params_only: bool, own: bool
) -> tuple[int, dict, dict] | None:
    """(step, arrays, meta) of the newest checkpoint that fits the config (ConfigError, before
    anything moves, if it does not), reads, matches its checksums and whose data position
    applies; each damaged newer one is moved aside (own run) or skipped (another run's)."""
    items = ("params", "model_state") if params_only else ckpt.ARRAY_ITEMS
    wanted = compat.array_shapes(run.abstract_state, items)
    config = run.cfg.model_dump(mode="json")
    damaged = []
    for step in reversed(reader.steps()):
        try:
            compat.check(
                reader.read_json("config", step),
                reader.array_shapes(step),
                config,
                wanted,
                params_only=params_only,
                where=reader.step_path(step),
            )
            arrays, data_state, meta = reader.restore(
                step, run.abstract_state, params_only=params_only
            )
            if data_state is not None:
                try:
                    run.train_data.set_state(data_state)
                except DataError as e:
                    raise ckpt.Damaged("data-state", f"data position does not apply: {e}") from e
        except ckpt.Damaged as e:
            damaged.append(_set_aside(reader, step, e, move=own))
            continue
        _sync_after_moves(damaged and own)
        return step, arrays, meta
    _sync_after_moves(damaged and own)
    if damaged:
        advice = "set checkpoint.resume=fresh to start over" if own else "resume from another run"
        raise CheckpointError(
            f"every checkpoint in {reader.directory} is damaged ({'; '.join(damaged)}); {advice}"
        )
    return None


def _set_aside(reader: ckpt.Checkpointer, step: int, damage: ckpt.Damaged, *, move: bool) -> str:
    """Warn about a damaged checkpoint and (own run, process 0) move it to damaged/."""
    path = reader.step_path(step)
    if not move:
        log.warning("checkpoint %s is damaged (%s); skipping it", path, damage)
        return f"step {step}: {damage}"
    target = reader.directory / ckpt.DAMAGED / f"{step}-{damage.reason}"
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
