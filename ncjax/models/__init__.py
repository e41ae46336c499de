"""Model registry for ncjax (Flax linen).

`get(name, num_classes, **options)` builds a model; every model is called as
`model.apply(variables, x, train=...)` on float32 NHWC input and returns logits.
Fine-tuning units are top-level submodules named as `units(name)` lists; the
classifier is the top-level `head`. The classifier input (N, D) is sown as
`intermediates/penultimate`. Flax's `capture_intermediates` gives each unit's raw output
as `intermediates/<unit>/__call__`: (N, H, W, C) maps for conv blocks, (N, T, D) tokens for
ViT layers, (N, width) for MLP layers; `unit_filter(model)` captures the units only.
`features` pools those outputs (outside the model) into one vector per example and unit.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from ncjax import methods
from ncjax.models.common import BatchNorm
from ncjax.models.densenet import DenseNet
from ncjax.models.densenet import CONFIGS as _DENSENET_CONFIGS
from ncjax.models.heads import ProjectionHead
from ncjax.models.mobilenet import MobileNetV2
from ncjax.models.resnet import ResNet
from ncjax.models.resnet import CONFIGS as _RESNET_CONFIGS
from ncjax.models.small import MLP, ConvNet4, ResNet12, SEResNet12
from ncjax.models.vit import ViT
from ncjax.models.vit import CONFIGS as _VIT_CONFIGS

__all__ = ["get", "units", "features", "unit_filter", "pool_units", "count_params",
           "finetune_percent", "names", "param_shapes", "ResNet", "ViT", "MLP", "ConvNet4",
           "ResNet12", "SEResNet12", "DenseNet", "MobileNetV2", "BatchNorm", "ProjectionHead"]

# name -> (class, fixed config, allowed user options)
_COMMON = ("scl_unit", "dtype")
_REGISTRY: dict[str, tuple[type, dict[str, Any], tuple[str, ...]]] = {}
for _n, (_stages, _block) in _RESNET_CONFIGS.items():
  _REGISTRY[_n] = (ResNet, dict(stage_sizes=_stages, block=_block),
                   _COMMON + ("stem", "width"))
for _n, (_p, _d, _l, _h, _m) in _VIT_CONFIGS.items():
  _REGISTRY[_n] = (ViT, dict(patch_size=_p, hidden_size=_d, num_layers=_l, num_heads=_h,
                             mlp_dim=_m), _COMMON + ("pool", "representation_size", "vpt_tokens",
                                                     "vpt_deep"))
for _n, (_g, _b, _w) in _DENSENET_CONFIGS.items():
  _REGISTRY[_n] = (DenseNet, dict(growth_rate=_g, block_config=_b, num_init_features=_w), _COMMON)
_REGISTRY["mobilenet_v2"] = (MobileNetV2, {}, _COMMON)
_REGISTRY["mlp"] = (MLP, {}, _COMMON + ("depth", "width", "batch_norm"))
_REGISTRY["convnet4"] = (ConvNet4, {}, _COMMON + ("width", "flatten"))
_REGISTRY["resnet12"] = (ResNet12, {}, _COMMON + ("widths",))
_REGISTRY["seresnet12"] = (SEResNet12, {}, _COMMON + ("widths", "se_reduction"))


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _entry(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'unknown model {name!r}; available: {", ".join(_REGISTRY)}')
  return _REGISTRY[name]


def get(name: str, num_classes: int, **options) -> nn.Module:
  """Builds model `name` with a `num_classes`-way head.

  Options (by family): all: `scl_unit` (None or a unit name), `dtype` (computation dtype,
  default float32; params stay float32). ResNet: `stem` ('imagenet' | 'cifar'), `width`.
  DenseNet (densenet121/161/169/201), MobileNetV2 (mobilenet_v2): torchvision's ImageNet
  networks, no further option.
  ViT: `pool` ('cls' | 'mean'), `representation_size` (adds `pre_logits`), `vpt_tokens`,
  `vpt_deep` (VPT prompts, see `ncjax.models.vit`). MLP: `depth`
  (9), `width` (784), `batch_norm` (False). ConvNet4: `width`, `flatten`. ResNet12: `widths`.
  SEResNet12: `widths`, `se_reduction` (16; RFS uses 4).
  Options set to None are ignored (model default).
  """
  cls, config, allowed = _entry(name)
  bad = sorted(set(options) - set(allowed))
  if bad:
    raise ValueError(f'unknown option(s) {bad} for model {name!r}; allowed: {", ".join(allowed)}')
  kwargs = dict(config)
  kwargs.update({k: v for k, v in options.items() if v is not None or k == "representation_size"})
  if kwargs.get("dtype") is not None:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  model = cls(num_classes=num_classes, **kwargs)
  if model.scl_unit is not None and model.scl_unit not in model.units:
    raise ValueError(f"unknown unit {model.scl_unit!r} for scl_unit of {name!r}; "
                     f'valid units: {", ".join(model.units)}')
  return model


def units(name_or_model, **options) -> tuple[str, ...]:
  """Fine-tuning units of a model (by registry name, or a model instance), in order."""
  if isinstance(name_or_model, nn.Module):
    return tuple(name_or_model.units)
  return tuple(get(name_or_model, 1, **options).units)


def unit_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
  """`capture_intermediates` filter that captures the `__call__` output of `model`'s units only.

  `model.apply(v, x, ..., capture_intermediates=unit_filter(model), mutable=['intermediates'])`
  returns `intermediates/<unit>/__call__ = (output,)` for every unit (and the sown
  `intermediates/penultimate`), and nothing for the other submodules, so no other activation
  is kept as an output.
  """
  paths = frozenset((u,) for u in model.units)
  # `mdl.path` is the submodule's name path from `model`: units are exactly the top-level ones.
  return lambda mdl, method_name: method_name == "__call__" and mdl.path in paths


def pool_units(model: nn.Module, intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`{unit: (N, C_unit) float32, ..., 'penultimate': (N, D)}` in unit order, from the
  'intermediates' collection of an apply with `capture_intermediates=unit_filter(model)` (or
  True): each unit's raw output pooled by `model.unit_feature` (conv maps: mean over H, W; ViT
  tokens: the class token or the token mean, per `pool`; MLP: as is). Works in train or eval
  mode, inside or outside `jit`.
  """
  out = {}
  for u in model.units:
    entry = intermediates.get(u)
    if not isinstance(entry, Mapping) or "__call__" not in entry:
      raise KeyError(f"intermediates have no {u}/__call__: apply the model with "
                     f"capture_intermediates=ncjax.models.unit_filter(model)")
    out[u] = model.unit_feature(entry["__call__"][0])
  pen = intermediates["penultimate"]
  out["penultimate"] = pen[0] if isinstance(pen, tuple) else pen
  return out


def features(model: nn.Module, variables, x) -> dict[str, jax.Array]:
  """Pooled output of every unit and the penultimate feature, eval mode.

  x (N, H, W, C) -> a flat dict `{unit: (N, C_unit) float32, ..., 'penultimate': (N, D)}` in
  unit order (see `pool_units`). Pure; can be wrapped in `jax.jit` (e.g.
  `jax.jit(functools.partial(features, model))`), but a jitted function returns its dicts
  with sorted keys ('layer10' before 'layer2'): iterate over `units(model)` when order
  matters. Under `jit` the pooling joins the forward pass in one program: XLA compiles it to
  the same optimized HLO as pooling inside the model did (`benchmarks/features.py`), so no
  unit map is kept beyond its pooling and nothing costs extra.
  """
  v = {k: val for k, val in variables.items() if k != "intermediates"}
  _, state = model.apply(v, x, train=False, capture_intermediates=unit_filter(model),
                         mutable=["intermediates"])
  return pool_units(model, state["intermediates"])


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs).

  A full variables dict (`{'params': ..., 'batch_stats': ...}`) counts its 'params'
  only: BatchNorm statistics are not parameters.
  """
  if isinstance(params, dict) and "params" in params and "batch_stats" in params:
    params = params["params"]
  elif isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  return int(sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(params)))


def _input_shape(name: str, image_size: int, channels: int):
  return (1, image_size, image_size, channels)


@functools.lru_cache(maxsize=64)
def _param_shapes_cached(name, num_classes, image_size, channels, options):
  model = get(name, num_classes, **dict(options))
  x = jax.ShapeDtypeStruct(_input_shape(name, image_size, channels), jnp.float32)
  return jax.eval_shape(lambda k, xx: model.init(k, xx, train=False), jax.random.key(0), x)


def param_shapes(name: str, num_classes: int, image_size: int = 224, channels: int = 3,
                 **options):
  """Abstract variables (ShapeDtypeStructs) of a model, via `jax.eval_shape` (no init)."""
  return _param_shapes_cached(name, num_classes, image_size, channels,
                              tuple(sorted(options.items())))


def finetune_percent(name: str, method: str, unit: str | None, num_classes: int,
                     image_size: int = 224, *, channels: int = 3, **options) -> float:
  """Percentage of parameters fine-tuned (paper Table 3).

  trainable params (incl. the new `num_classes` head) / all params of the model with that
  new head (backbone + new head; the pre-training classifier is not counted), x 100.
  `linear`: head only; `layer`, `scl`: `unit` + head (the SCL skip has no parameters);
  `full`: all. BatchNorm statistics are not parameters. The ViT position embedding
  depends on `image_size` (the paper's ViT-B/32 numbers are at 384). The abstract
  input is (1, image_size, image_size, channels): pass `image_size=28, channels=1` for
  the MLP on MNIST. `options` go to `get` (e.g. `stem='cifar'`, `depth=...`).
  """
  params = param_shapes(name, num_classes, image_size, channels, **options)["params"]
  if methods.needs_unit(method):
    valid = units(name, **{k: v for k, v in options.items() if k in ("depth", "widths")})
    if unit not in valid:
      raise ValueError(f'unknown unit {unit!r} for {name!r}; valid units: {", ".join(valid)}')
  return methods.percent_trainable(params, methods.trainable_mask(params, method, unit))
