"""DenseNet-121/161/169/201 with torchvision's structure, in Flax linen.

Layout (top-level submodules): `stem` (torchvision's `features.conv0`, `norm0`, ReLU, 3x3/2
max-pool), `denseblock1`..`denseblock4` (the fine-tuning units), `head` (Dense; torchvision's
`classifier`).

A unit is one torchvision dense block together with what follows it up to the next block:
`denseblock{i}` = `features.denseblock{i}` + `features.transition{i}` (BN, ReLU, 1x1 conv,
2x2/2 average pool) for i < 4, and `denseblock4` = `features.denseblock4` + `features.norm5` +
the ReLU of torchvision's `forward`. So, as for the ResNets, each unit's output is the next
unit's input, the units cover the whole network but the stem, and the classifier input is the
spatial mean of the last unit's output. A transition alone (BN + one 1x1 conv, no spatial
mixing) is not a block one would fine-tune by itself, and `norm5` is only a BatchNorm.

Unit outputs (H, W, C) for DenseNet-121 at 224: 28 x 28 x 128, 14 x 14 x 256, 7 x 7 x 512,
7 x 7 x 1024; the penultimate feature is (N, 1024).
torchvision's memory-efficient mode (gradient checkpointing) changes no value and is not
reproduced; `drop_rate` is 0 in every torchvision DenseNet.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import BatchNorm, MapUnits, pooled_head, torch_conv
from ncjax.models.resnet import max_pool_torch

Dtype = Any

# torchvision's DenseNet init: kaiming normal with its default fan_in mode (relu gain).
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# name -> (growth rate, layers per dense block, stem width), as in torchvision.
CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}


def _conv(features, k, dtype, name):
  return torch_conv(features, k, 1, dtype, name, kernel_init=conv_init)


class Stem(nn.Module):
  """conv0 (7x7/2) -> norm0 -> ReLU -> 3x3/2 max-pool: (N, H, W, 3) -> (N, H/4, W/4, width)."""
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = torch_conv(self.width, 7, 2, self.dtype, "conv0", kernel_init=conv_init)(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="norm0")(x, train))
    return max_pool_torch(x, 3, 2, 1)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth): (N, H, W, C) ->
  the (N, H, W, growth) new features (torchvision's `_DenseLayer` on the concatenation)."""
  growth_rate: int
  bn_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(BatchNorm(dtype=self.dtype, name="norm1")(x, train))
    y = _conv(self.bn_size * self.growth_rate, 1, self.dtype, "conv1")(y)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="norm2")(y, train))
    return _conv(self.growth_rate, 3, self.dtype, "conv2")(y)


class DenseStage(nn.Module):
  """One unit: `num_layers` dense layers, then a transition (`last=False`: BN, ReLU, 1x1 conv
  to half the channels, 2x2/2 average pool) or `norm5` + ReLU (`last=True`).

  (N, H, W, C) -> (N, H/2, W/2, (C + L * growth) // 2), or (N, H, W, C + L * growth) when last.
  """
  num_layers: int
  growth_rate: int
  bn_size: int = 4
  last: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_layers):
      new = DenseLayer(self.growth_rate, self.bn_size, self.dtype, name=f"denselayer{i + 1}")(
          x, train)
      # torchvision concatenates [input, new_1, ..., new_i] in this order on the channel axis.
      x = jnp.concatenate([x, new], axis=-1)
    if self.last:
      return nn.relu(BatchNorm(dtype=self.dtype, name="norm5")(x, train))
    y = nn.relu(BatchNorm(dtype=self.dtype, name="transition_norm")(x, train))
    y = _conv(x.shape[-1] // 2, 1, self.dtype, "transition_conv")(y)
    # AvgPool2d(2, 2): no padding, floor output size, like 'VALID'.
    return nn.avg_pool(y, (2, 2), strides=(2, 2), padding="VALID")


def densenet_units(block_config: Sequence[int]) -> tuple[str, ...]:
  return tuple(f"denseblock{i + 1}" for i in range(len(block_config)))


class DenseNet(MapUnits, nn.Module):
  """torchvision-style DenseNet-BC.

  Input (N, H, W, 3) float32 (H, W >= 29 for four blocks, as torchvision) -> logits
  (N, num_classes) float32; sows the classifier input (N, D) as `intermediates/penultimate`
  (D = 1024 for DenseNet-121, 2208 / 1664 / 1920 for 161 / 169 / 201).
  """
  num_classes: int
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return densenet_units(self.block_config)

  @nn.compact
  def __call__(self, x, train: bool = False):
    units, dtype = self._start()
    x = Stem(self.num_init_features, dtype, name="stem")(x.astype(dtype), train)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for i, (name, n) in enumerate(zip(units, self.block_config)):
      x = DenseStage(n, self.growth_rate, self.bn_size, last=i == len(units) - 1, dtype=dtype,
                     name=name)(x, train)
      out[name] = x
    return pooled_head(self, x, out, dtype)
