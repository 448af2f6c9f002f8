"""The one typed schema for a run: YAML files under configs/ are data for it.

Each component owns its section's class (models, data, optimizer); this file composes them.
The `model` section is a union of every registered model config, told apart by `name`."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import pydantic

from framework.data.config import DataConfig
from framework.finetune import FinetuneConfig
from framework.models import REGISTRY
from framework.parallel.mesh import MeshConfig
from framework.train.checkpoint import KEYWORDS, CheckpointConfig
from framework.train.optimizer import OptimConfig

_FROZEN = pydantic.ConfigDict(extra="forbid", frozen=True)

ModelSection = Annotated[
    Union[tuple(m.config for m in REGISTRY.values())],  # noqa: UP007
    pydantic.Field(discriminator="name"),
]


class RunConfig(pydantic.BaseModel):
    """Where the run lives and how it is seeded."""

    model_config = _FROZEN
    name: str = pydantic.Field(
        "run", min_length=1, max_length=128, description="run directory name (one path component)"
    )
    dir: str = pydantic.Field("runs", description="parent folder of run directories")
    seed: int = pydantic.Field(0, ge=0, lt=2**32, description="seed for params and dropout keys")

    @pydantic.field_validator("name")
    @classmethod
    def _one_component(cls, name: str) -> str:
        """The run directory must stay inside run.dir: no separators, no `.` or `..`."""
        if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
            raise ValueError("must be a single directory name (no '/', '..' or '.')")
        return name


class TrainConfig(pydantic.BaseModel):
    """Training loop: length, accumulation, logging, evaluation, profiling, sampling."""

    model_config = _FROZEN
    steps: int = pydantic.Field(1000, gt=0, description="optimizer steps")
    grad_accum: int = pydantic.Field(1, gt=0, description="micro-batches per step (scan)")
    log_every: int = pydantic.Field(10, gt=0, description="steps between metric lines")
    eval_every: int = pydantic.Field(200, gt=0, description="steps between evaluations")
    eval_batches: int = pydantic.Field(8, gt=0, description="batches per evaluation")
    progress: bool = pydantic.Field(True, description="progress bar (plain lines if no TTY)")
    tensorboard: bool = pydantic.Field(True, description="write TensorBoard event files")
    plot: bool = pydantic.Field(True, description="write PNG plots at the end")
    profile_start: int | None = pydantic.Field(None, ge=1, description="first profiled step")
    profile_steps: int = pydantic.Field(5, gt=0, description="steps in the profiler trace")
    sample_tokens: int = pydantic.Field(0, ge=0, description="tokens sampled at the end (LM)")
    sample_prompt: str = pydantic.Field("def ", description="prompt for the final sample")
    sample_temperature: float = pydantic.Field(0.8, gt=0, description="sampling temperature")
    nonfinite: Literal["stop", "skip"] = pydantic.Field(
        "stop",
        description="non-finite loss/gradient/param: stop (name the first bad leaf, "
        "keep the last good checkpoint) or skip the update (counted)",
    )
    max_skipped_fraction: float = pydantic.Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="with nonfinite=skip: stop (exit 1) when more than this share of the last "
        "100 steps (judged from 10 on) was skipped: the run is diverging",
    )
    stop_at: int | None = pydantic.Field(
        None,
        gt=0,
        description="stop after this step with a checkpoint, as a preemption "
        "would (the schedule still spans train.steps)",
    )


class WandbConfig(pydantic.BaseModel):
    """Weights & Biases: the metrics of metrics.jsonl also go to a W&B run (process 0 only)."""

    model_config = _FROZEN
    project: str | None = pydantic.Field(
        None, min_length=1, description="W&B project (None: $WANDB_PROJECT, else W&B's default)"
    )
    name: str | None = pydantic.Field(
        None, min_length=1, description="W&B run name (None: run.name)"
    )
    mode: Literal["online", "offline", "disabled"] | None = pydantic.Field(
        None,
        description="online: stream to the server; offline: write under <run dir>/wandb for "
        "`wandb sync`; disabled: log nothing; None: $WANDB_MODE, else online",
    )


class MetricsConfig(pydantic.BaseModel):
    """Where metrics go besides metrics.jsonl and TensorBoard (train.tensorboard)."""

    model_config = _FROZEN
    wandb: WandbConfig | None = pydantic.Field(
        None,
        description="log to Weights & Biases (needs pip install -e '.[track]'); None: off",
    )


class Config(pydantic.BaseModel):
    """A whole run: run, model, data, optim, train, mesh, checkpoint, finetune, metrics."""

    model_config = _FROZEN
    run: RunConfig = RunConfig()
    model: ModelSection
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    metrics: MetricsConfig = MetricsConfig()

    @pydantic.model_validator(mode="after")
    def _check_batch(self):
        if self.data.batch_size % self.train.grad_accum:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"train.grad_accum ({self.train.grad_accum})"
            )
        if self.finetune.lora is not None and self.checkpoint.resume in KEYWORDS:
            raise ValueError(
                "finetune.lora adapts pretrained weights: set checkpoint.resume to the base "
                f"run's directory (e.g. an imported Hugging Face model), not "
                f"{self.checkpoint.resume!r}"
            )
        return self
