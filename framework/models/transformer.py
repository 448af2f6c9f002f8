"""Decoder-only transformer; the config makes it GPT-2, Llama, Mistral or Qwen style.

GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings.
Llama: RoPE (optionally scaled), RMSNorm, SwiGLU, grouped-query attention, no biases.
Mistral adds a sliding window; Qwen2 biases on q/k/v only; Qwen3 a per-head QK RMSNorm.
Blocks carry a leading "layers" axis and run under `lax.scan` (or a Python loop over the same
params when `scan_layers` is false), each under the remat policy named in the config.
`decode` runs the same blocks over a KV cache (`init_cache`) for generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import pydantic

from framework import nn, ops
from framework.errors import ConfigError, ShapeError
from framework.models.registry import Model, ModelConfig, data_kind_error, register
from framework.nn.checks import check_int, check_rank, scope
from framework.parallel.logical import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RopeScaling(pydantic.BaseModel):
    """RoPE frequency scaling of long-context checkpoints (Hugging Face's `rope_scaling`)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    type: Literal["linear", "llama3"] = pydantic.Field(
        description="linear: positions / factor; llama3: Llama 3.1's per-frequency rule"
    )
    factor: float = pydantic.Field(gt=0, description="context extension factor")
    low_freq_factor: float = pydantic.Field(1.0, gt=0, description="llama3 only")
    high_freq_factor: float = pydantic.Field(4.0, gt=0, description="llama3 only")
    original_max_position_embeddings: int = pydantic.Field(
        8192, gt=0, description="llama3 only: the context the model was pre-trained at"
    )


class TransformerConfig(ModelConfig):
    """Decoder-only language model; defaults are a small GPT-2 style byte-level model."""

    name: Literal["transformer"] = "transformer"
    vocab_size: int | None = pydantic.Field(
        None, gt=0, description="token ids the model embeds; null = the data's vocabulary"
    )
    d_model: int = pydantic.Field(256, gt=0, description="residual stream width")
    n_layers: int = pydantic.Field(4, gt=0, description="number of transformer blocks")
    n_heads: int = pydantic.Field(4, gt=0, description="query heads per block")
    n_kv_heads: int | None = pydantic.Field(
        None, gt=0, description="key/value heads (GQA; 1 = multi-query); default n_heads"
    )
    head_dim: int | None = pydantic.Field(None, gt=0, description="default d_model // n_heads")
    d_ff: int = pydantic.Field(1024, gt=0, description="hidden width of the MLP")
    max_seq_len: int = pydantic.Field(256, gt=0, description="longest sequence (learned pos.)")
    position: Literal["learned", "rope"] = pydantic.Field("learned", description="positions")
    rope_theta: float = pydantic.Field(10000.0, gt=0, description="RoPE base frequency")
    rope_scaling: RopeScaling | None = pydantic.Field(
        None, description="RoPE frequency scaling (Llama 3.1: type llama3); null = none"
    )
    sliding_window: int | None = pydantic.Field(
        None, gt=0, description="each token attends to at most this many latest (Mistral)"
    )
    norm: Literal["layernorm", "rmsnorm"] = pydantic.Field("layernorm", description="norm type")
    norm_eps: float = pydantic.Field(1e-5, gt=0, description="epsilon inside the norms")
    activation: Literal["gelu", "gelu_exact", "swiglu"] = pydantic.Field(
        "gelu", description="MLP type: gelu (tanh approximation, GPT-2), gelu_exact (erf), swiglu"
    )
    bias: bool = pydantic.Field(True, description="biases in linear layers and norms")
    qkv_bias: bool | None = pydantic.Field(
        None, description="biases on the q/k/v projections (Qwen2); null = same as bias"
    )
    qk_norm: bool = pydantic.Field(
        False, description="RMSNorm of each query and key head before RoPE (Qwen3)"
    )
    tie_embeddings: bool = pydantic.Field(True, description="unembed with the embedding table")
    dropout: float = pydantic.Field(0.0, ge=0, lt=1, description="residual dropout rate")
    scan_layers: bool = pydantic.Field(True, description="lax.scan over blocks (else unroll)")
    remat: Literal["none", "full", "save_dots", "save_dots_no_batch"] = pydantic.Field(
        "none", description="activation checkpointing policy per block"
    )
    attention_impl: Literal["auto", "xla", "pallas", "triton", "mosaic", "cudnn"] = pydantic.Field(
        "auto",
        description="attention kernel; auto = fastest measured or per-GPU table (cudnn, mosaic "
        "on Hopper, triton), else xla; pallas = mosaic on Hopper where it takes the call, else "
        "triton",
    )
    norm_impl: Literal["auto", "xla", "pallas"] = pydantic.Field(
        "auto", description="norm kernel; auto = pallas on GPU where supported, else xla"
    )
    loss_impl: Literal["auto", "xla", "chunked", "pallas"] = pydantic.Field(
        "auto", description="unembedding + cross-entropy; chunked/pallas never hold full logits"
    )
    z_loss: float = pydantic.Field(0.0, ge=0, description="weight of logsumexp**2 in the loss")

    @pydantic.model_validator(mode="after")
    def _check_heads(self):
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}) "
                "unless head_dim is set"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("rope_scaling needs position: rope")
        return self

    @property
    def head_size(self) -> int:
        """Per-head width: head_dim, else d_model // n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, else n_heads."""
        return self.n_kv_heads or self.n_heads

    def unset(self) -> list[str]:
        return ["vocab_size"] if self.vocab_size is None else []

    def for_data(self, meta: Mapping[str, Any]) -> TransformerConfig:
        """Vocabulary from the data unless set (then at least the data's); learned positions
        cover data.seq_len; cudnn attention only on a GPU."""
        if meta.get("kind") != "lm":
            raise data_kind_error(self, "token", meta)
        vocab = meta.get("vocab_size")
        if vocab is None and self.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is not set and the data's vocabulary is not known before "
                "reading it; set model.vocab_size"
            )
        if self.vocab_size is not None and vocab is not None and self.vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size ({self.vocab_size}) is smaller than the data's vocabulary "
                f"({vocab}); raise it or leave it unset to take the data's"
            )
        seq_len = meta.get("seq_len")
        if self.position == "learned" and seq_len is not None and seq_len > self.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({seq_len}) is longer than model.max_seq_len "
                f"({self.max_seq_len}) of the learned position table"
            )
        window = self.sliding_window
        if self.attention_impl == "cudnn" and window is not None and (seq_len or 0) > window:
            raise ConfigError(
                f"model.attention_impl=cudnn takes no sliding window (model.sliding_window "
                f"{window} < data.seq_len {seq_len}); use auto, pallas or xla"
            )
        if self.attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise ConfigError(
                f"model.attention_impl=cudnn needs a GPU (backend is {jax.default_backend()}); "
                "use auto, pallas or xla"
            )
        return (
            self if self.vocab_size is not None else self.model_copy(update={"vocab_size": vocab})
        )


def _norm_spec(cfg: TransformerConfig) -> dict:
    if cfg.norm == "rmsnorm":
        return nn.rms_norm_spec(cfg.d_model)
    return nn.layer_norm_spec(cfg.d_model, bias=cfg.bias)


def _norm(params: dict, x: jax.Array, cfg: TransformerConfig) -> jax.Array:
    if cfg.norm == "rmsnorm":
        return nn.rms_norm(params, x, eps=cfg.norm_eps, impl=cfg.norm_impl)
    return nn.layer_norm(params, x, eps=cfg.norm_eps, impl=cfg.norm_impl)


def block_spec(cfg: TransformerConfig) -> dict:
    return {
        "attn_norm": _norm_spec(cfg),
        "attn": nn.attention_spec(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            bias=cfg.bias,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
        ),
        "mlp_norm": _norm_spec(cfg),
        "mlp": nn.mlp_spec(cfg.d_model, cfg.d_ff, cfg.activation, bias=cfg.bias),
    }


def spec(cfg: TransformerConfig) -> dict:
    tree = {
        "embed": nn.embedding_spec(cfg.vocab_size, cfg.d_model),
        "blocks": nn.stack(block_spec(cfg), cfg.n_layers),
        "final_norm": _norm_spec(cfg),
    }
    if cfg.position == "learned":
        tree["pos_embed"] = nn.embedding_spec(
            cfg.max_seq_len, cfg.d_model, axes=(None, "embed"), std=0.01
        )
    if not cfg.tie_embeddings:
        tree["unembed"] = nn.linear_spec(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), bias=False
        )
        # the fused loss reads this kernel directly (no nn.linear): not a LoRA target
        kernel = tree["unembed"]["kernel"]
        tree["unembed"]["kernel"] = dataclasses.replace(kernel, out_dims=None)
    return tree


def _attention_options(cfg: TransformerConfig) -> dict:
    """The attention keywords the config decides (shared by training and cached decoding)."""
    rope = cfg.position == "rope"
    return dict(
        rope_theta=cfg.rope_theta if rope else None,
        rope_scaling=cfg.rope_scaling.model_dump() if rope and cfg.rope_scaling else None,
        window=cfg.sliding_window,
        norm_eps=cfg.norm_eps,
    )


def block(
    params: dict,
    x: jax.Array,
    cfg: TransformerConfig,
    key: jax.Array | None,
    segment_ids: jax.Array | None,
    positions: jax.Array,
    cache: dict | None = None,
) -> tuple[jax.Array, dict | None]:
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). With a layer's KV
    `cache` the attention reads and extends it; returns (x, updated cache or None)."""
    k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
    k_lora = nn.sub_key(key, 2)  # LoRA dropout (framework.finetune); unused without adapters
    with scope("attn"):
        h = _norm(params["attn_norm"], x, cfg)
        if cache is None:
            h = nn.attention(
                params["attn"],
                h,
                causal=True,
                segment_ids=segment_ids,
                positions=positions,
                impl=cfg.attention_impl,
                key=nn.sub_key(k_lora, 0),
                **_attention_options(cfg),
            )
        else:
            h, cache = nn.cached_attention(
                params["attn"], h, cache, positions, **_attention_options(cfg)
            )
    x = x + nn.dropout(h, cfg.dropout, k_attn)
    with scope("mlp"):
        h = nn.mlp(
            params["mlp"], _norm(params["mlp_norm"], x, cfg), cfg.activation, nn.sub_key(k_lora, 1)
        )
    x = x + nn.dropout(h, cfg.dropout, k_mlp)
    return constrain(x, ("batch", "seq", "embed")), cache


def _run_blocks(
    blocks: dict,
    x: jax.Array,
    cfg: TransformerConfig,
    key: jax.Array | None,
    segment_ids: jax.Array | None,
    positions: jax.Array,
    cache: dict | None = None,
) -> tuple[jax.Array, dict | None]:
    keys = None if key is None else jax.random.split(key, cfg.n_layers)
    policy = REMAT_POLICIES[cfg.remat]

    def one(p, h, k, c):
        return block(p, h, cfg, k, segment_ids, positions, c)

    if cfg.remat != "none" and cache is None:
        one = jax.checkpoint(one, policy=policy, prevent_cse=not cfg.scan_layers)

    if cfg.scan_layers:

        def body(h, layer):
            p, k, c = layer
            return one(p, h, k, c)

        with scope("blocks"):
            return jax.lax.scan(body, x, (blocks, keys, cache))
    layer_caches = []
    for i in range(cfg.n_layers):
        with scope(f"blocks/{i}"):
            x, c = one(
                jax.tree.map(lambda a, i=i: a[i], blocks),
                x,
                None if keys is None else keys[i],
                None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache),
            )
        layer_caches.append(c)
    if cache is None:
        return x, None
    return x, jax.tree.map(lambda *layers: jnp.stack(layers), *layer_caches)


def hidden_states(
    params: dict,
    tokens: jax.Array,
    cfg: TransformerConfig,
    *,
    key: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: dict | None = None,
) -> tuple[jax.Array, jax.Array, dict | None]:
    """tokens [batch, seq] -> (final-norm hidden states [batch, seq, d_model], unembedding
    [d_model, vocab], both in the compute dtype; the updated KV cache when one is given)."""
    check_int(tokens, "tokens")
    check_rank(tokens, 2, "tokens", "batch, seq")
    seq = tokens.shape[1]
    if cfg.position == "learned" and seq > cfg.max_seq_len:
        raise ShapeError(f"tokens have seq length {seq} > max_seq_len {cfg.max_seq_len}")
    if positions is None:
        positions = (
            nn.segment_positions(segment_ids)
            if segment_ids is not None
            else jnp.broadcast_to(jnp.arange(seq), tokens.shape)
        )
    p = cfg.policy.cast_to_compute(params)
    k_embed, k_blocks = (None, None) if key is None else jax.random.split(key)
    x = nn.embed(p["embed"], tokens)
    if cfg.position == "learned":
        x = x + nn.embed(p["pos_embed"], positions)
    x = constrain(nn.dropout(x, cfg.dropout, k_embed), ("batch", "seq", "embed"))
    x, cache = _run_blocks(p["blocks"], x, cfg, k_blocks, segment_ids, positions, cache)
    x = _norm(p["final_norm"], x, cfg)
    unembed = p["embed"]["embedding"].T if cfg.tie_embeddings else p["unembed"]["kernel"]
    return x, unembed, cache


def apply(
    params: dict,
    tokens: jax.Array,
    cfg: TransformerConfig,
    *,
    key: jax.Array | None = None,
    state: dict | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
):
    """tokens [batch, seq] int -> (logits [batch, seq, vocab] in the output dtype, state).

    segment_ids [batch, seq] restricts attention to each packed document; positions default
    to the position within each segment."""
    with scope("transformer"):
        x, unembed, _ = hidden_states(
            params, tokens, cfg, key=key, segment_ids=segment_ids, positions=positions
        )
        logits = constrain(jnp.einsum("btd,dv->btv", x, unembed), ("batch", "seq", "vocab"))
    return cfg.policy.cast_to_output(logits), state if state is not None else {}


CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")  # logical axes of cache k and v


def init_cache(
    cfg: TransformerConfig, batch: int, length: int, dtype: Any = None
) -> dict[str, jax.Array]:
    """An empty KV cache {"k", "v": [n_layers, batch, length, kv_heads, head_dim]} (zeros, in
    the compute dtype unless `dtype`) for `decode`; length bounds prompt + generated tokens."""
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_size)
    dtype = cfg.compute_dtype if dtype is None else dtype
    return {name: jnp.zeros(shape, dtype) for name in ("k", "v")}


def decode(
    params: dict,
    tokens: jax.Array,
    cfg: TransformerConfig,
    *,
    cache: dict[str, jax.Array],
    positions: jax.Array,
    last: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens [batch, seq] at `positions` [batch, seq] (each row contiguous, rows may start at
    different positions) -> (logits [batch, seq, vocab] in the output dtype, updated cache).

    The blocks are the training ones; each layer writes the tokens' keys and values into the
    cache at their positions and attends to the cached positions up to its own (within the
    sliding window). Prefill: the right-padded prompts at 0..P-1; then one token per step.
    Positions must stay below the cache length (a write past it lands clamped, unchecked).
    `last` [batch] (a prefill's prompt length - 1) unembeds only that token of each row:
    logits [batch, 1, vocab] instead of [batch, seq, vocab]."""
    check_int(positions, "positions")
    if positions.shape != tokens.shape:
        raise ShapeError(f"positions {positions.shape} must match tokens {tokens.shape}")
    with scope("transformer"):
        x, unembed, cache = hidden_states(params, tokens, cfg, positions=positions, cache=cache)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        logits = jnp.einsum("btd,dv->btv", x, unembed)
    return cfg.policy.cast_to_output(logits), cache


def loss(
    params: dict,
    batch: dict,
    cfg: TransformerConfig,
    *,
    key: jax.Array | None = None,
    state: dict | None = None,
):
    """Mean next-token cross-entropy over positions where batch["mask"] (default all) is set;
    aux["weight"] is the number of those positions (the train step weights micro-batches by it).

    batch: {"inputs": [b, t] ids, "targets": [b, t] ids, optional "mask", "segment_ids",
    "positions"} (packed rows: framework.data.rows).
    The unembedding and the loss are one op (`loss_impl`), so fused kernels never hold the
    full f32 logits."""
    with scope("transformer"):
        x, unembed, _ = hidden_states(
            params,
            batch["inputs"],
            cfg,
            key=key,
            segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"),
        )
    per_token = ops.linear_cross_entropy(
        x, unembed, batch["targets"], z_loss=cfg.z_loss, impl=cfg.loss_impl
    )
    mask = batch.get("mask")
    weights = jnp.ones_like(per_token) if mask is None else mask.astype(jnp.float32)
    n_tokens = jnp.maximum(weights.sum(), 1.0)
    mean = (per_token * weights).sum() / n_tokens
    return mean, {
        "metrics": {"loss": mean},
        "weight": weights.sum(),
        "state": state if state is not None else {},
    }


def layer_matmul_params(cfg: TransformerConfig) -> int:
    """Parameters one block multiplies with: the q/k/v/o projections and the MLP."""
    attn = cfg.d_model * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return attn + cfg.d_model * cfg.d_ff * (3 if cfg.activation == "swiglu" else 2)


def attention_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """The attention scores and weighted sum, forward and backward, over all layers: 12 x
    layers x keys seen x heads x head_dim (PaLM appendix B; the forward is a third of it),
    with a query seeing on average half the keys (causal; MaxText counts it the same way) or,
    with a sliding window w < seq, min(position + 1, w) keys: w - w**2 / (2 seq) on average."""
    seen = 0.5 * seq_len
    if cfg.sliding_window is not None and cfg.sliding_window < seq_len:
        w = cfg.sliding_window
        seen = w - w * w / (2.0 * seq_len)
    return 12.0 * cfg.n_layers * seen * cfg.n_heads * cfg.head_size


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x matmul params (embedding lookups excluded, the
    unembedding included) plus the attention's (attention_flops_per_token)."""
    matmul_params = cfg.n_layers * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
    return 6.0 * matmul_params + attention_flops_per_token(cfg, seq_len)


MODEL = register(
    Model("transformer", TransformerConfig, spec, apply, loss, flops_per_token=flops_per_token)
)
spec = MODEL.spec  # the registered spec: Params in cfg.param_dtype
