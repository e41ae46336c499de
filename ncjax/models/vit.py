"""Vision Transformer (vit_jax layout) in Flax linen.

Top-level submodules/params: `embedding` (patch conv, kernel (P, P, 3, D)), `cls`
(1, 1, D), `pos_embedding` (1, 1 + g*g, D; its shape is fixed by the input at init),
`layer1`..`layerL` (encoder blocks, each with vit_jax's inner names `LayerNorm_0`,
`MultiHeadDotProductAttention_1` {query,key,value,out}, `LayerNorm_2`,
`MlpBlock_3` {Dense_0, Dense_1}), `encoder_norm`, optional `pre_logits`
(Dense + tanh, when `representation_size` is set), `head`.

Pre-LN blocks, LayerNorm eps 1e-6, GELU with the tanh approximation (flax's
`nn.gelu` default, which is what vit_jax's MlpBlock calls), no dropout. The classifier
input is the class token after `encoder_norm` (vit_jax's 'token' classifier).
A unit's output is its encoder block's (N, 1 + g*g, D) tokens; its feature (`unit_feature`)
is the class token or the token mean, per `pool`.

VPT (Jia et al., ECCV 2022), `vpt_tokens` = P > 0: a top-level parameter `prompts`
(L or 1, P, D) of learnt tokens placed right after the class token. Deep (`vpt_deep`): layer
i reads prompts[i - 1] in place of the previous layer's outputs at those positions; shallow:
prompts[0] is inserted once, before layer1, and flows through every layer. A unit's output
is then (N, 1 + P + g*g, D); 'mean' pooling leaves the prompt positions out. Init: uniform
in +-sqrt(6 / (3 P_patch^2 + D)), VPT's (xavier over the patch embedding's fan). P = 0 is
the plain ViT, parameter for parameter.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from ncjax.models.common import add_skip, as_dtype, check_unit

Dtype = Any

CONFIGS = {
    # name: (patch, hidden, layers, heads, mlp)
    "vit_b32": (32, 768, 12, 12, 3072),
    "vit_b16": (16, 768, 12, 12, 3072),
    "vit_s16": (16, 384, 12, 6, 1536),
    "vit_ti16": (16, 192, 12, 3, 768),
}


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    binit = nn.initializers.normal(stddev=1e-6)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init, bias_init=binit,
                 name="Dense_0")(x)
    y = nn.gelu(y, approximate=True)
    return nn.Dense(d, dtype=self.dtype, kernel_init=init, bias_init=binit,
                    name="Dense_1")(y)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True,
        name="MultiHeadDotProductAttention_1")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_3")(y)
    return x + y


class ViT(nn.Module):
  """Input (N, H, W, 3), H and W multiples of `patch_size` -> logits (N, num_classes) float32;
  sows the classifier input (N, D) as `intermediates/penultimate`."""
  num_classes: int
  patch_size: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  representation_size: int | None = None
  # Per-layer feature (`unit_feature` of each `layer{i}`): 'cls' = the class token,
  # 'mean' = the mean over all 1 + g*g tokens (class token included; the paper's
  # layer-wise ViT features are 145 x 768 per layer at 384x384).
  pool: str = "cls"
  scl_unit: str | None = None
  dtype: Dtype = jnp.float32
  vpt_tokens: int = 0      # VPT prompt tokens P (0: none)
  vpt_deep: bool = True    # prompts at every layer (deep) or once before layer1 (shallow)

  @property
  def units(self) -> tuple[str, ...]:
    return tuple(f"layer{i + 1}" for i in range(self.num_layers))

  def unit_feature(self, y):
    """A unit's output (N, T, D) tokens -> its feature (N, D) float32 (see `pool`)."""
    if self.pool == "cls":
      return y[:, 0].astype(jnp.float32)
    if self.pool == "mean":
      p = self.vpt_tokens
      y = jnp.concatenate([y[:, :1], y[:, 1 + p:]], axis=1) if p else y
      return jnp.mean(y.astype(jnp.float32), axis=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no batch statistics
    units = self.units
    check_unit(self.scl_unit, units)
    # `pool` is only read by `unit_feature` (outside the model unless SCL): check it here so a
    # bad value fails at the first call, as before.
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
    dtype = as_dtype(self.dtype)
    n, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=dtype, name="embedding")(x.astype(dtype))
    x = jnp.reshape(x, (n, -1, self.hidden_size))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.hidden_size)).astype(x.dtype), x],
                        axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.hidden_size))
    x = x + pos.astype(x.dtype)
    P = self.vpt_tokens
    if P < 0:
      raise ValueError(f"vpt_tokens must be >= 0, got {P}")
    if P:
      bound = (6.0 / (3 * p * p + self.hidden_size)) ** 0.5
      prompts = self.param(
          "prompts", lambda k, s: nn.initializers.uniform(2 * bound)(k, s) - bound,
          (self.num_layers if self.vpt_deep else 1, P, self.hidden_size))
    out = {}  # unit -> its raw output; only the SCL unit's is read
    for i, name in enumerate(units):
      if P and (i == 0 or self.vpt_deep):
        tokens = jnp.broadcast_to(prompts[i if self.vpt_deep else 0].astype(x.dtype),
                                  (n, P, self.hidden_size))
        rest = x[:, 1:] if i == 0 else x[:, 1 + P:]  # deep: drop the last layer's prompts
        x = jnp.concatenate([x[:, :1], tokens, rest], axis=1)
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=dtype, name=name)(x)
      out[name] = x
    x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name="encoder_norm")(x)
    feat = x[:, 0]
    if self.representation_size is not None:
      feat = jnp.tanh(nn.Dense(self.representation_size, dtype=dtype, name="pre_logits")(feat))
    feat = feat.astype(jnp.float32)
    if self.scl_unit is not None:
      feat = add_skip(feat, self.unit_feature(out[self.scl_unit]))
    self.sow("intermediates", "penultimate", feat)
    logits = nn.Dense(self.num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                      name="head")(feat)
    return logits.astype(jnp.float32)
