"""The training loop: config -> data -> state -> jit(step) -> metrics, evals, sample, plots.

Per-step metrics stay on the device and are fetched once per log interval (and before each
checkpoint, so a non-finite state is never saved), so the loop never blocks the step; the
fetched values are checked for non-finite loss, gradients and params step by step.
Checkpoints are written asynchronously by orbax; SIGTERM/SIGINT finish the current step, save
and return with `summary["stopped"]` set."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from framework import models
from framework.config.loader import ConfigError, dump_resolved
from framework.config.schema import Config
from framework.data import make_loaders
from framework.data.sources import load_tokenizer
from framework.parallel import logical
from framework.parallel.distributed import initialize
from framework.parallel.mesh import make_mesh
from framework.parallel.sharding import check_batch, put_batch, state_shardings
from framework.train import checkpoint as ckpt
from framework.train.metrics import MetricsWriter, Progress, mfu, peak_flops_per_device
from framework.train.optimizer import make_optimizer, schedule
from framework.train.sample import sample_tokens
from framework.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)
_NOT_AVERAGED = ("finite", "bad_grad", "bad_param", "skipped")


class NonFiniteError(RuntimeError):
    """Loss, a gradient or a parameter became NaN/inf; the message names the step and leaf."""


def _check_compatible(cfg: Config, meta: dict[str, Any]) -> None:
    """User mistakes that need the data's metadata to see: one line naming the key."""
    vocab = meta.get("vocab_size")
    if vocab is not None and getattr(cfg.model, "vocab_size", vocab) < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
            f"data's vocabulary ({vocab})"
        )
    max_len = getattr(cfg.model, "max_seq_len", None)
    if (
        vocab is not None
        and max_len is not None
        and getattr(cfg.model, "position", "") == "learned"
        and cfg.data.seq_len > max_len
    ):
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) is longer than model.max_seq_len "
            f"({max_len}) of the learned position table"
        )
    if "cudnn" in (getattr(cfg.model, "attention_impl", ""),) and jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention_impl=cudnn needs a GPU (backend is "
            f"{jax.default_backend()}); use auto, pallas or xla"
        )
    n_classes = meta.get("num_classes")
    if n_classes is not None and getattr(cfg.model, "num_classes", n_classes) < n_classes:
        raise ConfigError(
            f"model.num_classes ({cfg.model.num_classes}) is smaller than the "
            f"data's {n_classes} classes"
        )


def _mean_metrics(per_step: list[dict]) -> dict[str, float]:
    keys = [k for k in per_step[0] if k not in _NOT_AVERAGED]
    return {k: float(np.mean([m[k] for m in per_step])) for k in keys}


def evaluate(
    eval_fn, state, eval_set, n_batches: int, bytes_per_token: float | None, put=lambda b: b
) -> dict:
    """Average the model's metrics over `n_batches` held-out batches (same batches each time);
    `put` places a process-local host batch on the devices."""
    results = [
        eval_fn(state["params"], state["model_state"], put(b)) for b in eval_set.batches(n_batches)
    ]
    if not results:  # no held-out data (e.g. data.val_fraction=0)
        return {}
    out = _mean_metrics(jax.device_get(results))
    if bytes_per_token:
        out["bits_per_byte"] = out["loss"] / math.log(2) / bytes_per_token
    return out


class Trainer:
    """Holds what a run needs; `run()` trains to `train.steps` and returns the final metrics."""

    def __init__(self, cfg: Config, devices: list | None = None):
        self.cfg = cfg
        initialize(cfg.mesh.distributed)  # before any backend use; no-op for one process
        self.run_dir = Path(cfg.run.dir) / cfg.run.name
        self.is_main = jax.process_index() == 0
        self.model = models.get(cfg.model.name)
        self.train_data, self.eval_set, self.meta = make_loaders(
            cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        _check_compatible(cfg, self.meta)
        self.is_lm = self.meta.get("vocab_size") is not None
        # Layout: the mesh, then every sharding; all layout errors surface here, before compile.
        self.mesh = make_mesh(cfg.mesh, devices)
        self.rules = dict(cfg.mesh.rules)
        check_batch(
            self.mesh, self.rules, cfg.data.batch_size, cfg.data.seq_len if self.is_lm else None
        )
        self.lr = schedule(cfg.optim, cfg.train.steps)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)
        self._init = lambda k: init_state(self.model, cfg.model, self.tx, k)
        self.state_sharding = state_shardings(
            self.model, cfg.model, self._init, self.mesh, self.rules
        )
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.step_fn = jax.jit(
            self._traced(
                make_train_step(
                    self.model,
                    cfg.model,
                    self.tx,
                    seed=cfg.run.seed,
                    grad_accum=cfg.train.grad_accum,
                    lr_schedule=self.lr,
                    nonfinite=cfg.train.nonfinite,
                )
            ),
            in_shardings=(self.state_sharding, None),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
        )
        self.eval_fn = jax.jit(
            self._traced(make_eval_step(self.model, cfg.model)),
            in_shardings=(self.state_sharding["params"], self.state_sharding["model_state"], None),
            out_shardings=replicated,
        )
        items = cfg.data.batch_size * (cfg.data.seq_len if self.is_lm else 1)
        self.items_per_step = items
        flops = self.model.flops_per_token
        self.flops_per_token = flops(cfg.model, cfg.data.seq_len) if flops and self.is_lm else None
        self.peak_flops, self.peak_source = peak_flops_per_device(
            jax.devices()[0], cfg.model.compute_dtype
        )
        self.ckpt_dir = ckpt.checkpoint_dir(self.run_dir)
        self._resume_source = self._plan_resume()
        self.checkpointer: ckpt.Checkpointer | None = None
        self.skipped_steps = 0
        self._stop_signal: int | None = None

    def _plan_resume(self) -> Path | None:
        """Apply `checkpoint.resume` to what the run directory holds, before any compile: the
        checkpoint folder to restore from (None: start fresh); ConfigError for `never`."""
        cc = self.cfg.checkpoint
        existing = ckpt.step_dirs(self.ckpt_dir)
        if cc.resume == "never" and existing:
            raise ConfigError(
                f"checkpoint.resume=never, but the run directory {self.run_dir} already has "
                f"checkpoints (steps {existing}); use checkpoint.resume=auto to continue it, "
                "checkpoint.resume=fresh to delete them and start over, or another run.name"
            )
        if cc.resume == "fresh":
            if existing and self.is_main:
                log.warning("checkpoint.resume=fresh: deleting %s", self.ckpt_dir)
                ckpt.remove_checkpoints(self.run_dir)
            return None
        if existing:  # auto, or a path whose fine-tuning run was itself interrupted
            return self.ckpt_dir
        if cc.resume in ckpt.KEYWORDS:
            return None
        source = ckpt.checkpoint_dir(Path(cc.resume).expanduser())
        if not ckpt.step_dirs(source):
            raise ConfigError(
                f"checkpoint.resume: {cc.resume!r} is neither auto/never/fresh "
                f"nor a run directory with checkpoints (looked in {source})"
            )
        return source

    def _traced(self, fn):
        """`fn` traced with this mesh's logical rules active, so activations get constrained."""

        def wrapped(*args):
            with logical.activate(self.mesh, self.rules):
                return fn(*args)

        return wrapped

    def put(self, batch: dict) -> dict:
        """This process's host batch -> global arrays sharded over the mesh."""
        return put_batch(batch, self.mesh, self.rules, sequence=self.is_lm)

    def init_state(self):
        """Fresh state created already sharded (never whole on one device)."""
        key = jax.random.key(self.cfg.run.seed)
        return jax.jit(self._init, out_shardings=self.state_sharding)(key)

    def restore_or_init(self):
        """The state to start from: restored per `checkpoint.resume` (data position included),
        else fresh. Restores reshard onto this trainer's mesh."""
        source = self._resume_source
        if source is None:
            return self.init_state()
        own = source == self.ckpt_dir
        params_only = self.cfg.checkpoint.resume_params_only and not own
        reader = ckpt.Checkpointer(source, self.cfg.checkpoint, read_only=True)
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        try:
            found = reader.restore_newest(
                ckpt.abstract_state(shapes, self.state_sharding), params_only=params_only
            )
        finally:
            reader.close()
        if found is None:  # only temporary (unfinished) step directories: nothing to resume
            log.warning("no complete checkpoint in %s; starting from scratch", source)
            return self.init_state()
        step, arrays, data_state, meta = found
        if own:
            self._drop_unreadable_after(step)
        if params_only:
            fresh = self.init_state()
            state = fresh | {"params": arrays["params"], "model_state": arrays["model_state"]}
            state["opt_state"] = jax.jit(
                self.tx.init, out_shardings=self.state_sharding["opt_state"]
            )(arrays["params"])
            log.warning(
                "initialized params from %s step %d (fine-tuning from step 0)", source, step
            )
            return state
        self.train_data.set_state(data_state)
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        log.warning("resumed from %s step %d", source, step)
        return arrays | {
            "step": jax.device_put(np.int32(meta["step"]), self.state_sharding["step"])
        }

    def _drop_unreadable_after(self, step: int) -> None:
        """Delete checkpoints newer than the one restored (they failed to read), so the run
        writes them again instead of skipping steps it believes are saved."""
        newer = [s for s in ckpt.step_dirs(self.ckpt_dir) if s > step]
        if newer and self.is_main:
            for s in newer:
                log.warning("removing unreadable checkpoint %s", self.ckpt_dir / str(s))
                shutil.rmtree(self.ckpt_dir / str(s), ignore_errors=True)
        if newer and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("framework-drop-unreadable-checkpoints")

    def train_step(self, state, batch: dict):
        """One optimizer step on a process-local host batch: (new state, device metrics)."""
        return self.step_fn(state, self.put(batch))

    def _throughput(self, n_steps: int, seconds: float) -> dict[str, float]:
        rate = n_steps * self.items_per_step / seconds
        out = {
            "step_time": seconds / n_steps,
            ("tokens_per_s" if self.is_lm else "examples_per_s"): rate,
        }
        if self.flops_per_token:
            out["mfu"] = mfu(rate, self.flops_per_token, jax.device_count(), self.peak_flops)
        return out

    def _on_signal(self, signum: int, frame: Any) -> None:
        """First SIGTERM/SIGINT: stop after the current step with a checkpoint."""
        if self._stop_signal is not None:  # a second one: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning(
            "%s received: finishing the step, saving a checkpoint, exiting",
            signal.Signals(signum).name,
        )

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _stop_requested(self, step: int) -> bool:
        """Whether any process got a stop signal; with several processes they agree (so all
        save) once per log interval, keeping the per-step loop free of host syncs."""
        flag = self._stop_signal is not None
        if jax.process_count() == 1:
            return flag
        if step % self.cfg.train.log_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))

    def _check_finite(self, pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
        """Fetch pending metrics; NonFiniteError (stop policy) naming the step and first bad
        gradient or parameter leaf."""
        host = jax.device_get([m for _, m in pending])
        out = list(zip([s for s, _ in pending], host, strict=True))
        if self.cfg.train.nonfinite == "skip":
            return out
        for s, m in out:
            if m["finite"]:
                continue
            paths = ckpt.leaf_paths(self.state_sharding["params"])
            if int(m["bad_grad"]) >= 0:
                where = f"first non-finite gradient: {paths[int(m['bad_grad'])]}"
            elif int(m["bad_param"]) >= 0:
                where = f"first non-finite parameter after the update: {paths[int(m['bad_param'])]}"
            else:
                where = "non-finite loss, finite gradients"
            steps = ckpt.step_dirs(self.ckpt_dir)
            kept = (
                f"last good checkpoint: step {steps[-1]} in {self.ckpt_dir}"
                if steps
                else "no checkpoint was written"
            )
            raise NonFiniteError(
                f"non-finite loss or gradient at step {s}: {where} "
                f"(loss={m['loss']}, grad_norm={m['grad_norm']}); {kept}"
            )
        return out

    def _save(self, state, unlogged: list[tuple[int, dict]]) -> None:
        """Hand the (finite) state to the async checkpointer; the step does not wait.
        `unlogged` holds the fetched metrics of steps since the last log line (their skipped
        updates are not yet in self.skipped_steps)."""
        if self.checkpointer is None:
            return
        step = int(state["step"])
        skipped = self.skipped_steps + sum(int(m.get("skipped", 0)) for _, m in unlogged)
        meta = {"step": step, "skipped_steps": skipped}
        self.checkpointer.save(
            state, self.train_data.get_state(), self.cfg.model_dump(mode="json"), meta
        )

    def run(self, state=None) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"run.dir: cannot create run directory {self.run_dir} ({e.strerror})"
            ) from e
        if self.is_main:
            dump_resolved(cfg, self.run_dir)
        state = self.restore_or_init() if state is None else state
        start = int(state["step"])
        if start >= tc.steps:
            log.warning(
                "the run in %s already reached train.steps=%d (checkpoint.resume=auto); "
                "raise train.steps to continue, or use checkpoint.resume=fresh or "
                "another run.name to train again",
                self.run_dir,
                tc.steps,
            )
        if cfg.checkpoint.enabled:
            self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, cfg.checkpoint)
        every = cfg.checkpoint.every
        writer = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=tc.tensorboard)
        progress = Progress(tc.steps, start_step=start, enabled=self.is_main and tc.progress)
        pending: list[tuple[int, Any]] = []
        last_eval: dict[str, float] = {}
        t_last, steps_since = time.perf_counter(), 0
        profiling = False
        stopped: str | None = None
        previous_handlers = self._install_signals()
        try:
            for step in range(start, tc.steps):
                if tc.profile_start is not None and step + 1 == tc.profile_start:
                    jax.profiler.start_trace(str(self.run_dir / "profile"))
                    profiling = True
                state, metrics = self.train_step(state, next(self.train_data))
                pending.append((step + 1, metrics))
                steps_since += 1
                if profiling and step + 1 >= tc.profile_start + tc.profile_steps - 1:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                done = step + 1 == tc.steps
                interrupt = (step + 1 == tc.stop_at or self._stop_requested(step + 1)) and not done
                if (step + 1) % tc.log_every == 0 or done or interrupt:
                    host = self._check_finite(pending)
                    now = time.perf_counter()
                    line = _mean_metrics([m for _, m in host])
                    line |= self._throughput(steps_since, now - t_last)
                    if tc.nonfinite == "skip":
                        self.skipped_steps += sum(int(m["skipped"]) for _, m in host)
                        line["skipped_steps"] = float(self.skipped_steps)
                    writer.write(step + 1, line, "train")
                    progress.update(step + 1, line)
                    pending, t_last, steps_since = [], now, 0
                if (step + 1) % every == 0 or done or interrupt:
                    pending = self._check_finite(pending)  # never checkpoint a bad state
                    self._save(state, pending)
                if (step + 1) % tc.eval_every == 0 or done:
                    last_eval = evaluate(
                        self.eval_fn,
                        state,
                        self.eval_set,
                        tc.eval_batches,
                        self.meta.get("bytes_per_token"),
                        self.put,
                    )
                    if last_eval:
                        writer.write(step + 1, last_eval, "eval")
                    # evaluation time is not step time: restart the throughput window
                    t_last, steps_since = time.perf_counter(), 0
                if interrupt:
                    stopped = (
                        signal.Signals(self._stop_signal).name
                        if self._stop_signal
                        else f"train.stop_at={tc.stop_at}"
                    )
                    break
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if profiling:
                jax.profiler.stop_trace()
            if self.checkpointer is not None:
                self.checkpointer.close()  # waits for the in-flight save
            progress.close()
            writer.close()
        summary = {
            "step": int(state["step"]),
            "eval": last_eval,
            "run_dir": str(self.run_dir),
            "stopped": stopped,
            "skipped_steps": self.skipped_steps,
        }
        if stopped:
            self.state = state
            return summary
        if tc.sample_tokens and self.is_lm:
            summary["sample"] = self.sample(state, tc.sample_prompt, tc.sample_tokens)
        if tc.plot and self.is_main:
            from framework.train.plots import plot_run

            plot_run(self.run_dir)
        self.state = state
        return summary

    def sample(self, state, prompt: str, n: int) -> str:
        """Sample `n` tokens after `prompt` and decode them to text."""
        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        window = min(self.cfg.data.seq_len, getattr(self.cfg.model, "max_seq_len", 1 << 30))
        tokens = sample_tokens(
            self.model,
            state["params"],
            self.cfg.model,
            tokenizer.encode(prompt),
            n,
            window=window,
            temperature=self.cfg.train.sample_temperature,
            key=jax.random.key(self.cfg.run.seed + 1),
        )
        return tokenizer.decode(tokens)
