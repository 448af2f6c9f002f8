#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of its GPUs.
# jax.distributed reads the coordinator, process count and id from SLURM's variables, so the
# config needs no addresses. Submit with:
#
#   sbatch --nodes=4 scripts/launch_slurm.sh configs/llama_1b.yaml [key=value ...]
#
# The mesh below puts FSDP within each node (NVLink) and data parallelism across nodes
# (network); edit the overrides to taste (see docs/config.md, section mesh).
#SBATCH --job-name=framework
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes=N scripts/launch_slurm.sh CONFIG [key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}

# Let XLA use most of GPU memory and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --kill-on-bad-exit=1 python scripts/train.py "$CONFIG" \
  mesh.data=1 mesh.fsdp="$GPUS_PER_NODE" \
  mesh.across_nodes.data="$SLURM_NNODES" \
  mesh.distributed.enabled=true \
  "$@"
