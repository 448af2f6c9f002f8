"""Hooks: everything the training loop does besides stepping, each testable on its own.

A hook has an `every` (steps between calls; None: never per step) and up to four methods the
loop calls: `start(ctx)` before the first step, `__call__(ctx)` after each step where
`due(ctx)` holds (by default every `every` steps and at the final step), `end(ctx)` after the
last step of a run that finished, and `close(ctx)` always, last hook first. Hooks run in list
order at each step, so a hook that stops the run (`ctx.stop`) goes first: the others then see
`ctx.final` and save or log at that same step. `pauses_clock = True` marks hooks whose time is
not training time (evaluation, checkpoint copies): the throughput window restarts after them.

To add one: subclass `Hook`, set `every`, implement `__call__` (and `start`/`close` for
resources), and pass `[*default_hooks(run), MyHook()]` to `framework.train.train`."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from framework import finetune
from framework.data import load_tokenizer
from framework.train import checkpoint as ckpt
from framework.train.build import Run
from framework.train.context import Context
from framework.train.metrics import MetricsWriter, Progress, mfu, peak_flops_per_device
from framework.train.sample import sample_tokens
from framework.train.signals import STOP
from framework.train.tracking import WandbTracker, check_available

log = logging.getLogger(__name__)
Report = Callable[[int, Mapping[str, float], str], None]


class Hook:
    """Base hook: does nothing; subclasses set `every` and override what they need."""

    every: int | None = None
    pauses_clock: bool = False

    def due(self, ctx: Context) -> bool:
        """Whether to call this hook after the step just taken."""
        return self.every is not None and (ctx.step % self.every == 0 or ctx.final)

    def start(self, ctx: Context) -> None:
        """Before the first step (after the state is restored or created)."""

    def __call__(self, ctx: Context) -> None:
        """After a step where `due(ctx)` holds."""

    def end(self, ctx: Context) -> None:
        """After the last step of a run that reached train.steps (not after a stop)."""

    def close(self, ctx: Context) -> None:
        """Always, in reverse order, also after an error: release what `start` opened."""


class StopOnSignal(Hook):
    """SIGTERM/SIGINT (recorded by `framework.train.signals`, whose handlers `train` installs)
    and `train.stop_at` end the run after the current step with a checkpoint, as a preemption
    would. With several processes the signal is agreed once per `agree_every` steps (all
    processes stop at the same step, naming the same signal; no per-step host sync)."""

    every = 1

    def __init__(self, stop_at: int | None = None, agree_every: int = 1):
        self.stop_at, self.agree_every = stop_at, agree_every

    def _signalled(self, step: int) -> int | None:
        """The number of the signal that asks to stop, if one does and it is time to agree."""
        if jax.process_count() > 1 and step % self.agree_every:
            return None
        return STOP.agreed()

    def __call__(self, ctx: Context) -> None:
        if ctx.done:
            return
        if (signum := self._signalled(ctx.step)) is not None:
            ctx.stop(signal.Signals(signum).name)
        elif ctx.step == self.stop_at:
            ctx.stop(f"train.stop_at={self.stop_at}")


class Profile(Hook):
    """A profiler trace of steps [first, first + steps) into `directory`."""

    every = 1

    def __init__(self, directory: str, first: int, steps: int):
        self.directory, self.first, self.last = directory, first, first + steps - 1
        self.active = False

    def _maybe_start(self, next_step: int) -> None:
        if next_step == self.first and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def start(self, ctx: Context) -> None:
        self._maybe_start(ctx.step + 1)

    def __call__(self, ctx: Context) -> None:
        if self.active and (ctx.step >= self.last or ctx.final):
            jax.block_until_ready(ctx.state)
            jax.profiler.stop_trace()
            self.active = False
        self._maybe_start(ctx.step + 1)

    def close(self, ctx: Context) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class LogMetrics(Hook):
    """Every `every` steps: fetch the steps' metrics, average them, add throughput and MFU,
    and write one line to metrics.jsonl, TensorBoard, W&B (metrics.wandb) and the console.
    `report` writes other splits (evaluation) the same way."""

    def __init__(self, run: Run, every: int, *, enabled: bool = True):
        self.run, self.every, self.enabled = run, every, enabled
        tc = run.cfg.train
        self.tensorboard, self.progress_on = tc.tensorboard, tc.progress
        self.writer: MetricsWriter | None = None
        self.progress: Progress | None = None
        self.tracker: WandbTracker | None = None
        check_available(run.cfg.metrics.wandb)  # before anything is compiled, on every process
        self.peak, _ = peak_flops_per_device(jax.devices()[0], run.cfg.model.compute_dtype)

    def start(self, ctx: Context) -> None:
        if self.enabled:  # first: a failed wandb.init leaves nothing open
            cfg = self.run.cfg
            self.tracker = WandbTracker(
                cfg.metrics.wandb,
                self.run.run_dir,
                run_name=cfg.run.name,
                config=cfg.model_dump(mode="json"),
                start_step=ctx.step,
            )
        self.writer = MetricsWriter(
            self.run.run_dir,
            enabled=self.enabled,
            tensorboard=self.tensorboard,
            resume_step=ctx.step,  # records after the start step are written again
        )
        total = self.run.cfg.train.steps
        enabled = self.enabled and self.progress_on
        self.progress = Progress(total, start_step=ctx.step, enabled=enabled)

    def throughput(self, n_steps: int, seconds: float, hardware_flops: float) -> dict:
        """Step time, items/s, MFU (model FLOPs) and, where XLA's count of the step is complete,
        HFU (XLA's FLOPs), both per device of the mesh."""
        rate = n_steps * self.run.items_per_step / seconds
        out = {"step_time": seconds / n_steps}
        out["tokens_per_s" if self.run.is_lm else "examples_per_s"] = rate
        fpt = self.run.flops_per_token
        if fpt:
            out["mfu"] = mfu(rate, fpt, self.run.mesh.size, self.peak)
        if math.isfinite(hardware_flops) and math.isfinite(self.peak):
            out["hfu"] = hardware_flops * n_steps / seconds / self.peak
        return out

    def __call__(self, ctx: Context) -> None:
        fetched = ctx.take_fetched()
        if not fetched:
            return
        line = mean_metrics([m for _, m in fetched])
        n_steps, seconds = ctx.clock.lap()
        if n_steps:
            line |= self.throughput(n_steps, seconds, ctx.hardware_flops)
        if self.run.cfg.train.nonfinite == "skip":
            line["skipped_steps"] = float(ctx.skipped_steps)
            now = sum(int(m["skipped"]) for _, m in fetched)
            if now and self.enabled:
                log.warning(
                    "train.nonfinite=skip: %d of the last %d steps skipped (%d in total)",
                    now,
                    len(fetched),
                    ctx.skipped_steps,
                )
        self.report(ctx.step, line, "train")

    def report(self, step: int, metrics: Mapping[str, float], split: str) -> None:
        """Write one record of `split` (once started); other splits (evaluation) also go to
        the console through the framework's logger, whatever train.progress says."""
        if self.writer is not None:
            self.writer.write(step, metrics, split)
        if self.tracker is not None:
            self.tracker.write(step, metrics, split)
        if split == "train":
            if self.progress is not None:
                self.progress.update(step, metrics)
        elif self.enabled:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log.info("%s at step %d: %s", split, step, shown)

    def close(self, ctx: Context) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.close()


_NOT_AVERAGED = ("finite", "grad_finite", "param_finite", "skipped", "weight")


def mean_metrics(per_step: list[Mapping[str, Any]]) -> dict[str, float]:
    """Average each metric over steps (flags and counts left out)."""
    keys = [k for k in per_step[0] if k not in _NOT_AVERAGED]
    return {k: float(np.mean([m[k] for m in per_step])) for k in keys}


class SaveCheckpoint(Hook):
    """Every `every` steps and at the final step: hand the state to the async checkpointer,
    after checking every fetched step was finite (a bad state is never saved)."""

    pauses_clock = True

    def __init__(self, run: Run, every: int):
        self.run, self.every = run, every
        self.checkpointer: ckpt.Checkpointer | None = None

    def start(self, ctx: Context) -> None:
        directory = ckpt.checkpoint_dir(self.run.run_dir)
        self.checkpointer = ckpt.Checkpointer(directory, self.run.cfg.checkpoint)

    def __call__(self, ctx: Context) -> None:
        ctx.fetch()  # raises NonFiniteError (stop policy) before anything is written
        meta = {"step": ctx.step, "skipped_steps": ctx.skipped_steps}
        config = self.run.cfg.model_dump(mode="json")
        self.checkpointer.save(ctx.state, self.run.train_data.get_state(), config, meta)

    def close(self, ctx: Context) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()  # waits for the in-flight save


def evaluate(run: Run, state: Mapping[str, Any], n_batches: int) -> dict[str, float]:
    """Metrics over `n_batches` held-out batches (the same ones each time), each batch weighted
    by its count of counted items; {} without held-out data."""
    results = [
        run.eval_step(state["params"], state["model_state"], run.put(b))
        for b in run.eval_set.batches(n_batches)
    ]
    if not results:  # no held-out data (e.g. data.val_fraction=0)
        return {}
    results = jax.device_get(results)
    weights = np.array([float(r["weight"]) for r in results])
    total = max(weights.sum(), 1e-30)
    out = {
        k: float(np.dot(weights, [float(r[k]) for r in results]) / total)
        for k in results[0]
        if k != "weight"
    }
    bytes_per_token = run.data_meta.get("bytes_per_token")
    if bytes_per_token:
        out["bits_per_byte"] = out["loss"] / math.log(2) / bytes_per_token
    return out


class Evaluate(Hook):
    """Every `every` steps and when train.steps is reached: held-out metrics, reported as the
    "eval" split (file and console) and kept in the summary."""

    pauses_clock = True

    def __init__(self, run: Run, every: int, batches: int, report: Report | None = None):
        self.run, self.every, self.batches, self.report = run, every, batches, report

    def due(self, ctx: Context) -> bool:
        return ctx.step % self.every == 0 or ctx.done

    def __call__(self, ctx: Context) -> None:
        results = evaluate(self.run, ctx.state, self.batches)
        ctx.summary["eval"] = results
        if results and self.report is not None:
            self.report(ctx.step, results, "eval")


class Sample(Hook):
    """At the end of a finished run: `tokens` sampled after `prompt` with the KV-cache decoder
    (`framework.generate`), up to the data's EOS, decoded to text. A fine-tuning run (weights
    from checkpoint.resume) starting at step 0 also samples before its first step, to compare."""

    def __init__(self, run: Run, tokens: int, prompt: str, temperature: float):
        self.run, self.tokens, self.prompt, self.temperature = run, tokens, prompt, temperature

    def start(self, ctx: Context) -> None:
        if ctx.step == 0 and self.run.cfg.checkpoint.resume not in ckpt.KEYWORDS:
            ctx.summary["sample_before"] = self._sample(ctx)

    def end(self, ctx: Context) -> None:
        ctx.summary["sample"] = self._sample(ctx)

    def _sample(self, ctx: Context) -> str:
        cfg = self.run.cfg
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
        params = ctx.state["params"]
        if cfg.finetune.lora is not None:  # decode on the merged kernels (the base's layout)
            params = finetune.merge(params)
        tokens = sample_tokens(
            self.run.model,
            params,
            cfg.model,
            tokenizer.encode(self.prompt),
            self.tokens,
            window=cfg.data.seq_len,  # the context length the model was trained on
            temperature=self.temperature,
            key=jax.random.key(cfg.run.seed + 1),
            mesh=self.run.mesh,
            rules=self.run.rules,
            eos_id=self.run.data_meta.get("eos_id"),
        )
        return tokenizer.decode(tokens)


class Plot(Hook):
    """At the end of a finished run: PNG plots of metrics.jsonl under plots/."""

    def __init__(self, run: Run):
        self.run = run

    def end(self, ctx: Context) -> None:
        from framework.train.plots import plot_run

        plot_run(self.run.run_dir)


def default_hooks(run: Run) -> list[Hook]:
    """The hooks `train.*` and `checkpoint.*` ask for, in the order they must run."""
    tc, main = run.cfg.train, jax.process_index() == 0
    logger = LogMetrics(run, tc.log_every, enabled=main)
    hooks: list[Hook] = [StopOnSignal(tc.stop_at, agree_every=tc.log_every)]
    if tc.profile_start is not None:
        hooks.append(Profile(str(run.run_dir / "profile"), tc.profile_start, tc.profile_steps))
    hooks.append(logger)
    if run.cfg.checkpoint.enabled:
        hooks.append(SaveCheckpoint(run, run.cfg.checkpoint.every))
    hooks.append(Evaluate(run, tc.eval_every, tc.eval_batches, logger.report))
    if tc.sample_tokens and run.is_lm:
        hooks.append(Sample(run, tc.sample_tokens, tc.sample_prompt, tc.sample_temperature))
    if tc.plot and main:
        hooks.append(Plot(run))
    return hooks
