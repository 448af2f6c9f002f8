"""Hugging Face checkpoints in and out: GPT-2, Llama (2, 3.x), Mistral, Qwen2, Qwen3.

`load(hf_dir)` gives (model config, numpy params, tokenizer path) in memory;
`import_checkpoint(hf_dir, out_dir)` writes a folder a run starts from (`checkpoint.resume`);
`export_run(run_dir, out_dir)` writes what `transformers.AutoModelForCausalLM.from_pretrained`
loads (a LoRA run's adapters merged); `export_adapters(run_dir, out_dir)` writes a LoRA run's
adapters alone in the PEFT format. None needs torch or transformers. See docs/hf.md."""

from framework.hf.adapters import export_adapters
from framework.hf.config import ARCHITECTURES
from framework.hf.convert import import_checkpoint, load
from framework.hf.export import export_run

__all__ = ["ARCHITECTURES", "export_adapters", "export_run", "import_checkpoint", "load"]
