"""The training loop: step, record the step's metrics (left on the devices), call the hooks.

    run = build(cfg)
    summary = train(run)                       # default_hooks(run): log, checkpoint, eval, ...
    summary = train(run, [*default_hooks(run), MyHook()])

Metrics are fetched from the devices every train.log_every steps and when a hook asks (each
checkpoint, which never saves a non-finite state), so the loop never blocks the step. The step
is compiled ahead of time on the first batch, which also gives XLA's FLOP count for the
hardware utilisation logged beside MFU."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Sequence
from typing import Any

import jax

from framework.config.loader import dump_resolved
from framework.errors import ConfigError, NonFiniteError
from framework.train import nonfinite, oom
from framework.train.build import Run, compile_step
from framework.train.context import Context
from framework.train.hooks import Hook, default_hooks
from framework.train.lock import run_lock
from framework.train.resume import Start, plan_resume, restore_or_init
from framework.train.signals import STOP, stop_signals

log = logging.getLogger(__name__)


def make_run_dir(run: Run) -> None:
    """Create the run directory (it holds the run's lock before anything else is written)."""
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"run.dir: cannot create run directory {run.run_dir} ({e.strerror})"
        ) from e


def train(
    run: Run, hooks: Sequence[Hook] | None = None, start: Start | None = None
) -> dict[str, Any]:
    """Train from `start` (default: per checkpoint.resume) to train.steps or a stop; returns
    {"step", "start_step", "state", "eval", "stopped", "skipped_steps", "run_dir"}
    (+ "sample", and "sample_before" for a fine-tuning run started at step 0). SIGTERM/SIGINT
    stop it (framework.train.signals), before the first step too."""
    if run.train_data is None:
        raise ValueError("train() needs a Run built with its data (build(cfg, read_data=True))")
    with stop_signals():  # before any compile: a Ctrl-C then is a stop like any other
        make_run_dir(run)
        with run_lock(run.run_dir):  # before `fresh` may delete: never a live run's files
            return _train(run, default_hooks(run) if hooks is None else list(hooks), start)


def _train(run: Run, hooks: list[Hook], start: Start | None) -> dict[str, Any]:
    """`train` once the run directory is locked."""
    if (signum := STOP.agreed()) is not None:  # stopped while building: touch nothing
        return {
            "step": 0,
            "start_step": 0,
            "state": None,
            "eval": {},
            "stopped": signal.Signals(signum).name,
            "skipped_steps": 0,
            "run_dir": str(run.run_dir),
        }
    source = plan_resume(run) if start is None else None  # refuses before anything is written
    if jax.process_index() == 0:
        dump_resolved(run.cfg, run.run_dir)
    start = restore_or_init(run, source) if start is None else start
    ctx = Context(run, start.state, int(start.state["step"]), skipped_steps=start.skipped_steps)
    start_step = ctx.step
    nonfinite.check_start(run, ctx.state)
    total = run.cfg.train.steps
    if ctx.step >= total:
        log.warning(
            "the run in %s already reached train.steps=%d (checkpoint.resume=auto); raise "
            "train.steps to continue, or use checkpoint.resume=fresh or another run.name to "
            "train again",
            run.run_dir,
            total,
        )
    opened: list[Hook] = []
    try:
        try:
            for hook in hooks:
                hook.start(ctx)
                opened.append(hook)
            _steps(ctx, hooks, total)
            ctx.fetch()  # every step's metrics checked, also with no hook that fetches
            if ctx.stop_reason is None:
                for hook in hooks:
                    hook.end(ctx)
        finally:
            for hook in reversed(opened):
                hook.close(ctx)  # finishes saves in flight
    except NonFiniteError as e:  # name the checkpoint only once it is on disk
        raise NonFiniteError(f"{e.message}; {nonfinite.last_checkpoint(run)}") from None
    return {
        "step": ctx.step,
        "start_step": start_step,
        "state": ctx.state,
        "eval": ctx.summary.get("eval", {}),
        "stopped": ctx.stop_reason,
        "skipped_steps": ctx.skipped_steps,
        "run_dir": str(run.run_dir),
        **{k: ctx.summary[k] for k in ("sample_before", "sample") if k in ctx.summary},
    }


def _steps(ctx: Context, hooks: Sequence[Hook], total: int) -> None:
    """Step until train.steps or a stop, calling each due hook after each step."""
    run, step_fn = ctx.run, None
    ctx.clock.restart()
    while ctx.step < total and ctx.stop_reason is None:
        batch = run.put(next(run.train_data))
        if step_fn is None:
            if _stop_requested(ctx):
                break
            ctx.batch_spec = jax.eval_shape(lambda b: b, batch)
            with oom.reported(run, ctx.batch_spec):
                step_fn, ctx.hardware_flops = compile_step(run, ctx.state, batch)
            if math.isnan(ctx.hardware_flops):
                log.info("hfu not logged: the step has loops (scan over layers, accumulation)")
            if _stop_requested(ctx):
                break
            ctx.clock.restart()  # compile time is not step time
        with oom.reported(run, ctx.batch_spec, ctx.step + 1, step_fn):
            ctx.state, metrics = step_fn(ctx.state, batch)  # OOM: a report naming the layers
        ctx.step += 1
        ctx.done = ctx.step == total
        ctx.record(metrics)
        for hook in hooks:
            if hook.due(ctx):
                hook(ctx)
                if hook.pauses_clock:
                    ctx.clock.restart()
        if ctx.step % run.cfg.train.log_every == 0:
            ctx.fetch()  # NaN/inf stop within a log interval whatever the hooks


def _stop_requested(ctx: Context) -> bool:
    """Before the first step (checked before and after the compile, on every process at the
    same point): whether a signal asked to stop; the run then ends with nothing to save."""
    if (signum := STOP.agreed()) is not None:
        ctx.stop(signal.Signals(signum).name)
    return ctx.stop_reason is not None
