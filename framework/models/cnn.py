"""Small CNN classifier: stages of conv -> batch norm -> ReLU -> 2x2 max pool, then global
average pool and a linear head. Batch-norm running statistics are the model's state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import pydantic

from framework.errors import ConfigError, ShapeError
from framework.models.classifier import ClassifierConfig, classifier_loss
from framework.models.registry import Model, register
from framework.nn.basic import dropout, linear, linear_spec
from framework.nn.batch_norm import batch_norm, batch_norm_spec, batch_norm_state_spec
from framework.nn.checks import check_float, check_rank, scope
from framework.nn.conv import NHWC, conv2d, conv2d_spec, max_pool


class CNNConfig(ClassifierConfig):
    """Sizes of a small CNN; each entry of `channels` is one stage that halves the image."""

    name: Literal["cnn"] = pydantic.Field("cnn", description="model family; selects this model")
    image_size: int = pydantic.Field(28, gt=0, description="height and width of input images")
    in_channels: int = pydantic.Field(1, gt=0, description="channels of input images (NHWC)")
    channels: list[Annotated[int, pydantic.Field(gt=0)]] = pydantic.Field(
        default_factory=lambda: [16, 32],
        min_length=1,
        description="output channels of each conv stage, in order",
    )
    batch_norm: bool = pydantic.Field(True, description="batch norm after each conv")
    dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0, description="dropout rate before the head (training only)"
    )

    @pydantic.model_validator(mode="after")
    def _fits(self) -> CNNConfig:
        """Each stage halves the image with a 2x2 pool, so the image must survive every one."""
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} is too small for "
                f"{len(self.channels)} stages of 2x2 pooling"
            )
        return self

    def for_data(self, meta: Mapping[str, Any]) -> CNNConfig:
        """Classes as any classifier; the data's examples must be the configured images."""
        cfg = super().for_data(meta)
        shape = meta.get("input_shape")
        want = [cfg.image_size, cfg.image_size, cfg.in_channels]
        if shape is not None and list(shape) != want:
            raise ConfigError(
                f"the data's examples have shape {list(shape)}, but model.image_size and "
                f"model.in_channels expect {want} (height, width, channels)"
            )
        return cfg


def spec(cfg: CNNConfig) -> dict:
    """stage_i: {conv, bn?} for each entry of cfg.channels, then head: linear to the classes."""
    tree: dict = {}
    c_in = cfg.in_channels
    for i, c_out in enumerate(cfg.channels):
        # Batch norm's bias makes a conv bias redundant.
        stage = {"conv": conv2d_spec(c_in, c_out, bias=not cfg.batch_norm)}
        if cfg.batch_norm:
            stage["bn"] = batch_norm_spec(c_out)
        tree[f"stage_{i}"] = stage
        c_in = c_out
    tree["head"] = linear_spec(c_in, cfg.num_classes, ("conv_out", None))
    return tree


def state_spec(cfg: CNNConfig) -> dict:
    """Running batch-norm statistics per stage (always float32); {} without batch norm."""
    if not cfg.batch_norm:
        return {}
    return {f"stage_{i}": {"bn": batch_norm_state_spec(c)} for i, c in enumerate(cfg.channels)}


def apply(
    params: dict,
    inputs: jax.Array,
    cfg: CNNConfig,
    *,
    key: jax.Array | None = None,
    state: dict | None = None,
) -> tuple[jax.Array, dict]:
    """[batch, size, size, in_channels] images -> ([batch, classes] logits, new state).

    key given means training: batch statistics, updated running statistics, dropout. key=None
    means evaluation: running statistics, state returned unchanged. Computes in the policy's
    compute dtype (batch norm normalizes in float32) and returns logits in its output dtype."""
    check_float(inputs)
    check_rank(inputs, 4, layout=NHWC)
    size = (cfg.image_size, cfg.image_size)
    if tuple(inputs.shape[1:3]) != size:
        raise ShapeError(
            f"input images must be {size[0]}x{size[1]} (image_size), got shape "
            f"{tuple(inputs.shape)}"
        )
    if cfg.batch_norm and state is None:
        raise ValueError("cnn with batch_norm needs state=init(state_spec(cfg), key)")
    training = key is not None
    policy = cfg.policy
    x = policy.cast_to_compute(inputs)
    params = policy.cast_to_compute(params)
    new_state: dict = {}
    for i in range(len(cfg.channels)):
        name = f"stage_{i}"
        with scope(name):
            with scope("conv"):
                x = conv2d(params[name]["conv"], x)
            if cfg.batch_norm:
                with scope("bn"):
                    x, bn_state = batch_norm(
                        params[name]["bn"], state[name]["bn"], x, training=training
                    )
                new_state[name] = {"bn": bn_state}
            x = max_pool(jax.nn.relu(x), window=2)
    x = jnp.mean(x, axis=(1, 2))
    x = dropout(x, cfg.dropout, key)
    with scope("head"):
        logits = linear(params["head"], x)
    return policy.cast_to_output(logits), (new_state if cfg.batch_norm and training else state)


loss = classifier_loss(apply)


MODEL = register(
    Model(name="cnn", config=CNNConfig, spec=spec, apply=apply, loss=loss, state_spec=state_spec)
)
spec = MODEL.spec  # the registered spec: Params in cfg.param_dtype
