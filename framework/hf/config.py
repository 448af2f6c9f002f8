"""Hugging Face config.json <-> the transformer's config, per architecture.

Reading takes config.json as published checkpoints write it (`rope_theta` + `rope_scaling`
with `type` or `rope_type`) or as transformers 5.x does (`rope_parameters`); keys a file leaves
out take transformers' class defaults. Writing picks the architecture the model's fields can
express (remembering the one a model was imported from) and refuses, naming the field, a model
no supported class can run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pydantic

from framework.errors import ConfigError
from framework.models.transformer import TransformerConfig

ARCHITECTURES = {  # class name -> family
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
CLASS_OF = {family: name for name, family in ARCHITECTURES.items()}
_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "num_key_value_heads": None,
    "head_dim": None,
}
DEFAULTS: dict[str, dict[str, Any]] = {  # transformers' class defaults for keys a file omits
    "gpt2": {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    },
    "llama": _COMMON
    | {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008}
    | {"num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048}
    | {"attention_bias": False, "mlp_bias": False},
    "mistral": _COMMON
    | {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336}
    | {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    | {"max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": _COMMON
    | {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016}
    | {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
    | {"max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096}
    | {"max_window_layers": 28, "layer_types": None},
}
DEFAULTS["qwen3"] = DEFAULTS["qwen2"] | {"head_dim": 128, "attention_bias": False}
GELU = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
ROPE_TYPES = ("default", "linear", "llama3")
KEPT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


@dataclasses.dataclass(frozen=True)
class Source:
    """What an imported checkpoint was: its class, dtype and original config.json."""

    architecture: str
    dtype: str | None
    config: dict

    def to_json(self) -> dict:
        return {"architecture": self.architecture, "dtype": self.dtype, "config": self.config}

    @classmethod
    def from_json(cls, data: dict) -> Source:
        return cls(data["architecture"], data.get("dtype"), data.get("config", {}))


def read_config(hf_dir: str | Path) -> dict:
    """config.json of a checkpoint directory as a dict (ConfigError if absent or unreadable)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def architecture(hf: dict) -> str:
    """The class name config.json names (or its model_type implies); ConfigError if unsupported."""
    names = hf.get("architectures") or []
    by_type = {f: c for c, f in ARCHITECTURES.items()}
    name = names[0] if names else by_type.get(hf.get("model_type", ""), hf.get("model_type"))
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"config.json: architecture {name!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return name


def _torch_dtype(hf: dict) -> str | None:
    value = hf.get("dtype", hf.get("torch_dtype"))
    return value if value in ("float32", "bfloat16", "float16") else None


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, framework rope_scaling) from either config.json layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        key, theta = "rope_parameters", params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
        if all(isinstance(v, dict) for v in params.values()):
            raise ConfigError("config.json: rope_parameters per layer type is not supported")
    else:
        key, theta, scaling = "rope_scaling", hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    if (
        hf.get("partial_rotary_factor", 1.0) != 1.0
        or (scaling or {}).get("partial_rotary_factor", 1.0) != 1.0
    ):
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: {key}.rope_type={kind!r} is not supported (supported: "
            f"{', '.join(ROPE_TYPES)})"
        )
    if kind == "default":
        return float(theta), None
    out: dict[str, Any] = {"type": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in scaling:
                raise ConfigError(f"config.json: {key}.{name} is missing (rope_type llama3)")
            out[name] = scaling[name]
    return float(theta), out


def _window(hf: dict, family: str) -> int | None:
    """Sliding window of every layer (None: full attention); mixed layers are refused."""
    if family == "mistral":
        return hf["sliding_window"]
    if family in ("qwen2", "qwen3"):
        window = hf["sliding_window"] if hf["use_sliding_window"] else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf["max_window_layers"] else "full"
            for i in range(hf["num_hidden_layers"])
        ]
        kinds = {t == "sliding_attention" for t in types}
        if len(kinds) > 1:
            raise ConfigError(
                "config.json: layer_types mixes sliding and full attention "
                f"(max_window_layers={hf['max_window_layers']}); not supported"
            )
        if kinds == {True}:
            return window
    return None


def _check(hf: dict, key: str, allowed: tuple) -> None:
    if hf.get(key) not in allowed:
        raise ConfigError(
            f"config.json: {key}={hf.get(key)!r} is not supported (expected {allowed})"
        )


def to_framework(hf: dict) -> tuple[TransformerConfig, Source]:
    """(model config, source record) for a supported config.json."""
    name = architecture(hf)
    family = ARCHITECTURES[name]
    c = DEFAULTS[family] | {k: v for k, v in hf.items() if v is not None or k == "sliding_window"}
    if family == "gpt2":
        if c["activation_function"] not in GELU:
            raise ConfigError(
                f"config.json: activation_function={c['activation_function']!r} is not "
                f"supported (supported: {', '.join(GELU)})"
            )
        _check(c, "scale_attn_weights", (True,))
        _check(c, "scale_attn_by_inverse_layer_idx", (False,))
        _check(c, "add_cross_attention", (False,))
        fields = dict(
            vocab_size=c["vocab_size"],
            d_model=c["n_embd"],
            n_layers=c["n_layer"],
            n_heads=c["n_head"],
            d_ff=c["n_inner"] or 4 * c["n_embd"],
            max_seq_len=c["n_positions"],
            position="learned",
            norm="layernorm",
            norm_eps=c["layer_norm_epsilon"],
            activation=GELU[c["activation_function"]],
            bias=True,
        )
    else:
        _check(c, "hidden_act", ("silu",))
        theta, scaling = _rope(c)
        bias = bool(c.get("attention_bias", False))
        if family == "llama" and bool(c["mlp_bias"]) != bias:
            raise ConfigError(
                f"config.json: attention_bias={bias} with mlp_bias={c['mlp_bias']} is not "
                "supported (the framework has one bias switch for attention and MLP)"
            )
        if family == "qwen3" and bias:
            raise ConfigError(
                "config.json: attention_bias=true is not supported for Qwen3 (its MLP has none)"
            )
        fields = dict(
            vocab_size=c["vocab_size"],
            d_model=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            d_ff=c["intermediate_size"],
            max_seq_len=c["max_position_embeddings"],
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=_window(c, family),
            norm="rmsnorm",
            norm_eps=c["rms_norm_eps"],
            activation="swiglu",
            bias=bias,
            qkv_bias=True if family == "qwen2" else None,
            qk_norm=family == "qwen3",
        )
    fields["tie_embeddings"] = bool(c["tie_word_embeddings"])
    try:
        cfg = TransformerConfig(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "model"
        raise ConfigError(f"config.json gives an invalid model ({where}: {err['msg']})") from None
    return cfg, Source(name, _torch_dtype(hf), hf)


# ----------------------------------------------------------------------------------------------
# export


def _unsupported(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"model.{field}={json.dumps(value)}: {why}")


def _qkv_bias(cfg: TransformerConfig) -> bool:
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


def _gpt2_problem(cfg: TransformerConfig) -> ConfigError | None:
    """Why GPT2LMHeadModel cannot run this learned-position model (None: it can)."""
    if cfg.norm != "layernorm":
        return _unsupported("norm", cfg.norm, "GPT-2 (learned positions) uses layernorm")
    if cfg.activation == "swiglu":
        return _unsupported(
            "activation", cfg.activation, "no HF class has SwiGLU with learned positions"
        )
    if not cfg.bias or not _qkv_bias(cfg):
        field = "bias" if not cfg.bias else "qkv_bias"
        return _unsupported(field, False, "GPT2LMHeadModel has biases on every linear and norm")
    if cfg.kv_heads != cfg.n_heads:
        return _unsupported(
            "n_kv_heads", cfg.n_kv_heads, "GPT2LMHeadModel has no grouped-query attention"
        )
    if cfg.head_size * cfg.n_heads != cfg.d_model:
        return _unsupported(
            "head_dim", cfg.head_dim, "GPT2LMHeadModel needs head_dim = d_model / n_heads"
        )
    if cfg.qk_norm:
        return _unsupported("qk_norm", True, "only Qwen3 (rope, rmsnorm, swiglu) has QK-norm")
    if cfg.sliding_window is not None:
        return _unsupported(
            "sliding_window", cfg.sliding_window, "GPT2LMHeadModel has no sliding window"
        )
    return None


def _rope_problem(cfg: TransformerConfig, family: str) -> ConfigError | None:
    """Why `family` cannot run this RoPE model (None: it can)."""
    if cfg.norm != "rmsnorm":
        return _unsupported("norm", cfg.norm, "no HF class has layernorm with rope positions")
    if cfg.activation != "swiglu":
        return _unsupported(
            "activation", cfg.activation, "no HF class has an ungated MLP with rope positions"
        )
    qkv = _qkv_bias(cfg)
    if family == "qwen3":
        if not cfg.qk_norm:
            return _unsupported("qk_norm", False, "Qwen3ForCausalLM always has QK-norm")
        if cfg.bias or qkv:
            return _unsupported(
                "bias" if cfg.bias else "qkv_bias",
                True,
                "Qwen3 with QK-norm has no MLP or q/k/v-only biases",
            )
        return None
    if cfg.qk_norm:
        return _unsupported("qk_norm", True, "only Qwen3 has QK-norm, and it has no biases")
    if family == "qwen2":
        if cfg.bias or not qkv:
            field = "bias" if cfg.bias else "qkv_bias"
            return _unsupported(field, cfg.bias or qkv, "Qwen2ForCausalLM has biases on q/k/v only")
        return None
    if qkv != cfg.bias:
        return _unsupported(
            "qkv_bias",
            qkv,
            "with bias=true, q/k/v biases without the others (or the reverse) match no HF class",
        )
    if family == "mistral":
        if cfg.bias:
            return _unsupported("bias", True, "MistralForCausalLM has no biases")
        return None
    if cfg.sliding_window is not None:
        return _unsupported(
            "sliding_window",
            cfg.sliding_window,
            "sliding windows need bias=false (Mistral) or qkv_bias (Qwen2)",
        )
    return None


def choose(cfg: TransformerConfig, remembered: str | None) -> str:
    """The HF class for this model: the one it was imported from if it still fits, else the
    first that does; ConfigError naming the field when none can express it."""
    if cfg.position == "learned":
        problem = _gpt2_problem(cfg)
        if problem is not None:
            raise problem
        return "GPT2LMHeadModel"
    order = ["qwen3"] if cfg.qk_norm else ["llama", "mistral", "qwen2"]
    if remembered in ARCHITECTURES and ARCHITECTURES[remembered] in order:
        order.remove(ARCHITECTURES[remembered])
        order.insert(0, ARCHITECTURES[remembered])
    problems = [(f, _rope_problem(cfg, f)) for f in order]
    for family, problem in problems:
        if problem is None:
            return CLASS_OF[family]
    raise problems[0][1]


def from_framework(cfg: TransformerConfig, name: str, dtype: str, source: Source | None) -> dict:
    """config.json for `cfg` as class `name` (see `choose`), weights in `dtype`."""
    family = ARCHITECTURES[name]
    original = source.config if source is not None else {}
    out: dict[str, Any] = {"architectures": [name], "model_type": family}
    out |= {k: original[k] for k in KEPT_KEYS if k in original}
    if family == "gpt2":
        out |= dict(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            activation_function="gelu" if cfg.activation == "gelu_exact" else "gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
        )
    else:
        out |= dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_size,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
        )
        if cfg.rope_scaling is not None:
            out["rope_scaling"] = cfg.rope_scaling.model_dump() | {
                "rope_type": cfg.rope_scaling.type
            }
            if cfg.rope_scaling.type == "linear":
                for k in (
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ):
                    out["rope_scaling"].pop(k)
        if family == "llama":
            out |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
        if family == "qwen3":
            out["attention_bias"] = False
        if family == "mistral":
            out["sliding_window"] = cfg.sliding_window
        if family in ("qwen2", "qwen3"):
            window = cfg.sliding_window
            out |= dict(
                use_sliding_window=window is not None,
                sliding_window=window,
                max_window_layers=0 if window is not None else cfg.n_layers,
                layer_types=["sliding_attention" if window else "full_attention"] * cfg.n_layers,
            )
    out |= {"tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}
    return out
