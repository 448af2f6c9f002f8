"""Training: shipped configs, optimizer, gradient accumulation, loop metrics, non-finite."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from framework import models
from framework.config import load_config
from framework.errors import NonFiniteError
from framework.train import build, train
from framework.train.config import Config
from framework.train.optimizer import OptimConfig, decay_mask, make_optimizer, schedule
from framework.train.step import init_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(path, tmp_path):
    text = path.read_text()
    base = re.search(r"^base:\s*(\S+)", text, re.M)
    if base and base.group(1).startswith("../runs/"):
        # a config over an imported model's (convert_hf.py import writes runs/NAME/config.yaml,
        # absent here): validated over the tiny LM's config standing in for the import
        path = tmp_path / path.name
        path.write_text(text.replace(base.group(1), str(ROOT / "configs/tiny/lm.yaml"), 1))
    cfg = load_config(Config, path)
    assert cfg.model.name in models.REGISTRY


def test_inheritance_and_overrides_on_real_schema():
    cfg = load_config(
        Config,
        ROOT / "configs/tiny/lm.yaml",
        ["optim.learning_rate=0.5", "model.n_layers=3", "train.progress=true"],
    )
    assert cfg.optim.learning_rate == 0.5 and cfg.model.n_layers == 3 and cfg.train.progress
    assert cfg.optim.clip_norm == 1.0  # inherited from base.yaml
    assert cfg.run.name == "tiny_lm"


def test_schedule_warmup_and_decay():
    lr = schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(110)) == pytest.approx(0.1, abs=1e-6)
    lin = schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100
    )
    assert float(lin(50)) == pytest.approx(0.5)


def test_weight_decay_mask_skips_norms_biases_embeddings():
    params = {"embed": {"embedding": 1}, "ln": {"scale": 1, "bias": 1}, "w": {"kernel": 1}}
    mask = decay_mask(params, OptimConfig())
    assert mask == {
        "embed": {"embedding": False},
        "ln": {"scale": False, "bias": False},
        "w": {"kernel": True},
    }
    assert decay_mask(params, OptimConfig(decay_biases=True))["ln"]["bias"] is True


def _tiny_lm(**model_kw):
    cfg = load_config(Config, ROOT / "configs/tiny/lm.yaml")
    mcfg = cfg.model.model_copy(update={"vocab_size": 64, **model_kw})
    model = models.get("transformer")
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return model, mcfg, batch


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_gradient_accumulation_equals_full_batch(name):
    model, mcfg, batch = _tiny_lm()
    tx = make_optimizer(OptimConfig(name=name, learning_rate=1e-2, warmup_steps=0), 10)
    state = init_state(model, mcfg, tx, jax.random.key(1))
    full, m_full = jax.jit(make_train_step(model, mcfg, tx, seed=0))(state, batch)
    accum, m_acc = jax.jit(make_train_step(model, mcfg, tx, seed=0, grad_accum=4))(state, batch)
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-4)
    if name == "sgd":  # an update linear in the gradient: params must agree closely
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
            full["params"],
            accum["params"],
        )
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.abs(a - b).max(), full["params"], state["params"])
    )
    assert max(float(x) for x in moved) > 1e-4  # the step really changed the params


def _train(tmp_path, config="configs/tiny/lm.yaml", *overrides):
    cfg = load_config(Config, ROOT / config, [f"run.dir={tmp_path}", *overrides])
    return train(build(cfg))


def test_tiny_lm_learns_and_logs_metrics(tmp_path):
    summary = _train(tmp_path, "configs/tiny/lm.yaml", "train.tensorboard=true", "train.plot=true")
    run_dir = Path(summary["run_dir"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    evals = [x for x in lines if x["split"] == "eval"]
    for field in ("loss", "learning_rate", "grad_norm", "step_time", "tokens_per_s", "mfu"):
        assert field in train[-1], field
    assert [e["step"] for e in evals] == [30, 60]
    assert train[-1]["loss"] < 0.8 * np.log(64), train[-1]["loss"]
    assert evals[-1]["loss"] < evals[0]["loss"] < np.log(64)
    assert (run_dir / "config.yaml").exists() and (run_dir / "versions.yaml").exists()
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").iterdir())


def test_classifier_eval_reports_accuracy(tmp_path):
    summary = _train(tmp_path, "configs/tiny/mlp.yaml")
    assert summary["eval"]["accuracy"] > 0.5


def test_grad_accum_in_loop_and_sampling(tmp_path):
    summary = _train(
        tmp_path,
        "configs/tiny/lm.yaml",
        "train.grad_accum=2",
        "train.steps=6",
        "train.sample_tokens=5",
        "data.source=synthetic_lm",
    )
    assert summary["step"] == 6 and isinstance(summary["sample"], str)


def test_non_finite_loss_is_reported_with_its_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"at step \d+"):
        _train(
            tmp_path,
            "configs/tiny/lm.yaml",
            "optim.learning_rate=1e30",
            "optim.clip_norm=null",
            "optim.warmup_steps=0",
            "train.steps=10",
        )


def test_config_reference_is_current():
    from framework.config.docs import reference_markdown

    text = (ROOT / "docs/config.md").read_text()
    assert text.strip() == reference_markdown(Config).strip(), (
        "docs/config.md is stale: python -m framework.config.docs "
        "framework.train.config:Config -o docs/config.md"
    )


def test_profiler_trace_over_configured_steps(tmp_path):
    _train(
        tmp_path,
        "configs/tiny/lm.yaml",
        "train.steps=5",
        "train.profile_start=2",
        "train.profile_steps=2",
        "checkpoint.enabled=false",
    )
    traces = list((tmp_path / "tiny_lm" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_weight_decay_scales_with_the_learning_rate(name):
    """With zero gradients only decay moves params: about lr * wd per step, and never on
    biases/norm scales (catches a decay that ignores the learning rate)."""
    params = {"w": {"kernel": jnp.ones((4, 256)), "bias": jnp.ones((256,))}}
    lr, wd, steps = 1e-2, 0.1, 10
    tx = make_optimizer(
        OptimConfig(
            name=name,
            learning_rate=lr,
            warmup_steps=0,
            schedule="constant",
            weight_decay=wd,
            clip_norm=None,
        ),
        steps,
    )
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(steps):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    kernel = float(params["w"]["kernel"].mean())
    assert 1 - 2 * steps * lr * wd < kernel < 1 - 0.5 * steps * lr * wd, kernel
    np.testing.assert_array_equal(params["w"]["bias"], 1.0)


def test_no_held_out_data_skips_evaluation(tmp_path):
    summary = _train(
        tmp_path,
        "configs/tiny/lm.yaml",
        "train.steps=5",  # as the profiler test: the same compiled step
        "data.val_fraction=0",
        "checkpoint.enabled=false",
    )
    assert summary["step"] == 5 and summary["eval"] == {}
