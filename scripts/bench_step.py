"""Benchmark the train step of a config: step time, tokens/s, MFU, and compile time against
the number of layers with scan on and off.

    python scripts/bench_step.py CONFIG [key=value ...] [--layers 2,4,8,16,24] [--out F.json]

Batches are random tokens of the config's shape (no data loading), so this measures the
step alone. Compile time is measured by lowering + compiling a fresh jit for each variant."""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np


def _batch(cfg, rng):
    b, t = cfg.data.batch_size, cfg.data.seq_len
    vocab = cfg.model.vocab_size
    tokens = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def measure(cfg, steps: int, rng) -> dict:
    """Compile time, then mean step time over `steps` steps (after one warm-up)."""
    from framework import models
    from framework.train.metrics import mfu, peak_flops_per_device
    from framework.train.optimizer import make_optimizer
    from framework.train.step import init_state, make_train_step

    model = models.get(cfg.model.name)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = jax.jit(lambda k: init_state(model, cfg.model, tx, k))(jax.random.key(0))
    step = jax.jit(
        make_train_step(model, cfg.model, tx, seed=0, grad_accum=cfg.train.grad_accum),
        donate_argnums=0,
    )
    batch = _batch(cfg, rng)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    tokens = cfg.data.batch_size * cfg.data.seq_len
    out = {"compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s}
    if model.flops_per_token:
        peak, _ = peak_flops_per_device(jax.devices()[0], cfg.model.compute_dtype)
        fpt = model.flops_per_token(cfg.model, cfg.data.seq_len)
        out["mfu"] = mfu(out["tokens_per_s"], fpt, jax.device_count(), peak)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--layers", default="", help="comma list of layer counts to compile")
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)

    from framework.config import exit_on_config_error, load_config
    from framework.train.config import Config
    from framework.train.metrics import peak_flops_per_device

    with exit_on_config_error():
        cfg = load_config(Config, args.config, args.overrides)
    rng = np.random.default_rng(0)
    peak, source = peak_flops_per_device(jax.devices()[0], cfg.model.compute_dtype)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; peak {peak:.3g} "
        f"FLOP/s ({source})"
    )
    results = {
        "config": args.config,
        "overrides": args.overrides,
        "device": jax.devices()[0].device_kind,
        "main": measure(cfg, args.steps, rng),
        "layers": [],
    }
    m = results["main"]
    print(
        f"step {m['step_s'] * 1e3:.1f} ms | {m['tokens_per_s']:,.0f} tok/s | "
        f"MFU {m.get('mfu', float('nan')):.3f} | compile {m['compile_s']:.2f} s"
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
                r = measure(variant, 2, rng)
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
