"""MobileNetV2 with torchvision's structure, in Flax linen.

Layout (top-level submodules), index for index with torchvision's `features`:
`stem` = `features.0` (3x3/2 conv 3 -> 32, BN, ReLU6); `block1`..`block17` = `features.1`..
`features.17`, the inverted-residual blocks; `block18` = `features.18` (1x1 conv 320 -> 1280,
BN, ReLU6); `head` (Dense; torchvision's `classifier.1`).

The fine-tuning units are `block1`..`block18`: `block{i}` is `features.{i}`. The last 1x1
conv is a unit of its own rather than a part of `block17`: with 410k parameters (a ninth of
the backbone) it is the largest single layer, and a unit per torchvision index keeps the
mapping obvious. As for the ResNets, the classifier input is the spatial mean of the last
unit's output, (N, 1280) at width 1.0.

torchvision's classifier is Dropout(0.2) then Linear: the dropout is the identity in eval
mode, and ncjax trains without dropout (like its ViTs), so it is left out.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import BatchNorm, MapUnits, pooled_head, torch_conv as _conv

Dtype = Any

# torchvision's inverted_residual_setting: (expand ratio t, channels c, repeats n, stride s).
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible`: round to a multiple of `divisor`, never down by > 10%."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvBNReLU6(nn.Module):
  """torchvision's `Conv2dNormActivation(..., activation_layer=ReLU6)`: (N, H, W, C) ->
  (N, H / stride, W / stride, features)."""
  features: int
  k: int = 3
  stride: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _conv(self.features, self.k, self.stride, self.dtype, "conv", groups=self.groups)(x)
    return nn.relu6(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class InvertedResidual(nn.Module):
  """[1x1 expand conv-BN-ReLU6 (t != 1)] -> 3x3 depthwise conv-BN-ReLU6 (stride) -> 1x1
  project conv-BN, plus the input when stride 1 and the width is kept:
  (N, H, W, C) -> (N, H / stride, W / stride, features)."""
  features: int
  stride: int = 1
  expand_ratio: int = 6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    hidden = int(round(c * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = ConvBNReLU6(hidden, 1, dtype=self.dtype, name="expand")(y, train)
    y = ConvBNReLU6(hidden, 3, self.stride, groups=hidden, dtype=self.dtype,
                    name="depthwise")(y, train)
    y = _conv(self.features, 1, 1, self.dtype, "project_conv")(y)
    y = BatchNorm(dtype=self.dtype, name="project_bn")(y, train)
    return x + y if self.stride == 1 and c == self.features else y


def mobilenet_units(setting: Sequence[Sequence[int]] = SETTING) -> tuple[str, ...]:
  return tuple(f"block{i + 1}" for i in range(sum(n for _, _, n, _ in setting) + 1))


class MobileNetV2(MapUnits, nn.Module):
  """torchvision-style MobileNetV2.

  Input (N, H, W, 3) float32 -> logits (N, num_classes) float32 (output stride 32); sows the
  classifier input (N, 1280) as `intermediates/penultimate`. `width_mult` scales every width
  as torchvision does (rounded to multiples of 8; the last conv keeps 1280 below 1.0).
  """
  num_classes: int
  width_mult: float = 1.0
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return mobilenet_units()

  @nn.compact
  def __call__(self, x, train: bool = False):
    units, dtype = self._start()
    w = self.width_mult
    x = ConvBNReLU6(make_divisible(32 * w), 3, 2, dtype=dtype, name="stem")(x.astype(dtype), train)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    i = 0
    for t, c, n, s in SETTING:
      for j in range(n):
        x = InvertedResidual(make_divisible(c * w), s if j == 0 else 1, t, dtype,
                             name=units[i])(x, train)
        out[units[i]] = x
        i += 1
    x = ConvBNReLU6(make_divisible(1280 * max(1.0, w)), 1, dtype=dtype, name=units[i])(x, train)
    out[units[i]] = x
    return pooled_head(self, x, out, dtype)
