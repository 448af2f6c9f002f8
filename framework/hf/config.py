"""Hugging Face config.json -> the transformer's config, per architecture (writing it back:
`framework.hf.target`).

Reading takes config.json as published checkpoints write it (`rope_theta` + `rope_scaling`
with `type` or `rope_type`) or as transformers 5.x does (`rope_parameters`); keys a file leaves
out take transformers' class defaults; a value the framework cannot run is refused, naming the
key."""

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
GPT2_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}
GELU = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
ROPE_TYPES = ("default", "linear", "llama3")
KEPT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


@dataclasses.dataclass(frozen=True)
class Source:
    """What an imported checkpoint was: its class, dtype, original config.json and the folder
    it was imported from (None in records written before it was kept)."""

    architecture: str
    dtype: str | None
    config: dict
    path: str | None = None

    def to_json(self) -> dict:
        """As written to hf.json."""
        out = {"architecture": self.architecture, "dtype": self.dtype, "config": self.config}
        return out | ({"path": self.path} if self.path else {})

    @classmethod
    def from_json(cls, data: dict) -> Source:
        """From hf.json's contents."""
        return cls(
            data["architecture"], data.get("dtype"), data.get("config", {}), data.get("path")
        )


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
    """The weights' dtype config.json names (`dtype`, or 4.x's `torch_dtype`), if a float one."""
    value = hf.get("dtype", hf.get("torch_dtype"))
    return value if value in ("float32", "bfloat16", "float16") else None


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, framework rope_scaling) from either config.json layout, read as transformers
    does: `rope_scaling` wins over `rope_parameters`, a `rope_theta` inside the dict over the
    top-level one, and llama3's `original_max_position_embeddings` defaults to
    `max_position_embeddings`."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get(key) or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: {key} must be an object, not {scaling!r}")
    if scaling and all(isinstance(v, dict) for v in scaling.values()):
        raise ConfigError(f"config.json: {key} per layer type is not supported")
    theta = scaling.get("rope_theta", hf.get("rope_theta"))
    theta = 10000.0 if theta is None else theta  # transformers' default_theta
    for where, holder in (("", hf), (f"{key}.", scaling)):
        if holder.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise ConfigError(
                f"config.json: {where}partial_rotary_factor="
                f"{holder['partial_rotary_factor']!r} is not supported (only 1.0)"
            )
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: {key}.rope_type={kind!r} is not supported (supported: "
            f"{', '.join(ROPE_TYPES)})"
        )
    if kind == "default":
        return float(theta), None
    defaults = {"original_max_position_embeddings": hf.get("max_position_embeddings")}
    names = ["factor"]
    if kind == "llama3":
        names += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    out: dict[str, Any] = {"type": kind}
    for name in names:
        value = scaling.get(name, defaults.get(name))
        if value is None:
            raise ConfigError(f"config.json: {key}.{name} is missing (rope_type {kind})")
        out[name] = value
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
    """ConfigError naming `key` unless its value is one of `allowed`."""
    if hf.get(key) not in allowed:
        raise ConfigError(
            f"config.json: {key}={hf.get(key)!r} is not supported (expected {allowed})"
        )


def to_framework(hf: dict) -> tuple[TransformerConfig, Source]:
    """(model config, source record) for a supported config.json."""
    name = architecture(hf)
    family = ARCHITECTURES[name]
    given = {k: v for k, v in hf.items() if v is not None or k == "sliding_window"}
    if family == "gpt2":  # GPT2Config.attribute_map: the common names set the GPT-2 ones
        given |= {GPT2_ALIASES[k]: v for k, v in given.items() if k in GPT2_ALIASES}
    c = DEFAULTS[family] | given
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
        # Llama and Qwen3 read attention_bias; Mistral and Qwen2 ignore the key (fixed biases)
        bias = bool(c.get("attention_bias")) if family in ("llama", "qwen3") else False
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
