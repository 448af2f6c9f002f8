"""`build(cfg) -> Run`: everything a run needs, decided once, before anything trains.

Every script (train, bench, inspect, tests) builds through this, so a benchmark measures the
exact sharded program that training runs. Building reads the data's metadata, fits the model
config to it (the model owns that check), lays out the mesh and every sharding (layout errors
surface here, before any compile), and jits the train and eval steps. It touches no file on
disk: the run directory is the loop's business."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from framework import finetune, models, nn
from framework.data import EvalSet, Loader, describe, make_loaders
from framework.errors import ConfigError
from framework.models.registry import Model
from framework.parallel import logical
from framework.parallel.distributed import initialize
from framework.parallel.mesh import make_mesh
from framework.parallel.sharding import check_batch, logical_shardings, put_batch
from framework.train.config import Config
from framework.train.memory import check_fits
from framework.train.optimizer import make_optimizer, schedule
from framework.train.step import (
    State,
    init_state,
    make_eval_step,
    make_train_step,
    split_trainable,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """A built run: the resolved config and the objects derived from it (frozen)."""

    cfg: Config  # resolved: fields the data decides (e.g. model.vocab_size) are filled in
    model: Model
    mesh: Mesh
    rules: Mapping[str, Any]
    tx: optax.GradientTransformation
    shardings: dict  # of the state {"step", "params", "opt_state", "model_state"}
    abstract_state: dict  # jax.ShapeDtypeStruct per leaf, carrying those shardings
    train_step: Callable  # jit: (state, placed batch) -> (state, metrics); donates the state
    eval_step: Callable  # jit: (params, model_state, placed batch) -> metrics
    train_data: Loader | None  # this process's rows of each batch (None: built without data)
    eval_set: EvalSet | None
    data_meta: Mapping[str, Any]  # see framework.data.describe

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir) / self.cfg.run.name

    @property
    def is_lm(self) -> bool:
        """Token data (batches of sequences) rather than examples."""
        return self.data_meta["kind"] == "lm"

    @property
    def items_per_step(self) -> int:
        """Tokens (language models) or examples trained on per optimizer step."""
        return self.cfg.data.batch_size * (self.cfg.data.seq_len if self.is_lm else 1)

    @property
    def flops_per_token(self) -> float | None:
        """The model's FLOPs per trained token (for MFU), where the model defines them."""
        if self.model.flops_per_token is None or not self.is_lm:
            return None
        return self.model.flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def init_state(self, seed: int | None = None) -> State:
        """Fresh state, created already sharded (never whole on one device)."""
        key = jax.random.key(self.cfg.run.seed if seed is None else seed)
        fresh = lambda k: init_state(self.model, self.cfg.model, self.tx, k)  # noqa: E731
        return jax.jit(fresh, out_shardings=self.shardings)(key)

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's host batch -> global arrays sharded over the mesh."""
        return put_batch(batch, self.mesh, self.rules, sequence=self.is_lm)


def _traced(fn: Callable, mesh: Mesh, rules: Mapping[str, Any]) -> Callable:
    """`fn` traced with the mesh's logical rules active, so layers constrain activations."""

    def wrapped(*args):
        with logical.activate(mesh, rules):
            return fn(*args)

    return wrapped


def state_shardings(
    model: Model,
    mcfg: Any,
    tx: optax.GradientTransformation,
    shapes: State,
    mesh: Mesh,
    rules: Mapping[str, Any],
) -> dict:
    """Shardings of the state dict: params and model state from the model's logical axes; each
    optimizer-state tree shaped like the params (optax's tree_map_params finds them) takes the
    params' shardings leaf by leaf where shapes agree; the rest (counts, factored moments) is
    replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = logical_shardings(
        nn.logical_axes(model.spec(mcfg)), shapes["params"], mesh, rules, "param"
    )

    def like_param(leaf, param_sharding, param_shape):
        return param_sharding if leaf.shape == param_shape.shape else replicated

    opt_state = optax.tree_utils.tree_map_params(
        tx,
        like_param,
        shapes["opt_state"],
        split_trainable(model, params)[0],  # the optimizer holds the trainable part only
        split_trainable(model, shapes["params"])[0],
        transform_non_params=lambda _: replicated,
    )
    model_state = logical_shardings(
        nn.logical_axes(model.state_spec(mcfg)), shapes["model_state"], mesh, rules, "model state"
    )
    return {
        "step": replicated,
        "params": params,
        "opt_state": opt_state,
        "model_state": model_state,
    }


def _jit_steps(model, cfg, tx, lr, shardings, mesh, rules) -> tuple[Callable, Callable]:
    """The train step (state donated) and the eval step, jitted with the state's shardings and
    traced with the mesh's logical rules active."""
    replicated = NamedSharding(mesh, PartitionSpec())
    step = make_train_step(
        model,
        cfg.model,
        tx,
        seed=cfg.run.seed,
        grad_accum=cfg.train.grad_accum,
        lr_schedule=lr,
        nonfinite=cfg.train.nonfinite,
    )
    train_step = jax.jit(
        _traced(step, mesh, rules),
        in_shardings=(shardings, None),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        _traced(make_eval_step(model, cfg.model), mesh, rules),
        in_shardings=(shardings["params"], shardings["model_state"], None),
        out_shardings=replicated,
    )
    return train_step, eval_step


class _Plan(NamedTuple):
    """The model fitted to the data and the state's layout, before anything is allocated."""

    cfg: Config
    mesh: Mesh
    rules: dict
    tx: optax.GradientTransformation
    shardings: dict
    abstract: dict


def _plan(
    cfg: Config,
    model: Model,
    meta: Mapping[str, Any],
    devices: list | None,
    mesh: AbstractMesh | None = None,
) -> _Plan:
    """Fit the model to the data's metadata, lay out the mesh and the state's shardings, and
    refuse (ConfigError) a run that cannot fit its devices: all without allocating. With an
    abstract `mesh` (compiling for devices this host lacks) the memory check is skipped."""
    cfg = cfg.model_copy(update={"model": cfg.model.for_data(meta)})
    is_lm = meta["kind"] == "lm"
    abstract_only = mesh is not None
    mesh = make_mesh(cfg.mesh, devices) if mesh is None else mesh
    rules = dict(cfg.mesh.rules)
    check_batch(mesh, rules, cfg.data.batch_size, cfg.data.seq_len if is_lm else None)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shapes = jax.eval_shape(lambda k: init_state(model, cfg.model, tx, k), jax.random.key(0))
    shardings = state_shardings(model, cfg.model, tx, shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    if not abstract_only:
        check_fits(cfg, abstract, mesh, is_lm)
    return _Plan(cfg, mesh, rules, tx, shardings, abstract)


def model_for(cfg: Config) -> Model:
    """The config's registered model, transformed as `finetune` says (LoRA adapters)."""
    model = models.get(cfg.model.name)
    if cfg.finetune.lora is not None:
        model = finetune.wrap(model, cfg.finetune.lora)
    return model


def lm_meta(cfg: Config, what: str) -> Mapping[str, Any]:
    """The data's metadata for planning a language model's step without reading the data;
    ConfigError unless the data is tokens and the vocabulary is known. `what` names the caller
    in the error ("the estimator", "GPU export")."""
    meta = describe(cfg.data)
    if meta["kind"] != "lm":
        raise ConfigError(f"data.source {cfg.data.source!r}: {what} takes language models")
    if meta["vocab_size"] is None and getattr(cfg.model, "vocab_size", None) is None:
        raise ConfigError("model.vocab_size: set it (token files give it only once read)")
    return meta


def _known_unread(cfg: Config, meta: Mapping[str, Any]) -> bool:
    """Whether the data's metadata fixes every shape before reading it (token files tell
    their vocabulary only once read, unless model.vocab_size is set)."""
    vocab = meta["vocab_size"] or getattr(cfg.model, "vocab_size", None)
    return meta["kind"] != "lm" or vocab is not None


def build(cfg: Config, devices: list | None = None, *, read_data: bool = True) -> Run:
    """Build a run from a validated config; ConfigError/DataError for user mistakes.
    `read_data=False` skips the loaders (inspecting or sizing a run without its data): the
    model is then fitted to what `framework.data.describe` knows. Shapes and sizes are
    checked before the data is read where its metadata allows (a typo in data.seq_len must
    not first generate gigabytes of tokens)."""
    initialize(cfg.mesh.distributed)  # before any backend use; no-op for one process
    model = model_for(cfg)
    meta = describe(cfg.data)
    plan = _plan(cfg, model, meta, devices) if _known_unread(cfg, meta) or not read_data else None
    train_data = eval_set = None
    if read_data:
        train_data, eval_set, meta = make_loaders(
            cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if plan is None or plan.cfg.model != cfg.model.for_data(meta):
            plan = _plan(cfg, model, meta, devices)
    cfg, mesh, rules, tx = plan.cfg, plan.mesh, plan.rules, plan.tx
    lr = schedule(cfg.optim, cfg.train.steps)
    train_step, eval_step = _jit_steps(model, cfg, tx, lr, plan.shardings, mesh, rules)
    return Run(
        cfg=cfg,
        model=model,
        mesh=mesh,
        rules=rules,
        tx=tx,
        shardings=plan.shardings,
        abstract_state=plan.abstract,
        train_step=train_step,
        eval_step=eval_step,
        train_data=train_data,
        eval_set=eval_set,
        data_meta=meta,
    )


def compile_step(run: Run, state: State, batch: Mapping[str, jax.Array]) -> tuple[Callable, float]:
    """(the train step compiled ahead of time for these arguments, the FLOPs XLA counts for one
    step on one device, from its cost analysis of the partitioned program). NaN where that
    count is incomplete: XLA counts a loop body once, so a step with loops (layers under
    lax.scan, gradient accumulation) would be undercounted."""
    compiled = run.train_step.lower(state, batch).compile()
    if re.search(r"\bwhile\(", compiled.as_text()):
        return compiled, math.nan
    return compiled, float(compiled.cost_analysis().get("flops", math.nan))
