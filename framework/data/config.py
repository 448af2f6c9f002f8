"""The `data:` section of a run config: where examples come from and how they are batched."""

from __future__ import annotations

from typing import Literal

import pydantic

STDLIB = "stdlib"
SourceType = Literal[
    "text", "jsonl", "parquet", "arrow", "hf_dataset", "chat", "tokens"
]  # the kinds a mixture may hold
# The single-source keys that data.sources replaces (with per-source values).
# (file_pattern, text_field and max_bytes stay defaults a source may override).
_SINGLE_SOURCE_KEYS = ("source", "paths", "val_paths")


def _check_paths(cls, v: list[str]) -> list[str]:
    """paths / val_paths entries are non-empty strings."""
    if any(not p.strip() for p in v):
        raise ValueError("paths must be non-empty strings")
    return v


class SourceConfig(pydantic.BaseModel):
    """One entry of `data.sources`: a corpus and its mixture weight."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    type: SourceType = pydantic.Field(
        "text", description="text files, jsonl/parquet/arrow/hf_dataset, chat jsonl, or tokens"
    )
    paths: list[str] = pydantic.Field(
        ..., min_length=1, description="files, folders (recursive) or globs of this source"
    )
    weight: float = pydantic.Field(
        1.0, ge=0.0, description="share of training rows (weights are normalised)"
    )
    name: str | None = pydantic.Field(None, description="label in logs (default: source<i>)")
    file_pattern: str | None = pydantic.Field(
        None,
        description="file-name glob inside folders of text (default *.py); the split of an "
        "hf_dataset DatasetDict (default train)",
    )
    text_field: str | None = pydantic.Field(
        None, min_length=1, description="jsonl field / column (default: data.text_field)"
    )
    max_bytes: int | None = pydantic.Field(
        None, gt=0, description="read at most this many text bytes (default: data.max_bytes)"
    )
    val_paths: list[str] = pydantic.Field(
        [], description="held-out files of this source (default: data.val_fraction of it)"
    )

    _non_empty_paths = pydantic.field_validator("paths", "val_paths")(_check_paths)


class StageConfig(pydantic.BaseModel):
    """From training step `step` on, the mixture samples its sources with `weights`."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    step: int = pydantic.Field(..., ge=1, description="first step of the stage")
    weights: list[float] = pydantic.Field(..., min_length=1, description="one per source")


class DataConfig(pydantic.BaseModel):
    """Data source, tokenization, split, and batching; read by `framework.data.make_loaders`."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    source: Literal[
        "synthetic_lm",
        "synthetic_classification",
        "text",
        "jsonl",
        "parquet",
        "arrow",
        "hf_dataset",
        "chat",
        "tokens",
    ] = pydantic.Field(
        "text",
        description="text files; jsonl/parquet/arrow/hf_dataset text; chat jsonl (SFT); token "
        "files or a prepare_data folder; or a synthetic task",
    )
    paths: list[str] = pydantic.Field(
        [STDLIB],
        min_length=1,
        description="files, folders (recursive) or globs; 'stdlib' = Python's own .py sources",
    )
    file_pattern: str = pydantic.Field(
        "*.py",
        min_length=1,
        description="file-name glob inside folders of a text corpus (token folders: all "
        "files); the split of an hf_dataset DatasetDict (default train)",
    )
    text_field: str = pydantic.Field(
        "text", min_length=1, description="jsonl field / parquet, arrow or dataset column"
    )
    sources: list[SourceConfig] = pydantic.Field(
        [], description="a mixture of sources with weights (replaces data.source/paths/...)"
    )
    stages: list[StageConfig] = pydantic.Field(
        [], description="mixture weights that change at given steps"
    )
    packing: bool = pydantic.Field(
        True,
        description="LM rows: documents packed end to end (segment_ids, positions); false: "
        "one document per row, padded, padding out of the loss",
    )
    on_bad_file: Literal["skip", "fail"] = pydantic.Field(
        "skip", description="a non-UTF-8 or binary file in a text source: skip (counted) or fail"
    )
    tokenizer: str = pydantic.Field(
        "byte",
        min_length=1,
        description="'byte' (257 ids: one per UTF-8 byte and EOS) or a HF tokenizers JSON file",
    )
    eos_token: str | None = pydantic.Field(
        None, description="end-of-document token of a tokenizer file (default: its eos_token)"
    )
    chat_template: str | None = pydantic.Field(
        None,
        description="chat sources: 'auto' (the tokenizer's own, else chatml), 'chatml', "
        "'llama3' or 'plain'",
    )
    max_bytes: int | None = pydantic.Field(
        8_000_000,
        gt=0,
        description="read at most this many text bytes per text-like source (files in sorted "
        "order; chat and token sources are read whole)",
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

    _non_empty_paths = pydantic.field_validator("paths", "val_paths")(_check_paths)

    @pydantic.field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every dimension must be >= 1, got {v}")
        return v

    @pydantic.model_validator(mode="after")
    def _mixture(self) -> DataConfig:
        if not self.sources:
            if self.stages:
                raise ValueError("data.stages needs data.sources (a mixture)")
            return self
        if self.source.startswith("synthetic"):
            raise ValueError("data.sources mixes text or token sources, not synthetic ones")
        fields = type(self).model_fields
        given = sorted(
            k
            for k in _SINGLE_SOURCE_KEYS
            if k != "source" and getattr(self, k) != fields[k].get_default()
        )
        if given:
            raise ValueError(
                f"data.sources replaces data.{', data.'.join(given)}: set them per source"
            )
        if sum(s.weight for s in self.sources) <= 0:
            raise ValueError("data.sources weights are all zero")
        steps = [st.step for st in self.stages]
        if steps != sorted(set(steps)):
            raise ValueError(f"data.stages steps must increase, got {steps}")
        for st in self.stages:
            if len(st.weights) != len(self.sources):
                raise ValueError(
                    f"data.stages step {st.step}: {len(st.weights)} weights for "
                    f"{len(self.sources)} sources"
                )
            if any(w < 0 for w in st.weights) or sum(st.weights) <= 0:
                raise ValueError(
                    f"data.stages step {st.step}: weights must be >= 0 and not all zero, "
                    f"got {st.weights}"
                )
        return self

    def source_list(self) -> list[SourceConfig]:
        """The sources to mix, with the data-wide defaults filled in: `sources`, or the single
        source the top-level keys describe."""
        listed = self.sources or [
            SourceConfig(type=self.source, paths=self.paths, val_paths=self.val_paths)
        ]
        defaults = {
            "file_pattern": self.file_pattern,
            "text_field": self.text_field,
            "max_bytes": self.max_bytes,
        }
        if self.file_pattern == type(self).model_fields["file_pattern"].default:
            defaults["file_pattern"] = None  # the format's own: *.py for text, by extension else
        return [
            s.model_copy(update={k: v for k, v in defaults.items() if getattr(s, k) is None})
            for s in listed
        ]

    @pydantic.model_validator(mode="after")
    def _tokens_need_files(self) -> DataConfig:
        if self.source == "tokens" and STDLIB in self.paths:
            raise ValueError(
                "source 'tokens' reads .bin/.npy token files: set data.paths "
                "('stdlib' is a text corpus; see scripts/prepare_data.py)"
            )
        return self
