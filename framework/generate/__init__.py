"""Generation from transformer language models with a KV cache: prefill, then one jitted
decode step per token (`generate`), and the token filters it samples through (`sampling`)."""

from framework.generate.loop import check_lengths, generate, generate_long, place_params
from framework.generate.sampling import Sampling, filter_logits, row_keys, sample

__all__ = [
    "Sampling",
    "check_lengths",
    "filter_logits",
    "generate",
    "generate_long",
    "place_params",
    "row_keys",
    "sample",
]
