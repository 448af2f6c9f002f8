"""Where a run starts: `checkpoint.resume` applied to what the run directory holds.

`plan_resume` decides (and, for `fresh`, deletes) before any compile; `restore_or_init`
returns the state to start from, restored onto the run's own shardings (so a checkpoint loads
onto any mesh), with the data position and the skipped-step count of the checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import jax
import numpy as np

from framework.errors import ConfigError
from framework.train import checkpoint as ckpt
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
    over existing checkpoints or a resume path without checkpoints."""
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
        if existing and jax.process_index() == 0:
            log.warning("checkpoint.resume=fresh: deleting %s", own)
            ckpt.remove_checkpoints(run_dir)
        return None
    if existing:  # auto, or a path whose fine-tuning run was itself interrupted
        return own
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
    """Restore the newest readable checkpoint of `source` (data position included), else a
    fresh state. With `resume_params_only` from another run: its params, a fresh optimizer."""
    if source is None:
        return Start(run.init_state())
    own = source == ckpt.checkpoint_dir(run.run_dir)
    params_only = run.cfg.checkpoint.resume_params_only and not own
    reader = ckpt.Checkpointer(source, run.cfg.checkpoint, read_only=True)
    try:
        found = reader.restore_newest(run.abstract_state, params_only=params_only)
    finally:
        reader.close()
    if found is None:  # only temporary (unfinished) step directories: nothing to resume
        log.warning("no complete checkpoint in %s; starting from scratch", source)
        return Start(run.init_state())
    step, arrays, data_state, meta = found
    if own:
        _drop_unreadable_after(source, step)
    if params_only:
        state = run.init_state() | {
            "params": arrays["params"],
            "model_state": arrays["model_state"],
        }
        init_opt = jax.jit(run.tx.init, out_shardings=run.shardings["opt_state"])
        state["opt_state"] = init_opt(arrays["params"])
        log.warning("initialized params from %s step %d (fine-tuning from step 0)", source, step)
        return Start(state)
    run.train_data.set_state(data_state)
    log.warning("resumed from %s step %d", source, step)
    step_array = jax.device_put(np.int32(meta["step"]), run.shardings["step"])
    return Start(arrays | {"step": step_array}, int(meta.get("skipped_steps", 0)))


def _drop_unreadable_after(directory: Path, step: int) -> None:
    """Delete checkpoints newer than the one restored (they failed to read), so the run
    writes them again instead of skipping steps it believes are saved."""
    newer = [s for s in ckpt.step_dirs(directory) if s > step]
    if newer and jax.process_index() == 0:
        for s in newer:
            log.warning("removing unreadable checkpoint %s", directory / str(s))
            shutil.rmtree(directory / str(s), ignore_errors=True)
    if newer and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("framework-drop-unreadable-checkpoints")
