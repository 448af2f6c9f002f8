"""Benchmark the kernels against their baselines in the same process: time and TFLOP/s
(attention) or GB/s (norms, fused cross-entropy) for the Pallas kernels, the XLA reference and,
for attention, cuDNN and the Mosaic GPU kernels (Hopper). Prints a table and writes JSON.

    python scripts/bench_kernels.py [--suite quick|gpu_check|full] [--dtype bfloat16]
        [--out bench.json] [--dispatch-out framework/ops/attention_measured.json]

On a GPU the kernels are compiled; on CPU Pallas runs in interpret mode (slow: only the quick
suite makes sense there, to check that the script and every path work; the Mosaic kernels are
skipped there, with the reason printed: interpreted at benchmark size they are far too slow).
Attention on a GPU times triton, mosaic (where this jax has it and the GPU is a Hopper), cudnn,
xla and auto; on CPU pallas (= triton, interpreted) and xla. `--dispatch-out` merges one
measured entry per attention shape (the fastest of cudnn, mosaic and triton by forward +
backward) into the file `impl=auto` reads (framework/ops/attention_dispatch.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def timeit(fn: Callable, *args: Any, reps: int = 10) -> float:
    """Median wall seconds of a jitted call (after compilation and one warm-up)."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def temp_bytes(fn: Callable, *args: Any) -> float:
    """Peak scratch memory of the compiled call beyond its inputs and outputs (XLA's
    memory_analysis of the compiled program: temp_size_in_bytes); NaN where unreported."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return float(getattr(analysis, "temp_size_in_bytes", float("nan")))


def _grad_fn(f: Callable, argnums: tuple[int, ...]) -> Callable:
    """Backward pass with a fixed random cotangent: vjp of f w.r.t. argnums."""

    def run(*args):
        out, vjp = jax.vjp(lambda *a: f(*a), *args)
        ct = jax.random.normal(jax.random.key(9), out.shape, jnp.float32).astype(out.dtype)
        grads = vjp(ct)
        return [grads[i] for i in argnums]

    return run


def bench_attention(shapes, dtype, impls, reps) -> list[dict]:
    from framework import ops

    rows = []
    for b, t, h, kh, d, causal in shapes:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, t, h, d), dtype)
        k = jax.random.normal(keys[1], (b, t, kh, d), dtype)
        v = jax.random.normal(keys[2], (b, t, kh, d), dtype)
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        for impl in impls:

            def f(q, k, v, impl=impl, causal=causal):
                return ops.attention(q, k, v, causal=causal, impl=impl)

            row = {
                "op": "attention",
                "impl": impl,
                "shape": [b, t, h, kh, d],
                "causal": causal,
                "dtype": str(jnp.dtype(dtype)),
            }
            try:
                fwd = timeit(f, q, k, v, reps=reps)
                # backward = (forward + backward) - forward; noise can make it <= 0 for tiny
                # shapes (CPU dry runs): floored at 1 ns so rates stay finite and positive
                bwd = max(timeit(_grad_fn(f, (0, 1, 2)), q, k, v, reps=reps) - fwd, 1e-9)
                row.update(
                    fwd_ms=fwd * 1e3,
                    bwd_ms=bwd * 1e3,
                    fwd_tflops=flops / fwd / 1e12,
                    bwd_tflops=2.5 * flops / bwd / 1e12,
                )
            except Exception as e:  # noqa: BLE001 - e.g. cudnn absent: report, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
    return rows


def bench_norms(shapes, dtype, impls, reps) -> list[dict]:
    from framework import ops

    rows = []
    for n, dim in shapes:
        x = jax.random.normal(jax.random.key(0), (n, dim), dtype)
        w = jax.random.normal(jax.random.key(1), (dim,), jnp.float32)
        nbytes = n * dim * jnp.dtype(dtype).itemsize
        b = jax.random.normal(jax.random.key(2), (dim,), jnp.float32)
        for op, impl in [(op, impl) for op in ("rms_norm", "layer_norm") for impl in impls]:

            def f(x, w, impl=impl, op=op, b=b):
                if op == "rms_norm":
                    return ops.rms_norm(x, w, impl=impl)
                return ops.layer_norm(x, w, b, impl=impl)

            row = {
                "op": op,
                "impl": impl,
                "shape": [n, dim],
                "dtype": str(jnp.dtype(dtype)),
            }
            try:
                fwd = timeit(f, x, w, reps=reps)
                full = timeit(_grad_fn(f, (0, 1)), x, w, reps=reps)
            except Exception as e:  # noqa: BLE001 - report, keep going
                rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            row.update(
                fwd_ms=fwd * 1e3,
                fwd_gbps=2 * nbytes / fwd / 1e9,
                fwd_bwd_ms=full * 1e3,
                bwd_gbps=3 * nbytes / max(full - fwd, 1e-9) / 1e9,  # see the attention note
            )
            rows.append(row)
    return rows


def bench_cross_entropy(shapes, dtype, impls, reps) -> list[dict]:
    from framework import ops

    rows = []
    for n, d, vocab in shapes:
        h = jax.random.normal(jax.random.key(0), (n, d), dtype)
        w = (jax.random.normal(jax.random.key(1), (d, vocab), jnp.float32) * d**-0.5).astype(dtype)
        y = jax.random.randint(jax.random.key(2), (n,), 0, vocab)
        nbytes = (n * d + d * vocab) * jnp.dtype(dtype).itemsize
        for impl in impls:

            def f(h, w, impl=impl, y=y):
                return ops.linear_cross_entropy(h, w, y, impl=impl)

            row = {
                "op": "linear_cross_entropy",
                "impl": impl,
                "shape": [n, d, vocab],
                "dtype": str(jnp.dtype(dtype)),
            }
            try:
                fwd = timeit(f, h, w, reps=reps)
                full = timeit(_grad_fn(f, (0, 1)), h, w, reps=reps)
                scratch = temp_bytes(_grad_fn(f, (0, 1)), h, w)
            except Exception as e:  # noqa: BLE001 - report, keep going
                rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            row.update(
                fwd_ms=fwd * 1e3,
                fwd_bwd_ms=full * 1e3,
                fwd_tflops=2 * n * d * vocab / fwd / 1e12,
                fwd_gbps=nbytes / fwd / 1e9,
                fwd_bwd_temp_mib=scratch / 2**20,
            )
            rows.append(row)
    return rows


# (attention shapes (b, t, h, kh, d, causal), norm shapes (rows, dim), CE shapes (n, d, vocab)).
# gpu_check: the FlashAttention-3 paper's setting (hd128, 16 heads, 16k tokens per call), and
# norm / loss shapes of 1B-8B models at vocab 32k and 128k.
SUITES = {
    "quick": ([(1, 64, 4, 2, 64, True)], [(64, 128)], [(64, 64, 512)]),
    "gpu_check": (
        [(8, 2048, 16, 16, 128, True), (2, 8192, 16, 16, 128, True)],
        [(16384, 4096), (32768, 8192)],
        [(8192, 2048, 32000), (8192, 4096, 128256)],
    ),
    "full": (
        [
            (1, 8192, 16, 16, 128, True),
            (1, 8192, 16, 16, 128, False),
            (2, 4096, 32, 8, 128, True),
            (4, 2048, 16, 16, 64, True),
            (2, 4096, 8, 8, 256, True),
        ],
        [(16384, 4096), (32768, 8192), (8192, 2048)],
        [(8192, 2048, 32768), (16384, 4096, 128256)],
    ),
}


def dispatch_entries(rows: list[dict], device: str) -> list[dict]:
    """One measured-dispatch entry per attention shape timed for at least two of the kernels
    (cudnn, mosaic, triton): the fastest by forward + backward time, as its impl name
    (framework/ops/attention_dispatch.py reads them); `ms` keeps every impl's time."""
    from framework.ops import attention_dispatch

    by_shape: dict[tuple, dict[str, float]] = {}
    meta: dict[tuple, dict] = {}
    for r in rows:
        if r["op"] != "attention" or "error" in r or r["impl"] == "auto":
            continue
        b, t, h, kh, d = r["shape"]
        key = (r["dtype"], d, r["causal"], t)
        by_shape.setdefault(key, {})[r["impl"]] = r["fwd_ms"] + r["bwd_ms"]
        meta[key] = {"dtype": r["dtype"], "head_dim": d, "causal": r["causal"], "seq_len": t}
    stamp = f"{datetime.date.today().isoformat()} jax {jax.__version__}"
    entries = []
    for key, ms in by_shape.items():
        kernels = attention_dispatch.kernel_times(ms)  # a "pallas" row is the Triton kernel
        if len(kernels) < 2:
            continue
        best = min(kernels, key=kernels.get)
        entries.append(
            {"device": device.lower(), **meta[key], "ms": ms, "best": best, "measured": stamp}
        )
    return entries


def merge_dispatch(path: str, entries: list[dict]) -> None:
    """Add `entries` to the measured-dispatch file, replacing any for the same device, dtype,
    head dim, masking and length; written atomically."""
    fields = ("device", "dtype", "head_dim", "causal", "seq_len")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["entries"]
    new_keys = {tuple(e[k] for k in fields) for e in entries}
    kept = [e for e in old if tuple(e.get(k) for k in fields) not in new_keys]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"entries": kept + entries}, f, indent=2)
    os.replace(tmp, path)


def _print(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<21} {r['impl']:<8} {str(r['shape']):<28} {r['error']}")
            continue
        rate = " ".join(
            f"{k}={v:,.4g}" for k, v in r.items() if k.endswith(("_ms", "_tflops", "_gbps"))
        )
        print(f"{r['op']:<21} {r['impl']:<8} {str(r['shape']):<28} {rate}")


def attention_impls(on_gpu: bool, device: str) -> tuple[list[str], str | None]:
    """(attention impls to time, why the Mosaic kernels are not among them or None)."""
    from framework.ops import attention_dispatch
    from pallas_kernels import flash_attention_mgpu as mgpu

    if not on_gpu:
        return ["pallas", "xla"], "interpreted on the CPU it is far too slow at benchmark size"
    skipped = mgpu.available()
    if skipped is None and attention_dispatch.generation(device) != "hopper":
        skipped = f"the kernels are for Hopper (sm90), not {device}"
    return ["triton"] + ([] if skipped else ["mosaic"]) + ["cudnn", "xla", "auto"], skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --suite quick")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--dispatch-out", help="merge measured attention entries into this file")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    attn, norms, ce = SUITES["quick" if args.quick else args.suite]
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, dtype {dtype}")
    attn_impls, skipped = attention_impls(on_gpu, device)
    if skipped:
        print(f"attention impl=mosaic skipped: {skipped}")
    rows: list[dict] = []

    def save() -> None:  # after each part, so a time limit keeps what was measured
        _print(rows[printed[0] :])
        printed[0] = len(rows)
        if args.out:
            with open(f"{args.out}.tmp", "w") as f:
                json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)
            os.replace(f"{args.out}.tmp", args.out)

    printed = [0]
    rows += bench_attention(attn, dtype, attn_impls, args.reps)
    save()
    if args.dispatch_out:
        entries = dispatch_entries(rows, device)
        merge_dispatch(args.dispatch_out, entries)
        print(f"{len(entries)} measured attention entries -> {args.dispatch_out}")
    rows += bench_norms(norms, dtype, ["pallas", "xla"], args.reps)
    save()
    rows += bench_cross_entropy(ce, dtype, ["pallas", "chunked", "xla"], args.reps)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
