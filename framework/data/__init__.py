"""Data: text corpora, token files and synthetic tasks, batched by a grain pipeline.

train, eval_set, meta = make_loaders(cfg.data, process_index=..., process_count=...)
batch = next(train)                       # process-local rows of the global batch
state = train.get_state(); train.set_state(state)   # resume exactly
for batch in eval_set.batches(8): ...     # same held-out batches every call
"""

from framework.data.config import DataConfig
from framework.data.pipeline import EvalSet, Loader, describe, make_loaders
from framework.data.tokenizers import load_tokenizer
from framework.errors import DataError

__all__ = [
    "DataConfig",
    "DataError",
    "EvalSet",
    "Loader",
    "describe",
    "load_tokenizer",
    "make_loaders",
]
