"""Decode speed: `python scripts/bench_decode.py [CONFIG] [--new-tokens 256 --batch 1 --repeats 3]`.

Tokens/s of `framework.generate` (prefill, then a jitted while_loop of KV-cache decode steps)
against the recompute-per-token sampler the framework had before (a jitted full forward over a
fixed window for every new token), both in this process on the config's model with random
weights (default: configs/default.yaml). The recompute sampler runs with a window covering the
whole sequence (the same attention as the cache) and with the trained sequence length
(`data.seq_len`, what the end-of-run sample used). Compilation is excluded (one warm-up run
each); the best of --repeats is reported."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def "


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    return args


def recompute_sampler(
    apply: Callable[..., Any],
    params: Any,
    mcfg: Any,
    prompt: list[int],
    n: int,
    *,
    window: int,
    temperature: float,
    key: Any,
) -> list[int]:
    """The pre-KV-cache sampler: one jitted forward over a fixed window per new token."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def next_token(params, buf, last, key):
        logits, _ = apply(params, buf[None], mcfg)
        return jax.random.categorical(key, logits[0, last].astype(jnp.float32) / temperature)

    tokens = list(prompt)
    for i in range(n):
        ctx = tokens[-window:]
        buf = np.zeros(window, np.int32)
        buf[: len(ctx)] = ctx
        tokens.append(int(next_token(params, buf, len(ctx) - 1, jax.random.fold_in(key, i))))
    return tokens[len(prompt) :]


def _best(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    """Print tokens/s of both samplers and their ratio."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    from framework import nn
    from framework.config import load_config
    from framework.generate import generate
    from framework.models import transformer
    from framework.train.config import Config

    cfg = load_config(Config, args.config)
    prompt = list(PROMPT.encode())
    total = len(prompt) + args.new_tokens
    mcfg = cfg.model.model_copy(
        update={
            "vocab_size": cfg.model.vocab_size or 256,
            "max_seq_len": max(cfg.model.max_seq_len, total),
        }
    )
    params = jax.device_put(nn.init(transformer.spec(mcfg), jax.random.key(0)))
    key = jax.random.key(1)
    prompts = [prompt] * args.batch
    n = args.new_tokens

    def cached():
        out = generate(
            params, mcfg, prompts, max_new_tokens=n, temperature=args.temperature, key=key
        )
        assert all(len(r) == n for r in out)

    def recompute(window):
        def run():
            for _ in prompts:
                recompute_sampler(
                    transformer.apply,
                    params,
                    mcfg,
                    prompt,
                    n,
                    window=window,
                    temperature=args.temperature or 1.0,
                    key=key,
                )

        return run

    rows = [("KV cache (framework.generate)", _best(cached, args.repeats))]
    repeats = max(1, args.repeats - 1)
    rows.append((f"recompute, window {total} (whole sequence)", _best(recompute(total), repeats)))
    if cfg.data.seq_len < total:
        window = cfg.data.seq_len
        rows.append(
            (f"recompute, window {window} (data.seq_len)", _best(recompute(window), repeats))
        )
    tokens = n * args.batch
    print(
        f"{Path(args.config).name}: d_model {mcfg.d_model}, {mcfg.n_layers} layers, vocab "
        f"{mcfg.vocab_size}; {n} new tokens x batch {args.batch} after a {len(prompt)}-token "
        f"prompt; {jax.devices()[0].platform} ({jax.device_count()} devices visible)"
    )
    base = tokens / rows[0][1]
    for name, seconds in rows:
        rate = tokens / seconds
        print(f"  {name:<44} {rate:10.1f} tokens/s  ({seconds:.3f} s)  x{base / rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
