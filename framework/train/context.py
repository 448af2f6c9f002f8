"""What the loop and its hooks share during a run: the state, the step, the metrics not yet
fetched from the devices, and whether this is the final step."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from framework.errors import NonFiniteError
from framework.train import nonfinite
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
    batch_spec: Any = None  # shapes/dtypes of a training batch (set when the step compiles)
    clock: Clock = dataclasses.field(default_factory=Clock)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # "eval", "sample"
    skips: nonfinite.SkipMonitor | None = None  # nonfinite=skip's recent drops (first fetch)
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
        """Copy pending metrics to the host and check them: NonFiniteError (stop policy) naming
        the step and what went non-finite first, or (skip policy) when too many recent steps
        were dropped. The loop adds the last good checkpoint once saves in flight are done."""
        if not self._pending:
            return
        host = jax.device_get([m for _, m in self._pending])
        fetched = list(zip([s for s, _ in self._pending], host, strict=True))
        self._pending = []
        if self.run.cfg.train.nonfinite == "skip":
            flags = [bool(m["skipped"]) for _, m in fetched]
            self.skipped_steps += sum(flags)
            if self.skips is None:
                self.skips = nonfinite.SkipMonitor(self.run.cfg.train.max_skipped_fraction)
            self.skips.add(flags)
            if (reason := self.skips.too_many()) is not None:
                raise NonFiniteError(reason)
        elif bad := [i for i, (_, m) in enumerate(fetched) if not m["finite"]]:
            step, m = fetched[bad[0]]
            # steps keep the old state when non-finite: if every later one was too, the state
            # is still the one the first bad step started from
            held = len(bad) == len(fetched) - bad[0]
            before = self.state if held else None
            raise NonFiniteError(nonfinite.describe(self.run, step, m, self.batch_spec, before))
        self._fetched.extend(fetched)
        del self._fetched[:-MAX_UNTAKEN]  # with no hook taking them, keep only the newest

    def take_fetched(self) -> list[tuple[int, dict]]:
        """Fetch, then hand over (and forget) every step's host metrics not yet taken."""
        self.fetch()
        out, self._fetched = self._fetched, []
        return out
