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
from framework.train import build, nanfind, train
from framework.train import checkpoint as ckpt
from framework.train.config import Config
from framework.train.hooks import Hook, default_hooks
from framework.train.nonfinite import forward_order, param_paths
from framework.train.resume import Start, restore_or_init

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


def test_a_mid_network_blow_up_is_named_where_it_was_made(tmp_path):
    """One layer's weight so large that its MLP overflows: every gradient is NaN, and the
    message names that layer's MLP (not blocks/attn/k/bias, the first path). The config's
    train.steps (the stop comes at step 1): the same compiled step as the test below."""
    run = _build(tmp_path, "checkpoint.enabled=false", "train.log_every=1")
    state = run.init_state()
    up = state["params"]["blocks"]["mlp"]["up"]
    up["kernel"] = up["kernel"].at[1].set(1e38)  # layer 1 of the 2 stacked blocks
    with pytest.raises(NonFiniteError) as info:
        train(run, start=Start(state))
    msg = str(info.value)
    assert msg.startswith("non-finite values at step 1: loss=nan (the forward pass)")
    assert "the forward pass first makes a NaN/inf in transformer/blocks[1]/mlp;" in msg
    assert "first non-finite gradient: all" in msg and "blocks/attn/k/bias" not in msg
    assert msg.endswith("no checkpoint was written")


def test_first_made_skips_propagation_and_masking_constants():
    """The blamed layer is where a NaN/inf came from finite inputs: not a -inf mask, not the
    layers that merely carry it on; the scan iteration is the layer index."""
    sites = nanfind.Sites()

    def layers(x, scales):
        masked = jnp.where(jnp.arange(4) < 2, x, -jnp.inf)  # a -inf constant is not a blow-up
        x = x + jnp.exp(jnp.max(masked))

        def body(h, s):
            with jax.named_scope("grow"):
                return jnp.exp(h * s), None

        with jax.named_scope("blocks"):
            return jax.lax.scan(body, x, scales)[0].sum()

    f = jax.jit(nanfind.first_made(layers, sites))
    out, (site, layer) = f(jnp.arange(4.0), jnp.array([0.1, 0.1, 1000.0, 0.1]))
    assert not jnp.isfinite(out)
    assert (sites.name(int(site), int(layer)), int(layer)) == ("blocks[2]/grow", 2)
    _, (site, _) = f(jnp.arange(4.0), jnp.full(4, 0.1))
    assert int(site) == nanfind.NONE


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
    assert int(restore_or_init(run, directory).state["step"]) == 2  # complete: it restores


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
