"""Optional Weights & Biases logging (`metrics.wandb`): the scalars of metrics.jsonl, mirrored.

`WandbTracker.write` takes what `MetricsWriter.write` takes and logs the same numbers at the same
step under the names TensorBoard uses (`train/loss`, `eval/loss`); like TensorBoard, non-finite
values stay only in metrics.jsonl (as null). Only process 0 logs. The W&B run's id is kept in
`<run dir>/wandb_id.txt`: a run resumed from a checkpoint continues the same W&B run
(`resume="allow"`), a run starting at step 0 gets a new one (W&B drops steps below a run's last).
wandb is an optional dependency (`pip install -e '.[track]'`); it is imported only when
`metrics.wandb` is set, and its absence is a ConfigError naming the key."""

from __future__ import annotations

import importlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from framework.errors import ConfigError
from framework.train.metrics import scalars, to_number

ID_FILE = "wandb_id.txt"
INSTALL_HINT = "pip install -e '.[track]'"


def check_available(settings: Any) -> None:
    """ConfigError (one line naming `metrics.wandb`) when it is set but wandb cannot be imported.
    Every process checks, so they all fail alike, before anything is compiled."""
    if settings is None:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise ConfigError(
            f"metrics.wandb is set but the wandb package is not installed: run {INSTALL_HINT} "
            "(or remove metrics.wandb)"
        ) from None


def run_id(run_dir: Path, start_step: int) -> tuple[str, bool]:
    """(the W&B run id, whether it continues an earlier W&B run): the id in `wandb_id.txt` when
    the run resumes from a checkpoint (start_step > 0), else a new one written there."""
    path = run_dir / ID_FILE
    if start_step > 0 and path.exists():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored, True
    new = secrets.token_hex(4)  # 8 characters of [0-9a-f], like wandb's own ids
    tmp = path.with_name(ID_FILE + ".tmp")
    tmp.write_text(new + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return new, False


class WandbTracker:
    """Log metrics to a W&B run; a no-op when `settings` is None or on any process but 0.

    `settings` is the config's `metrics.wandb` (project, name, mode), `run_name` the default
    W&B name (run.name), `config` the resolved config shown in W&B, `start_step` the step the
    training starts from (0: a new W&B run; else the one in `<run_dir>/wandb_id.txt`)."""

    def __init__(
        self,
        settings: Any,
        run_dir: str | Path,
        *,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = settings is not None and jax.process_index() == 0
        self._run: Any = None
        self.id: str | None = None
        self.resumed = False  # whether the W&B run continues one from before a restart
        if not self.enabled:
            return
        check_available(settings)
        import wandb  # only here: an optional dependency

        self.id, self.resumed = run_id(self.run_dir, int(start_step))
        kwargs: dict[str, Any] = {}
        if settings.project is not None:
            kwargs["project"] = settings.project
        if settings.mode is not None:  # else wandb reads $WANDB_MODE (default online)
            kwargs["mode"] = settings.mode
        try:
            self._run = wandb.init(
                id=self.id,
                resume="allow",
                name=settings.name or run_name,
                # $WANDB_DIR if set, else the run directory: <dir>/wandb/<offline-run-...>
                dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
                config=dict(config or {}),
                **kwargs,
            )
        except wandb.errors.Error as e:  # no API key, a bad one, no network: one line
            raise ConfigError(
                f"metrics.wandb: {e} (or set metrics.wandb.mode=offline and `wandb sync` later)"
            ) from e

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        """Log `metrics` at `step` as `split/name`, as MetricsWriter.write sends to TensorBoard."""
        if self._run is None:
            return
        data = scalars({name: to_number(name, value) for name, value in metrics.items()}, split)
        if data:
            self._run.log(data, step=int(step))

    def close(self) -> None:
        """Finish the W&B run (flushes it); safe to call twice."""
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
