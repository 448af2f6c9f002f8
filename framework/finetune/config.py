"""The `finetune` config section."""

from __future__ import annotations

import pydantic

from framework.finetune.lora import LoraConfig


class FinetuneConfig(pydantic.BaseModel):
    """How a run adapts a pretrained model (its weights come from checkpoint.resume)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    lora: LoraConfig | None = pydantic.Field(
        None, description="low-rank adapters on projection kernels; the base is frozen"
    )
