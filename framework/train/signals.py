"""SIGTERM/SIGINT during a run: the first asks for a stop after the current step (with a
checkpoint), a second only warns so that a checkpoint being saved completes, a third aborts.

Handlers are process-wide, so one `StopSignals` (`STOP`) records them; `stop_signals()` installs
its handlers for a block: `train()` does, and `scripts/train.py` does before `build`, so a Ctrl-C
during a compile never meets Python's KeyboardInterrupt (which crashed jax, 16 of 16 tries)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABORT_STATUS = 130  # the shell's status for a run ended by Ctrl-C


class StopSignals:
    """The stop signals received: `signum` the first one's number (None: none), `count` how
    many. The handler (`__call__`) only records and logs; the loop acts at its next check."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.signum = signum
            log.warning("%s received: finishing the step, saving a checkpoint, exiting", name)
        elif self.count == 2:
            log.warning(
                "%s received: already stopping (saving a checkpoint); send the signal again "
                "to abort",
                name,
            )
        else:
            log.error(
                "%s received a third time: aborting now; a checkpoint being saved is left "
                "incomplete (a rerun resumes from the one before)",
                name,
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(ABORT_STATUS)

    def agreed(self) -> int | None:
        """The signal number any process received (the largest), None if none did; with
        several processes a collective, so every process must call it at the same point."""
        signum = self.signum or 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
        return signum or None


STOP = StopSignals()
_depth = 0  # nested `stop_signals` blocks; the outermost forgets the signals at its end


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Inside the block SIGTERM/SIGINT go to `STOP` (main thread only; elsewhere a no-op).
    Each block installs the handlers again (`jax.distributed.initialize`, inside `build`,
    takes SIGTERM for its preemption notifier) and puts back the Python ones it replaced;
    nested blocks share `STOP`, which the outermost forgets at its end (the next run in this
    process starts clean)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.signal(s, STOP) for s in SIGNALS}
    _depth += 1
    try:
        yield STOP
    finally:
        _depth -= 1
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)
        if _depth == 0:
            STOP.signum, STOP.count = None, 0
