"""A LoRA run's adapters alone, in the PEFT format (`adapter_config.json` +
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained(base_model, folder)` loads
onto the transformers model the full export (or the import's source) gives.

Our adapted kernel W [*in, *out] gets `lora_a` [*in, r], `lora_b` [r, *out] and
`lora_scale` = alpha / r per layer; x @ W becomes x @ W + scale * (x @ A) @ B. PEFT's LoRA
layer holds `lora_A.weight` [r, in_features] and `lora_B.weight` [out_features, r] and adds
lora_alpha / r * B(A(x)) (no rslora), so lora_A is A^T and lora_B is B^T, the head dims
flattened in the order the full export's name rules (`framework.hf.weights`) flatten the
kernel's. GPT-2's Conv1D modules take the same tensors (`fan_in_fan_out: true`); its fused
c_attn cannot hold our separate q/k/v adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from framework.errors import ConfigError
from framework.hf import config as hfc
from framework.hf import export, files, target, weights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _module(rule: weights.Rule) -> str:
    """The module name template of a weight rule ('model.layers.{i}.self_attn.q_proj')."""
    return rule.hf.removesuffix(".weight")


def _target_name(module: str, others: list[str]) -> str:
    """The shortest dotted suffix of `module` that PEFT (which matches a target name against
    a module name or its '.'-separated tail) matches with no module in `others`."""
    parts = module.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if "{i}" in suffix:
            break
        if not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
    raise AssertionError(f"no unique PEFT target name for {module}")  # a bug in the rules


def _rules(cfg, family: str, kernels: list[str]) -> dict[str, weights.Rule]:
    """{adapted kernel path: the full export's rule for it}; ConfigError for a kernel PEFT
    cannot adapt alone (GPT-2's fused c_attn)."""
    out = {}
    for rule in weights.rules(cfg, family):
        for kernel in kernels:
            if kernel not in rule.fw:
                continue
            if len(rule.fw) > 1:
                raise ConfigError(
                    f"--peft: {kernel} is part of {family}'s fused {_module(rule)} (with "
                    f"{', '.join(p for p in rule.fw if p != kernel)}), where PEFT's LoRA has one "
                    "A for all of them; target other kernels or export the merged model "
                    "(without --peft)"
                )
            if not rule.layered or not rule.hf.endswith(".weight"):
                raise ConfigError(f"--peft: {kernel} ({rule.hf}) is not a per-layer projection")
            out[kernel] = rule
    return out


def _check_adapter_shapes(flat: dict, kernel: str, rule: weights.Rule) -> int:
    """The rank of `kernel`'s adapters; ConfigError if their shapes disagree with it."""
    where = kernel[: -len("/kernel")]
    w = flat[kernel]
    r = flat[f"{where}/lora_a"].shape[-1]
    want = {
        "lora_a": (*w.shape[: 1 + rule.in_dims], r),
        "lora_b": (w.shape[0], r, *w.shape[1 + rule.in_dims :]),
        "lora_scale": w.shape[:1],
    }
    for leaf, shape in want.items():
        have = tuple(flat[f"{where}/{leaf}"].shape)
        if have != shape:
            raise ConfigError(
                f"checkpoint param {where}/{leaf} is {list(have)}, its kernel "
                f"{list(w.shape)} needs {list(shape)}"
            )
    return r


def _alpha(flat: dict, kernels: list[str], rank: int, saved: dict) -> float:
    """lora_alpha with PEFT's scaling lora_alpha / r equal to every stored lora_scale (the
    config's alpha when it gives that scale); ConfigError if the scales differ."""
    scales = np.concatenate(
        [np.asarray(flat[k[: -len("kernel")] + "lora_scale"], np.float32).ravel() for k in kernels]
    )
    if not np.all(scales == scales[0]):
        raise ConfigError(
            f"--peft: lora_scale differs between kernels or layers ({scales.min()} to "
            f"{scales.max()}); PEFT's config holds one lora_alpha / r"
        )
    scale = float(scales[0])
    alpha = (((saved.get("finetune") or {}).get("lora") or {}).get("alpha")) or None
    if alpha is not None and np.float32(float(alpha) / rank) == np.float32(scale):
        return float(alpha)
    return scale * rank


def export_adapters(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write a LoRA run's adapters to `out_dir` in the PEFT format (float32 unless `dtype`);
    returns a summary. ConfigError (one line) for a run without adapters, a model HF cannot
    express, adapters PEFT cannot hold, or an `out_dir` holding the run's own files."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    got, flat, saved = export._read_run(run_dir, step)
    cfg = export._model_config(saved, flat)
    kernels = export.adapted_kernels(flat)
    if not kernels:
        raise ConfigError(
            f"{run_dir}: step {got} holds no LoRA adapters (not a finetune.lora run); "
            "export the whole model without --peft"
        )
    source, source_dir = export.find_source(run_dir, saved)
    name = target.choose(cfg, source.architecture if source else None)
    family = hfc.ARCHITECTURES[name]
    dtype = dtype or "float32"
    if dtype not in export.EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(export.EXPORT_DTYPES)}")
    np_dtype = export.EXPORT_DTYPES[dtype]
    export.check_shapes(cfg, flat)
    rules = _rules(cfg, family, kernels)
    ranks = {k: _check_adapter_shapes(flat, k, rules[k]) for k in kernels}
    if len(set(ranks.values())) > 1:
        raise ConfigError(f"--peft: the adapters' ranks differ ({sorted(set(ranks.values()))})")
    rank = next(iter(ranks.values()))
    alpha = _alpha(flat, kernels, rank, saved)

    linear = [r for r in weights.rules(cfg, family) if r.hf.endswith(".weight") and r.in_dims]
    modules = [_module(r) for r in linear]
    targets, plan, fan_in_fan_out = [], [], set()
    for kernel in kernels:
        rule = rules[kernel]
        module = _module(rule)
        targets.append(_target_name(module, [m for m in modules if m != module]))
        fan_in_fan_out.add(not rule.transpose)  # GPT-2's Conv1D stores [in, out]
        where = kernel[: -len("/kernel")]
        # our A [*in, r] is PEFT's lora_A [r, in] transposed; B [r, *out] its lora_B [out, r]
        for leaf, hf_leaf, in_dims in (("lora_a", "lora_A", rule.in_dims), ("lora_b", "lora_B", 1)):
            sub = weights.Rule(
                f"{PEFT_PREFIX}{module}.{hf_leaf}.weight", (f"{where}/{leaf}",), True, in_dims
            )
            array = flat[f"{where}/{leaf}"]
            for layer, tensor in weights.tensors(sub, cfg.n_layers):

                def make(sub=sub, array=array, layer=layer) -> np.ndarray:
                    return sub.join([np.asarray(array[layer], np.float32)]).astype(np_dtype)

                plan.append(files.Planned(tensor, sub.hf_shape(array.shape[1:]), np_dtype, make))
    if len(fan_in_fan_out) > 1:  # no family mixes Linear and Conv1D projections
        raise AssertionError("adapted modules mix Linear and Conv1D")
    tokenizer = (saved.get("data") or {}).get("tokenizer", "byte")
    tokenizer_dir = Path(tokenizer).parent if tokenizer != "byte" else None
    export.check_out(out_dir, [run_dir, source_dir, tokenizer_dir])
    base = (source.path or source.config.get("_name_or_path") or "") if source else ""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(((saved.get("finetune") or {}).get("lora") or {}).get("dropout", 0)),
        "target_modules": sorted(set(targets)),
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "bias": "none",
        "use_rslora": False,  # scaling = lora_alpha / r, our lora_scale
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    files.write_file(out_dir / WEIGHTS_FILE, plan)
    return {
        "architecture": name,
        "step": got,
        "dtype": dtype,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": config["target_modules"],
        "base_model_name_or_path": base,
        "tensors": len(plan),
        "params": sum(math.prod(t.shape) for t in plan),
        "files": [CONFIG_FILE, WEIGHTS_FILE],
    }
