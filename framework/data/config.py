"""The `data:` section of a run config: where examples come from and how they are batched."""

from __future__ import annotations

from typing import Literal

import pydantic

STDLIB = "stdlib"


class DataConfig(pydantic.BaseModel):
    """Data source, tokenization, split, and batching; read by `framework.data.make_loaders`."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    source: Literal["synthetic_lm", "synthetic_classification", "text", "tokens"] = pydantic.Field(
        "text", description="text corpus, token files (.bin/.npy), or a synthetic task"
    )
    paths: list[str] = pydantic.Field(
        [STDLIB],
        min_length=1,
        description="files, folders (recursive) or globs; 'stdlib' = Python's own .py sources",
    )
    file_pattern: str = pydantic.Field(
        "*.py",
        min_length=1,
        description="file-name glob inside folders of a text corpus (token folders: all files)",
    )
    tokenizer: str = pydantic.Field(
        "byte",
        min_length=1,
        description="'byte' (256 ids, one per UTF-8 byte) or a HF tokenizers JSON file",
    )
    max_bytes: int | None = pydantic.Field(
        8_000_000, gt=0, description="read at most this many corpus bytes (files in sorted order)"
    )
    val_fraction: float = pydantic.Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="held-out share: by file for text, tail windows for tokens without val_paths",
    )
    token_dtype: Literal["uint16", "uint32"] = pydantic.Field(
        "uint16", description="dtype of raw .bin token files (.npy files carry their own)"
    )
    val_paths: list[str] = pydantic.Field(
        [], description="validation token files for source 'tokens'"
    )
    seq_len: int = pydantic.Field(256, ge=1, le=1 << 20, description="tokens per LM example")
    batch_size: int = pydantic.Field(
        32, ge=1, description="global batch in sequences/examples, summed over processes"
    )
    shuffle_seed: int = pydantic.Field(
        0, ge=0, lt=1 << 32, description="seed of the training order (not of the data itself)"
    )
    vocab_size: int = pydantic.Field(
        256, ge=2, le=(1 << 31) - 1, description="vocabulary of synthetic_lm"
    )
    num_classes: int = pydantic.Field(
        10, ge=2, le=1 << 20, description="classes of synthetic_classification"
    )
    input_shape: list[int] = pydantic.Field(
        [32], min_length=1, description="example shape of synthetic_classification"
    )
    num_examples: int = pydantic.Field(
        4096, ge=1, le=1 << 26, description="training examples of the synthetic sources"
    )
    worker_count: int = pydantic.Field(
        0, ge=0, le=256, description="grain worker processes (0 = read in the training process)"
    )

    @pydantic.field_validator("paths", "val_paths")
    @classmethod
    def _non_empty_paths(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("paths must be non-empty strings")
        return v

    @pydantic.field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every dimension must be >= 1, got {v}")
        return v

    @pydantic.model_validator(mode="after")
    def _tokens_need_files(self) -> DataConfig:
        if self.source == "tokens" and STDLIB in self.paths:
            raise ValueError(
                "source 'tokens' reads .bin/.npy token files: set data.paths "
                "('stdlib' is a text corpus; see scripts/prepare_data.py)"
            )
        return self
