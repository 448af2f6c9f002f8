"""Non-finite steps told truthfully (issue 10 item 7): the order leaves are named in, a start
state that is already bad, the stop message after an asynchronous save, and nonfinite=skip's
warnings and its stop when most recent steps were dropped."""

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from framework.config import load_config
from framework.errors import NonFiniteError
from framework.train import build, train
from framework.train import checkpoint as ckpt
from framework.train.config import Config
from framework.train.hooks import Hook, default_hooks
from framework.train.nonfinite import forward_order, param_paths
from framework.train.resume import Start

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/lm.yaml"
QUIET = ("train.eval_every=1000", "train.sample_tokens=0", "train.plot=false")


def _build(run_dir: Path, *overrides: str):
    cfg = load_config(Config, TINY, [f"run.dir={run_dir}", *QUIET, *overrides])
    return build(cfg, devices=jax.devices()[:1])


def _set(params: dict, path: str, value: float) -> dict:
    """A copy of `params` with every element of one leaf set to `value`."""
    *parents, last = path.split("/")
    out = jax.tree.map(lambda x: x, params)
    node = out
    for part in parents:
        node = node[part]
    node[last] = jnp.full_like(node[last], value)
    return out


def test_parameters_are_ordered_by_first_use_in_the_loss(tmp_path):
    run = _build(tmp_path, "checkpoint.enabled=false")
    batch = jax.eval_shape(lambda b: b, run.put(next(run.train_data)))
    paths = param_paths(run)
    order = [paths[i] for i in forward_order(run, batch)]
    assert sorted(order) == sorted(paths)
    assert order[0] == "embed/embedding"  # path order would start at blocks/attn/k/bias
    assert order.index("blocks/attn/q/kernel") < order.index("blocks/attn/o/kernel")
    assert order.index("blocks/attn/o/kernel") < order.index("blocks/mlp/down/kernel")
    assert order.index("blocks/mlp/down/kernel") < order.index("final_norm/scale")


def test_a_bad_parameter_in_the_start_state_is_named(tmp_path):
    run = _build(tmp_path, "checkpoint.enabled=false", "train.steps=2")
    state = run.init_state()
    state["params"] = _set(state["params"], "blocks/mlp/down/kernel", float("inf"))
    with pytest.raises(NonFiniteError, match=r"starting state: blocks/mlp/down/kernel$"):
        train(run, start=Start(state))


def test_forward_overflow_is_reported_as_such_not_as_the_first_path(tmp_path):
    """Huge but finite embeddings: the loss overflows in the forward pass and every gradient
    is NaN; the message says so instead of naming blocks/attn/k/bias."""
    run = _build(tmp_path, "checkpoint.enabled=false", "train.steps=2", "train.log_every=1")
    state = run.init_state()
    state["params"] = _set(state["params"], "embed/embedding", 3e38)
    with pytest.raises(NonFiniteError) as info:
        train(run, start=Start(state))
    msg = str(info.value)
    assert msg.startswith("non-finite values at step 1: loss=nan (the forward pass)")
    assert "first non-finite gradient: all" in msg and "blocks/attn/k/bias" not in msg
    assert msg.endswith("no checkpoint was written")


class _PoisonAfter(Hook):
    """Sets one parameter leaf to inf after step `at` (after that step's save started)."""

    every = 1

    def __init__(self, at: int):
        self.at = at

    def __call__(self, ctx):
        if ctx.step == self.at:
            ctx.state = ctx.state | {"params": _set(ctx.state["params"], "final_norm/scale", 1e38)}


def test_stop_message_names_the_checkpoint_saved_asynchronously(tmp_path):
    run = _build(tmp_path, "checkpoint.every=2", "checkpoint.async_save=true", "train.log_every=1")
    with pytest.raises(NonFiniteError) as info:
        train(run, [*default_hooks(run), _PoisonAfter(2)])
    msg = str(info.value)
    directory = ckpt.checkpoint_dir(run.run_dir)
    assert "at step 3" in msg and msg.endswith(f"last good checkpoint: step 2 in {directory}")
    assert ckpt.step_dirs(directory) == [2]


def test_skip_warns_at_each_log_line_and_stops_when_most_steps_are_dropped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="framework")
    run = _build(
        tmp_path,
        "optim.learning_rate=1e39",  # inf in float32: every update is non-finite
        "train.nonfinite=skip",
        "train.log_every=5",
        "train.steps=40",
        "checkpoint.enabled=false",
    )
    with pytest.raises(NonFiniteError, match=r"dropped 10 of the last 10 steps .*diverging"):
        train(run)
    warnings = [r.getMessage() for r in caplog.records if "nonfinite=skip" in r.getMessage()]
    assert warnings[0] == "train.nonfinite=skip: 5 of the last 5 steps skipped (5 in total)"
