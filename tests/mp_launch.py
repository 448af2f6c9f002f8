"""Helpers for tests that start a real multi-process jax.distributed run on 127.0.0.1."""

import socket
import subprocess
from pathlib import Path

from jax_setup import cpu_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_overrides(port: int, process_id: int, n: int = 2) -> list[str]:
    """Config overrides that make this process `process_id` of an `n`-process run."""
    return [
        f"mesh.distributed.coordinator_address=127.0.0.1:{port}",
        f"mesh.distributed.num_processes={n}",
        f"mesh.distributed.process_id={process_id}",
        "mesh.distributed.timeout_s=60",
    ]


def run_all(commands: list[list[str]], *, timeout: float = 150, **popen) -> list[str]:
    """Run the commands concurrently; assert each exits 0; return their stdouts. Processes
    still alive on the way out (a timeout, a failure) are killed."""
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        for cmd in commands
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def start_all(commands: list[list[str]], logs: Path, **popen) -> list[subprocess.Popen]:
    """Start the commands (process i writes logs/p{i}.out and logs/p{i}.err, unbuffered, on
    CPU with 2 devices each); stop them with `stop_all`."""
    env = cpu_env(2, PYTHONUNBUFFERED="1")
    procs = []
    for i, cmd in enumerate(commands):
        with open(logs / f"p{i}.out", "w") as out, open(logs / f"p{i}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, **popen))
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill and reap the processes still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
