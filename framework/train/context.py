"""What the loop and its hooks share during a run: the state, the step, the metrics not yet
fetched from the devices, and whether this is the final step."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from framework.errors import NonFiniteError
from framework.train import checkpoint as ckpt
from framework.train.build import Run
from framework.train.step import State

MAX_UNTAKEN = 10_000  # fetched host metrics kept for `take_fetched` when no hook takes them


@dataclasses.dataclass
class Clock:
    """The throughput window: steps taken since it (re)started and when that was."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0

    def restart(self) -> None:
        self.started, self.steps = time.perf_counter(), 0

    def lap(self) -> tuple[int, float]:
        """(steps, seconds) of the window so far, then restart it."""
        out = (self.steps, time.perf_counter() - self.started)
        self.restart()
        return out


@dataclasses.dataclass
class Context:
    """Mutable run state handed to every hook (one per `train` call)."""

    run: Run
    state: State
    step: int  # optimizer steps completed
    done: bool = False  # train.steps reached
    stop_reason: str | None = None  # set by `stop`: a signal, train.stop_at
    skipped_steps: int = 0  # non-finite updates dropped (nonfinite=skip), over all fetches
    hardware_flops: float = math.nan  # XLA's FLOPs of one step on one device
    clock: Clock = dataclasses.field(default_factory=Clock)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # "eval", "sample"
    _pending: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    _fetched: list[tuple[int, dict]] = dataclasses.field(default_factory=list)

    @property
    def final(self) -> bool:
        """The last step of this call: train.steps reached or a stop requested."""
        return self.done or self.stop_reason is not None

    def stop(self, reason: str) -> None:
        """End the run after this step (hooks later in the list still run at it)."""
        self.stop_reason = reason

    def record(self, metrics: Any) -> None:
        """Keep a step's device metrics until the next fetch (no host sync here)."""
        self._pending.append((self.step, metrics))
        self.clock.steps += 1

    def fetch(self) -> None:
        """Copy pending metrics to the host and check them: NonFiniteError (stop policy)
        naming the step and the first bad gradient or parameter leaf."""
        if not self._pending:
            return
        host = jax.device_get([m for _, m in self._pending])
        fetched = list(zip([s for s, _ in self._pending], host, strict=True))
        self._pending = []
        if self.run.cfg.train.nonfinite == "skip":
            self.skipped_steps += sum(int(m["skipped"]) for _, m in fetched)
        else:
            for step, m in fetched:
                if not m["finite"]:
                    raise NonFiniteError(nonfinite_message(self.run, step, m))
        self._fetched.extend(fetched)
        del self._fetched[:-MAX_UNTAKEN]  # with no hook taking them, keep only the newest

    def take_fetched(self) -> list[tuple[int, dict]]:
        """Fetch, then hand over (and forget) every step's host metrics not yet taken."""
        self.fetch()
        out, self._fetched = self._fetched, []
        return out


def nonfinite_message(run: Run, step: int, m: dict) -> str:
    """Which leaf went non-finite first at `step`, and the last checkpoint left to resume."""
    paths = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_flatten_with_path(run.abstract_state["params"])[0]
    ]
    if int(m["bad_grad"]) >= 0:
        where = f"first non-finite gradient: {paths[int(m['bad_grad'])]}"
    elif int(m["bad_param"]) >= 0:
        where = f"first non-finite parameter after the update: {paths[int(m['bad_param'])]}"
    else:
        where = "non-finite loss, finite gradients"
    directory = ckpt.checkpoint_dir(run.run_dir)
    steps = ckpt.step_dirs(directory)
    kept = (
        f"last good checkpoint: step {steps[-1]} in {directory}"
        if steps
        else ("no checkpoint was written")
    )
    return (
        f"non-finite loss or gradient at step {step}: {where} "
        f"(loss={m['loss']}, grad_norm={m['grad_norm']}); {kept}"
    )
