"""Checkpoints: orbax CheckpointManager around the train state, plus the resume policy.

A checkpoint is one orbax step directory `<run>/checkpoints/<step>/` with items
`params`, `opt_state`, `model_state` (sharded arrays, written asynchronously), `data` (the
loader's JSON position), `config` (the resolved config) and `meta` (step, skipped steps).
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves no half checkpoint behind. The step's dropout key is derived from
(seed, step), so storing the step restores the RNG too. Restores take their target shardings
from the current mesh, so a checkpoint loads onto any layout (resharding on restore).
Params export to safetensors (no pickle) with '/'-joined keys; `load_safetensors` reverses it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pydantic
from orbax.checkpoint import checkpoint_managers as policies

from framework.errors import CheckpointError

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "model_state")
JSON_ITEMS = ("data", "config", "meta")
KEYWORDS = ("auto", "never", "fresh")


class CheckpointConfig(pydantic.BaseModel):
    """Checkpoint cadence, retention and the resume policy."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    enabled: bool = pydantic.Field(True, description="save checkpoints at all")
    every: int = pydantic.Field(100, gt=0, description="steps between saves (and at the end)")
    keep: int = pydantic.Field(3, gt=0, description="most recent checkpoints kept")
    keep_every: int | None = pydantic.Field(
        None, gt=0, description="also keep every checkpoint whose step is a multiple of this"
    )
    async_save: bool = pydantic.Field(True, description="write in the background (orbax async)")
    resume: str = pydantic.Field(
        "auto",
        min_length=1,
        description="auto: continue from the newest complete checkpoint in the run directory; "
        "never: refuse to run over existing checkpoints; fresh: delete them and "
        "start over; a path: start from another run's newest checkpoint",
    )
    resume_params_only: bool = pydantic.Field(
        False,
        description="with a resume path: take params (and model state) only, fresh "
        "optimizer, step 0 and data order (fine-tuning)",
    )


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints; a path to a checkpoints folder is taken as is."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"


def step_dirs(directory: Path) -> list[int]:
    """Steps with a finished (non-temporary) step directory, oldest first, without orbax."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpointer:
    """An orbax CheckpointManager for one run directory: save, list, restore with fallback."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        keep: list[Any] = [policies.LatestN(n=cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        handlers = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
        handlers |= {k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS}
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # orbax warns that a read-only manager is read-only: expected here
            absl.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=cfg.async_save and not read_only,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
            )
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_names=ARRAY_ITEMS + JSON_ITEMS,
                item_handlers=handlers,
            )
        finally:
            absl.setLevel(level)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, state: dict, data_state: dict, config: dict, meta: dict) -> None:
        """Start writing `state` at its step; returns once the arrays are copied off-device."""
        step = int(meta["step"])
        if step in self.steps():
            return
        # An empty tree (a model without mutable state) is not an orbax item: it is rebuilt.
        args = {
            k: ocp.args.StandardSave(state[k]) for k in ARRAY_ITEMS if jax.tree.leaves(state[k])
        }
        args |= {
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(config),
            "meta": ocp.args.JsonSave(meta),
        }
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        """Block until the in-flight save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and deletions."""
        self.manager.close()

    def restore(
        self, step: int, abstract: dict, *, params_only: bool = False
    ) -> tuple[dict, dict | None, dict]:
        """(arrays restored onto `abstract`'s shardings, data state, meta) of one step."""
        items = ("params", "model_state") if params_only else ARRAY_ITEMS
        empty = {k: abstract[k] for k in items if not jax.tree.leaves(abstract[k])}
        args = {k: ocp.args.StandardRestore(abstract[k]) for k in items if k not in empty}
        args |= {"meta": ocp.args.JsonRestore()}
        if not params_only:
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        arrays = {k: empty[k] if k in empty else out[k] for k in items}
        return arrays, (None if params_only else out["data"]), out["meta"]

    def restore_newest(
        self,
        abstract: dict,
        *,
        params_only: bool = False,
        warn: Callable[[str], None] = log.warning,
    ) -> tuple[int, dict, dict | None, dict] | None:
        """Newest readable checkpoint (warning about each unreadable newer one); None if there
        are no checkpoints; CheckpointError if there are some and none can be read."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                arrays, data, meta = self.restore(step, abstract, params_only=params_only)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
                if "structures do not match" in reason:  # the config changed, not the files
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(step)} does not fit this config's "
                        f"model/optimizer state ({reason}); was model.* or optim.* changed? "
                        "Use checkpoint.resume_params_only with a resume path to fine-tune "
                        "with another optimizer"
                    ) from e
                failures.append(f"step {step}: {type(e).__name__}: {reason}")
                warn(
                    f"checkpoint {self.directory / str(step)} is unreadable ({reason}); "
                    "falling back to the one before"
                )
                continue
            return step, arrays, data, meta
        if failures or step_dirs(self.directory):
            raise CheckpointError(
                f"{self.directory} holds checkpoints but none can be restored "
                f"({'; '.join(failures) or 'no complete step directory'}); move them aside "
                "or set checkpoint.resume=fresh to start over"
            )
        return None

    def read_numpy(self, item: str = "params", step: int | None = None) -> tuple[int, Any]:
        """(step, one item as host numpy arrays / JSON) without a mesh or model: export,
        inspection, comparisons. Optimizer-state containers come back as plain dicts/lists."""
        steps = self.steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (steps: {steps})"
            )
        if item in JSON_ITEMS:
            return step, self.manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )[item]
        one = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
            self.manager.item_metadata(step)[item],
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        )
        return step, jax.device_get(out[item])


def remove_checkpoints(run_dir: str | Path) -> bool:
    """Delete a run's checkpoints folder (for `resume: fresh`); whether there was one."""
    directory = checkpoint_dir(run_dir)
    if directory.exists():
        shutil.rmtree(directory)
        return True
    return False


# ----------------------------------------------------------------------------------------------
# safetensors


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {'a/b/c': numpy array}; '/' must not occur inside a key."""
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if "/" in str(k):
                    raise ValueError(f"param key {k!r} under {prefix or '(root)'} contains '/'")
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.ascontiguousarray(np.asarray(node))

    walk(params, "")
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/c': array} -> nested dict (inverse of flatten_params)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def save_safetensors(params: Any, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write params as one safetensors file with '/'-joined keys."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flatten_params(jax.device_get(params)), str(path), metadata=metadata)
    return path


def load_safetensors(path: str | Path) -> dict:
    """Read a safetensors file written by save_safetensors back into nested params."""
    from safetensors.numpy import load_file

    return unflatten_params(load_file(str(path)))
