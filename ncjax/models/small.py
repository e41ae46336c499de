"""Small models: the paper's MLP (Fig. 2), ConvNet4 and ResNet12 (few-shot, Table 2).

Units are top-level submodules. A unit's output: MLP `layer{i}` (N, width) after the ReLU;
ConvNet4 / ResNet12 `block{i}` the (N, H, W, C) map after the block's max-pool. Its feature
(`unit_feature`, (N, C) float32) is the output itself (MLP) or its spatial mean (conv nets).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import BatchNorm, add_skip, as_dtype, check_unit, spatial_mean

Dtype = Any
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class DenseUnit(nn.Module):
  width: int
  batch_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.width, dtype=self.dtype, name='dense')(x)
    if self.batch_norm:
      x = BatchNorm(dtype=self.dtype, name='bn')(x, train)
    return nn.relu(x)


class MLP(nn.Module):
  """`depth` hidden layers of `width` units with ReLU (units `layer1`..`layer{depth}`).

  Input NHWC (or any (N, ...)) is flattened. The penultimate feature is the output of
  the last hidden layer.
  """
  num_classes: int
  depth: int = 9
  width: int = 784
  batch_norm: bool = False
  scl_unit: Optional[str] = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> Tuple[str, ...]:
    return tuple(f'layer{i + 1}' for i in range(self.depth))

  def unit_feature(self, y):
    """A unit's output (N, width) -> its feature (N, width) float32 (no pooling needed)."""
    return y.astype(jnp.float32)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_unit(self.scl_unit, self.units)
    dtype = as_dtype(self.dtype)
    x = jnp.reshape(x, (x.shape[0], -1)).astype(dtype)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for name in self.units:
      x = DenseUnit(self.width, self.batch_norm, dtype, name=name)(x, train)
      out[name] = x
    feat = x.astype(jnp.float32)
    if self.scl_unit is not None:
      feat = add_skip(feat, self.unit_feature(out[self.scl_unit]))
    self.sow('intermediates', 'penultimate', feat)
    return nn.Dense(self.num_classes, dtype=dtype, name='head')(feat).astype(jnp.float32)


class ConvUnit(nn.Module):
  features: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=conv_init, name='conv')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))
    return nn.max_pool(x, (2, 2), (2, 2), 'VALID')


class ConvNet4(nn.Module):
  """4 x [conv3x3(64), BN, ReLU, max-pool 2] (units `block1`..`block4`).

  Penultimate: global average pool of block4 (`flatten=True`: the flattened map, as in
  the classic few-shot Conv-4 embedding).
  """
  num_classes: int
  width: int = 64
  flatten: bool = False
  scl_unit: Optional[str] = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> Tuple[str, ...]:
    return tuple(f'block{i + 1}' for i in range(4))

  def unit_feature(self, y):
    """A unit's output (N, H, W, C) -> its feature (N, C) float32: the spatial mean."""
    return spatial_mean(y)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_unit(self.scl_unit, self.units)
    dtype = as_dtype(self.dtype)
    x = x.astype(dtype)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for name in self.units:
      x = ConvUnit(self.width, dtype, name=name)(x, train)
      out[name] = x
    if self.flatten:
      feat = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
    else:
      feat = spatial_mean(x)
    if self.scl_unit is not None:
      feat = add_skip(feat, self.unit_feature(out[self.scl_unit]))
    self.sow('intermediates', 'penultimate', feat)
    return nn.Dense(self.num_classes, dtype=dtype, name='head')(feat).astype(jnp.float32)


class ResNet12Block(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(f, k, name):
      p = k // 2
      return nn.Conv(f, (k, k), padding=((p, p), (p, p)), use_bias=False,
                     kernel_init=conv_init, dtype=self.dtype, name=name)
    lrelu = lambda v: nn.leaky_relu(v, 0.1)
    y = lrelu(BatchNorm(dtype=self.dtype, name='bn1')(conv(self.features, 3, 'conv1')(x), train))
    y = lrelu(BatchNorm(dtype=self.dtype, name='bn2')(conv(self.features, 3, 'conv2')(y), train))
    y = BatchNorm(dtype=self.dtype, name='bn3')(conv(self.features, 3, 'conv3')(y), train)
    s = BatchNorm(dtype=self.dtype, name='downsample_bn')(
        conv(self.features, 1, 'downsample_conv')(x), train)
    y = lrelu(y + s)
    return nn.max_pool(y, (2, 2), (2, 2), 'VALID')


class ResNet12(nn.Module):
  """Few-shot ResNet-12: 4 residual blocks (3 conv3x3+BN+LeakyReLU(0.1), 1x1 conv+BN
  shortcut, max-pool 2), widths 64-160-320-640, global average pool (units
  `block1`..`block4`). DropBlock is not implemented."""
  num_classes: int
  widths: Sequence[int] = (64, 160, 320, 640)
  scl_unit: Optional[str] = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> Tuple[str, ...]:
    return tuple(f'block{i + 1}' for i in range(len(self.widths)))

  def unit_feature(self, y):
    """A unit's output (N, H, W, C) -> its feature (N, C) float32: the spatial mean."""
    return spatial_mean(y)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_unit(self.scl_unit, self.units)
    dtype = as_dtype(self.dtype)
    x = x.astype(dtype)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for name, w in zip(self.units, self.widths):
      x = ResNet12Block(w, dtype, name=name)(x, train)
      out[name] = x
    feat = spatial_mean(x)
    if self.scl_unit is not None:
      feat = add_skip(feat, self.unit_feature(out[self.scl_unit]))
    self.sow('intermediates', 'penultimate', feat)
    return nn.Dense(self.num_classes, dtype=dtype, name='head')(feat).astype(jnp.float32)
