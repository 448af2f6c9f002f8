"""Config machinery against a toy schema: inheritance, overrides, one-line errors, run records."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import pytest
import yaml

from framework.config import (
    ConfigError,
    apply_overrides,
    dump_resolved,
    exit_on_config_error,
    load_config,
    load_yaml_tree,
    validate,
)
from framework.config.docs import reference_markdown, write_reference

_STRICT = pydantic.ConfigDict(extra="forbid", frozen=True)


class Optim(pydantic.BaseModel):
    """Optimizer settings."""

    model_config = _STRICT
    learning_rate: float = pydantic.Field(1e-3, gt=0, description="peak learning rate")
    betas: list[float] = pydantic.Field(default_factory=lambda: [0.9, 0.95], description="adam")


class Train(pydantic.BaseModel):
    """Training loop settings."""

    model_config = _STRICT
    batch_size: int = pydantic.Field(8, gt=0, description="global batch size")
    steps: int = pydantic.Field(10, ge=1, description="optimizer steps")
    optim: Optim = pydantic.Field(default_factory=Optim, description="optimizer")


class Mlp(pydantic.BaseModel):
    """A multilayer perceptron."""

    model_config = _STRICT
    name: Literal["mlp"] = "mlp"
    hidden: int = pydantic.Field(32, gt=0, description="hidden width")


class Gpt(pydantic.BaseModel):
    """A decoder-only transformer."""

    model_config = _STRICT
    name: Literal["gpt"] = "gpt"
    n_layers: int = pydantic.Field(2, gt=0, description="number of blocks")
    d_model: int = pydantic.Field(64, gt=0, description="residual width")


class Toy(pydantic.BaseModel):
    """The toy root config."""

    model_config = _STRICT
    seed: int = pydantic.Field(0, description="random seed")
    train: Train = pydantic.Field(default_factory=Train)
    model: Annotated[Mlp | Gpt, pydantic.Field(discriminator="name")] = pydantic.Field(
        default_factory=Mlp, description="which model"
    )
    tags: list[str] = pydantic.Field(default_factory=list, description="free-form labels")
    eval: Train | None = pydantic.Field(None, description="optional eval loop")


TOY_KEYS = [
    "seed",
    "train",
    "train.batch_size",
    "train.steps",
    "train.optim",
    "train.optim.learning_rate",
    "train.optim.betas",
    "model",
    "model.name",
    "model.hidden",
    "model.n_layers",
    "model.d_model",
    "tags",
    "eval",
    "eval.batch_size",
    "eval.optim.betas",
]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _error(schema, tree) -> str:
    with pytest.raises(ConfigError) as info:
        validate(schema, tree)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_base_inheritance_three_levels_deep_merge(tmp_path):
    _write(
        tmp_path / "root.yaml",
        """
        seed: 1
        tags: [a, b]
        train: {batch_size: 4, steps: 100, optim: {learning_rate: 1.0e-2, betas: [0.8, 0.9]}}
    """,
    )
    _write(
        tmp_path / "mid" / "mid.yaml",
        """
        base: ../root.yaml
        train: {steps: 200, optim: {learning_rate: 3e-4}}
        tags: [c]
    """,
    )
    leaf = _write(
        tmp_path / "mid" / "leaf.yaml",
        """
        base: mid.yaml
        train: {optim: {betas: [0.5, 0.6]}}
        model: {name: gpt, n_layers: 4}
    """,
    )
    tree = load_yaml_tree(leaf)
    assert "base" not in tree
    assert tree == {
        "seed": 1,
        "tags": ["c"],
        "model": {"name": "gpt", "n_layers": 4},
        "train": {
            "batch_size": 4,
            "steps": 200,
            "optim": {"learning_rate": 3e-4, "betas": [0.5, 0.6]},
        },
    }
    cfg = load_config(Toy, leaf)
    assert isinstance(cfg.model, Gpt) and cfg.model.n_layers == 4
    assert cfg.train.optim.learning_rate == pytest.approx(3e-4)


def test_overrides_convert_types_and_create_sections():
    tree = apply_overrides(
        {"train": {"steps": 1}},
        [
            "train.steps=3",
            "train.optim.learning_rate=1e-3",
            "seed=7",
            "tags=[x, y]",
            "eval=null",
            "model.name=gpt",
            "model.n_layers= 6",
            "train.optim.betas=[0.1,0.2]",
        ],
    )
    assert tree["train"]["steps"] == 3
    assert tree["train"]["optim"]["learning_rate"] == pytest.approx(1e-3)
    assert isinstance(tree["train"]["optim"]["learning_rate"], float)
    assert tree["tags"] == ["x", "y"] and tree["eval"] is None and tree["seed"] == 7
    assert apply_overrides({}, ["flag=true", "s=hello"]) == {"flag": True, "s": "hello"}
    cfg = validate(Toy, tree)
    assert cfg.model == Gpt(n_layers=6) and cfg.train.optim.betas == [0.1, 0.2]
    with pytest.raises(ConfigError, match="'train.steps'.*key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_override_does_not_mutate_input():
    tree = {"train": {"steps": 1}}
    apply_overrides(tree, ["train.steps=2"])
    assert tree == {"train": {"steps": 1}}


def test_unknown_key_suggests_closest_field():
    msg = _error(Toy, {"train": {"optim": {"lerning_rate": 1.0}}})
    assert msg == "train.optim.lerning_rate: unknown key (did you mean 'learning_rate'?)"
    msg = _error(Toy, {"model": {"name": "gpt", "n_layer": 3}})
    assert msg == "model.n_layer: unknown key (did you mean 'n_layers'?)"
    msg = _error(Toy, {"eval": {"batch_sise": 3}})
    assert msg == "eval.batch_sise: unknown key (did you mean 'batch_size'?)"
    assert _error(Toy, {"trian": {}}) == "trian: unknown key (did you mean 'train'?)"
    assert "did you mean" not in _error(Toy, {"zzzzzz": 1})


def test_unknown_key_through_override(tmp_path):
    path = _write(tmp_path / "c.yaml", "seed: 1\n")
    with pytest.raises(
        ConfigError,
        match=r"train\.optim\.lerning_rate: unknown key .*"
        r"'learning_rate'",
    ):
        load_config(Toy, path, ["train.optim.lerning_rate=1e-3"])


def test_wrong_type_and_out_of_range():
    msg = _error(Toy, {"train": {"steps": "many"}})
    assert msg.startswith("train.steps: ") and "integer" in msg and "'many'" in msg
    assert (
        _error(Toy, {"train": {"batch_size": -3}})
        == "train.batch_size: Input should be greater than 0 (got -3)"
    )
    msg = _error(Toy, {"model": {"name": "resnet"}})
    assert msg.startswith("model: ") and "resnet" in msg
    assert _error(Toy, {"tags": ["a", 3]}).startswith("tags[1]: ")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_yaml_tree(tmp_path / "nope.yaml")
    child = _write(tmp_path / "child.yaml", "base: missing_parent.yaml\n")
    with pytest.raises(ConfigError, match=r"missing_parent\.yaml: file not found"):
        load_yaml_tree(child)


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "seed: 1\ntrain: {steps: 3\nmodel: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML") as info:
        load_yaml_tree(bad)
    assert "\n" not in str(info.value)
    dup = _write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:2:1: invalid YAML: duplicate key 'seed'"):
        load_yaml_tree(dup)
    listy = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_yaml_tree(listy)
    assert load_yaml_tree(_write(tmp_path / "empty.yaml", "")) == {}


def test_inheritance_cycle(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> c\.yaml -> a\.yaml"):
        load_yaml_tree(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml_tree(tmp_path / "self.yaml")


def test_dump_resolved_round_trips(tmp_path):
    cfg = validate(
        Toy,
        {
            "model": {"name": "gpt"},
            "train": {"optim": {"learning_rate": 1e-5}},
            "eval": {"steps": 2},
        },
    )
    path = dump_resolved(cfg, tmp_path / "run" / "0")
    assert path == tmp_path / "run" / "0" / "config.yaml"
    assert load_config(Toy, path) == cfg
    info = yaml.safe_load((path.parent / "versions.yaml").read_text())
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["pydantic"] == pydantic.VERSION
    assert "git_revision" in info and "git_dirty" in info


def test_reference_markdown_lists_every_key(tmp_path):
    text = reference_markdown(Toy)
    for key in TOY_KEYS:
        assert f"`{key}`" in text, key
    assert "peak learning rate" in text and "> 0" in text
    assert 'name: "gpt"' in text and 'name: "mlp"' in text
    assert write_reference(Toy, tmp_path / "docs" / "config.md").read_text() == text


_SCRIPT = """
import sys
from typing import Literal
import pydantic
from framework.config import exit_on_config_error, load_config

class Train(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    batch_size: int = pydantic.Field(8, gt=0)

class Root(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    train: Train = Train()

with exit_on_config_error():
    load_config(Root, sys.argv[1], sys.argv[2:])
print("unreachable")
"""


def test_script_exits_2_with_one_line(tmp_path):
    script = _write(tmp_path / "script.py", _SCRIPT)
    cfg = _write(tmp_path / "cfg.yaml", "train: {batch_size: 3}\n")
    done = subprocess.run(
        [sys.executable, str(script), str(cfg), "train.batch_sze=4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "train.batch_sze" in lines[0] and "'batch_size'" in lines[0]
    assert lines[0].startswith("config error: ")


def test_exit_on_config_error_as_decorator(capsys):
    @exit_on_config_error()
    def run():
        raise ConfigError("a.b: broken\nacross lines")

    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    assert capsys.readouterr().err == "config error: a.b: broken across lines\n"
