"""A LoRA run's export (framework.hf: export_run merges the adapters, export_adapters writes
them alone in the PEFT format; scripts/convert_hf.py export [--peft]) against transformers and
peft.

A tiny random Llama (GQA, so q/k/v/o differ in width; every projection adapted) is built with
transformers, imported, and given adapters with random nonzero lora_b (they change the logits),
saved as a LoRA run's checkpoint. Then: `lora.merge` gives the adapted model's logits; the merged
export loads with `from_pretrained` with those logits; the PEFT export loads with
`peft.PeftModel.from_pretrained` onto the base model with those logits and PEFT's own scaling
and merge. GPT-2 (Conv1D: fan_in_fan_out) exports its o/up/down adapters; its fused c_attn and a
run without adapters are one-line errors (exit 2)."""

import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import hf_models  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from framework import nn  # noqa: E402
from framework.finetune import lora  # noqa: E402
from framework.hf import export_adapters, export_run, import_checkpoint, load  # noqa: E402
from framework.models.transformer import TransformerConfig, spec  # noqa: E402
from framework.train.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert_hf  # noqa: E402

RANK, ALPHA = 4, 12.0  # lora_scale 3
ALL = ("blocks/attn/(q|k|v|o)/kernel", "blocks/mlp/(gate|up|down)/kernel")


def _with_adapters(cfg: TransformerConfig, params: dict, targets: tuple[str, ...]) -> dict:
    """`params` with adapters on `targets` (PEFT's A init, lora_b random: not a no-op)."""
    lcfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    adapters = nn.init(lora.adapters_only(lora.add_adapters(spec(cfg), lcfg)), jax.random.key(1))
    adapters = jax.tree.map(np.asarray, adapters)
    rng = np.random.default_rng(1)

    def randomize_b(tree):
        for k, v in tree.items():
            if isinstance(v, dict):
                randomize_b(v)
            elif k == "lora_b":
                tree[k] = (0.3 * rng.standard_normal(v.shape)).astype(np.float32)

    randomize_b(adapters)
    return lora.deep_merge(params, adapters)


def _save_run(run_dir: Path, cfg, params, base: Path, targets, step: int = 7) -> Path:
    """A LoRA run's checkpoint: params with adapters, its config resuming from `base`."""
    run_config = {
        "model": cfg.model_dump(mode="json"),
        "data": {"tokenizer": "byte"},
        "checkpoint": {"resume": str(base)},
        "finetune": {"lora": {"rank": RANK, "alpha": ALPHA, "targets": list(targets)}},
    }
    writer = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    writer.save(
        {"params": params, "opt_state": {}, "model_state": {}}, {}, run_config, {"step": step}
    )
    writer.close()
    return run_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF dir, imported folder, run dir, model config, params with adapters, their logits)."""
    root = tmp_path_factory.mktemp("lora_llama")
    hf_models.build("llama3_gqa").save_pretrained(root / "hf")
    import_checkpoint(root / "hf", root / "fw")
    cfg, params, _ = load(root / "hf")
    params = _with_adapters(cfg, params, ALL)
    run = _save_run(root / "run", cfg, params, root / "fw", ALL)
    return root / "hf", root / "fw", run, cfg, params, hf_models.framework_logits(cfg, params)


def _base_model(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def test_merge_gives_the_adapted_logits(llama):
    hf_dir, _, _, cfg, params, adapted = llama
    base = hf_models.logits(_base_model(hf_dir), hf_models.IDS).numpy()
    assert hf_models.rel(adapted, base) > 1e-2  # the adapters matter
    merged = lora.merge(params)
    assert not any(k in lora.ADAPTER_LEAVES for k in merged["blocks"]["attn"]["q"])
    err = hf_models.rel(hf_models.framework_logits(cfg, merged), adapted)
    print(f"lora.merge: max relative logit difference {err:.2e}")
    assert err < hf_models.TOL


def test_merged_export_loads_in_transformers(llama, tmp_path):
    hf_dir, _, run, _, params, adapted = llama
    summary = export_run(run, tmp_path / "merged")
    assert summary["step"] == 7 and summary["architecture"] == "LlamaForCausalLM"
    assert len(summary["merged_adapters"]) == 7  # q, k, v, o, gate, up, down
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    err = hf_models.rel(hf_models.logits(model.eval(), hf_models.IDS).numpy(), adapted)
    print(f"merged export: max relative logit difference {err:.2e}")
    assert err < hf_models.TOL
    # the merged weights are the ones lora.merge gives (W + scale * A @ B, in W's layout)
    q = lora.merge(params)["blocks"]["attn"]["q"]["kernel"][1]
    want = np.asarray(q).reshape(q.shape[0], -1).T
    got = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_peft_export_loads_with_peft(llama, tmp_path, capsys):
    hf_dir, imported, run, _, params, adapted = llama
    out = tmp_path / "peft"
    status = convert_hf.main(["export", str(run), "--out", str(out), "--peft"])
    printed = capsys.readouterr().out
    assert status == 0 and "r=4, lora_alpha=12" in printed, printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (RANK, ALPHA, 0.0)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str(hf_dir.absolute())
    assert not config["fan_in_fan_out"] and not config["use_rslora"]

    model = peft.PeftModel.from_pretrained(_base_model(hf_dir), out).eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (
        q.scaling["default"]
        == ALPHA / RANK
        == float(params["blocks"]["attn"]["q"]["lora_scale"][0])
    )
    a, b = params["blocks"]["attn"]["q"]["lora_a"][0], params["blocks"]["attn"]["q"]["lora_b"][0]
    assert np.array_equal(q.lora_A["default"].weight.detach().numpy(), a.T)
    assert np.array_equal(q.lora_B["default"].weight.detach().numpy(), b.reshape(RANK, -1).T)
    # every adapter tensor in the file is the one PEFT holds (nothing left at its init)
    from safetensors.numpy import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    held = peft.get_peft_model_state_dict(model)
    assert saved.keys() == held.keys() and len(saved) == 2 * 7 * 2
    assert all(np.array_equal(saved[k], held[k].detach().numpy()) for k in saved)
    o = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    assert saved[o].shape == (RANK, 4 * 8)  # [r, heads * head_dim]

    err = hf_models.rel(hf_models.logits(model, hf_models.IDS).numpy(), adapted)
    with capsys.disabled():
        print(f"PEFT export: max relative logit difference {err:.2e}")
    assert err < hf_models.TOL
    # PEFT's own merge equals the merged export
    export_run(run, tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    theirs = model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_gpt2_peft_export_and_fused_c_attn(tmp_path, capsys):
    hf_models.build("gpt2").save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "fw")
    cfg, base, _ = load(tmp_path / "hf")
    targets = ("blocks/attn/o/kernel", "blocks/mlp/(up|down)/kernel")
    params = _with_adapters(cfg, base, targets)
    run = _save_run(tmp_path / "run", cfg, params, tmp_path / "fw", targets)
    summary = export_adapters(run, tmp_path / "peft")
    assert summary["target_modules"] == ["attn.c_proj", "c_fc", "mlp.c_proj"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"]  # Conv1D stores [in, out]
    model = peft.PeftModel.from_pretrained(_base_model(tmp_path / "hf"), tmp_path / "peft")
    err = hf_models.rel(
        hf_models.logits(model.eval(), hf_models.IDS).numpy(),
        hf_models.framework_logits(cfg, params),
    )
    with capsys.disabled():
        print(f"GPT-2 PEFT export: max relative logit difference {err:.2e}")
    assert err < hf_models.TOL

    fused = ("blocks/attn/(q|v)/kernel",)
    run = _save_run(
        tmp_path / "fused", cfg, _with_adapters(cfg, base, fused), tmp_path / "fw", fused
    )
    capsys.readouterr()
    status = convert_hf.main(["export", str(run), "--out", str(tmp_path / "x"), "--peft"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "fused transformer.h.{i}.attn.c_attn" in err and "without --peft" in err
    assert not (tmp_path / "x").exists()
    # the merged export of the same run is fine
    export_run(run, tmp_path / "merged")

    # a run without adapters has nothing to export in the PEFT format
    status = convert_hf.main(
        ["export", str(tmp_path / "fw"), "--out", str(tmp_path / "x"), "--peft"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "holds no LoRA adapters" in err and err.count("\n") == 1
