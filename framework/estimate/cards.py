"""GPUs the estimator knows: memory, HBM and interconnect bandwidth (peak dense FLOP/s from
the MFU table in framework.train.metrics), with where each number comes from, and the
efficiencies measured on our own step (calibration)."""

from __future__ import annotations

import dataclasses
import os

from framework.errors import ConfigError
from framework.train.metrics import table_peak_flops


@dataclasses.dataclass(frozen=True)
class Card:
    """One GPU model; bandwidths are per GPU, one direction, in bytes/s."""

    name: str
    device_kind: str  # as jax names it (abstract meshes for tracing use it)
    memory: int  # bytes of HBM, as nvidia-smi reports them
    hbm: float
    nvlink: float  # within a node
    network: float  # across nodes (one NIC per GPU)
    gpus_per_node: int
    source: str

    @property
    def bf16_flops(self) -> float:
        """Dense bf16 tensor-core peak FLOP/s: the MFU table's (framework.train.metrics)."""
        return table_peak_flops(self.device_kind, "bfloat16")[0]


GB = 10**9
MIB = 2**20
# Memory: what nvidia-smi reports (H100 SXM: 81559 MiB and H200: 143771 MiB, read on the
# machines lent to this project; A100 80GB: 81920 MiB).
# NVLink: 900 GB/s (H100/H200 SXM) and 600 GB/s (A100) are both directions together; one
# direction is half. Network: one 400 Gb/s NIC per GPU (ConnectX-7; A100 nodes: 200 Gb/s).
CARDS: dict[str, Card] = {
    "h100": Card(
        "NVIDIA H100 SXM 80GB",
        "NVIDIA H100 80GB HBM3",
        81559 * MIB,
        3.35e12,
        450 * GB,
        50 * GB,
        8,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 3.35 TB/s, NVLink 900 GB/s",
    ),
    "h200": Card(
        "NVIDIA H200 SXM 141GB",
        "NVIDIA H200",
        143771 * MIB,
        4.8e12,
        450 * GB,
        50 * GB,
        8,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM): 4.8 TB/s, NVLink 900 GB/s",
    ),
    "a100": Card(
        "NVIDIA A100 SXM 80GB",
        "NVIDIA A100-SXM4-80GB",
        81920 * MIB,
        2.039e12,
        300 * GB,
        25 * GB,
        8,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 2.039 TB/s, NVLink 600 GB/s",
    ),
}

# Fractions of the datasheet peaks our step reaches, fitted on an H200 (jax 0.11.2, 2026-11-27,
# docs/estimate.md): the five train steps measured there (llama_1b at 4/8/16 x 2048 tokens with
# save_dots_no_batch and 16 x 2048 with full remat, gpt2_small at 16 x 1024) are predicted
# within 8% with matmuls at 0.68 of peak and memory-bound work at 0.6 of HBM bandwidth (a grid
# over 0.62-0.70 and 0.6-0.8 minimizing the largest error; the two are nearly collinear on
# these steps, so a free least-squares fit is ill-conditioned).
MATMUL_EFFICIENCY = 0.68
HBM_EFFICIENCY = 0.6
# the fused unembedding + cross-entropy kernel's forward and backward: 12.6 ms for 8192 tokens,
# d_model 2048, vocabulary 32000 on the H200 (docs/performance.md), 256 TFLOP/s
LOSS_EFFICIENCY = 0.26
LINK_EFFICIENCY = 0.8  # ring collectives reach about 80% of link bandwidth (nccl-tests)

# jax preallocates this share of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise (scripts/launch_slurm.sh sets 0.9)
DEFAULT_MEM_FRACTION = 0.75


def for_device_kind(device_kind: str) -> Card | None:
    """The card jax names exactly `device_kind` (an H100 PCIe, an H200 NVL, a GH200 or a 40 GB
    A100 is none of these), or None."""
    kind = device_kind.strip().lower()
    return next((c for c in CARDS.values() if kind == c.device_kind.lower()), None)


def card(name: str) -> Card:
    """The card named `name` (h100, h200, a100); ConfigError listing the known ones."""
    key = name.lower().replace("-", "").replace("nvidia", "").strip()
    if key not in CARDS:
        raise ConfigError(f"--gpu {name!r} is not a known card; known: {', '.join(CARDS)}")
    return CARDS[key]


def mem_fraction(value: float | None = None) -> float:
    """The share of a GPU's memory jax may use: `value`, else $XLA_PYTHON_CLIENT_MEM_FRACTION,
    else jax's default 0.75."""
    if value is None:
        env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        try:
            value = float(env) if env else DEFAULT_MEM_FRACTION
        except ValueError:
            raise ConfigError(f"$XLA_PYTHON_CLIENT_MEM_FRACTION={env!r} is not a number") from None
    if not 0 < value <= 1:
        raise ConfigError(f"memory fraction must be in (0, 1], got {value}")
    return value
