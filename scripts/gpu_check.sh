#!/usr/bin/env bash
# One command for a GPU machine (its steps' limits add up to 12 minutes; on an H200 it ran in 5): the GPU-marked
# tests compiled (the Mosaic GPU attention's among them: tests/test_flash_attention_mgpu.py), the
# kernel benchmarks (attention: Triton, Mosaic GPU on Hopper, cuDNN, XLA, auto), and train-step
# benchmarks for gpt2_small and llama_1b (two remat policies), each beside the estimator's
# prediction (scripts/estimate.py); then performance.md + performance.json and the
# measured attention dispatch entries (the fastest of cudnn, mosaic, triton per shape).
# Each step runs under its own time limit; the exit status is 1 if any step failed.
#
#   bash scripts/gpu_check.sh             # on a GPU
#   bash scripts/gpu_check.sh --dry-run   # on a CPU: tiny shapes, output to a temp folder
#
# Env: GPU_CHECK_OUT (report and logs; default docs/, a temp folder for --dry-run; on a lent
# device machine use GPU_CHECK_OUT=$OUT to get everything back), GPU_CHECK_DISPATCH (measured
# entries; default framework/ops/attention_measured.json, $GPU_CHECK_OUT/... for --dry-run),
# PYTHON (default python3), GPU_CHECK_DRY_RUN=1 (same as --dry-run). Missing dependencies are
# installed from wheels in .whl/ (scripts/gpu_wheels.sh prepares them).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=${GPU_CHECK_DRY_RUN:-0}
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "gpu_check: unknown argument '$1' (usage: gpu_check.sh [--dry-run])" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
  out=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
  dispatch=${GPU_CHECK_DISPATCH:-$out/attention_measured.json}
else
  out=${GPU_CHECK_OUT:-docs}
  dispatch=${GPU_CHECK_DISPATCH:-framework/ops/attention_measured.json}
  backend=$(JAX_PLATFORMS= timeout 120 "$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null)
  if [ "$backend" != "gpu" ]; then
    echo "gpu_check: no GPU backend (jax says '${backend:-not importable}'); use --dry-run on a CPU" >&2
    exit 2
  fi
  export JAX_PLATFORMS=  # present but empty: tests/conftest.py must not force the CPU
  if ! "$py" -c 'import grain, pydantic, tensorboardX' 2>/dev/null; then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    compgen -G ".whl/*.whl" >/dev/null || {
      echo "gpu_check: grain/pydantic/tensorboardX missing and no .whl/ (run scripts/gpu_wheels.sh)" >&2
      exit 2
    }
    timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
fi
results="$out/gpu_check_logs"
mkdir -p "$results"
echo "gpu_check: report to $out, logs in $results (dry run: $dry)"
failed=()

step() {  # name, seconds, command...: run under a time limit and log; a failure is recorded
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exit $rc in $((SECONDS - t0)) s (limit $limit s)"
  tail -n 25 "$results/$name.log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step env 60 "$py" - "$results/env.json" "$dry" <<'PY'
import datetime, json, platform, subprocess, sys
import jax
driver = "n/a"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=20).stdout.strip() or "n/a"
except (OSError, subprocess.SubprocessError):
    pass
env = {"card": jax.devices()[0].device_kind, "driver": driver, "jax": jax.__version__,
       "python": platform.python_version(), "date": datetime.date.today().isoformat(),
       "dry_run": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print("gpu_check:", env)
PY

if [ "$dry" = 1 ]; then
  step gpu_tests 120 "$py" -m pytest -q -n 0 -m gpu --collect-only tests/test_norm_kernels.py \
    tests/test_flash_attention_mgpu.py
  step kernels 240 "$py" scripts/bench_kernels.py --suite quick --reps 1 \
    --out "$results/kernels.json" --dispatch-out "$dispatch"
  step step_tiny 240 "$py" scripts/bench_step.py configs/tiny/lm.yaml --steps 1 \
    --out "$results/step_tiny.json"
else
  # only the files that hold GPU tests: the others may import what the machine lacks (datasets)
  mapfile -t gpu_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
  step gpu_tests 200 "$py" -m pytest -q -n 0 -m gpu -rfEs "${gpu_files[@]}"
  if grep -q "skipped" "$results/gpu_tests.log"; then  # a GPU test that skips did not run
    echo "gpu_check: GPU tests were skipped: pytest did not see the GPU"
    failed+=(gpu_tests_skipped)
  fi
  step kernels 150 "$py" scripts/bench_kernels.py --suite gpu_check --reps 10 \
    --out "$results/kernels.json" --dispatch-out "$dispatch"
  synthetic=(data.source=synthetic_lm data.num_examples=512 train.grad_accum=1)
  step step_gpt2_small 75 "$py" scripts/bench_step.py configs/gpt2_small.yaml --steps 10 \
    "${synthetic[@]}" data.vocab_size=50304 data.batch_size=16 --out "$results/step_gpt2_small.json"
  step step_llama_1b 105 "$py" scripts/bench_step.py configs/llama_1b.yaml --steps 10 \
    "${synthetic[@]}" data.vocab_size=32000 data.batch_size=8 --out "$results/step_llama_1b.json"
  step step_llama_1b_remat_full 75 "$py" scripts/bench_step.py configs/llama_1b.yaml --steps 5 \
    "${synthetic[@]}" data.vocab_size=32000 data.batch_size=16 model.remat=full \
    --out "$results/step_llama_1b_remat_full.json"
fi
timeout 60 "$py" scripts/perf_report.py --results "$results" --out "$out" --failed "${failed[*]:-}" \
  || failed+=(report)
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: failed steps: ${failed[*]}; report in $out/performance.md"
  exit 1
fi
echo "gpu_check: done; report in $out/performance.md"
