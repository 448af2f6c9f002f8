"""Tensor names and layouts: each Hugging Face tensor <-> the framework leaves it fills.

A rule names one HF tensor (`{i}` for the layer) and the framework leaves cut from it along
its output axis (GPT-2's fused c_attn gives q, k and v). Torch `Linear` weights are stored
[out, in] (`transpose`); GPT-2's `Conv1D` already [in, out]. A framework leaf of shape
s (one layer's slice) is the HF block reshaped from (prod(s[:in_dims]), prod(s[in_dims:])),
or from a flat vector when `in_dims` is 0 (biases, norm scales). The rules are filtered by
the leaves the model's spec declares, and every declared leaf must be covered exactly once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np

from framework import nn
from framework.models.transformer import TransformerConfig, spec
from framework.train.integrity import leaf_paths

BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # not parameters
PREFIX = {"gpt2": "transformer.", "llama": "model."}  # base-model prefix (optional on disk)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor and the framework leaves ('/'-joined paths) it holds."""

    hf: str
    fw: tuple[str, ...]
    transpose: bool = False
    in_dims: int = 1

    @property
    def layered(self) -> bool:
        """Whether the rule stands for one tensor per layer."""
        return "{i}" in self.hf

    def name(self, layer: int | None) -> str:
        """The HF tensor name for `layer` (None for an unlayered rule)."""
        return self.hf.format(i=layer) if self.layered else self.hf

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One framework slice as the HF block it comes from (before any transpose)."""
        if self.in_dims == 0:
            return (math.prod(shape),)
        return (math.prod(shape[: self.in_dims]), math.prod(shape[self.in_dims :]))

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the HF tensor whose parts have framework slice shape `shape`."""
        part = self.part_shape(shape)
        joined = (*part[:-1], part[-1] * len(self.fw))
        return joined[::-1] if self.transpose else joined

    def split(self, tensor: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
        """HF tensor -> one array of framework slice shape per leaf (views where possible)."""
        block = tensor.T if self.transpose else tensor
        return [p.reshape(shape) for p in np.split(block, len(self.fw), axis=-1)]

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        """Framework slices -> the HF tensor."""
        blocks = [p.reshape(self.part_shape(p.shape)) for p in parts]
        block = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=-1)
        return block.T if self.transpose else block


def _gpt2() -> list[Rule]:
    """GPT2LMHeadModel's tensors (Conv1D weights: [in, out], no transpose)."""
    h = "transformer.h.{i}."
    rules = [
        Rule("transformer.wte.weight", ("embed/embedding",)),
        Rule("transformer.wpe.weight", ("pos_embed/embedding",)),
        Rule("lm_head.weight", ("unembed/kernel",), transpose=True),
        Rule(h + "attn.c_attn.weight", tuple(f"blocks/attn/{x}/kernel" for x in "qkv")),
        Rule(h + "attn.c_attn.bias", tuple(f"blocks/attn/{x}/bias" for x in "qkv"), in_dims=0),
        Rule(h + "attn.c_proj.weight", ("blocks/attn/o/kernel",), in_dims=2),
        Rule(h + "attn.c_proj.bias", ("blocks/attn/o/bias",), in_dims=0),
        Rule(h + "mlp.c_fc.weight", ("blocks/mlp/up/kernel",)),
        Rule(h + "mlp.c_fc.bias", ("blocks/mlp/up/bias",), in_dims=0),
        Rule(h + "mlp.c_proj.weight", ("blocks/mlp/down/kernel",)),
        Rule(h + "mlp.c_proj.bias", ("blocks/mlp/down/bias",), in_dims=0),
    ]
    norms = {h + "ln_1": "blocks/attn_norm", h + "ln_2": "blocks/mlp_norm"}
    norms["transformer.ln_f"] = "final_norm"
    for hf, fw in norms.items():
        rules.append(Rule(f"{hf}.weight", (f"{fw}/scale",), in_dims=0))
        rules.append(Rule(f"{hf}.bias", (f"{fw}/bias",), in_dims=0))
    return rules


def _llama() -> list[Rule]:
    """Llama/Mistral/Qwen2/Qwen3 tensors (every optional bias and norm; `rules` keeps those
    the model declares)."""
    h = "model.layers.{i}."
    rules = [
        Rule("model.embed_tokens.weight", ("embed/embedding",)),
        Rule("lm_head.weight", ("unembed/kernel",), transpose=True),
        Rule("model.norm.weight", ("final_norm/scale",), in_dims=0),
        Rule(h + "input_layernorm.weight", ("blocks/attn_norm/scale",), in_dims=0),
        Rule(h + "post_attention_layernorm.weight", ("blocks/mlp_norm/scale",), in_dims=0),
        Rule(h + "self_attn.o_proj.weight", ("blocks/attn/o/kernel",), transpose=True, in_dims=2),
        Rule(h + "self_attn.o_proj.bias", ("blocks/attn/o/bias",), in_dims=0),
        Rule(h + "self_attn.q_norm.weight", ("blocks/attn/q_norm/scale",), in_dims=0),
        Rule(h + "self_attn.k_norm.weight", ("blocks/attn/k_norm/scale",), in_dims=0),
    ]
    for x in "qkv":
        rules.append(Rule(h + f"self_attn.{x}_proj.weight", (f"blocks/attn/{x}/kernel",), True))
        rules.append(Rule(h + f"self_attn.{x}_proj.bias", (f"blocks/attn/{x}/bias",), in_dims=0))
    for x in ("gate", "up", "down"):
        rules.append(Rule(h + f"mlp.{x}_proj.weight", (f"blocks/mlp/{x}/kernel",), True))
        rules.append(Rule(h + f"mlp.{x}_proj.bias", (f"blocks/mlp/{x}/bias",), in_dims=0))
    return rules


def leaf_shapes(cfg: TransformerConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{'/'-joined path: (shape, dtype)} of every param the model declares (nothing allocated)."""
    tree = nn.shapes(spec(cfg))
    leaves = jax.tree.leaves(tree)
    return {
        p: (tuple(x.shape), np.dtype(x.dtype))
        for p, x in zip(leaf_paths(tree), leaves, strict=True)
    }


def rules(cfg: TransformerConfig, family: str) -> list[Rule]:
    """The rules for this model, each of whose leaves it declares; every leaf covered once."""
    shapes = leaf_shapes(cfg)
    candidates = _gpt2() if family == "gpt2" else _llama()
    out = [r for r in candidates if all(p in shapes for p in r.fw)]
    covered = [p for r in out for p in r.fw]
    missing = sorted(set(shapes) - set(covered))
    if missing or len(covered) != len(set(covered)):
        raise AssertionError(f"no {family} tensor maps to {missing or covered}")  # a bug here
    return out


def prefix(family: str) -> str:
    """The base-model prefix of `family`'s tensor names (checkpoints of the base class omit it)."""
    return PREFIX["gpt2" if family == "gpt2" else "llama"]


def slice_shape(rule: Rule, shapes: dict, path: str) -> tuple[int, ...]:
    """One layer's (or the whole leaf's) framework shape for `rule`."""
    shape = shapes[path][0]
    return shape[1:] if rule.layered else shape


def tensors(rule: Rule, n_layers: int) -> Iterator[tuple[int | None, str]]:
    """(layer or None, HF tensor name) for each tensor `rule` stands for."""
    for layer in range(n_layers) if rule.layered else [None]:
        yield layer, rule.name(layer)
