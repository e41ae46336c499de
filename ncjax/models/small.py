"""Small models: the paper's MLP (Fig. 2), ConvNet4, ResNet12 and SEResNet12 (few-shot,
Table 2).

Units are top-level submodules. A unit's output: MLP `layer{i}` (N, width) after the ReLU;
ConvNet4 / ResNet12 / SEResNet12 `block{i}` the (N, H, W, C) map after the block's max-pool.
Its feature (`unit_feature`, (N, C) float32) is the output itself (MLP) or its spatial mean
(conv nets).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import BatchNorm, add_skip, as_dtype, check_unit, spatial_mean

Dtype = Any
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class DenseUnit(nn.Module):
  width: int
  batch_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.width, dtype=self.dtype, name="dense")(x)
    if self.batch_norm:
      x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
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
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return tuple(f"layer{i + 1}" for i in range(self.depth))

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
    self.sow("intermediates", "penultimate", feat)
    return nn.Dense(self.num_classes, dtype=dtype, name="head")(feat).astype(jnp.float32)


class ConvUnit(nn.Module):
  features: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=conv_init, name="conv")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))
    return nn.max_pool(x, (2, 2), (2, 2), "VALID")


class ConvNet4(nn.Module):
  """4 x [conv3x3(64), BN, ReLU, max-pool 2] (units `block1`..`block4`).

  Penultimate: global average pool of block4 (`flatten=True`: the flattened map, as in
  the classic few-shot Conv-4 embedding).
  """
  num_classes: int
  width: int = 64
  flatten: bool = False
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return tuple(f"block{i + 1}" for i in range(4))

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
    self.sow("intermediates", "penultimate", feat)
    return nn.Dense(self.num_classes, dtype=dtype, name="head")(feat).astype(jnp.float32)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (Hu et al., SENet): x (N, H, W, C) -> x * gate (N, 1, 1, C).

  gate = sigmoid(fc2(relu(fc1(mean_HW(x))))), fc1: C -> max(1, C // reduction), fc2: -> C,
  both with bias (as torch's `nn.Linear` in SENet and RFS). The squeeze is computed in
  float32 (`spatial_mean`), the dense layers in `dtype`.
  """
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    # max(1, .): a narrow test model (C < reduction) would otherwise get a 0-wide layer.
    hidden = max(1, c // self.reduction)
    s = nn.relu(nn.Dense(hidden, dtype=self.dtype, name="fc1")(spatial_mean(x)))
    gate = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="fc2")(s))
    return x * gate[:, None, None, :].astype(x.dtype)


class ResNet12Block(nn.Module):
  """One ResNet-12 block; `se_reduction` not None adds `SqueezeExcite` (submodule `se`) to
  the residual branch after bn3, before the addition (SENet's SE-ResNet module, RFS)."""
  features: int
  dtype: Dtype = jnp.float32
  se_reduction: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(f, k, name):
      p = k // 2
      return nn.Conv(f, (k, k), padding=((p, p), (p, p)), use_bias=False,
                     kernel_init=conv_init, dtype=self.dtype, name=name)
    lrelu = lambda v: nn.leaky_relu(v, 0.1)
    y = lrelu(BatchNorm(dtype=self.dtype, name="bn1")(conv(self.features, 3, "conv1")(x), train))
    y = lrelu(BatchNorm(dtype=self.dtype, name="bn2")(conv(self.features, 3, "conv2")(y), train))
    y = BatchNorm(dtype=self.dtype, name="bn3")(conv(self.features, 3, "conv3")(y), train)
    if self.se_reduction is not None:
      y = SqueezeExcite(self.se_reduction, self.dtype, name="se")(y)
    s = BatchNorm(dtype=self.dtype, name="downsample_bn")(
        conv(self.features, 1, "downsample_conv")(x), train)
    y = lrelu(y + s)
    return nn.max_pool(y, (2, 2), (2, 2), "VALID")


class ResNet12(nn.Module):
  """Few-shot ResNet-12: 4 residual blocks (3 conv3x3+BN+LeakyReLU(0.1), 1x1 conv+BN
  shortcut, max-pool 2), widths 64-160-320-640, global average pool (units
  `block1`..`block4`). DropBlock is not implemented."""
  num_classes: int
  widths: Sequence[int] = (64, 160, 320, 640)
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32

  @property
  def units(self) -> tuple[str, ...]:
    return tuple(f"block{i + 1}" for i in range(len(self.widths)))

  def unit_feature(self, y):
    """A unit's output (N, H, W, C) -> its feature (N, C) float32: the spatial mean."""
    return spatial_mean(y)

  def _se_reduction(self) -> int | None:
    return None  # plain blocks; SEResNet12 overrides

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_unit(self.scl_unit, self.units)
    dtype = as_dtype(self.dtype)
    x = x.astype(dtype)
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for name, w in zip(self.units, self.widths):
      x = ResNet12Block(w, dtype, self._se_reduction(), name=name)(x, train)
      out[name] = x
    feat = spatial_mean(x)
    if self.scl_unit is not None:
      feat = add_skip(feat, self.unit_feature(out[self.scl_unit]))
    self.sow("intermediates", "penultimate", feat)
    return nn.Dense(self.num_classes, dtype=dtype, name="head")(feat).astype(jnp.float32)


class SEResNet12(ResNet12):
  """ResNet12 with squeeze-and-excitation in every block (the paper's SEResNet12, Table 2;
  SENet, Hu et al.): each block's residual branch is rescaled per channel by
  `SqueezeExcite(se_reduction)` before the shortcut is added. Same units (`block1`..`block4`),
  unit outputs, features and SCL behaviour as ResNet12; each block has an extra `se`
  submodule (`fc1`, `fc2`). `se_reduction` r defaults to SENet's 16; RFS's `seresnet12`
  (WangYueFt/rfs models/resnet.py) builds its SE layers with r = 4: pass `se_reduction=4` to
  match it."""
  se_reduction: int = 16

  def _se_reduction(self) -> int | None:
    return self.se_reduction
