"""Building blocks shared by the ncjax models.

* `BatchNorm`: BatchNorm with PyTorch semantics (normalise with the biased batch
  variance, update the running variance with the *unbiased* one), so the running
  statistics after a train-mode step equal torch's `nn.BatchNorm2d` exactly.
* `spatial_mean`: the pooling of a unit's conv map into one feature vector per example.
* `add_skip`: the parameter-free SCL skip (zero-pad on the channel axis, then add).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

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
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', self.bias_init, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
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


def spatial_mean(x):
  """(N, H, W, C) -> (N, C) in float32 (adaptive average pooling to 1x1)."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def check_unit(unit: Optional[str], valid: Sequence[str], what: str = 'scl_unit'):
  if unit is not None and unit not in valid:
    raise ValueError(f'unknown unit {unit!r} for {what}; valid units: {", ".join(valid)}')


def add_skip(penultimate, unit_feature):
  """SCL skip: zero-pad `unit_feature` (N, c) on the channel axis to (N, D), add."""
  d = penultimate.shape[-1]
  c = unit_feature.shape[-1]
  if c > d:
    raise ValueError(f'SCL unit width {c} exceeds the penultimate width {d}')
  u = unit_feature.astype(penultimate.dtype)
  if c < d:
    u = jnp.pad(u, ((0, 0),) * (u.ndim - 1) + ((0, d - c),))
  return penultimate + u
