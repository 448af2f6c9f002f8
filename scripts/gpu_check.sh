#!/usr/bin/env bash
# One command for a GPU machine (at most 7 minutes of step limits on one H100): the GPU-marked tests compiled,
# the kernel benchmarks, and train-step benchmarks for gpt2_small and llama_1b; then
# docs/performance.md + docs/performance.json and the measured attention dispatch entries
# (framework/ops/attention_measured.json). Each step runs under its own time limit.
#
#   bash scripts/gpu_check.sh             # on a GPU
#   bash scripts/gpu_check.sh --dry-run   # on a CPU: tiny shapes, output to a temp folder
#
# Env: GPU_CHECK_OUT (report folder; default docs/, a temp folder for --dry-run), PYTHON
# (default python3), GPU_CHECK_DRY_RUN=1 (same as --dry-run). Wheels in .whl/ are installed
# first (scripts/gpu_wheels.sh prepares them; docs/performance.md says why).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && dry=1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "$dry" = 1 ]; then
  out=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
  dispatch="$out/attention_measured.json"
else
  out=${GPU_CHECK_OUT:-docs}
  dispatch=framework/ops/attention_measured.json
  backend=$("$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null)
  if [ "$backend" != "gpu" ]; then
    echo "gpu_check: no GPU backend (jax says '${backend:-not importable}'); use --dry-run on a CPU" >&2
    exit 2
  fi
fi
results=$(mktemp -d /tmp/gpu_check_results.XXXXXX)
mkdir -p "$out"
echo "gpu_check: results in $results, report to $out (dry run: $dry)"

step() {  # name, seconds, command...: run under a time limit, log, never abort the whole check
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exit $rc in $((SECONDS - t0)) s (limit $limit s)"
  tail -n 25 "$results/$name.log"
  return 0
}

"$py" - "$results/env.json" "$dry" <<'PY'
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
  step gpu_tests 120 "$py" -m pytest -q -n 0 -m gpu --collect-only tests/test_norm_kernels.py
  step kernels 240 "$py" scripts/bench_kernels.py --suite quick --reps 1 \
    --out "$results/kernels.json" --dispatch-out "$dispatch"
  step step_tiny 240 "$py" scripts/bench_step.py configs/tiny/lm.yaml --steps 1 \
    --out "$results/step_tiny.json"
else
  step gpu_tests 90 "$py" -m pytest -q -n 0 -m gpu tests/
  step kernels 150 "$py" scripts/bench_kernels.py --suite gpu_check --reps 10 \
    --out "$results/kernels.json" --dispatch-out "$dispatch"
  synthetic=(data.source=synthetic_lm data.num_examples=512 train.grad_accum=1)
  step step_gpt2_small 75 "$py" scripts/bench_step.py configs/gpt2_small.yaml --steps 10 \
    "${synthetic[@]}" data.vocab_size=50304 data.batch_size=16 --out "$results/step_gpt2_small.json"
  step step_llama_1b 105 "$py" scripts/bench_step.py configs/llama_1b.yaml --steps 10 \
    "${synthetic[@]}" data.vocab_size=32000 data.batch_size=8 --out "$results/step_llama_1b.json"
fi
"$py" scripts/perf_report.py --results "$results" --out "$out" || exit 1
echo "gpu_check: done; report in $out/performance.md"
