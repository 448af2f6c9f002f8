"""Train state and the jitted train / eval steps.

The state is a plain dict {"step", "params", "opt_state", "model_state"}; the step's dropout
key is `fold_in(key(seed), step)`, so a resumed run draws exactly the keys it would have.
Every step reports which gradient / new parameter leaf is first non-finite (-1: none), and with
`nonfinite="skip"` a non-finite update is dropped inside the jitted step (the step still
advances, so data order and dropout keys stay those of an uninterrupted run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from framework import nn
from framework.models.registry import Model, ModelConfig

State = dict[str, Any]


def init_state(
    model: Model, mcfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array
) -> State:
    """Fresh params (per-path keys), model state (e.g. batch-norm statistics), optimizer state."""
    params = nn.init(model.spec(mcfg), key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "model_state": nn.init(model.state_spec(mcfg), key),
    }


def first_nonfinite(tree: Any) -> jax.Array:
    """Index (in jax.tree.leaves order) of the first leaf holding a NaN/inf, else -1."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.int32(-1)
    ok = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    return jnp.where(jnp.all(ok), -1, jnp.argmin(ok)).astype(jnp.int32)


def _split_micro(batch: dict, n: int) -> dict:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        # Micro-batch i takes rows i, i+n, i+2n, ...: with the batch split over devices each
        # device keeps its own rows (a contiguous split would move rows between devices).
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    model: Model,
    mcfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    grad_accum: int = 1,
    lr_schedule: Callable[[Any], Any] | None = None,
    nonfinite: str = "stop",
) -> Callable:
    """`step(state, batch) -> (state, metrics)`; gradients are averaged over `grad_accum`
    micro-batches inside one jitted call (lax.scan), equal to the full batch's gradient when
    micro-batches carry equal token counts. `nonfinite="skip"` keeps the old params, optimizer
    and model state when the loss, a gradient or a new parameter is not finite."""
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")

    def loss_and_grad(params, model_state, batch, key):
        def f(p):
            return model.loss(p, batch, mcfg, key=key, state=model_state)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, aux, grads

    def step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        params = state["params"]
        if grad_accum == 1:
            loss, aux, grads = loss_and_grad(params, state["model_state"], batch, key)
            metrics, model_state = aux["metrics"], aux["state"]
        else:
            micro = _split_micro(batch, grad_accum)

            def body(carry, xs):
                grads_sum, metrics_sum, mstate = carry
                i, mb = xs
                _, aux, g = loss_and_grad(params, mstate, mb, jax.random.fold_in(key, i))
                add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
                return (
                    jax.tree.map(add, grads_sum, g),
                    jax.tree.map(add, metrics_sum, aux["metrics"]),
                    aux["state"],
                ), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            metric_shapes = jax.eval_shape(
                lambda: loss_and_grad(
                    params, state["model_state"], jax.tree.map(lambda x: x[0], micro), key
                )[1]["metrics"]
            )
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
            (grads, metrics, model_state), _ = jax.lax.scan(
                body, (zeros_g, zeros_m, state["model_state"]), (jnp.arange(grad_accum), micro)
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
            loss = metrics["loss"]
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "model_state": model_state,
        }
        grad_norm = jnp.sqrt(
            sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
        )
        bad_grad, bad_param = first_nonfinite(grads), first_nonfinite(new_params)
        finite = jnp.isfinite(loss) & (bad_grad < 0) & (bad_param < 0)
        out = dict(
            metrics,
            loss=loss,
            grad_norm=grad_norm,
            finite=finite,
            bad_grad=bad_grad,
            bad_param=bad_param,
        )
        if nonfinite == "skip":
            kept = {k: v for k, v in state.items() if k != "step"}
            new_state = {"step": new_state["step"]} | jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                {k: v for k, v in new_state.items() if k != "step"},
                kept,
            )
            out["skipped"] = (~finite).astype(jnp.int32)
        if lr_schedule is not None:
            out["learning_rate"] = lr_schedule(state["step"])
        return new_state, out

    return step


def make_eval_step(model: Model, mcfg: ModelConfig) -> Callable:
    """`eval_step(params, model_state, batch) -> metrics` with key=None (no dropout, frozen
    statistics)."""

    def eval_step(params, model_state, batch):
        _, aux = model.loss(params, batch, mcfg, key=None, state=model_state)
        return aux["metrics"]

    return eval_step
