"""Train state and the train / eval step functions (jitted by the builder).

The state is a plain dict {"step", "params", "opt_state", "model_state"}; the step's dropout
key is `fold_in(key(seed), step)`, so a resumed run draws exactly the keys it would have.
A model's loss is a mean over its counted items (tokens under the mask, examples) and reports
their count as `aux["weight"]`; micro-batches are combined weighted by that count, so the
gradient is the gradient of the mean over every counted item of the step, however the batch is
split. Every step flags which gradient and new parameter leaves are finite (one flag per leaf),
and a non-finite update is never applied: the step advances (so data order and dropout keys
stay those of an uninterrupted run) with the old state, which `nonfinite="skip"` trains on and
`nonfinite="stop"` keeps so the host can re-run the forward pass that blew up (`nonfinite`)."""

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
    """Fresh params (per-path keys), model state (e.g. batch-norm statistics), optimizer state
    (for the trainable params only)."""
    params = nn.init(model.spec(mcfg), key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(split_trainable(model, params)[0]),
        "model_state": nn.init(model.state_spec(mcfg), key),
    }


def _is_none(x: Any) -> bool:
    return x is None


def split_trainable(model: Model, params: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like params, None where the other has the leaf
    (model.trainable decides; every leaf trains without it, frozen is then None). Optimizer
    states and gradients are trees of the trainable part, so frozen leaves cost neither."""
    if model.trainable is None:
        return params, None
    mask = model.trainable(params)
    train = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return train, frozen


def combine(train: Any, frozen: Any) -> Any:
    """The params tree from `split_trainable`'s two parts."""
    if frozen is None:
        return train
    return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=_is_none)


def finite_leaves(tree: Any) -> jax.Array:
    """One flag per leaf (jax.tree.leaves order, None counting as a finite leaf, so the flags
    of a trainable part line up with the whole params tree): every element finite."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_none)
    if not leaves:
        return jnp.zeros((0,), bool)
    return jnp.stack([jnp.bool_(True) if x is None else jnp.all(jnp.isfinite(x)) for x in leaves])


def split_micro(batch: dict, n: int) -> dict:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        # Micro-batch i takes rows i, i+n, i+2n, ...: with the batch split over devices each
        # device keeps its own rows (a contiguous split would move rows between devices).
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def gradients(
    model: Model,
    mcfg: ModelConfig,
    params: Any,
    model_state: Any,
    batch: dict,
    key: jax.Array,
    grad_accum: int = 1,
) -> tuple[Any, dict, Any]:
    """(gradients, metrics, new model state) of the mean loss over every counted item of
    `batch`, accumulated over `grad_accum` micro-batches in a lax.scan. Each micro-batch's
    mean loss and metrics are weighted by its count (`aux["weight"]`), so uneven masks give the
    same result as one full batch. Gradients are those of the trainable part
    (`split_trainable`): frozen leaves are not differentiated (None in the tree)."""
    params, frozen = split_trainable(model, params)

    def loss_fn(p, mstate, mb, k):
        loss, aux = model.loss(combine(p, frozen), mb, mcfg, key=k, state=mstate)
        return loss, (
            dict(aux["metrics"], loss=loss),
            jnp.asarray(aux["weight"], jnp.float32),
            aux["state"],
        )

    if grad_accum == 1:
        (_, (metrics, _, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, batch, key
        )
        return grads, metrics, model_state

    def weighted(p, mstate, mb, k):  # the micro-batch's loss sum: mean x count
        loss, aux = loss_fn(p, mstate, mb, k)
        return loss * aux[1], aux

    grad_fn = jax.value_and_grad(weighted, has_aux=True)
    micro = split_micro(batch, grad_accum)

    def body(carry, xs):
        grads_sum, metrics_sum, weight_sum, mstate = carry
        i, mb = xs
        (_, (metrics, w, mstate)), g = grad_fn(params, mstate, mb, jax.random.fold_in(key, i))
        grads_sum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads_sum, g)
        metrics_sum = jax.tree.map(lambda a, m: a + w * m.astype(a.dtype), metrics_sum, metrics)
        return (grads_sum, metrics_sum, weight_sum + w, mstate), None

    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(weighted, params, model_state, first, key)[1][0]
    carry = (
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(lambda _: jnp.zeros((), jnp.float32), metric_shapes),
        jnp.zeros((), jnp.float32),
        model_state,
    )
    (grads, metrics, weight, model_state), _ = jax.lax.scan(
        body, carry, (jnp.arange(grad_accum), micro)
    )
    total = jnp.maximum(weight, 1.0)  # every item masked out: zero gradient, not NaN
    grads = jax.tree.map(lambda g: (g / total).astype(g.dtype), grads)
    metrics = {k: v / total for k, v in metrics.items()}
    return grads, metrics, model_state


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
    """`step(state, batch) -> (state, metrics)` (see `gradients` for micro-batching). The old
    params, optimizer and model state are kept when the loss, a gradient or a new parameter is
    not finite; `nonfinite="skip"` also counts those steps in metrics["skipped"]."""
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")

    def step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        params, frozen = split_trainable(model, state["params"])
        grads, metrics, model_state = gradients(
            model, mcfg, state["params"], state["model_state"], batch, key, grad_accum
        )
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = combine(optax.apply_updates(params, updates), frozen)
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "model_state": model_state,
        }
        # frozen params cannot change: only the updated part is checked (None counts finite)
        grad_finite = finite_leaves(grads)
        param_finite = finite_leaves(split_trainable(model, new_params)[0])
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(grad_finite) & jnp.all(param_finite)
        out = dict(
            metrics,
            grad_norm=optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads)),
            finite=finite,
            grad_finite=grad_finite,
            param_finite=param_finite,
        )
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state["step"] = state["step"] + 1
        if nonfinite == "skip":
            out["skipped"] = (~finite).astype(jnp.int32)
        if lr_schedule is not None:
            out["learning_rate"] = lr_schedule(state["step"])
        return new_state, out

    return step


def make_eval_step(model: Model, mcfg: ModelConfig) -> Callable:
    """`eval_step(params, model_state, batch) -> metrics` with key=None (no dropout, frozen
    statistics); metrics include "loss" and the batch's count "weight" for weighted means."""

    def eval_step(params, model_state, batch):
        loss, aux = model.loss(params, batch, mcfg, key=None, state=model_state)
        return dict(aux["metrics"], loss=loss, weight=jnp.asarray(aux["weight"], jnp.float32))

    return eval_step
