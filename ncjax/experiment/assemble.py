"""Assembling a run from its spec: data splits, the model, its initial variables, on-device
pre-processing, batch arithmetic and the frozen backbone's embeddings. Everything here
happens before a run's first step; every stage (`ncjax.experiment.stages`) shares it.
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import data, errors, measure, methods, models, weights
from ncjax.experiment.spec import Backbone, Run, Spec


# ----------------------------------------------------------------------------- data

def load_split(spec: Spec, name: str, split: str, bb: Backbone,
               classes: Iterable[int] | None) -> data.ArrayDataset:
  """A split at its native resolution (variable-size images fitted to the backbone's
  `image_size`), lazily decoded where the source allows: take subsets, then `materialize`."""
  ds = data.load(spec.source(name), split, data_dir=spec.data_dir,
                 decode_size=bb.image_size or None)
  if classes:
    ds = data.select_classes(ds, list(classes))
  ds.name = name
  return ds


def materialize(spec: Spec, ds: data.ArrayDataset) -> data.ArrayDataset:
  """`data.materialize` within the spec's ``data_budget_mb`` (larger splits stream)."""
  return data.materialize(ds, spec.data_budget_mb)


def balanced(spec: Spec, ds: data.ArrayDataset, size: int, field: str) -> data.ArrayDataset:
  """`ds` itself when `size` is 0, else its class-balanced subset of `size` examples (drawn
  with the spec's seed, keeping `ds.name`); a size the split cannot fill is a config error
  naming `field`."""
  if not size:
    return ds
  try:
    sub = data.balanced_subset(ds, size, spec.seed)
  except ValueError as e:
    raise errors.ConfigError(f"--config.{field}={size}: {e}") from e
  sub.name = ds.name
  return sub


def source_train(spec: Spec, bb: Backbone) -> data.ArrayDataset:
  """The pre-training split (``pretrain.classes``, ``pretrain.train_size``), still lazy."""
  pc = spec.pretrain
  return balanced(spec, load_split(spec, pc.dataset, "train", bb, pc.classes), pc.train_size,
                  "pretrain.train_size")


def downstream_train(spec: Spec, bb: Backbone, dataset: str, size: int = 0) -> data.ArrayDataset:
  """A downstream training split restricted to ``downstream_classes`` (the class-balanced
  subset of `size` examples when `size` > 0), still lazy."""
  return balanced(spec, load_split(spec, dataset, "train", bb, spec.downstream_classes), size,
                  "train_sizes")


def downstream(spec: Spec, bb: Backbone, dataset: str, size: int = 0):
  """``(train, test)`` of a downstream dataset, decoded: `downstream_train` and the
  ``test_split`` restricted to ``downstream_classes``."""
  test = load_split(spec, dataset, spec.test_split, bb, spec.downstream_classes)
  return materialize(spec, downstream_train(spec, bb, dataset, size)), materialize(spec, test)


# ----------------------------------------------------------------------------- pre-processing

def normalization(kind: str, ds: data.ArrayDataset, channels: int,
                  weights_path: str | None = None):
  """(mean, std) per input channel in [0, 1] units: 'imagenet' / a stored dataset name,
  'inception' ([-1, 1] inputs), 'dataset' (computed on `ds`, the training split) or
  'checkpoint' (the preprocessing config of `weights_path`, `weights.preprocessing`).
  One-channel statistics are repeated when grayscale images feed a `channels`-channel model."""
  if kind == "checkpoint":
    pre = weights.preprocessing(weights_path) if weights_path else None
    if pre is None:  # assets.check_assets reports this before any work
      raise ValueError(f"{weights_path}: no preprocessing config gives a mean and std")
    mean, std = tuple(pre["mean"]), tuple(pre["std"])
  elif kind == "dataset":
    mean, std = _dataset_stats(ds)
  elif kind == "inception":
    mean, std = (0.5,) * channels, (0.5,) * channels
  else:
    mean, std = data.stats_for(kind)
  if len(mean) == 1 and channels > 1:
    mean, std = mean * channels, std * channels
  if len(mean) != channels:
    raise ValueError(f"{kind} normalisation has {len(mean)} channels; the model takes {channels}")
  return mean, std


_STATS: dict = {}


def _dataset_stats(ds: data.ArrayDataset):
  # Every method of a (dataset, subset) cell normalises with the same training statistics:
  # compute them once per split (a full pass over a large split takes minutes).
  key = (ds.name, len(ds), hash(ds.labels.tobytes()), ds.images.shape)
  if key not in _STATS:
    _STATS[key] = data.dataset_stats(ds)
  return _STATS[key]


def make_prepare(mean, std, image_size: int | None, aug_level: int,
                 channels: int) -> data.Preprocess:
  """On-device pre-processing of uint8 batches at native resolution: (grayscale ->
  `channels` copies) -> [0,1] -> augment (training only) -> resize to `image_size` ->
  normalise (`data.Preprocess`)."""
  return data.Preprocess(np.asarray(mean, np.float32), np.asarray(std, np.float32),
                         image_size=image_size or None, aug_level=int(aug_level),
                         channels=int(channels))


def normalization_used(bb: Backbone) -> str:
  """What a record says of its input normalisation: the kind, and for 'checkpoint' the file
  its mean and std came from (``checkpoint:<file>``)."""
  if bb.normalization != "checkpoint":
    return bb.normalization
  pre = weights.preprocessing(bb.weights_path)
  return f"checkpoint:{pre['source'] if pre else bb.weights_path}"


def prepare_for(bb: Backbone, ds: data.ArrayDataset, aug_level: int) -> data.Preprocess:
  """The backbone's pre-processing, normalised with its `normalization` on `ds`."""
  channels = input_shape(bb, ds)[-1]
  mean, std = normalization(bb.normalization, ds, channels, bb.weights_path)
  return make_prepare(mean, std, bb.image_size or None, aug_level, channels)


# ----------------------------------------------------------------------------- the model

def build_model(spec: Spec, bb: Backbone, num_classes: int, method: str = "",
                unit: str | None = None):
  """The backbone's model with a `num_classes` head, the method's model options (SCL's
  skip) and the spec's compute dtype (parameters, optimizer state and BatchNorm statistics
  stay float32; the loss and the NC metrics are computed in float32)."""
  options = {**bb.options, **(methods.model_options(method, unit) if method else {})}
  if method == "vpt":  # the prompts are the model's own parameters
    options.update(vpt_tokens=spec.peft.vpt_tokens, vpt_deep=spec.peft.vpt_deep)
  return models.get(bb.model, num_classes, **options, dtype=spec.dtype)


def input_shape(bb: Backbone, ds: data.ArrayDataset) -> tuple[int, int, int, int]:
  """The model's input shape (1, H, W, C): the backbone's `image_size` / `channels` where set,
  else the data's own."""
  hw = (bb.image_size, bb.image_size) if bb.image_size else ds.images.shape[1:3]
  return (1,) + tuple(hw) + (bb.channels or ds.images.shape[-1],)


@functools.lru_cache(maxsize=None)
def _jit_init(model):
  return jax.jit(functools.partial(model.init, train=False))


def init_variables(model, input_shape: tuple[int, ...], seed: int) -> dict:
  """Fresh ``{'params', 'batch_stats'}`` for `model` on float32 inputs of `input_shape`."""
  if getattr(model, "scl_unit", None) is not None:
    # The SCL skip has no parameters: the plain model's (already compiled) init serves.
    model = model.clone(scl_unit=None)
  x = jnp.zeros((1,) + tuple(input_shape[1:]), jnp.float32)
  variables = dict(_jit_init(model)(jax.random.PRNGKey(seed), x))
  variables.setdefault("batch_stats", {})
  return variables


def transplant(source: dict, target: dict, skip_top: Iterable[str] = (methods.HEAD,)) -> dict:
  """Copies every leaf of `source` into `target` except the top-level `skip_top` modules
  (the classifier, which is new for the downstream task). Shapes must match."""
  skip_top = set(skip_top)
  out = {}
  for col, tree in target.items():
    src = source.get(col, {})
    new = {}
    for k, v in tree.items():
      if k in skip_top or k not in src:
        if k not in skip_top and col == "params":
          raise ValueError(f"pre-trained variables lack {col}/{k}")
        new[k] = v
        continue

      def check(path, a, b, col=col, k=k):
        if a.shape != b.shape:
          raise ValueError(f"pre-trained {col}/{k}{jax.tree_util.keystr(path)} has shape "
                           f"{a.shape}, the model expects {b.shape}")
        return a
      new[k] = jax.tree_util.tree_map_with_path(check, src[k], v)
    out[col] = new
  return out


def initial_variables(spec: Spec, bb: Backbone, model, ds: data.ArrayDataset,
                      pretrained: dict | None) -> tuple[dict, str]:
  """Initial variables for fine-tuning `model` on `ds` and where they came from: the
  backbone's weights file, the pre-trained source model, or scratch."""
  variables = init_variables(model, input_shape(bb, ds), spec.seed)
  # A method's extra top-level parameters (VPT's prompts) are in no checkpoint: they keep
  # their fresh values; everything else comes from the weights.
  extra = {k: v for k, v in variables["params"].items() if k == methods.PROMPTS}
  if extra and (bb.weights_path or pretrained is not None):
    loaded, origin = initial_variables(spec, bb, model.clone(vpt_tokens=0), ds, pretrained)
    return {**loaded, "params": {**loaded["params"], **extra}}, origin
  if bb.weights_path:
    return weights.load(bb.weights_path, bb.model, variables), bb.weights
  if pretrained is not None:
    return transplant(pretrained, variables), "pretrain"
  return variables, "scratch"


# ----------------------------------------------------------------------------- batches

def steps_per_epoch(n_train: int, batch_size: int) -> int:
  """Optimizer steps in one epoch of full batches (>= 1): the unit of ``optim.epochs`` and
  ``optim.decay_epochs``."""
  return max(1, n_train // batch_size)


def total_steps(optim, n_train: int, batch_size: int) -> int:
  """``optim.steps`` when > 0, else ``optim.epochs`` (>= 1) epochs of full batches."""
  if optim.steps:
    return int(optim.steps)
  if int(optim.epochs) < 1:
    raise ValueError(f"optim.epochs must be >= 1 when optim.steps is 0, got {optim.epochs}")
  return int(optim.epochs) * steps_per_epoch(n_train, batch_size)


def optimizer(optim, n_train: int, batch_size: int):
  """`train.OptimConfig` of a run on `n_train` examples in batches of `batch_size`."""
  return optim.optimizer(steps_per_epoch(n_train, batch_size))


def effective_batch(batch_size: int, n: int, mesh) -> int:
  """The configured batch, shrunk for tiny datasets (Fig. 11's 10-example subsets) and rounded
  to the device count."""
  d = mesh.devices.size
  if batch_size < 1:
    raise ValueError(f"batch size must be >= 1, got {batch_size}")
  b = max(d, (min(batch_size, n) // d) * d)
  if b > n:
    raise ValueError(f"{n} training examples cannot fill one batch on {d} devices")
  return b


def eval_batch(spec: Spec, mesh) -> int:
  return effective_batch(spec.eval_batch_size, 1 << 30, mesh)


# ----------------------------------------------------------------------------- embeddings

def embed(spec: Spec, run: Run, pretrained: dict | None, mesh, split: str | None = None):
  """Penultimate embeddings (N, D) float32 of the frozen backbone (eval mode) on the
  downstream classes' images of `split` (default ``fewshot.split``: the meta-test classes,
  ``meta_test`` of ``cifar_fs`` / ``mini_imagenet``), the split and where the weights came
  from."""
  ds = materialize(spec, load_split(spec, run.dataset, split or spec.fewshot.split,
                                    run.backbone, spec.downstream_classes))
  model = build_model(spec, run.backbone, ds.num_classes)
  variables, origin = initial_variables(spec, run.backbone, model, ds, pretrained)
  prepare = prepare_for(run.backbone, ds, 1)
  emb = measure.extract(model, variables, prepare, ds.images, eval_batch(spec, mesh), mesh,
                        names=("penultimate",), desc=run.id)["penultimate"]
  return emb, ds, origin
