"""The whole train step as a GPU program: the real jitted, sharded step (bf16 compute, Pallas
attention, norms and fused loss, remat, AdamW) exported for CUDA on an abstract 8 x H100 mesh,
for scaled-down Llama-style and GPT-2-style configs, under fsdp=8 and data=2 x fsdp=2 x tensor=2.
No GPU needed: jax.export runs the real Pallas -> Triton lowering against the abstract device."""

import re

import pytest

from framework.config import ConfigError, load_config
from framework.train.config import Config
from framework.train.gpu_program import export_train_step, summarize
from pallas_kernels import flash_attention_mgpu

SMALL = [
    "model.n_layers=2",
    "model.d_model=256",
    "model.n_heads=4",
    "model.d_ff=512",
    "model.max_seq_len=256",
    "model.vocab_size=1024",
    "data.seq_len=256",
    "data.batch_size=16",
    "train.grad_accum=1",
]
CONFIGS = {
    # Kernels named explicitly, GQA (2 KV heads), RMSNorm, SwiGLU, RoPE.
    "llama": (
        "configs/llama_1b.yaml",
        [
            "model.n_kv_heads=2",
            "model.attention_impl=pallas",
            "model.norm_impl=pallas",
            "model.loss_impl=pallas",
        ],
        "rms_norm",
    ),
    # impl=auto everywhere: for an abstract H100, auto must pick the same kernels.
    "gpt2": ("configs/gpt2_small.yaml", [], "layer_norm"),
}
MOSAIC = flash_attention_mgpu.available() is None  # jax >= 0.11: Hopper's attention kernels
MESHES = {
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
    "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_train_step_exports_for_8_h100(model, mesh):
    path, overrides, norm = CONFIGS[model]
    cfg = load_config(Config, path, [*SMALL, *overrides, *MESHES[mesh]])
    exported = export_train_step(cfg, devices=8)
    s = summarize(exported)
    assert s["platforms"] == ["cuda"] and s["devices"] == 8
    # Layers are scanned, so each kernel's call site appears once per scan body: the forward
    # body and the backward body (which re-runs the forward kernels under remat). Attention:
    # fwd in both bodies, dq and dkdv once. Norms: 2 per block (+1 final) forward, the block's
    # 2 recomputed in the backward body; their backward kernels 2 + 1. The fused loss: 4.
    kernels = s["triton_kernels"]
    # On Hopper, attention takes the Mosaic GPU kernels where jax has them (fwd 2, dq, dk/dv)
    attention = {"flash_attention_fwd": 2, "flash_attention_dq": 1, "flash_attention_dkdv": 1}
    assert s["mosaic_gpu_calls"] == (4 if MOSAIC else 0)
    assert kernels == {
        **({} if MOSAIC else attention),
        f"{norm}_fwd": 5,
        f"{norm}_bwd": 3,
        "linear_ce_fwd": 1,
        "linear_ce_dlogits": 1,
        "linear_ce_dh": 1,
        "linear_ce_dw": 1,
    }, kernels
    # The kernels run per shard (shard_map): the gradients of weights they take whole (norm
    # scales, the unembedding) are all-reduced over the shards inside the program.
    assert s["explicit_collectives"].get("all_reduce", 0) > 0, s
    # Every input that has a dimension (params, optimizer moments, the batch) is split over
    # the mesh; only scalars (step, Adam's count) are replicated.
    non_scalar = sum(1 for a in exported.in_avals if a.ndim > 0)
    assert s["inputs_split"] == non_scalar, s
    # bf16 compute: the attention kernels take bf16 q/k/v.
    text = exported.mlir_module()
    call = "custom_call @mosaic_gpu" if MOSAIC else 'name = "flash_attention_fwd"'
    fwd = next(line for line in text.splitlines() if call in line)
    assert re.search(r"tensor<[0-9x]+xbf16>", fwd), fwd[:300]


def test_export_refuses_a_token_config_without_a_vocabulary():
    cfg = load_config(
        Config,
        "configs/llama_1b.yaml",
        [*SMALL, "model.n_kv_heads=2", "model.vocab_size=null", "mesh.data=1", "mesh.fsdp=8"],
    )
    with pytest.raises(ConfigError, match="model.vocab_size"):
        export_train_step(cfg, devices=8)


def test_script_prints_the_summary_and_writes_a_loadable_export(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "step.mlir"
    args = ["--json", "--out", str(out), *SMALL, "model.n_kv_heads=2", *MESHES["fsdp8"]]
    done = subprocess.run(
        [sys.executable, "scripts/export_gpu.py", "configs/llama_1b.yaml", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["devices"] == 8 and summary["mosaic_gpu_calls"] == (4 if MOSAIC else 0)
    assert MOSAIC or summary["triton_kernels"]["flash_attention_dq"] == 1
    text = out.read_text()
    fwd = text.count("custom_call @mosaic_gpu") if MOSAIC else text.count('"flash_attention_fwd"')
    assert "func.func public @main" in text and fwd >= 2
