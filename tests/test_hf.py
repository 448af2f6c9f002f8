"""Hugging Face import/export (framework.hf, scripts/convert_hf.py) against transformers.

Tiny random models of every supported architecture are saved locally in float32, imported,
and their framework logits compared with transformers' (1e-4 relative); exported back, they
load with from_pretrained with no missing keys, bitwise-equal state dicts and equal logits.
Both config.json layouts, keys whose reading transformers defines (rope precedence, aliases,
ignored biases), sharded import/export (and re-export into the same folder), bf16 checkpoints
and --param-dtype, the export of a run never imported, resuming a run from an imported folder
and every bad input (one line, exit status 2) are covered."""

import json
import shutil
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_models  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from framework.config import load_config  # noqa: E402
from framework.errors import ConfigError  # noqa: E402
from framework.hf import export_run, import_checkpoint, load, target  # noqa: E402
from framework.models.transformer import TransformerConfig  # noqa: E402
from framework.train.checkpoint import flatten_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{variant: (directory, torch model)} saved in float32 (one tokenizer.json, for gpt2)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in hf_models.VARIANTS:
        model = hf_models.build(name)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    hf_models.tiny_tokenizer(root / "gpt2" / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def roundtrip(hf, tmp_path_factory):
    """{variant: (imported folder, exported folder)}."""
    root = tmp_path_factory.mktemp("roundtrip")
    out = {}
    for name, (path, _) in hf.items():
        imported, exported = root / f"{name}_fw", root / f"{name}_hf"
        import_checkpoint(path, imported)
        export_run(imported, exported)
        out[name] = (imported, exported)
    return out


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_import_logits_match_transformers(hf, name):
    path, model = hf[name]
    cfg, params, _ = load(path)
    ref = hf_models.logits(model, hf_models.IDS).numpy()
    got = hf_models.framework_logits(cfg, params)
    err = hf_models.rel(got, ref)
    print(f"{name}: import max relative logit error {err:.2e}")
    assert err < hf_models.TOL, (name, err)
    # the options under test change the result (the comparison is not vacuous)
    for field in ("sliding_window", "rope_scaling"):
        if getattr(cfg, field) is not None:
            assert (
                hf_models.rel(
                    hf_models.framework_logits(cfg.model_copy(update={field: None}), params), ref
                )
                > 1e-3
            )


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_export_loads_bitwise_equal(hf, roundtrip, name):
    _, model = hf[name]
    _, exported = roundtrip[name]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back) is type(model)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # tied unembeddings appear under both names, equal to the embedding
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.equal(
        hf_models.logits(back.eval(), hf_models.IDS), hf_models.logits(model, hf_models.IDS)
    )


def test_import_folder_contents(hf, roundtrip):
    imported, exported = roundtrip["gpt2"]
    cfg = load_config(_config_class(), imported / "config.yaml")
    assert Path(cfg.data.tokenizer) == imported / "tokenizer.json"
    assert cfg.data.seq_len <= cfg.model.max_seq_len and cfg.checkpoint.resume == str(imported)
    assert cfg.run.name == f"{imported.name}_finetune"  # never trains into the import folder
    assert json.loads((imported / "hf.json").read_text())["architecture"] == "GPT2LMHeadModel"
    assert (exported / "tokenizer.json").read_bytes() == (
        hf["gpt2"][0] / "tokenizer.json"
    ).read_bytes()
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not (
        roundtrip["qwen2_window"][1] / "tokenizer.json"
    ).exists()  # byte-level: none written


def _config_class():
    from framework.train.config import Config

    return Config


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_both_config_layouts(hf, tmp_path):
    path, _ = hf["llama3_gqa"]
    cfg, params, _ = load(path)
    assert (
        json.loads((path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    )

    def published(c, key):  # rope_theta + rope_scaling with `type` or `rope_type`
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        c["rope_scaling"] = rope | {key: kind}

    for key in ("type", "rope_type"):
        old = _rewrite(path, tmp_path / key, lambda c, key=key: published(c, key))
        cfg2, params2, _ = load(old)
        assert cfg2 == cfg and cfg2.rope_scaling.type == "llama3"
        assert all(np.array_equal(params2_, p) for p, params2_ in _pairs(params, params2))


def _hf_rope(path: Path) -> dict:
    """transformers' own reading of a directory's RoPE parameters."""
    return dict(transformers.AutoConfig.from_pretrained(path).rope_parameters)


def test_config_keys_read_as_transformers_reads_them(hf, tmp_path):
    """Keys whose reading is easy to get wrong give the values transformers derives: a
    rope_theta inside rope_scaling wins, llama3's original context defaults to
    max_position_embeddings, Mistral and Qwen2 ignore attention_bias (fixed biases), GPT-2
    takes the common names (hidden_size, ...) for its own."""
    llama, _ = hf["llama3_gqa"]
    _, reference, _ = load(llama)

    def linear_inner_theta(c):
        c.pop("rope_parameters")
        c["rope_theta"] = 500000.0
        c["rope_scaling"] = {"type": "linear", "factor": 2.0, "rope_theta": 1000.0}

    def llama3_no_original(c):
        rope = c.pop("rope_parameters")
        rope.pop("original_max_position_embeddings")
        c["rope_scaling"], c["rope_theta"] = rope, rope.pop("rope_theta")

    for edit in (linear_inner_theta, llama3_no_original):
        path = _rewrite(llama, tmp_path / edit.__name__, edit)
        cfg, params, _ = load(path)
        want = _hf_rope(path)
        assert cfg.rope_theta == want["rope_theta"] and cfg.rope_scaling.factor == want["factor"]
        if cfg.rope_scaling.type == "llama3":
            omax = want["original_max_position_embeddings"]
            assert cfg.rope_scaling.original_max_position_embeddings == omax
        assert all(np.array_equal(x, y) for x, y in _pairs(reference, params))

    for name in ("mistral_window", "qwen2_window"):
        path = _rewrite(hf[name][0], tmp_path / name, lambda c: c.update(attention_bias=True))
        cfg, params, _ = load(path)
        assert not cfg.bias and bool(cfg.qkv_bias) == (name == "qwen2_window")
        assert all(np.array_equal(x, y) for x, y in _pairs(load(hf[name][0])[1], params))

    def common_names(c):
        for alias, own in (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer")):
            c[alias] = c.pop(own)

    path = _rewrite(hf["gpt2"][0], tmp_path / "gpt2_common", common_names)
    cfg, params, _ = load(path)
    assert (cfg.d_model, cfg.n_layers) == (32, 2)
    assert all(np.array_equal(x, y) for x, y in _pairs(load(hf["gpt2"][0])[1], params))

    def no_factor(c):
        c.pop("rope_parameters")
        c["rope_scaling"] = {"rope_type": "linear"}

    with pytest.raises(ConfigError, match=r"rope_scaling\.factor is missing"):
        load(_rewrite(llama, tmp_path / "no_factor", no_factor))


def _pairs(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert fa.keys() == fb.keys()
    return [(fa[k], fb[k]) for k in fa]


def test_base_model_names_and_buffers(hf, tmp_path):
    """Published GPT-2 stores the base model's names (no `transformer.` prefix) and its
    attention-mask buffers; both import."""
    from safetensors.numpy import load_file, save_file

    path, _ = hf["gpt2"]
    shutil.copytree(path, tmp_path / "base")
    tensors = load_file(str(path / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    _, params, _ = load(path)
    _, base, _ = load(tmp_path / "base")
    assert all(np.array_equal(x, y) for x, y in _pairs(params, base))


def test_host_checksums_equal_the_device_ones():
    """The weights-only checkpoint is checksummed on the host, chunk by chunk: the same values
    `integrity` computes on the device (so restores verify it)."""
    import ml_dtypes

    from framework.train import integrity
    from framework.train.checkpoint import host_checksum

    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "bf16": rng.standard_normal((4, 9)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(11).astype(np.float16),
        "i32": rng.integers(-1000, 1000, (6, 6)).astype(np.int32),
        "u8": rng.integers(0, 255, 13).astype(np.uint8),
        "bool": rng.integers(0, 2, (5, 3)).astype(bool),
        "scalar": np.ones((), np.float32),
    }
    paths, leaves = integrity.leaf_paths(tree), jax.tree.leaves(tree)
    host = {p: host_checksum(x, chunk=4) for p, x in zip(paths, leaves, strict=True)}
    assert host == integrity.array_checksums(tree)


def test_sharded_import_and_export(hf, roundtrip, tmp_path):
    path, model = hf["llama3_gqa"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, params, _ = load(path)
    _, sharded, _ = load(tmp_path / "sharded")
    assert all(np.array_equal(x, y) for x, y in _pairs(params, sharded))
    # an export over an earlier one in the same folder leaves none of its weight files behind
    # (transformers would load a stale model.safetensors rather than the new index)
    other = hf_models.build("llama3_gqa", seed=1)
    other.save_pretrained(tmp_path / "other")
    import_checkpoint(tmp_path / "other", tmp_path / "other_fw")
    export_run(tmp_path / "other_fw", tmp_path / "out")
    summary = export_run(roundtrip["llama3_gqa"][0], tmp_path / "out", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in summary["files"] and len(summary["files"]) > 2
    assert not (tmp_path / "out" / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    export_run(tmp_path / "other_fw", tmp_path / "out")  # and back to one file
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    # a folder with both layouts is read as transformers reads it: model.safetensors first
    shutil.copyfile(
        tmp_path / "other" / "model.safetensors", tmp_path / "sharded" / "model.safetensors"
    )
    _, both, _ = load(tmp_path / "sharded")
    assert all(np.array_equal(x, y) for x, y in _pairs(load(tmp_path / "other")[1], both))


def test_export_of_a_run_never_imported(tmp_path):
    """A model trained here (no hf.json: the class from its fields, no special tokens) exports
    to a folder transformers loads with the framework's logits."""
    from framework.hf import weights
    from framework.train.checkpoint import CheckpointConfig, Checkpointer, unflatten_params

    cfg = TransformerConfig(
        vocab_size=hf_models.VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=32,
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
        qkv_bias=True,
        sliding_window=6,
        tie_embeddings=False,
    )
    rng = np.random.default_rng(0)
    flat = {
        path: (1.0 if path.endswith("/scale") else 0.0)
        + 0.3 * rng.standard_normal(shape).astype(dtype)
        for path, (shape, dtype) in weights.leaf_shapes(cfg).items()
    }
    params = unflatten_params(flat)
    run_config = {"model": cfg.model_dump(mode="json"), "data": {"tokenizer": "byte"}}
    writer = Checkpointer(tmp_path / "run" / "checkpoints", CheckpointConfig(async_save=False))
    writer.save({"params": params, "opt_state": {}, "model_state": {}}, {}, run_config, {"step": 5})
    writer.close()
    summary = export_run(tmp_path / "run", tmp_path / "out")
    assert summary["architecture"] == "Qwen2ForCausalLM" and summary["step"] == 5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] is None  # not Qwen2's or Llama's default ids
    assert not summary["generation_config"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = hf_models.logits(back, hf_models.IDS).numpy()
    assert hf_models.rel(hf_models.framework_logits(cfg, params), ref) < hf_models.TOL


def test_bfloat16_checkpoint_round_trips(hf, tmp_path, capsys):
    _, model = hf["qwen3"]
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32)
    cfg, params, _ = load(tmp_path / "bf16")
    assert params["embed"]["embedding"].dtype == np.float32  # stored in the param dtype
    import_checkpoint(tmp_path / "bf16", tmp_path / "fw")
    summary = export_run(tmp_path / "fw", tmp_path / "out")
    assert summary["dtype"] == "bfloat16"  # remembered from config.json
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    # --param-dtype bfloat16: the checkpoint holds bf16 params, config.yaml trains in bf16
    status, _ = _main(
        capsys, "import", tmp_path / "bf16", "--out", tmp_path / "fw16", "--param-dtype", "bfloat16"
    )
    assert status == 0
    cfg16 = load_config(_config_class(), tmp_path / "fw16" / "config.yaml")
    assert cfg16.model.param_dtype == "bfloat16"
    from framework.train.checkpoint import CheckpointConfig, Checkpointer

    reader = Checkpointer(tmp_path / "fw16" / "checkpoints", CheckpointConfig(), read_only=True)
    _, params16 = reader.read_numpy("params")
    reader.close()
    flat = flatten_params(params16)
    assert {str(x.dtype) for x in flat.values()} == {"bfloat16"}
    embedding = a["model.embed_tokens.weight"].float().numpy()  # bf16 -> f32 is exact
    assert np.array_equal(flat["embed/embedding"].astype(np.float32), embedding)


def test_resume_from_imported_folder(roundtrip, tmp_path, caplog):
    from framework.train import build
    from framework.train.resume import plan_resume, restore_or_init

    imported, _ = roundtrip["llama3_gqa"]
    _, expected, _ = load(roundtrip["llama3_gqa"][1])
    base = [
        f"run.dir={tmp_path}",
        "data.source=synthetic_lm",
        f"data.vocab_size={hf_models.VOCAB}",
        "data.seq_len=16",
        "data.num_examples=64",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.plot=false",
        "checkpoint.async_save=false",
        f"checkpoint.resume={imported}",
    ]
    for params_only in ("false", "true"):
        cfg = load_config(
            _config_class(),
            imported / "config.yaml",
            [*base, f"run.name=ft_{params_only}", f"checkpoint.resume_params_only={params_only}"],
        )
        run = build(cfg)
        start = restore_or_init(run, plan_resume(run))
        assert int(start.state["step"]) == 0
        got = jax.device_get(start.state["params"])
        assert all(np.array_equal(x, y) for x, y in _pairs(expected, got))
        assert not any(np.any(x) for x in jax.tree.leaves(jax.device_get(start.state["opt_state"])))
        if params_only == "false":  # a weights-only checkpoint is taken as params-only
            assert "holds weights only" in caplog.text


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(position="rope", norm="layernorm"), "model.norm"),
        (dict(position="learned", norm="layernorm", activation="swiglu"), "model.activation"),
        (dict(position="learned", n_kv_heads=2), "model.n_kv_heads"),
        (dict(position="learned", bias=False), "model.bias"),
        (dict(position="learned", qk_norm=True), "model.qk_norm"),
        (dict(position="rope", norm="rmsnorm", activation="gelu"), "model.activation"),
        (dict(position="rope", norm="rmsnorm", activation="swiglu", qk_norm=True), "model.bias"),
        (dict(position="rope", norm="rmsnorm", activation="swiglu", qkv_bias=False), "qkv_bias"),
        (
            dict(position="rope", norm="rmsnorm", activation="swiglu", sliding_window=8),
            "model.sliding_window",
        ),
    ],
)
def test_inexpressible_models_name_the_field(fields, named):
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=4, **fields)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        target.choose(cfg, None)


@pytest.mark.parametrize(
    "fields, arch",
    [
        (dict(bias=False), "LlamaForCausalLM"),
        (dict(bias=False, sliding_window=8), "MistralForCausalLM"),
        (dict(bias=False, qkv_bias=True), "Qwen2ForCausalLM"),
        (dict(bias=False, qkv_bias=True, sliding_window=8), "Qwen2ForCausalLM"),
        (dict(bias=False, qk_norm=True), "Qwen3ForCausalLM"),
        (dict(bias=True), "LlamaForCausalLM"),
    ],
)
def test_architecture_chosen_from_fields(fields, arch):
    rope = dict(position="rope", norm="rmsnorm", activation="swiglu")
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=4, **rope, **fields)
    assert target.choose(cfg, None) == arch


def test_remembered_architecture_kept_while_it_fits():
    rope = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False)
    llama = TransformerConfig(vocab_size=64, d_model=32, n_heads=4, **rope)
    assert target.choose(llama, "MistralForCausalLM") == "MistralForCausalLM"
    assert target.choose(llama, "Qwen3ForCausalLM") == "LlamaForCausalLM"  # no qk_norm: not Qwen3
    qwen2 = llama.model_copy(update={"qkv_bias": True})
    assert target.choose(qwen2, "LlamaForCausalLM") == "Qwen2ForCausalLM"


def _main(capsys, *argv) -> tuple[int, str]:
    """convert_hf's exit status and stderr (checked to be one line on failure)."""
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    status = convert_hf.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert status == 0 or err.count("\n") == 1, err  # one line
    return status, err


def test_bad_inputs_exit_2_naming_the_thing(hf, roundtrip, tmp_path, capsys):
    path, model = hf["llama3_gqa"]
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    status, err = _main(capsys, "import", tmp_path / "empty", "--out", out)
    assert status == 2 and "no config.json" in err

    def phi(c):
        c["architectures"], c["model_type"] = ["PhiForCausalLM"], "phi"

    bad = _rewrite(path, tmp_path / "phi", phi)
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "'PhiForCausalLM'" in err and "Qwen3ForCausalLM" in err

    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "shards" / shard).unlink()
    status, err = _main(capsys, "import", tmp_path / "shards", "--out", out)
    assert status == 2 and f"shard {shard} is missing" in err

    bad = _rewrite(path, tmp_path / "ff", lambda c: c.update(intermediate_size=48))
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "tensor model.layers.0.mlp." in err and "[64, 32]" in err

    def yarn(c):
        c.pop("rope_parameters")
        c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}

    bad = _rewrite(path, tmp_path / "yarn", yarn)
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "rope_scaling.rope_type='yarn'" in err

    def mixed(c):  # Qwen2 sliding only from layer 1 on
        c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True)
        c.update(sliding_window=4, max_window_layers=1, layer_types=None)

    bad = _rewrite(path, tmp_path / "mixed", mixed)
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "layer_types mixes sliding and full attention" in err

    from safetensors.numpy import load_file, save_file

    extra = _rewrite(path, tmp_path / "extra", lambda c: None)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    status, err = _main(capsys, "import", extra, "--out", out)
    assert status == 2 and "tensor model.layers.0.self_attn.q_proj.bias" in err

    bad = _rewrite(path, tmp_path / "gelu", lambda c: c.update(hidden_act="gelu"))
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "hidden_act='gelu'" in err

    bad = _rewrite(path, tmp_path / "tok", lambda c: None)
    (bad / "tokenizer.json").write_text("{not json")
    status, err = _main(capsys, "import", bad, "--out", out)
    assert status == 2 and "tokenizer.json: not a tokenizer.json" in err
    assert not out.exists()  # nothing written for a bad input

    imported = roundtrip["qwen2_window"][0]
    status, err = _main(capsys, "export", imported, "--out", imported)
    assert status == 2 and "holds the run's own files" in err

    status, err = _main(capsys, "export", roundtrip["qwen2_window"][0], "--out", out, "--step", 7)
    assert status == 2 and "step 7" in err
    status, err = _main(capsys, "export", tmp_path / "empty", "--out", out)
    assert status == 2 and "not a run directory" in err


def test_export_of_an_inexpressible_run(roundtrip, tmp_path, capsys):
    from framework.train.checkpoint import CheckpointConfig, Checkpointer

    imported, _ = roundtrip["llama3_gqa"]
    cfg = load_config(_config_class(), imported / "config.yaml").model_dump(mode="json")
    cfg["model"] |= {"norm": "layernorm", "bias": False, "rope_scaling": None}
    _, params, _ = load(roundtrip["llama3_gqa"][1])
    for name in ("attn_norm", "mlp_norm"):
        params["blocks"][name] = {"scale": params["blocks"][name]["scale"]}
    run_dir = tmp_path / "run"
    writer = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    writer.save({"params": params, "opt_state": {}, "model_state": {}}, {}, cfg, {"step": 3})
    writer.close()
    status, err = _main(capsys, "export", run_dir, "--out", tmp_path / "out")
    assert status == 2 and 'model.norm="layernorm"' in err
