"""One run per directory: an exclusive lock on `<run_dir>/.lock` for the life of a run.

The lock is `fcntl.flock`, which the OS releases on any exit (kill -9 included), so a lock
file left by a dead run is simply taken again. The file records {pid, host, started} of the
holder, for the message a second run gets. With several processes, process 0 holds it."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from framework.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock inside the block; ConfigError naming the holder (pid,
    host, since when) when another run holds it. The directory must exist."""
    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = _acquire(run_dir / LOCK_FILE)
        except (ConfigError, OSError) as e:  # every process must hear of it, not hang
            error = e
    try:
        if not _all_agree(error is None):
            raise error or ConfigError(
                f"run.dir: {run_dir} is in use by another run (process 0 could not lock it)"
            )
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # a broken disk must not hide the run's error
                os.ftruncate(fd, 0)  # a clean end leaves no holder to report
            os.close(fd)


def _acquire(path: Path) -> int:
    """Lock `path` (created if missing) and record this process in it: the open descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_flock(fd):  # raised here, not in an `except`: a user error, not an OSError
        os.close(fd)
        raise ConfigError(
            f"run.dir: {path.parent} is in use by another run ({_describe(_holder(path))}); "
            "wait for it to end or stop it, or use another run.name"
        )
    try:
        _record(fd, path)
    except BaseException:
        os.close(fd)  # releases the lock: a failed record must not keep it held
        raise
    return fd


def _record(fd: int, path: Path) -> None:
    """Write this process into the locked file, warning about a holder left by a killed run."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    left = _read(fd)
    if left and (left.get("pid"), left.get("host")) != (me["pid"], me["host"]):
        log.warning(
            "%s was left by a run that did not end cleanly (%s); taking it over",
            path,
            _describe(left),
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)


def _try_flock(fd: int) -> bool:
    """Take the exclusive lock on an open file without waiting: whether it was free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read(fd: int) -> dict:
    """The holder recorded in an open lock file ({} when empty or unreadable)."""
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _holder(path: Path, tries: int = 20) -> dict:
    """The recorded holder of a lock another process holds; it writes the record just after
    locking, so an empty file is read again for up to a second."""
    for _ in range(tries):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return {}
        try:
            if found := _read(fd):
                return found
        finally:
            os.close(fd)
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    """'pid 123 on host, since 2026-01-01T12:00:00+00:00' (or that it is unknown)."""
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _all_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))
