"""Which Hugging Face class a framework model exports as, and its config.json.

A model imported from a class stays that class while its fields allow; otherwise the fields
decide (learned positions: GPT-2; RoPE: Qwen3 with QK-norm, else Llama, Mistral or Qwen2 by
biases and window). A model no class expresses is refused with one line naming the field."""

from __future__ import annotations

import json
from typing import Any

from framework.errors import ConfigError
from framework.hf.config import ARCHITECTURES, CLASS_OF, KEPT_KEYS, Source
from framework.models.transformer import TransformerConfig


def _unsupported(field: str, value: Any, why: str) -> ConfigError:
    """The one-line refusal naming `model.<field>` and its value."""
    return ConfigError(f"model.{field}={json.dumps(value)}: {why}")


def _qkv_bias(cfg: TransformerConfig) -> bool:
    """Whether the q/k/v projections have biases."""
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
    # token ids the source did not give are null, not the class defaults (GPT-2's 50256,
    # Llama's 1 and 2: ids a model trained here does not reserve)
    out |= {k: original.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
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
        if cfg.rope_scaling is not None:  # the published layout: transformers 4.x and 5.x read it
            scaling = cfg.rope_scaling.model_dump()
            kind = scaling.pop("type")
            keep = ("factor",) if kind == "linear" else tuple(scaling)
            out["rope_scaling"] = {"rope_type": kind} | {k: scaling[k] for k in keep}
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
