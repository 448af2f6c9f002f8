"""The test session's jax environment (tests/conftest.py applies it before jax is imported
anywhere; subprocesses inherit it through os.environ):

- 8 simulated CPU devices;
- on CPU, XLA's LLVM backend at optimization level 0: compiling dominates these tiny programs
  and -O0 halves it (the HLO passes, SPMD partitioning and collectives included, run as
  before; only machine-code optimization is skipped);
- one persistent compilation cache for the session, shared by the xdist workers and every
  subprocess they start, so a program compiled once (the tiny LM's train step, say) is loaded
  from disk the next time any process builds it; every program is cached, small ones too.
  The directory is removed when the session ends. It has no size limit: a limit turns on
  jax's file lock, but also a scan of the whole directory on every write (quadratic in the
  entries; 6 s of a 120 s test file, measured). Unlocked, processes may race on an entry: a
  reader that catches it half-written fails to decompress it, and jax then warns and compiles
  (it never loads a wrong program); writers of one key all write a program for that key.

A test that must see XLA really compile turns the cache off: `no_compilation_cache()` in this
process, `cpu_env(..., cache=False)` for a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

DEVICES = 8
_OWN_CACHE: str | None = None  # the cache directory this process made (and removes)


def _with_flag(flags: str, flag: str) -> str:
    """XLA_FLAGS with `flag` set (replacing an earlier value of the same flag)."""
    name = flag.split("=")[0]
    kept = [f for f in flags.split() if f.split("=")[0] != name]
    return " ".join([*kept, flag])


def configure() -> None:
    """Set the session's environment (idempotent: xdist workers inherit it already set)."""
    global _OWN_CACHE
    cpu = os.environ.setdefault("JAX_PLATFORMS", "cpu") == "cpu"
    flags = _with_flag(
        os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={DEVICES}"
    )
    if cpu:  # never on a GPU run (scripts/gpu_check.sh sets JAX_PLATFORMS empty)
        flags = _with_flag(flags, "--xla_backend_optimization_level=0")
    os.environ["XLA_FLAGS"] = flags
    if cpu and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _OWN_CACHE = tempfile.mkdtemp(prefix="framework-tests-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
        # every program, the small ones too (checksums, orbax's slices, eager ops): loading one
        # costs less than compiling it again in each process (a warm 40-step tiny-LM run with
        # saves: about 15% less CPU than with a 0.2 s threshold)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def remove_cache() -> None:
    """Remove the cache directory if this process made it (the session's first process)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def cpu_env(devices: int = DEVICES, *, cache: bool = True, **extra: str) -> dict[str, str]:
    """os.environ for a subprocess on `devices` simulated CPU devices, with the session's other
    XLA flags; `cache=False`: without the persistent compilation cache (it compiles)."""
    flags = _with_flag(
        os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"
    )
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
    if not cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


@contextlib.contextmanager
def no_compilation_cache() -> Iterator[None]:
    """Inside the block, in this process: every jit compiles (the persistent cache is neither
    read nor written); afterwards the cache is as configured."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        cc.reset_cache()
