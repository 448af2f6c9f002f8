"""Mixed precision as one policy: params keep their own dtype; they and the inputs are cast to
the compute dtype at apply time, and the model's output is cast to the output dtype."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name_or_dtype: Any) -> Any:
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name_or_dtype]
    return name_or_dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """Param, compute and output dtypes; names ("bfloat16") or jnp dtypes are accepted."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, to_dtype(getattr(self, field)))

    def cast_to_compute(self, tree: Any) -> Any:
        """Cast floating leaves to the compute dtype (integer leaves such as tokens stay)."""
        return _cast_floats(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        return _cast_floats(tree, self.output_dtype)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


FP32 = Policy()
BF16 = Policy(jnp.float32, jnp.bfloat16, jnp.float32)
