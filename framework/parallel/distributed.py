"""Multi-process start-up through `jax.distributed`: coordinator, process count and id from the
config, else from jax's own detection (SLURM, Open MPI, JAX_* environment variables).

Must run before anything touches a jax backend. On CPU, collectives go through gloo."""

from __future__ import annotations

import os

import jax
import pydantic

from framework.errors import ConfigError

# More than one task launched by srun / mpirun, or jax's own variables: a multi-process run.
_ENV_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


class DistributedConfig(pydantic.BaseModel):
    """jax.distributed settings; leave them unset for one process or cluster auto-detection."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    enabled: bool | None = pydantic.Field(
        None, description="true: initialize; false: never; null: when set here or detected"
    )
    coordinator_address: str | None = pydantic.Field(None, description="host:port of process 0")
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
            heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
        )
    except Exception as e:  # jax raises RuntimeError / ValueError with long messages
        raise RuntimeError(
            f"jax.distributed.initialize failed (coordinator "
            f"{cfg.coordinator_address or 'auto-detected'}, "
            f"{cfg.num_processes or '?'} processes, timeout {cfg.timeout_s}s): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
