"""Optimizer from config through optax: adamw / sgd / adafactor, warmup + decay schedule,
global-norm clipping, and weight decay masked off norms, biases and embeddings."""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax
import pydantic


class OptimConfig(pydantic.BaseModel):
    """Optimizer, learning-rate schedule and regularization."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw", "sgd", "adafactor"] = pydantic.Field("adamw", description="optimizer")
    learning_rate: float = pydantic.Field(3e-4, gt=0, description="peak learning rate")
    warmup_steps: int = pydantic.Field(100, ge=0, description="linear warmup from 0")
    schedule: Literal["cosine", "linear", "constant"] = pydantic.Field(
        "cosine", description="decay after warmup, down to min_lr_ratio * learning_rate"
    )
    min_lr_ratio: float = pydantic.Field(0.1, ge=0, le=1, description="final lr / peak lr")
    b1: float = pydantic.Field(0.9, ge=0, lt=1, description="adam beta1")
    b2: float = pydantic.Field(0.95, ge=0, lt=1, description="adam beta2")
    eps: float = pydantic.Field(1e-8, gt=0, description="adam epsilon")
    momentum: float = pydantic.Field(0.9, ge=0, lt=1, description="sgd momentum (0 = none)")
    nesterov: bool = pydantic.Field(False, description="sgd nesterov momentum")
    weight_decay: float = pydantic.Field(0.1, ge=0, description="decoupled weight decay")
    decay_norms: bool = pydantic.Field(False, description="apply weight decay to norm scales")
    decay_biases: bool = pydantic.Field(False, description="apply weight decay to biases")
    decay_embeddings: bool = pydantic.Field(False, description="apply weight decay to embeddings")
    clip_norm: float | None = pydantic.Field(1.0, gt=0, description="global-norm clip; null=off")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine/linear decay to min_lr_ratio * peak at
    total_steps (or constant): optax's warmup schedules, joined by hand only for linear."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, 1), end)
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.warmup_constant_schedule(0.0, peak, warmup)
    decay = optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """True where weight decay applies. By naming convention of framework.nn: leaves named
    "scale" are norm scales, "bias" biases, "embedding" embedding tables."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return cfg.decay_norms
        if name == "bias":
            return cfg.decay_biases
        if name == "embedding":
            return cfg.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The full optax chain for `cfg` (clipping first, then the optimizer with its schedule)."""
    lr = schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg)  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.name == "sgd":
        # Momentum on the gradient only; decay added after it and scaled by the lr, so it is
        # decoupled (lr * wd * param per step) as in adamw, not amplified by the momentum.
        opt = optax.chain(
            optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.scale_by_learning_rate(lr),
        )
    else:
        # optax adds adafactor's decay after the lr scaling: scale it by the schedule so it is
        # decoupled weight decay like adamw's (lr * wd * param), not wd * param per step.
        decay = (lambda step: cfg.weight_decay * lr(step)) if cfg.weight_decay else None
        opt = optax.adafactor(lr, weight_decay_rate=decay, weight_decay_mask=mask)
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
