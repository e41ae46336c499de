"""ResNet-18/34/50 with torchvision's structure, in Flax linen.

Layout (top-level submodules): `stem` (conv + bn [+ max-pool]), `block1`..`blockB`
(one per BasicBlock/Bottleneck, 1-indexed in forward order), `head` (Dense).
A unit's output is its block's (N, H, W, C) map; its feature (`unit_feature`) is the mean
over H, W, and the classifier input is the same pooling of the last block.
Explicit symmetric paddings reproduce PyTorch's outputs exactly at every input size:
7x7/2 conv pad 3, 3x3/2 max-pool pad 1 (padded with -inf), 3x3 convs pad 1,
1x1 convs pad 0. Bottleneck is v1.5 (stride on the 3x3 conv).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import BatchNorm, MapUnits, pooled_head, torch_conv as _conv

Dtype = Any


def max_pool_torch(x, window: int = 3, stride: int = 2, pad: int = 1):
  """torch.nn.MaxPool2d(window, stride, pad): -inf padding, floor output size.

  `nn.max_pool` reduces with init value -inf, which is also what its explicit padding
  pads with (and keeps the op differentiable: reduce_window_max).
  """
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)))


class Stem(nn.Module):
  kind: str = "imagenet"  # 'imagenet' | 'cifar'
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.kind == "imagenet":
      x = _conv(self.width, 7, 2, self.dtype, "conv")(x)
    elif self.kind == "cifar":
      x = _conv(self.width, 3, 1, self.dtype, "conv")(x)
    else:
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.kind!r}")
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    x = nn.relu(x)
    if self.kind == "imagenet":
      x = max_pool_torch(x, 3, 2, 1)
    return x


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_c = self.features * self.expansion
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
    if self.stride != 1 or x.shape[-1] != out_c:
      x = _conv(out_c, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_bn")(x, train)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_c = self.features * self.expansion
    y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
    y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
    y = _conv(out_c, 1, 1, self.dtype, "conv3")(y)
    y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
    if self.stride != 1 or x.shape[-1] != out_c:
      x = _conv(out_c, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_bn")(x, train)
    return nn.relu(y + x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
CONFIGS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}


def resnet_units(stage_sizes: Sequence[int]) -> tuple[str, ...]:
  return tuple(f"block{i + 1}" for i in range(sum(stage_sizes)))


class ResNet(MapUnits, nn.Module):
  """torchvision-style ResNet.

  `block{i}` is stage s, index j in torchvision's `layer{s+1}.{j}` (forward order).
  Input (N, H, W, 3) -> logits (N, num_classes) float32; sows the classifier input (N, D)
  as `intermediates/penultimate`.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  stem: str = "imagenet"
  width: int = 64
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return resnet_units(self.stage_sizes)

  @nn.compact
  def __call__(self, x, train: bool = False):
    units, dtype = self._start()
    block_cls = BLOCKS[self.block]
    x = Stem(kind=self.stem, width=self.width, dtype=dtype, name="stem")(
        x.astype(dtype), train)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    i = 0
    for s, n in enumerate(self.stage_sizes):
      for j in range(n):
        stride = 2 if (s > 0 and j == 0) else 1
        name = units[i]
        x = block_cls(self.width * 2**s, stride, dtype, name=name)(x, train)
        out[name] = x
        i += 1
    return pooled_head(self, x, out, dtype)
