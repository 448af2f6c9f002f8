"""Inspect a config without training: `python scripts/inspect_model.py CONFIG [key=value ...]`.

Prints the parameter count, model FLOPs per trained token, each parameter's partition spec
under the configured mesh, and bytes per device for params and optimizer state. Built by
`framework.train.build` without reading the data; nothing is allocated: shapes come from
`jax.eval_shape`. `--devices N` simulates N CPU devices.

Not named inspect.py: a script's folder comes first on sys.path, so that name would shadow the
stdlib `inspect` for every other script in scripts/ (numpy and pydantic import it)."""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="simulate this many CPU devices (sets XLA_FLAGS before jax loads)",
    )
    return parser.parse_intermixed_args(argv)


def _mib(n: int) -> str:
    return f"{n:,} B ({n / 2**20:,.2f} MiB)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
            f"platform_device_count={args.devices}"
        ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from framework import nn
    from framework.config import exit_on_config_error, load_config
    from framework.parallel.logical import partition_spec
    from framework.parallel.sharding import shard_bytes
    from framework.train import build
    from framework.train.config import Config

    with exit_on_config_error():
        cfg = load_config(Config, args.config, args.overrides)
        run = build(cfg, read_data=False)  # the layout training uses, without reading data
    cfg, mesh, shardings = run.cfg, run.mesh, run.shardings
    shapes = run.abstract_state
    spec = run.model.spec(cfg.model)
    print(f"model: {cfg.model.name}   parameters: {nn.count(spec):,}")
    if run.flops_per_token:
        seq = cfg.data.seq_len
        print(f"model FLOPs per trained token (seq_len {seq}): {run.flops_per_token:,.0f}")
    sizes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"mesh: {sizes}  ({mesh.size} devices)")
    rows = [
        (
            jax.tree_util.keystr(path, simple=True, separator="/"),
            p.shape,
            p.axes,
            partition_spec(p.axes, run.rules),
        )
        for path, p in jax.tree_util.tree_flatten_with_path(spec, is_leaf=nn.param.is_param)[0]
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'parameter':<{width}}  shape / logical axes -> partition spec")
    for name, shape, axes, pspec in rows:
        print(f"{name:<{width}}  {shape} {axes} -> {pspec}")
    print("\nbytes per device:")
    for part in ("params", "opt_state", "model_state"):
        total = shard_bytes(shapes[part], _replicated(shardings[part], mesh))
        one = shard_bytes(shapes[part], shardings[part])
        print(f"  {part:<12} {_mib(one):>28} of {_mib(total)} total")
    if run.model.trainable is not None:  # frozen params (LoRA): what the optimizer covers
        from framework.train.step import split_trainable

        trained = [
            split_trainable(run.model, x)[0] for x in (shapes["params"], shardings["params"])
        ]
        one = shard_bytes(*trained)
        total = shard_bytes(trained[0], _replicated(trained[1], mesh))
        print(
            f"  {'trainable':<12} {_mib(one):>28} of {_mib(total)} total (params the step updates)"
        )
    return 0


def _replicated(shardings, mesh):
    """The same tree, every leaf fully replicated (gives the unsharded total)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), shardings)


if __name__ == "__main__":
    sys.exit(main())
