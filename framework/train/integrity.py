"""Checkpoint integrity: a checksum per array and per JSON item, recorded at save and checked
at restore, so a flipped bit on disk is found before it trains (or is exported).

Array checksums are computed on the devices by one jitted function over the whole tree:
two 32-bit sums of each element's bits, weighted by the element's position. Integer addition
wraps and is order-free, so the value does not depend on the sharding (a checkpoint restored
onto another mesh checks the same), and any single flipped bit changes the first sum (its
weights are odd). JSON items are hashed from their canonical serialization."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_GOLDEN = np.uint32(0x9E3779B1)
_MIX_A = np.uint32(0x85EBCA6B)
_MIX_B = np.uint32(0xC2B2AE35)


def _bits(x: jax.Array) -> jax.Array:
    """The element bits of `x` as uint32 (64-bit elements become two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """[position-weighted sum, mixed sum] of the bits of `x`, both uint32."""
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for dim in range(bits.ndim):  # row-major flat index, without reshaping a sharded array
        index = index * np.uint32(bits.shape[dim]) + jax.lax.broadcasted_iota(
            jnp.uint32, bits.shape, dim
        )
    weighted = jnp.sum(bits * (index * _GOLDEN | np.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum((bits ^ (index * _MIX_A)) * _MIX_B, dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


@functools.cache
def _digest_all(out_sharding: NamedSharding | None) -> Callable:
    """The jitted digest of a list of arrays (one compile per structure and layout)."""
    return jax.jit(lambda xs: [_digest(x) for x in xs], out_shardings=out_sharding)


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of the leaves of `tree`, in jax.tree.leaves order."""
    return [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def array_checksums(tree: Any) -> dict[str, str]:
    """{leaf path: 16 hex digits} for every array of `tree` (computed where the arrays live)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return {}
    sharding = getattr(leaves[0], "sharding", None)
    out_sharding = (
        NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, NamedSharding)
        else None
    )
    digests = _digest_all(out_sharding)(leaves)
    # Replicated results: this process's copy (a multi-process array is not fully addressable).
    words = [np.asarray(d.addressable_data(0)) for d in digests]
    return {
        path: f"{int(a):08x}{int(b):08x}"
        for path, (a, b) in zip(leaf_paths(tree), words, strict=True)
    }


def json_checksum(value: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of `value`."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_mismatch(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """The first leaf path whose checksum differs (or is missing on either side), else None."""
    for path in sorted(expected.keys() | actual.keys()):
        if expected.get(path) != actual.get(path):
            return path
    return None
