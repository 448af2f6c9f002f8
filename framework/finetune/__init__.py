"""Fine-tuning transformations of a model and its parameter tree (LoRA)."""

from framework.finetune.config import FinetuneConfig
from framework.finetune.lora import LoraConfig, add_adapters, merge, wrap

__all__ = ["FinetuneConfig", "LoraConfig", "add_adapters", "merge", "wrap"]
