"""Performance-critical ops behind one call each; `impl` picks xla, pallas, triton, mosaic, cudnn
or auto (which ones per op: docs/kernels.md)."""

from framework.ops.attention import attention
from framework.ops.losses import cross_entropy, linear_cross_entropy
from framework.ops.norms import layer_norm, rms_norm
from framework.ops.registry import impls

__all__ = ["attention", "cross_entropy", "impls", "layer_norm", "linear_cross_entropy", "rms_norm"]
