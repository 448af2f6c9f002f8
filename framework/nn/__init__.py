"""Pure-functional layers: each is a `*_spec(...)` declaring Params plus a pure apply function."""

from framework.errors import ShapeError
from framework.nn.attention import attention, attention_spec, cached_attention
from framework.nn.basic import (
    attend,
    dropout,
    embed,
    embedding_spec,
    linear,
    linear_spec,
    sub_key,
)
from framework.nn.batch_norm import batch_norm, batch_norm_spec, batch_norm_state_spec
from framework.nn.checks import scope
from framework.nn.conv import avg_pool, conv2d, conv2d_spec, max_pool
from framework.nn.masks import causal_mask, padding_mask, segment_positions
from framework.nn.mlp import mlp, mlp_spec
from framework.nn.norm import layer_norm, layer_norm_spec, rms_norm, rms_norm_spec
from framework.nn.param import Param, count, init, logical_axes, shapes, stack
from framework.nn.precision import BF16, FP32, Policy
from framework.nn.rope import apply_rope

__all__ = [
    "BF16",
    "FP32",
    "Param",
    "Policy",
    "ShapeError",
    "apply_rope",
    "attend",
    "attention",
    "attention_spec",
    "avg_pool",
    "batch_norm",
    "batch_norm_spec",
    "batch_norm_state_spec",
    "cached_attention",
    "causal_mask",
    "conv2d",
    "conv2d_spec",
    "count",
    "dropout",
    "embed",
    "embedding_spec",
    "init",
    "layer_norm",
    "layer_norm_spec",
    "linear",
    "linear_spec",
    "logical_axes",
    "max_pool",
    "mlp",
    "mlp_spec",
    "padding_mask",
    "rms_norm",
    "rms_norm_spec",
    "scope",
    "segment_positions",
    "shapes",
    "stack",
    "sub_key",
]
