#!/usr/bin/env bash
# One command for a GPU machine: the GPU-marked tests (kernels compiled, not interpreted), then
# the kernel benchmarks and a train-step benchmark. Results go to ${OUT:-gpu_check}/.
#
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
python - <<'PY'
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"gpu_check: no GPU backend (jax sees {jax.devices()}); install jax[cuda12]")
print("devices:", jax.devices())
PY
export PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log"
python scripts/bench_kernels.py --dtype bfloat16 --out "$out/bench_kernels.json" \
  2>&1 | tee "$out/bench_kernels.log"
python scripts/bench_step.py configs/gpt2_small.yaml data.batch_size=16 train.grad_accum=1 \
  --out "$out/bench_step_gpt2.json" 2>&1 | tee "$out/bench_step.log"
