"""Non-finite steps told truthfully: which value went bad first in the order the step computes
them, and how often `nonfinite=skip` has been dropping updates.

Each step reports a finite/non-finite flag per gradient leaf and per updated parameter leaf.
The host orders them the way the step computes them (parameters by their first use in the
traced loss, gradients in the reverse of that order, as the backward pass produces them), so a
NaN loss whose gradients are all NaN is reported as such instead of blaming whichever leaf
sorts first by name. The order is traced only when a non-finite step is reported."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from framework.errors import NonFiniteError
from framework.parallel import logical
from framework.train import checkpoint as ckpt
from framework.train import nanfind
from framework.train.build import Run
from framework.train.integrity import leaf_paths
from framework.train.step import finite_leaves, split_micro

log = logging.getLogger(__name__)
SKIP_WINDOW = 100  # recent steps over which nonfinite=skip's drop rate is judged
SKIP_MIN_STEPS = 10  # ... once at least this many have been seen


def _sub_jaxpr(eqn: Any) -> Any:
    """The inner jaxpr of a call-like equation (pjit, remat, scan, custom_vjp/jvp) whose inputs
    are the equation's inputs in order, else None."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(name)
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            return inner
    return None


def _is_var(v: Any) -> bool:
    return not hasattr(v, "val")  # Literals carry a value; Vars do not


def first_use_order(jaxpr: Any, n_leaves: int) -> list[int]:
    """Indices of the first `n_leaves` inputs of `jaxpr`, earliest first use first (inputs used
    inside the same scan/call are ordered by their use inside it; unused ones last)."""
    first: dict[int, int] = {}
    counter = 0

    def visit(inner: Any, names: dict) -> None:
        nonlocal counter
        for eqn in inner.eqns:
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                visit(
                    sub,
                    {
                        iv: names[ov]
                        for ov, iv in zip(eqn.invars, sub.invars, strict=True)
                        if _is_var(ov) and ov in names
                    },
                )
            for v in eqn.invars:
                if _is_var(v) and v in names:
                    first.setdefault(names[v], counter)
            counter += 1

    visit(jaxpr, {v: i for i, v in enumerate(jaxpr.invars[:n_leaves])})
    return sorted(range(n_leaves), key=lambda i: (first.get(i, counter), i))


def param_paths(run: Run) -> list[str]:
    """'/'-joined paths of the parameter leaves, in jax.tree.leaves order."""
    return leaf_paths(run.abstract_state["params"])


def forward_order(run: Run, batch_spec: Any) -> list[int]:
    """Parameter leaf indices in the order the loss first uses them (path order without a
    batch to trace with)."""
    params = run.abstract_state["params"]
    leaves, treedef = jax.tree.flatten(params)
    if batch_spec is None:
        return list(range(len(leaves)))

    def loss(flat, batch, state):
        p = jax.tree.unflatten(treedef, flat)
        return run.model.loss(p, batch, run.cfg.model, key=None, state=state)[0]

    try:
        jaxpr = jax.make_jaxpr(loss)(leaves, batch_spec, run.abstract_state["model_state"])
    except Exception:  # diagnosis must not hide the report: fall back to path order
        return list(range(len(leaves)))
    return first_use_order(jaxpr.jaxpr, len(leaves))


def _first_bad(flags: Sequence[bool], order: Sequence[int], paths: Sequence[str]) -> str:
    bad = [paths[i] for i in order if not flags[i]]
    if len(bad) == len(paths):
        return f"all {len(paths)} leaves"
    return f"{bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")


def made_in_forward(run: Run, state: dict) -> str | None:
    """Where the forward pass from `state` first makes a NaN/inf (`nanfind`), re-run on the
    first micro-batch of the next training batch (the bad step's own batch is gone), or None.
    Compiled only here, so healthy runs never pay for it."""
    sites = nanfind.Sites()

    def loss(params, model_state, batch):
        return run.model.loss(params, batch, run.cfg.model, key=None, state=model_state)[0]

    def made(params, model_state, batch):
        with logical.activate(run.mesh, run.rules):
            return nanfind.first_made(loss, sites)(params, model_state, batch)[1]

    batch = run.put(next(run.train_data))
    micro = jax.tree.map(lambda x: x[0], split_micro(batch, run.cfg.train.grad_accum))
    site, layer = jax.device_get(jax.jit(made)(state["params"], state["model_state"], micro))
    return None if site == nanfind.NONE else sites.name(int(site), int(layer))


def _made_in_forward_or_none(run: Run, state: dict) -> str | None:
    """`made_in_forward`, or None if the diagnosis itself fails (it must not hide the report)."""
    try:
        return made_in_forward(run, state)
    except Exception:  # noqa: BLE001 - any failure of the extra diagnosis
        log.warning("could not re-run the forward pass to find where it blew up", exc_info=True)
        return None


def describe(
    run: Run, step: int, m: dict, batch_spec: Any = None, before: dict | None = None
) -> str:
    """What went non-finite at `step`, first in computation order; `before`: the state the
    step started from (kept by the step), to find where its forward pass blew up."""
    loss = float(m["loss"])
    grads_ok, params_ok = np.asarray(m["grad_finite"]), np.asarray(m["param_finite"])
    paths, order = param_paths(run), forward_order(run, batch_spec)
    parts = [f"loss={loss}" + (" (the forward pass)" if not np.isfinite(loss) else "")]
    if before is not None and (where := _made_in_forward_or_none(run, before)) is not None:
        parts.append(
            f"re-run from the step's starting parameters (on the next batch), the forward pass "
            f"first makes a NaN/inf in {where}"
        )
    if not grads_ok.all():
        parts.append(f"first non-finite gradient: {_first_bad(grads_ok, order[::-1], paths)}")
    if not params_ok.all():
        where = _first_bad(params_ok, order, paths)
        parts.append(f"first non-finite parameter after the update: {where}")
    return f"non-finite values at step {step}: {'; '.join(parts)}"


def check_start(run: Run, state: dict) -> None:
    """NonFiniteError naming the parameters that are already non-finite in the state a run
    starts from (every later step's inputs are the previous step's checked outputs)."""
    replicated = NamedSharding(run.mesh, PartitionSpec())
    flags = jax.jit(finite_leaves, out_shardings=replicated)(state["params"])
    flags = np.asarray(flags.addressable_data(0))
    if not flags.all():
        where = _first_bad(flags, range(len(flags)), param_paths(run))
        raise NonFiniteError(f"non-finite parameters in the starting state: {where}")


def last_checkpoint(run: Run) -> str:
    """Where the run can resume from (call after in-flight saves have finished)."""
    directory = ckpt.checkpoint_dir(run.run_dir)
    steps = ckpt.step_dirs(directory)
    if not steps:
        return "no checkpoint was written"
    return f"last good checkpoint: step {steps[-1]} in {directory}"


class SkipMonitor:
    """nonfinite=skip: the drop rate over the last SKIP_WINDOW steps, and whether it is above
    train.max_skipped_fraction (the run is diverging, not hitting the odd bad batch)."""

    def __init__(self, limit: float):
        self.limit = limit
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)

    def add(self, skipped: Sequence[bool]) -> None:
        self.recent.extend(bool(s) for s in skipped)

    def too_many(self) -> str | None:
        """A one-line reason to stop, or None."""
        n, dropped = len(self.recent), sum(self.recent)
        if n >= SKIP_MIN_STEPS and dropped > self.limit * n:
            return (
                f"train.nonfinite=skip dropped {dropped} of the last {n} steps (more than "
                f"train.max_skipped_fraction={self.limit}): the run is diverging"
            )
        return None
