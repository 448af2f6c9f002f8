"""Parameter declarations: deterministic init, per-path independence, derived trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import nn
from framework.nn import Param


def _spec(extra_layer: bool):
    spec = {"a": nn.linear_spec(4, 8, ("embed", "mlp")), "c": nn.rms_norm_spec(8)}
    if extra_layer:
        spec["b"] = nn.linear_spec(8, 8, ("mlp", "mlp"))
    return spec


def test_init_is_deterministic_and_key_dependent():
    spec = _spec(False)
    p1, p2 = nn.init(spec, jax.random.key(0)), nn.init(spec, jax.random.key(0))
    p3 = nn.init(spec, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(p1["a"]["kernel"], p3["a"]["kernel"])


def test_adding_a_layer_leaves_other_values_bitwise_unchanged():
    small, big = nn.init(_spec(False), jax.random.key(0)), nn.init(_spec(True), jax.random.key(0))
    assert set(big) == {"a", "b", "c"}
    np.testing.assert_array_equal(small["a"]["kernel"], big["a"]["kernel"])
    np.testing.assert_array_equal(small["c"]["scale"], big["c"]["scale"])


def test_sibling_leaves_get_different_values():
    spec = {"x": Param((64,), (None,)), "y": Param((64,), (None,))}
    p = nn.init(spec, jax.random.key(0))
    assert not np.allclose(p["x"], p["y"])


def test_logical_axes_counts_and_shapes_without_allocating():
    spec = _spec(True)
    axes = nn.logical_axes(spec)
    assert axes["a"]["kernel"] == ("embed", "mlp") and axes["b"]["bias"] == ("mlp",)
    assert nn.count(spec) == 4 * 8 + 8 + 8 * 8 + 8 + 8
    shapes = nn.shapes(spec)
    assert isinstance(shapes["b"]["kernel"], jax.ShapeDtypeStruct)
    assert shapes["b"]["kernel"].shape == (8, 8) and shapes["b"]["kernel"].dtype == jnp.float32
    assert nn.count(nn.init(spec, jax.random.key(0))) == nn.count(spec)


def test_stack_adds_layers_axis_and_distinct_slices():
    stacked = nn.stack({"w": Param((16, 16), ("embed", "mlp"))}, 3)
    assert stacked["w"].shape == (3, 16, 16) and stacked["w"].axes == ("layers", "embed", "mlp")
    w = nn.init(stacked, jax.random.key(0))["w"]
    assert w.shape == (3, 16, 16) and not np.allclose(w[0], w[1])


def test_param_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="rank"):
        Param((2, 3), ("embed",))
