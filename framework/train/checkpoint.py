"""Checkpoints: orbax CheckpointManager around the train state, plus the resume policy.

A checkpoint is one orbax step directory `<run>/checkpoints/<step>/` with items `params`,
`opt_state`, `model_state` (sharded arrays, written asynchronously), `data` (the loader's JSON
position), `config` (the resolved config) and `meta` (step, skipped steps, and the checksum of
every array and JSON item, checked at every restore: `framework.train.integrity`). A checkpoint
that cannot be read or fails its checksums is `Damaged`; the resume moves it to
`checkpoints/damaged/` (never deletes it) and falls back to the one before. Orbax writes each
step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no half checkpoint behind. The step's dropout key is derived from (seed, step), so
storing the step restores the RNG too. Restores take their target shardings from the current
mesh, so a checkpoint loads onto any layout (resharding on restore). Params export to
safetensors (no pickle) with '/'-joined keys; `load_safetensors` reverses it."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pydantic
from orbax.checkpoint import checkpoint_managers as policies

from framework.errors import CheckpointError, DamagedCheckpointError, environment_cause
from framework.train import integrity

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "model_state")
JSON_ITEMS = ("data", "config", "meta")
KEYWORDS = ("auto", "never", "fresh")
DAMAGED = "damaged"  # checkpoints/damaged/<step>-<reason>: moved aside, never deleted


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


def _quiet_abandoned_reads() -> None:
    """Drop two known-harmless reports that follow a failed restore of a damaged checkpoint:
    tensorstore completes the reads orbax gave up on, and each (hundreds, one per array)
    reports either "Event loop is closed" (an unraisable exception) or "Task exception was
    never retrieved" (asyncio's logger). The restore's own error is reported once, by us.
    Everything else reaches the previous hook / handlers unchanged."""
    previous = sys.unraisablehook
    if getattr(previous, "_framework_filter", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    def abandoned_read(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage().startswith("Task exception was never retrieved")
            and "tensorstore" in str(error)
        )

    hook._framework_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(abandoned_read)


class Checkpointer:
    """An orbax CheckpointManager for one run directory: save, list, restore with fallback."""

    def __init__(
        self,
        directory: str | Path,
        cfg: CheckpointConfig,
        *,
        read_only: bool = False,
        save_concurrent_gb: int = 96,
    ):
        """`save_concurrent_gb` bounds the bytes orbax writes at once (orbax's default 96;
        a converter writing host arrays lowers it to bound its memory)."""
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        _quiet_abandoned_reads()
        keep: list[Any] = [policies.LatestN(n=cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        handlers = {
            k: ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb)
            for k in ARRAY_ITEMS
        }
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
        """Start writing `state` at its step; returns once the arrays are copied off-device.
        `meta` gets the checksum of every array and JSON item (checked at restore)."""
        step = int(meta["step"])
        if step in self.steps():
            return
        # An empty tree (a model without mutable state) is not an orbax item: it is rebuilt.
        arrays = {k: state[k] for k in ARRAY_ITEMS if jax.tree.leaves(state[k])}
        sums: dict[str, Any] = {k: _checksums(v) for k, v in arrays.items()}
        sums |= {"data": integrity.json_checksum(data_state)}
        sums |= {"config": integrity.json_checksum(config)}
        sums["meta"] = integrity.json_checksum(meta)
        args = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        args |= {
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(config),
            "meta": ocp.args.JsonSave(meta | {"checksums": sums}),
        }
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        """Block until the in-flight save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and deletions."""
        self.manager.close()

    def step_path(self, step: int) -> Path:
        """The directory of one checkpoint."""
        return self.directory / str(step)

    def _restore(self, step: int, args: dict) -> dict:
        """orbax restore of some items; any failure to read them is `Damaged`."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(**args)).items())
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise _damage_or_environment(e) from e

    def _item_metadata(self, step: int) -> Any:
        """orbax's per-item metadata (tree of shapes/dtypes); `Damaged` if unreadable."""
        try:
            return self.manager.item_metadata(step)
        except Exception as e:
            raise _damage_or_environment(e) from e

    def read_json(self, item: str, step: int) -> Any:
        """One JSON item (`config`, `data`, `meta`) of a checkpoint, checked against its
        checksum; `Damaged` if it is not."""
        out = self._restore(step, {k: ocp.args.JsonRestore() for k in {item, "meta"}})
        _verify(out["meta"], {}, {} if item == "meta" else {item: out[item]})
        return out[item]

    def array_metadata(self, step: int) -> dict[str, Any]:
        """{item: tree of array metadata (shape, dtype)} of a checkpoint's saved arrays."""
        metadata = self._item_metadata(step)
        return {k: metadata[k] for k in ARRAY_ITEMS if metadata.get(k) is not None}

    def restore(
        self, step: int, abstract: dict, *, params_only: bool = False
    ) -> tuple[dict, dict | None, dict]:
        """(arrays restored onto `abstract`'s shardings, data state, meta) of one step, not yet
        checked (`verify`); `Damaged` if unreadable. Each process reads its own shards."""
        items = ("params", "model_state") if params_only else ARRAY_ITEMS
        empty = {k: abstract[k] for k in items if not jax.tree.leaves(abstract[k])}
        args = {k: ocp.args.StandardRestore(abstract[k]) for k in items if k not in empty}
        args |= {"meta": ocp.args.JsonRestore()}
        if not params_only:
            args["data"] = ocp.args.JsonRestore()
        out = self._restore(step, args)
        arrays = {k: empty[k] if k in empty else out[k] for k in items}
        return arrays, (None if params_only else out["data"]), out["meta"]

    @staticmethod
    def verify(meta: dict, arrays: dict, data_state: dict | None) -> None:
        """`Damaged` unless what `restore` returned matches its recorded checksums (a
        collective computation: every process calls it)."""
        present = {k: v for k, v in arrays.items() if jax.tree.leaves(v)}
        _verify(meta, present, {} if data_state is None else {"data": data_state})

    def move_aside(self, step: int, reason: str) -> Path:
        """Move a damaged checkpoint to `damaged/<step>-<reason>` (never deleted, out of the
        `keep` rotation); returns where it went."""
        target = self.directory / DAMAGED / f"{step}-{reason}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / DAMAGED / f"{step}-{reason}-{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.step_path(step).rename(target)
        return target

    def read_numpy(self, item: str = "params", step: int | None = None) -> tuple[int, Any]:
        """(step, one item as host numpy arrays / JSON) without a mesh or model: export,
        inspection, comparisons. Optimizer-state containers come back as plain dicts/lists.
        CheckpointError if the step is missing or its checksums do not match."""
        steps = self.steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (steps: {steps})"
            )
        try:
            if item in JSON_ITEMS:
                return step, self.read_json(item, step)
            one = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                self._item_metadata(step)[item],
            )
            out = self._restore(
                step, {item: ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
            )
            _verify(out["meta"], {item: out[item]}, {})
        except Damaged as e:
            raise DamagedCheckpointError(
                f"checkpoint {self.step_path(step)} is damaged: {e}"
            ) from e
        return step, jax.device_get(out[item])


def _checksums(tree: Any) -> dict[str, str]:
    """`integrity.array_checksums`; a tree of host numpy arrays (an imported model) is summed
    on the host in chunks (`host_checksum`), so it never goes to a device."""
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(isinstance(x, np.ndarray) for x in leaves):
        return integrity.array_checksums(tree)
    return {
        path: host_checksum(x) for path, x in zip(integrity.leaf_paths(tree), leaves, strict=True)
    }


def host_checksum(x: np.ndarray, chunk: int = 1 << 22) -> str:
    """`integrity`'s checksum of one host array, computed `chunk` elements at a time (memory
    bounded by the chunk, not the array): the same position-weighted sums of the element bits
    with uint32 wrap-around. 8-byte dtypes take the device path."""
    if x.dtype.itemsize == 8:
        (value,) = integrity.array_checksums([x]).values()
        return value
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    flat = np.ascontiguousarray(x).reshape(-1)
    flat = flat.view(np.uint8) if x.dtype == np.bool_ else flat.view(unsigned)
    weighted = mixed = 0
    for start in range(0, flat.size, chunk):
        bits = flat[start : start + chunk].astype(np.uint32)
        index = np.arange(start, start + bits.size, dtype=np.uint64).astype(np.uint32)
        weighted += int(np.sum(bits * (index * integrity._GOLDEN | np.uint32(1)), dtype=np.uint32))
        mixed += int(
            np.sum((bits ^ (index * integrity._MIX_A)) * integrity._MIX_B, dtype=np.uint32)
        )
    return f"{weighted % 2**32:08x}{mixed % 2**32:08x}"


class Damaged(Exception):
    """A checkpoint whose files cannot be read or no longer match their checksums."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason  # short slug for the damaged/ folder name
        super().__init__(detail)


def _damage_or_environment(e: BaseException) -> BaseException:
    """`Damaged` for a read that failed on the checkpoint's content; the error itself for a
    failure of the environment (permission, I/O or disk errors, device memory), which must not
    move good checkpoints aside."""
    if environment_cause(e) is not None or "RESOURCE_EXHAUSTED" in str(e):
        return e
    return Damaged("unreadable", _first_line(e))


def _first_line(e: BaseException) -> str:
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:300]


def _verify(meta: dict, arrays: dict[str, Any], json_items: dict[str, Any]) -> None:
    """`Damaged` unless `arrays` and `json_items` (and `meta` itself) match the checksums
    recorded in `meta`. Checkpoints written before checksums existed are not checked."""
    if not isinstance(meta, dict):
        raise Damaged("meta", f"meta is not a JSON object: {str(meta)[:100]}")
    sums = meta.get("checksums")
    if sums is None:
        log.info("checkpoint step %s has no checksums (older format)", meta.get("step"))
        return
    own = {k: v for k, v in meta.items() if k != "checksums"}
    if integrity.json_checksum(own) != sums.get("meta"):
        raise Damaged("meta", "checksum mismatch in meta")
    for item, value in json_items.items():
        if integrity.json_checksum(value) != sums.get(item):
            raise Damaged("data-state" if item == "data" else item, f"checksum mismatch in {item}")
    for item, tree in arrays.items():
        bad = integrity.first_mismatch(sums.get(item, {}), integrity.array_checksums(tree))
        if bad is not None:
            raise Damaged("checksum", f"checksum mismatch in {item}/{bad}")


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
