"""Benchmark the train step of a config: step time, tokens/s, MFU, and compile time against
the number of layers with scan on and off.

    python scripts/bench_step.py CONFIG [key=value ...] [--layers 2,4,8,16,24] [--out F.json]

The run is built by `framework.train.build`, exactly as training builds it (mesh, state
shardings, jitted step); one real batch is placed once and reused, so this times the step
alone. MFU and HFU (XLA's FLOP count of the compiled step) are per device."""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax


def measure(cfg, steps: int) -> dict:
    """Build the run as training does (mesh, shardings, jitted step), compile it on one real
    batch, then time `steps` steps after one warm-up. MFU and HFU are per device."""
    from framework.parallel.sharding import bytes_per_device
    from framework.train import build
    from framework.train.build import compile_step
    from framework.train.metrics import mfu, peak_flops_per_device

    run = build(cfg)
    state = run.init_state()
    batch = run.put(next(run.train_data))
    t0 = time.perf_counter()
    compiled, hardware_flops = compile_step(run, state, batch)
    compile_s = time.perf_counter() - t0
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    out = {
        **_memory(compiled),
        "compile_s": compile_s,
        "step_s": step_s,
        "items_per_s": run.items_per_step / step_s,
        "items": "tokens" if run.is_lm else "examples",
        "hardware_flops_per_device": hardware_flops,
        "state_bytes_per_device": max(bytes_per_device(state).values()),
        "state_bytes_total": sum(x.nbytes for x in jax.tree.leaves(state)),
        "state_devices": len(bytes_per_device(state)),
        "mesh": dict(run.mesh.shape),
    }
    peak, _ = peak_flops_per_device(jax.devices()[0], cfg.model.compute_dtype)
    if run.flops_per_token:
        out["mfu"] = mfu(out["items_per_s"], run.flops_per_token, run.mesh.size, peak)
    out["hfu"] = hardware_flops / step_s / peak  # NaN: a loop in the step (see compile_step)
    return out


def _memory(compiled) -> dict:
    """XLA's memory analysis of the compiled step (bytes per device: arguments, outputs,
    temporaries, aliased) and, where the backend reports it, the device's measured peak."""
    analysis = compiled.memory_analysis()
    out = {}
    for field in ("argument", "output", "temp", "alias", "generated_code"):
        value = getattr(analysis, f"{field}_size_in_bytes", None)
        if value is not None:
            out[f"compiled_{field}_bytes"] = int(value)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["measured_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--layers", default="", help="comma list of layer counts to compile")
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_intermixed_args(argv)

    from framework.config import exit_on_config_error, load_config
    from framework.train.config import Config
    from framework.train.metrics import peak_flops_per_device

    with exit_on_config_error():
        cfg = load_config(Config, args.config, args.overrides)
    peak, source = peak_flops_per_device(jax.devices()[0], cfg.model.compute_dtype)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; peak {peak:.3g} "
        f"FLOP/s ({source})"
    )
    results = {
        "config": args.config,
        "overrides": args.overrides,
        "device": jax.devices()[0].device_kind,
        "main": measure(cfg, args.steps),
        "layers": [],
    }
    m = results["main"]
    mesh = " x ".join(f"{k}={v}" for k, v in m["mesh"].items())
    print(
        f"mesh {mesh}; state on {m['state_devices']} devices, "
        f"{m['state_bytes_per_device']:,} B per device of {m['state_bytes_total']:,} B"
    )
    print(
        f"step {m['step_s'] * 1e3:.1f} ms | {m['items_per_s']:,.0f} {m['items']}/s | "
        f"MFU {m.get('mfu', float('nan')):.3f} | HFU {m['hfu']:.3f} | "
        f"compile {m['compile_s']:.2f} s"
    )
    if "compiled_temp_bytes" in m:
        print(
            f"memory per device: compiled arguments {m['compiled_argument_bytes'] / 2**30:.2f} GiB,"
            f" temporaries {m['compiled_temp_bytes'] / 2**30:.2f} GiB; measured peak "
            f"{m.get('measured_peak_bytes', float('nan')) / 2**30:.2f} GiB"
        )
    if args.layers:
        print(
            f"{'layers':>6} {'scan compile s':>15} {'unrolled compile s':>19} "
            f"{'scan step ms':>13} {'unrolled step ms':>17}"
        )
        for n in [int(x) for x in args.layers.split(",")]:
            row = {"n_layers": n}
            for scan in (True, False):
                variant = cfg.model_copy(
                    update={
                        "model": cfg.model.model_copy(update={"n_layers": n, "scan_layers": scan})
                    }
                )
                r = measure(variant, 2)
                row["scan" if scan else "unrolled"] = r
            results["layers"].append(row)
            print(
                f"{n:>6} {row['scan']['compile_s']:>15.2f} {row['unrolled']['compile_s']:>19.2f}"
                f" {row['scan']['step_s'] * 1e3:>13.1f} {row['unrolled']['step_s'] * 1e3:>17.1f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
