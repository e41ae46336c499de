"""Building blocks shared by the ncjax models.

* `BatchNorm`: BatchNorm with PyTorch semantics (normalise with the biased batch
  variance, update the running variance with the *unbiased* one), so the running
  statistics after a train-mode step equal torch's `nn.BatchNorm2d` exactly.
* `spatial_mean`: the pooling of a unit's conv map into one feature vector per example.
* `add_skip`: the parameter-free SCL skip (zero-pad on the channel axis, then add).
* `MapUnits`: what the conv nets with (N, H, W, C) unit outputs share (pooling, checks).
* `pooled_head`: the end of a conv net: pool, SCL skip, sow the penultimate feature, classify.
* `torch_conv`: a bias-free `nn.Conv2d(k, stride, padding=k // 2, groups)` of torchvision.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def as_dtype(dtype) -> Any:
  """Accepts a dtype object or its name ('bfloat16', 'float32', ...)."""
  if dtype is None:
    return jnp.float32
  return jnp.dtype(dtype)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with torch's running-statistics rule.

  Variables: params `scale`, `bias` (C,); batch_stats `mean`, `var` (C,) -- the same
  names and shapes as `flax.linen.BatchNorm`.

  `train=True`: normalise with the batch mean and the biased batch variance; unless the
  module is being initialised, update
      mean <- momentum * mean + (1 - momentum) * batch_mean
      var  <- momentum * var  + (1 - momentum) * batch_var * n / (n - 1)
  (n = number of values reduced per channel), which is PyTorch's rule with
  torch momentum = 1 - momentum. `unbiased_running_var=False` gives Flax's rule
  (biased variance in the running average). Statistics are computed in float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  unbiased_running_var: bool = True
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", self.bias_init, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    axes = tuple(range(x.ndim - 1))
    if train:
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        n = 1
        for a in axes:
          n *= x.shape[a]
        run_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * run_var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * mul + bias
    return y.astype(self.dtype)


# torchvision's init for ResNet and MobileNetV2 convs: kaiming normal, fan_out, relu gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_conv(features: int, k: int, stride: int, dtype, name: str, groups: int = 1,
               kernel_init=conv_init) -> nn.Conv:
  """torch's `nn.Conv2d(c_in, features, k, stride, padding=k // 2, groups=groups, bias=False)`.

  The explicit symmetric padding (not 'SAME', which pads more on the bottom/right at stride
  2) gives PyTorch's outputs at every input size. Kernel (k, k, c_in // groups, features).
  """
  p = k // 2
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                 feature_group_count=groups, use_bias=False, kernel_init=kernel_init,
                 dtype=dtype, name=name)


def spatial_mean(x):
  """(N, H, W, C) -> (N, C) in float32 (adaptive average pooling to 1x1)."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def check_unit(unit: str | None, valid: Sequence[str], what: str = "scl_unit"):
  if unit is not None and unit not in valid:
    raise ValueError(f'unknown unit {unit!r} for {what}; valid units: {", ".join(valid)}')


def add_skip(penultimate, unit_feature):
  """SCL skip: zero-pad `unit_feature` (N, c) on the channel axis to (N, D), add."""
  d = penultimate.shape[-1]
  c = unit_feature.shape[-1]
  if c > d:
    raise ValueError(f"SCL unit width {c} exceeds the penultimate width {d}")
  u = unit_feature.astype(penultimate.dtype)
  if c < d:
    u = jnp.pad(u, ((0, 0),) * (u.ndim - 1) + ((0, d - c),))
  return penultimate + u


def pooled_head(module: nn.Module, x, outputs, dtype):
  """The end of a conv net with units, called from `module`'s compact `__call__`.

  x: the last unit's output (N, H, W, D); outputs: {unit: raw output} (only
  `module.scl_unit`'s is read). The penultimate feature is the spatial mean of `x` (plus the
  zero-padded feature of `module.scl_unit`, SCL), sown as `intermediates/penultimate`; the
  top-level `head` (Dense, computing in `dtype`) maps it to logits (N, num_classes) float32.
  """
  feat = spatial_mean(x)
  if module.scl_unit is not None:
    feat = add_skip(feat, module.unit_feature(outputs[module.scl_unit]))
  module.sow("intermediates", "penultimate", feat)
  logits = nn.Dense(module.num_classes, dtype=dtype, name="head")(feat)
  return logits.astype(jnp.float32)


class MapUnits:
  """Mixin of the conv nets whose units output (N, H, W, C) maps (ResNet, DenseNet,
  MobileNetV2); the class defines `units`, `scl_unit` and `dtype`."""

  def unit_feature(self, y):
    """A unit's output (N, H, W, C) -> its feature (N, C) float32: the spatial mean."""
    return spatial_mean(y)

  def _start(self):
    """(units, computation dtype), once `scl_unit` is known to be one of the units."""
    check_unit(self.scl_unit, self.units)
    return self.units, as_dtype(self.dtype)
