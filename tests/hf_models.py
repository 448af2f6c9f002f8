"""Tiny Hugging Face models with random weights for the import/export tests (no hub access).

Each variant is a transformers config that exercises one mapping: GPT-2 (tanh and exact GELU,
tied and untied), Llama 3 with GQA and llama3 rope scaling, Llama 2 style with biases and
linear scaling, Mistral with a window shorter than the test sequence (and multi-query
attention), Qwen2 (q/k/v biases, tied, every layer sliding), Qwen3 (QK-norm, head_dim !=
d_model / n_heads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 100
SEQ = 16  # test sequence length; Mistral's window (5) is shorter
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _rope(**kw) -> dict:
    """A tiny RoPE model's config arguments (32 wide, 2 layers, 4 heads), with `kw`."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


VARIANTS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2_exact_untied": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        n_inner=48,
        activation_function="gelu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama3_gqa": lambda: transformers.LlamaConfig(
        **_rope(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3)
    ),
    "llama2_bias_linear": lambda: transformers.LlamaConfig(
        **_rope(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        )
    ),
    "mistral_window": lambda: transformers.MistralConfig(
        **_rope(num_key_value_heads=1, sliding_window=5)
    ),
    "qwen2_window": lambda: transformers.Qwen2Config(
        **_rope(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=0,
        )
    ),
    "qwen3": lambda: transformers.Qwen3Config(**_rope(num_key_value_heads=2, head_dim=16)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The variant's model with every parameter random (norm scales around 1, biases and
    matrices around 0), from a fixed torch seed; eval mode, float32."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(VARIANTS[name]())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in pname or ".ln_" in pname):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer(path: Path, vocab: int = VOCAB) -> Path:
    """A character-level BPE tokenizer.json of at most `vocab` ids, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens"] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return path


def logits(model: torch.nn.Module, ids) -> torch.Tensor:
    """The model's float32 logits for int token ids [batch, seq]."""
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


# The framework side of the parity tests (tests/test_hf.py, tests/test_lora_export.py).
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))
TOL = 1e-4
# XLA:CPU without its expensive passes: half the compile time, the same f32 arithmetic
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def framework_logits(cfg, params: dict) -> np.ndarray:
    """The framework's f32 logits on IDS (XLA attention and norms, highest matmul precision;
    adapters in the tree are applied)."""
    import jax
    import jax.numpy as jnp

    from framework.models.transformer import apply

    cfg = cfg.model_copy(update={"attention_impl": "xla", "norm_impl": "xla"})
    ids = jnp.asarray(IDS)
    with jax.default_matmul_precision("highest"):
        lowered = jax.jit(apply, static_argnums=2).lower(params, ids, cfg)
        out, _ = lowered.compile(FAST_COMPILE)(params, ids)
    return np.asarray(out)
