"""Multi-process start-up through `jax.distributed`: coordinator, process count and id from the
config, else from jax's own detection (SLURM, Open MPI, JAX_* environment variables).

Must run before anything touches a jax backend. On CPU, collectives go through gloo.

A dead peer is noticed by our own watchdog (`PeerWatch`) within `heartbeat_timeout_s`: it
prints one line and exits with status 1. jax's coordination service would otherwise abort the
survivors from C++ (SIGABRT and a C++ stack; its Python callback hook cannot be used: jaxlib
fails to convert the status it passes), so jax's own heartbeat is set longer than ours. Not
covered: when process 0 (which hosts the coordination service) dies, jax's client in every
other process notices the lost connection at once and still aborts from C++."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax
import pydantic

from framework.errors import ConfigError, DistributedError

# jax's heartbeat timeout as a multiple of ours: our watchdog must notice a dead peer first.
JAX_HEARTBEAT_FACTOR = 3

# More than one task launched by srun / mpirun, or jax's own variables: a multi-process run.
_ENV_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")

_watch: PeerWatch | None = None  # this process's watchdog, once initialized


class DistributedConfig(pydantic.BaseModel):
    """jax.distributed settings; leave them unset for one process or cluster auto-detection."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    enabled: bool | None = pydantic.Field(
        None, description="true: initialize; false: never; null: when set here or detected"
    )
    coordinator_address: str | None = pydantic.Field(
        None, pattern=r"^\S+:[0-9]{1,5}$", description="host:port of process 0"
    )
    num_processes: int | None = pydantic.Field(None, gt=0, description="processes in the run")
    process_id: int | None = pydantic.Field(None, ge=0, description="this process's index")
    timeout_s: int = pydantic.Field(300, gt=0, description="initialization timeout (seconds)")
    heartbeat_timeout_s: int = pydantic.Field(
        60,
        gt=0,
        description="a process silent this long counts as dead: the others exit "
        "with an error instead of hanging",
    )


def wanted(cfg: DistributedConfig) -> bool:
    """Whether this run should call jax.distributed.initialize."""
    if cfg.enabled is not None:
        return cfg.enabled
    if cfg.coordinator_address or (cfg.num_processes or 1) > 1:
        return True
    return any(int(os.environ.get(k, "1") or 1) > 1 for k in _ENV_HINTS)


def initialize(cfg: DistributedConfig) -> None:
    """Join the multi-process run (once per process); a clear error when it cannot."""
    if not wanted(cfg) or jax.distributed.is_initialized():
        return
    if cfg.process_id is not None and cfg.num_processes and cfg.process_id >= cfg.num_processes:
        raise ConfigError(
            f"mesh.distributed.process_id ({cfg.process_id}) must be < "
            f"mesh.distributed.num_processes ({cfg.num_processes})"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            cfg.coordinator_address,
            cfg.num_processes,
            cfg.process_id,
            initialization_timeout=cfg.timeout_s,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout_s * JAX_HEARTBEAT_FACTOR,
        )
    except (ValueError, TypeError) as e:  # jax's own argument checks: a config mistake
        raise ConfigError(f"mesh.distributed: {_first_line(e)}") from e
    except Exception as e:  # cannot reach the coordinator, timeout: the environment
        raise DistributedError(
            f"jax.distributed.initialize failed (coordinator "
            f"{cfg.coordinator_address or 'auto-detected'}, "
            f"{cfg.num_processes or '?'} processes, timeout {cfg.timeout_s}s): {_first_line(e)}"
        ) from e
    global _watch
    _watch = PeerWatch(cfg.heartbeat_timeout_s)
    _watch.start()


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (jax's run to dozens of lines)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def announce_failure() -> None:
    """Tell the other processes this one is exiting on an error, so they stop too."""
    if _watch is not None:
        _watch.stop(failed=True)


def settle_peer_failure() -> None:
    """After an error in a multi-process run, give the watchdog time to tell whether a peer
    died (a failed collective is often the first sign): if so it exits with its one line."""
    if _watch is not None and _watch.is_alive():
        _watch.join(_watch.timeout_s + _watch.interval + 1)


class PeerWatch(threading.Thread):
    """Each process bumps its counter in jax's key-value store every few seconds and watches
    the others'; one that stops (killed, hung, or its host gone) for `timeout_s` ends this
    process with one stderr line and status 1. A process that exits normally says so first,
    so its peers do not mistake a finished process for a dead one."""

    PREFIX = "framework/peer_watch/"
    EXITED = "exited"
    FAILED = "failed"

    def __init__(self, timeout_s: float):
        super().__init__(name="peer-watch", daemon=True)
        from jax._src.distributed import global_state

        self.client, self.timeout_s = global_state.client, timeout_s
        self.me, self.n = jax.process_index(), jax.process_count()
        self.interval = timeout_s / 5
        self.stopped = threading.Event()
        self._lock = threading.Lock()  # a beat never overwrites the final word
        atexit.register(self.stop)

    def _key(self, process: int) -> str:
        return f"{self.PREFIX}{process}"

    def stop(self, failed: bool = False) -> None:
        """Tell the peers this process exits (on purpose, or `failed`: they exit too instead
        of waiting in a collective for it), and stop watching them. The first word stays."""
        with self._lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            try:
                value = self.FAILED if failed else self.EXITED
                self.client.key_value_set(self._key(self.me), value, allow_overwrite=True)
            except Exception:  # the coordinator may already be gone: nothing left to tell
                pass

    def run(self) -> None:
        """Beat, then read every peer's counter (one request), each `interval` seconds."""
        beats, seen = 0, {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
        while not self.stopped.wait(self.interval):
            beats += 1
            try:
                with self._lock:
                    if self.stopped.is_set():
                        return
                    self.client.key_value_set(self._key(self.me), str(beats), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(self.PREFIX))
            except Exception as e:  # the coordinator (process 0) is unreachable
                self._exit(f"lost the coordinator (process 0): {_first_line(e)}")
            for peer, (last, since) in list(seen.items()):
                value = values.get(self._key(peer))
                if value == self.EXITED:
                    del seen[peer]
                elif value == self.FAILED:
                    self._exit(f"process {peer} of {self.n} failed (see its output)")
                elif value != last:
                    seen[peer] = (value, time.monotonic())
                elif time.monotonic() - since > self.timeout_s:
                    self._exit(
                        f"process {peer} of {self.n} stopped responding for over "
                        f"{self.timeout_s:g}s (mesh.distributed.heartbeat_timeout_s)"
                    )

    def _exit(self, reason: str) -> None:
        """One line on stderr, then end the process at once (jax would abort it later)."""
        if self.stopped.is_set():
            return
        sys.stdout.flush()
        sys.stderr.write(
            f"error: {reason}; process {self.me} exits (status 1); "
            "rerun every process to resume from the last checkpoint\n"
        )
        sys.stderr.flush()
        os._exit(1)
