"""The transfer pipeline: (pre-train) -> fine-tune with each method -> evaluate -> NC metrics.

`run(config, workdir)` walks the grid ``models x datasets x train sizes x methods x units``
of a config (see ``configs/default.py`` for every field) and returns one result record per
cell (the fields `ncjax.report` documents). `run_layer_probes` is Fig. 9's layer-wise linear
probing. Everything here composes `ncjax.train`'s one train step; nothing trains differently.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ncjax import data, methods, metrics, models, train

PyTree = Any


# ----------------------------------------------------------------------------- config helpers

def split_list(value) -> list[str]:
  """``'a, b,c'`` -> ``['a', 'b', 'c']``; lists and tuples pass through; '' -> []."""
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [str(v).strip() for v in value if str(v).strip()]
  return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_classes(spec) -> list[int] | None:
  """``'5-9'`` -> [5, 6, 7, 8, 9]; ``'0,2,4'`` -> [0, 2, 4]; '' -> None (all classes).

  Raises ValueError for a reversed range (``'9-5'``), a negative id or a non-integer, rather
  than reading it as "all classes"."""
  out = []
  for part in split_list(spec):
    lo, dash, hi = part.partition("-")
    try:
      ids = range(int(lo), int(hi) + 1) if dash else [int(part)]
    except ValueError:
      raise ValueError(f"{part!r} is not a class id or a range lo-hi") from None
    if dash and int(hi) < int(lo):
      raise ValueError(f"reversed class range {part!r} (write {hi}-{lo})")
    if min(ids) < 0:
      raise ValueError(f"negative class id in {part!r}")
    out.extend(ids)
  return out or None


class ConfigError(ValueError):
  """An invalid config; the message lists every problem, in command-line terms."""


def check_config(config) -> None:
  """Checks the fields a run would otherwise coerce or reject late, all at once, before any
  work: batch sizes, steps/epochs, class ranges, methods, dtype, the data budget. Raises
  `ConfigError` listing every problem as ``--config.<field>=<value>: <why>``."""
  problems = []

  def bad(field, value, why):
    problems.append(f"--config.{field}={value}: {why}")

  def at_least(field, value, lo):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
      bad(field, value, f"must be an integer >= {lo}")

  optims = [("optim", config.optim)]
  if config.pretrain.enabled or config.job == "pretrain":
    merged = config.optim.copy_and_resolve_references()
    merged.update(dict(config.pretrain.optim))
    optims.append(("pretrain.optim", merged))
  for prefix, optim in optims:
    # An inherited value is reported once, under the field that set it.
    own = set(config.pretrain.optim) if prefix == "pretrain.optim" else set(optim)
    name = lambda f: f"{prefix if f in own else 'optim'}.{f}"
    at_least(name("batch_size"), optim.batch_size, 1)
    at_least(name("steps"), optim.steps, 0)
    if optim.steps == 0:
      at_least(name("epochs"), optim.epochs, 1)
    if not optim.lr > 0:
      bad(name("lr"), optim.lr, "must be > 0")
  problems[:] = list(dict.fromkeys(problems))
  at_least("eval_batch_size", config.eval_batch_size, 1)
  for field, spec in (("downstream_classes", config.downstream_classes),
                      ("pretrain.classes", config.pretrain.classes)):
    try:
      parse_classes(spec)
    except ValueError as e:
      bad(field, spec, str(e))
  for m in split_list(config.methods):
    if m not in methods.METHODS:
      bad("methods", config.methods, f"unknown method {m!r} (methods: {', '.join(methods.METHODS)})")
  for name in split_list(config.models):
    if name not in models.names():
      bad("models", config.models, f"unknown model {name!r} (models: {', '.join(models.names())})")
  if str(config.dtype) not in COMPUTE_DTYPES:
    bad("dtype", config.dtype, f"must be one of {', '.join(COMPUTE_DTYPES)}")
  if not float(config.data_budget_mb) >= 0:
    bad("data_budget_mb", config.data_budget_mb, "must be >= 0")
  if config.compile_cache_dir:
    why = _not_creatable(os.path.expanduser(str(config.compile_cache_dir)))
    if why:
      bad("compile_cache_dir", config.compile_cache_dir, why)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _not_creatable(path: str) -> str | None:
  """Why directory `path` cannot be used or created (its nearest existing ancestor must be a
  writable directory), or None."""
  p = os.path.abspath(path)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    return f"{p} is not a directory"
  if not os.access(p, os.W_OK):
    return f"{p} is not writable"
  return None


def _get(cfg, key, default=None):
  try:
    return cfg[key] if key in cfg else default
  except TypeError:
    return default


def backbone_config(config, model_name: str):
  """The per-model settings ``config.backbone.<model_name>`` (weights, unit, image_size,
  options, normalization); missing fields fall back to ``config.backbone.default``."""
  bb = config.backbone
  base = dict(bb.default) if "default" in bb else {}
  if model_name in bb:
    base.update(dict(bb[model_name]))
  base.setdefault("weights", "")
  base.setdefault("unit", "")
  base.setdefault("image_size", 0)
  base.setdefault("options", {})
  base.setdefault("normalization", "dataset")
  base.setdefault("datasets", "")  # '' = config.datasets
  base["options"] = dict(base["options"])
  return base


# ----------------------------------------------------------------------------- data

def load_split(config, name: str, split: str, image_size: int | None,
               classes: list[int] | None) -> data.ArrayDataset:
  """A split at its native resolution (variable-size images fitted to `image_size`), lazily
  decoded where the source allows: take subsets, then `materialize`."""
  source = _get(_get(config, "dataset_sources", {}) or {}, name, "") or name
  ds = data.load(source, split, data_dir=_get(config, "data_dir") or None,
                 decode_size=image_size or None)
  if classes:
    ds = data.select_classes(ds, classes)
  ds.name = name
  return ds


def materialize(config, ds: data.ArrayDataset) -> data.ArrayDataset:
  """`data.materialize` within ``config.data_budget_mb`` (larger splits stream from disk)."""
  return data.materialize(ds, float(config.data_budget_mb))


def downstream_splits(config, bb: dict):
  """Yields ``(name, train split, test split)`` for each downstream dataset of a backbone
  (its own `datasets`, else ``config.datasets``), restricted to ``downstream_classes``.
  The train split may still be lazy (subset it, then `materialize`); the test split is
  materialised."""
  classes = parse_classes(_get(config, "downstream_classes", ""))
  image_size = int(bb["image_size"]) or None
  test_split = _get(config, "test_split", "test") or "test"
  for name in split_list(bb.get("datasets")) or split_list(config.datasets):
    yield (name, load_split(config, name, "train", image_size, classes),
           materialize(config, load_split(config, name, test_split, image_size, classes)))


def uses_pretraining(config, bb: dict) -> bool:
  """Whether the backbone starts from `pretrain` (enabled, and no weights file given)."""
  return bool(config.pretrain.enabled) and bb["weights"] in ("", "pretrain")


def normalization(kind: str, ds: data.ArrayDataset, channels: int):
  """(mean, std) per input channel in [0, 1] units: 'imagenet' / a stored dataset name, or
  'dataset' (computed on `ds`, the training split). One-channel statistics are repeated when
  grayscale images feed a `channels`-channel model."""
  if kind == "dataset":
    mean, std = data.dataset_stats(ds)
  elif kind == "inception":  # vit_jax / Inception: inputs scaled to [-1, 1]
    mean, std = (0.5,) * channels, (0.5,) * channels
  else:
    mean, std = data.stats_for(kind)
  if len(mean) == 1 and channels > 1:
    mean, std = mean * channels, std * channels
  if len(mean) != channels:
    raise ValueError(f"{kind} normalisation has {len(mean)} channels; the model takes {channels}")
  return mean, std


def make_prepare(mean, std, image_size: int | None, aug_level: int,
                 channels: int) -> data.Preprocess:
  """On-device pre-processing of uint8 batches at native resolution: (grayscale ->
  `channels` copies) -> [0,1] -> augment (training only) -> resize to `image_size` ->
  normalise (`data.Preprocess`)."""
  return data.Preprocess(np.asarray(mean, np.float32), np.asarray(std, np.float32),
                         image_size=image_size or None, aug_level=int(aug_level),
                         channels=int(channels))


COMPUTE_DTYPES = ("float32", "bfloat16")


def build_model(config, model_name: str, num_classes: int, options: dict):
  """`models.get` with the config's compute dtype (``config.dtype``: parameters, optimizer
  state and BatchNorm statistics stay float32; the loss and the NC metrics are computed in
  float32)."""
  dtype = str(config.dtype)
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
  return models.get(model_name, num_classes, **{**options, "dtype": dtype})


# ----------------------------------------------------------------------------- variables

def input_shape(bb: dict, ds: data.ArrayDataset) -> tuple[int, int, int, int]:
  """The model's input shape (1, H, W, C): the backbone's `image_size` / `channels` where set,
  else the data's own."""
  image_size = int(bb["image_size"])
  hw = (image_size, image_size) if image_size else ds.images.shape[1:3]
  return (1,) + tuple(hw) + (int(_get(bb, "channels", 0)) or ds.images.shape[-1],)


@functools.lru_cache(maxsize=None)
def _jit_init(model):
  return jax.jit(functools.partial(model.init, train=False))


def init_variables(model, input_shape: tuple[int, ...], seed: int) -> dict:
  """Fresh ``{'params', 'batch_stats'}`` for `model` on float32 inputs of `input_shape`."""
  if getattr(model, "scl_unit", None) is not None:
    # The SCL skip has no parameters: the plain model's (already compiled) init serves.
    model = model.clone(scl_unit=None)
  x = jnp.zeros((1,) + tuple(input_shape[1:]), jnp.float32)
  variables = _jit_init(model)(jax.random.PRNGKey(seed), x)
  variables = dict(variables)
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
      def check(path, a, b):
        if a.shape != b.shape:
          raise ValueError(f"pre-trained {col}/{k}{jax.tree_util.keystr(path)} has shape "
                           f"{a.shape}, the model expects {b.shape}")
        return a
      new[k] = jax.tree_util.tree_map_with_path(check, src[k], v)
    out[col] = new
  return out


def load_backbone(config, model_name: str, bb: dict, variables: dict,
                  pretrained: dict | None) -> tuple[dict, str]:
  """Initial variables for fine-tuning and where they came from."""
  path = bb["weights"]
  if path and path != "pretrain":
    from ncjax import weights
    if not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(
          f"weights file {path!r} for {model_name} not found. "
          + ("ResNets take torchvision state dicts (.pth/.safetensors/.npz), e.g. "
             "resnet18-f37072fd.pth from https://download.pytorch.org/models/"
             if model_name.startswith("resnet") else
             "ViTs take vit_jax .npz checkpoints, e.g. gs://vit_models/imagenet21k/ViT-B_32.npz "
             "from github.com/google-research/vision_transformer"))
    return weights.load(os.path.expanduser(path), model_name, variables), path
  if pretrained is not None:
    return transplant(pretrained, variables), "pretrain"
  if path == "pretrain":
    raise ValueError(f"backbone {model_name} asks for weights='pretrain' but config.pretrain "
                     "is disabled")
  return variables, "scratch"


# ----------------------------------------------------------------------------- steps

def total_steps(optim, n_train: int, batch_size: int) -> int:
  """``optim.steps`` when > 0, else ``optim.epochs`` (>= 1) epochs of full batches."""
  if _get(optim, "steps", 0):
    return int(optim.steps)
  if int(optim.epochs) < 1:
    raise ValueError(f"optim.epochs must be >= 1 when optim.steps is 0, got {optim.epochs}")
  return max(1, int(optim.epochs) * (n_train // batch_size))


def effective_batch(batch_size: int, n: int, mesh) -> int:
  """The configured batch, shrunk for tiny datasets (Fig. 11's 10-example subsets) and rounded
  to the device count."""
  d = mesh.devices.size
  if batch_size < 1:
    raise ValueError(f"batch size must be >= 1, got {batch_size}")
  b = min(batch_size, n)
  b = max(d, (b // d) * d)
  if b > n:
    raise ValueError(f"{n} training examples cannot fill one batch on {d} devices")
  return b


def recalibrate_batch_stats(forward, params, batch_stats, prepare, images, batch_size, mesh,
                            seed, steps: int = 0):
  """Forward passes over `images` in train mode that update the BatchNorm running statistics
  only (every method updates them on the downstream data; used before caching features).

  `steps` batches (at least one epoch): the running statistics are an exponential moving
  average (momentum 0.9), so ~50 batches forget the pre-training statistics (0.9^50 < 0.01),
  as they would be forgotten during a linear probe that runs BatchNorm in train mode."""
  if not batch_stats:
    return batch_stats
  update = _jit_recalibrate(forward, mesh)
  params, prepare = train.put_replicated(mesh, (params, prepare))
  batch_stats = train.put_replicated(mesh, batch_stats, copy=True)  # donated below
  rows = train.local_rows(batch_size)
  for x, _ in train.batch_iterator(images, np.zeros(len(images), np.int32), batch_size,
                                  seed=seed, start_step=0,
                                  total_steps=max(steps, len(images) // batch_size)):
    batch_stats = update(params, batch_stats, prepare, train.to_global(mesh, x[rows]))
  return batch_stats


@functools.lru_cache(maxsize=None)
def _jit_recalibrate(forward, mesh):
  rep, dat = train.replicated(mesh), train.batch_sharded(mesh)

  def update(params, stats, prepare, x):
    return forward(params, stats, prepare(None, x, False), True)[1]
  return jax.jit(update, in_shardings=(rep, rep, rep, dat), out_shardings=rep,
                 donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def features_fn(model, names: tuple[str, ...] | None = None):
  """``fn(variables, prepare, x) -> {name: (N, C) float32}``: pooled features (eval mode) of
  the units and 'penultimate' (or only `names`); one per model, so `train.predict` compiles
  it once per model and input shape."""
  def fn(variables, prepare, x):
    f = models.features(model, variables, prepare(None, x, False))
    return {k: v.astype(jnp.float32) for k, v in f.items() if names is None or k in names}
  return fn


def extract(model, variables, prepare, images, batch_size, mesh, names=None):
  """Pooled features (eval mode) of `images`: dict name -> (N, C) numpy float32, for the
  units and 'penultimate' (or only `names`)."""
  out: dict[str, list] = {}
  fn = features_fn(model, None if names is None else tuple(names))
  for f, _ in train.predict(fn, images, batch_size, args=(variables, prepare), mesh=mesh,
                            desc="features"):
    for k, v in f.items():
      out.setdefault(k, []).append(np.asarray(v, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


def collapse(model, variables, prepare, ds: data.ArrayDataset, batch_size, mesh,
             rank_limit: int = 1 << 26) -> tuple[dict, dict]:
  """Streams the downstream training features through `metrics.CollapseStats`, one per unit
  and one for the penultimate feature. Returns ``(penultimate metrics, {unit: nc1})``.

  Features never leave the device: each padded batch goes through one jitted function
  (features + a masked statistics update), compiled once per model and batch shape. Memory is
  independent of N: d x d per layer (and K x d x d for the penultimate numerical rank,
  computed only when K*d*d <= `rank_limit`)."""
  k = ds.num_classes
  shapes = jax.eval_shape(features_fn(model), variables, prepare,
                          jax.ShapeDtypeStruct((1,) + ds.images.shape[1:], jnp.uint8))
  stats = {n: metrics.CollapseStats.create(
               k, v.shape[1], per_class_second_moment=n == "penultimate"
               and k * v.shape[1] ** 2 <= rank_limit) for n, v in shapes.items()}
  update = _jit_collapse_update(model, mesh)
  variables, prepare, stats = train.put_replicated(mesh, (variables, prepare, stats))
  rows = train.local_rows(batch_size)
  batches = data.prefetch((ds.images[idx][rows], ds.labels[idx][rows],
                           (np.arange(batch_size) < valid)[rows])
                          for idx, valid in train.padded_batches(len(ds), batch_size))
  for x, y, mask in train.progress(batches, total=-(-len(ds) // batch_size), desc="collapse"):
    stats = update(stats, variables, prepare, *(train.to_global(mesh, a) for a in (x, y, mask)))
  pen = stats.pop("penultimate")
  result = {"nc1": float(pen.nc1()), "cdnv": float(pen.cdnv())}
  result["numerical_rank"] = (float(pen.numerical_rank()) if pen.class_scatter is not None
                              else float("nan"))
  # jit returns dicts with sorted keys ('layer10' < 'layer2'): restore the model's unit order.
  layerwise = {n: float(stats[n].nc1()) for n in models.units(model) if n in stats}
  return result, layerwise


@functools.lru_cache(maxsize=None)
def _jit_collapse_update(model, mesh):
  """``update(stats, variables, prepare, x, y, mask) -> stats``: the features of a padded
  batch, added to every layer's statistics with the padding rows masked out."""
  rep, dat = train.replicated(mesh), train.batch_sharded(mesh)
  features = features_fn(model)

  def update(stats, variables, prepare, x, y, mask):
    f = features(variables, prepare, x)
    return {n: stats[n].update(f[n], y, mask) for n in stats}
  return jax.jit(update, in_shardings=(rep, rep, rep, dat, dat, dat), out_shardings=rep,
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------- one run

def finetune(config, model_name: str, bb: dict, train_ds: data.ArrayDataset,
             test_ds: data.ArrayDataset, method: str, unit: str | None, pretrained, workdir,
             mesh, run_name: str) -> tuple[dict, dict]:
  """Fine-tunes one (model, dataset, method, unit) cell; returns its result record and the
  final variables."""
  t0 = time.time()
  optim = config.optim
  seed = int(config.seed)
  options = dict(bb["options"])
  if method == "scl":
    options["scl_unit"] = unit
  model = build_model(config, model_name, train_ds.num_classes, options)
  image_size = int(bb["image_size"]) or None
  in_shape = input_shape(bb, train_ds)
  variables = init_variables(model, in_shape, seed)
  variables, origin = load_backbone(config, model_name, bb, variables, pretrained)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  mask = methods.trainable_mask(params, method, unit)
  mean, std = normalization(bb["normalization"], train_ds, in_shape[-1])
  aug = int(optim.aug_level)
  prepare = make_prepare(mean, std, image_size, aug, in_shape[-1])
  batch = effective_batch(int(optim.batch_size), len(train_ds), mesh)
  steps = total_steps(optim, len(train_ds), batch)
  tx = train.make_optimizer(train.OptimConfig.from_config(optim), steps, mask)
  ckpt = os.path.join(workdir, "checkpoints", run_name) if workdir else None
  common = dict(batch_size=batch, total_steps=steps, seed=seed, mesh=mesh,
                checkpoint_every=int(config.checkpoint_every), resume=bool(config.resume),
                desc=run_name)
  eval_batch = effective_batch(int(config.eval_batch_size), 1 << 30, mesh)
  forward = train.model_forward(model)
  if method == "linear" and aug <= 1 and config.cache_linear_features:
    # Frozen backbone and no augmentation: its features are the same every epoch, so
    # compute them once (after updating BatchNorm statistics on the downstream data, as every
    # method does) and train the head on them with the same train step.
    batch_stats = recalibrate_batch_stats(forward, params, batch_stats, prepare,
                                          train_ds.images, batch, mesh, seed,
                                          steps=min(steps, 50))
    feats = extract(model, {"params": params, "batch_stats": batch_stats}, prepare,
                    train_ds.images, eval_batch, mesh, names=("penultimate",))["penultimate"]
    step = train.make_train_step(train.head_forward(train_ds.num_classes), tx, mask)
    state = train.init_state(params, batch_stats, tx)
    state, history = train.fit(state, step, feats, train_ds.labels,
                               checkpoint_dir=ckpt and ckpt + "-head", **common)
  else:
    step = train.make_train_step(forward, tx, mask, prepare)
    state = train.init_state(params, batch_stats, tx)
    state, history = train.fit(state, step, train_ds.images, train_ds.labels,
                               checkpoint_dir=ckpt, **common)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  acc = train.accuracy(forward, state.params, state.batch_stats, prepare, test_ds.images,
                       test_ds.labels, eval_batch, mesh)
  record = {
      "model": model_name, "dataset": train_ds.name, "method": method,
      "unit": unit if methods.needs_unit(method) else "", "accuracy": acc,
      "percent_params": methods.percent_trainable(params, mask),
      "num_train": len(train_ds), "num_test": len(test_ds), "num_classes": train_ds.num_classes,
      "steps": steps, "batch_size": batch, "weights": origin, "seed": seed,
      "final_train_loss": history[-1]["loss"] if history else float("nan"),
  }
  if config.collapse:
    pen, layerwise = collapse(model, variables, prepare, train_ds, eval_batch, mesh)
    record.update(pen)
    record["layerwise_nc1"] = layerwise
  else:
    record.update(nc1=float("nan"), cdnv=float("nan"), numerical_rank=float("nan"),
                  layerwise_nc1={})
  record["wall_s"] = time.time() - t0
  logging.info("%s: accuracy %.2f%%, NC1 %.4g", run_name, acc, record["nc1"])
  return record, variables


# ----------------------------------------------------------------------------- pre-training

def projected_forward(model, head) -> train.Forward:
  """`Forward` over ``params = {'backbone': …, 'projection': …}``: the backbone's penultimate
  feature through a `ncjax.models.ProjectionHead` (the backbone's own classifier is unused)."""
  def forward(params, batch_stats, x, is_train):
    variables = {"params": params["backbone"]}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    mutable = ["intermediates"] + (["batch_stats"] if is_train and batch_stats else [])
    _, state = model.apply(variables, x, train=is_train, mutable=mutable)
    z = head.apply({"params": params["projection"]}, state["intermediates"]["penultimate"][0])
    return z, state.get("batch_stats", batch_stats)
  return forward


def two_views(prepare) -> train.Prepare:
  """Training input of two independent augmentations of the batch, stacked (2N, ...)."""
  def p(rng, x, is_train):
    if not is_train:
      return prepare(rng, x, False)
    k1, k2 = jax.random.split(rng)
    return jnp.concatenate([prepare(k1, x, True), prepare(k2, x, True)])
  return p


def supcon_objective(temperature: float):
  """SupCon on the stacked two-view embeddings (2N, D) produced with `two_views`."""
  from ncjax import losses

  def loss(z, labels):
    n = labels.shape[0]
    return losses.supcon(z.reshape(2, n, -1).swapaxes(0, 1), labels, temperature)
  return loss


def pretrain(config, model_name: str, bb: dict, workdir, mesh) -> tuple[dict, dict]:
  """Trains `model_name` from scratch on the source data; every parameter trains.

  ``config.pretrain`` selects the loss (``ce`` | ``mse`` | ``supcon``), an optional projection
  head (``projection_layers``; dropped afterwards), augmentation (``optim.aug_level``) and
  l_inf adversarial training (``adversarial_eps`` in [0, 1] pixel units, PGD). Returns the
  backbone's variables and a record of its source test accuracy (NaN for SupCon, which has
  no classifier) and its collapse on the source training data (Table 1, Fig. 2-4)."""
  from ncjax import losses
  t0 = time.time()
  pc, seed = config.pretrain, int(config.seed)
  optim = config.optim.copy_and_resolve_references()
  optim.update(dict(pc.optim))
  loss_name = str(_get(pc, "loss", "ce"))
  layers = int(_get(pc, "projection_layers", 0))
  eps = float(_get(pc, "adversarial_eps", 0.0))
  supcon = loss_name == "supcon"
  losses.get(loss_name)  # a clear error for an unknown loss before any work
  if supcon and eps > 0:
    raise ValueError("adversarial pre-training is implemented for the ce and mse losses only")
  image_size = int(bb["image_size"]) or None
  classes = parse_classes(pc.classes)
  src = materialize(config, load_split(config, pc.dataset, "train", image_size, classes))
  src_test = materialize(config, load_split(config, pc.dataset, "test", image_size, classes))
  model = build_model(config, model_name, src.num_classes, bb["options"])
  in_shape = input_shape(bb, src)
  variables = init_variables(model, in_shape, seed)
  mean, std = normalization(bb["normalization"], src, in_shape[-1])
  prepare = make_prepare(mean, std, image_size, int(optim.aug_level), in_shape[-1])
  if layers == 0 and not supcon:
    forward, params, loss_fn = train.model_forward(model), variables["params"], losses.get(loss_name)
  else:
    dim = jax.eval_shape(lambda v, x: models.features(model, v, x), variables,
                         jnp.zeros(in_shape, jnp.float32))["penultimate"].shape[-1]
    head = models.ProjectionHead(
        layers=layers, width=int(_get(pc, "projection_width", 0)) or dim,
        num_classes=None if supcon else src.num_classes,
        out_dim=int(_get(pc, "projection_dim", 128)) if supcon else None)
    params = {"backbone": variables["params"],
              "projection": head.init(jax.random.PRNGKey(seed + 1), jnp.zeros((1, dim)))["params"]}
    forward = projected_forward(model, head)
    loss_fn = (supcon_objective(float(_get(pc, "temperature", 0.1))) if supcon
               else losses.get(loss_name))
  adversary = None
  if eps > 0:
    adversary = train.pgd_adversary(forward, loss_fn, eps / np.asarray(std, np.float32),
                                    steps=int(_get(pc, "adversarial_steps", 7)))
  mask = jax.tree.map(lambda _: True, params)
  batch = effective_batch(int(optim.batch_size), len(src), mesh)
  steps = total_steps(optim, len(src), batch)
  tx = train.make_optimizer(train.OptimConfig.from_config(optim), steps, mask)
  step = train.make_train_step(forward, tx, mask, two_views(prepare) if supcon else prepare,
                               loss_fn=loss_fn, adversary=adversary)
  run_name = f"pretrain-{model_name}-{pc.dataset}"
  state, history = train.fit(
      train.init_state(params, variables["batch_stats"], tx), step, src.images, src.labels,
      batch_size=batch, total_steps=steps, seed=seed, mesh=mesh,
      checkpoint_dir=os.path.join(workdir, "checkpoints", run_name),
      checkpoint_every=int(config.checkpoint_every), resume=bool(config.resume), desc=run_name)
  projected = "backbone" in state.params
  backbone = {"params": state.params["backbone"] if projected else state.params,
              "batch_stats": state.batch_stats}
  eval_batch = effective_batch(int(config.eval_batch_size), 1 << 30, mesh)
  acc = float("nan") if supcon else train.accuracy(
      forward, state.params, state.batch_stats, prepare, src_test.images, src_test.labels,
      eval_batch, mesh)
  pen, layerwise = collapse(model, backbone, prepare, src, eval_batch, mesh)
  record = {
      "model": model_name, "dataset": src.name, "method": "full", "unit": "",
      "accuracy": acc, "percent_params": 100.0, "num_train": len(src),
      "num_test": len(src_test), "num_classes": src.num_classes, "steps": steps,
      "batch_size": batch, "weights": "scratch", "seed": seed, "stage": "pretrain",
      "loss": loss_name, "projection_layers": layers, "adversarial_eps": eps,
      "aug_level": int(optim.aug_level),
      "final_train_loss": history[-1]["loss"] if history else float("nan"),
      **pen, "layerwise_nc1": layerwise, "wall_s": time.time() - t0}
  logging.info("%s: source accuracy %.2f%%, source NC1 %.4g", run_name, acc, pen["nc1"])
  return backbone, record


# ----------------------------------------------------------------------------- the grid

def run(config, workdir: str) -> list[dict]:
  """Runs the config's grid; writes ``records.jsonl`` as it goes and returns the records."""
  mesh = train.data_mesh()
  os.makedirs(workdir, exist_ok=True)
  records, pre_records = [], []
  sizes = [int(s) for s in split_list(_get(config, "train_sizes", ""))] or [0]
  for model_name in split_list(config.models):
    bb = backbone_config(config, model_name)
    pretrained = None
    if uses_pretraining(config, bb):
      pretrained, prec = pretrain(config, model_name, bb, workdir, mesh)
      pre_records.append(prec)
      _write_jsonl(os.path.join(workdir, "pretrain.jsonl"), pre_records)
    for ds_name, train_full, test_ds in downstream_splits(config, bb):
      for size in sizes:
        train_ds = data.balanced_subset(train_full, size, int(config.seed)) if size else train_full
        train_ds = materialize(config, train_ds)  # decode only the rows this run uses
        train_ds.name = ds_name
        for method in split_list(config.methods):
          units = (split_list(_get(config, "units", "")) or [bb["unit"]]
                   if methods.needs_unit(method) else [None])
          for unit in units:
            name = "-".join(p for p in (model_name, ds_name, method, unit,
                                        f"n{size}" if size else "") if p)
            rec, _ = finetune(config, model_name, bb, train_ds, test_ds, method, unit,
                              pretrained, workdir, mesh, run_name=name)
            if pretrained is not None:  # Table 1 / Fig. 4: source collapse vs transfer
              rec.update(source_nc1=prec["nc1"], source_accuracy=prec["accuracy"])
            records.append(rec)
            _write_jsonl(os.path.join(workdir, "records.jsonl"), records)
  return records


def _write_jsonl(path: str, records: list[dict]) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def run_pretrain_only(config, workdir: str) -> list[dict]:
  """Pre-trains every model of the config on the source data; the records carry the source
  accuracy and the layer-wise NC1 on the source training data (Fig. 2, Table 1)."""
  mesh = train.data_mesh()
  records = []
  for model_name in split_list(config.models):
    bb = backbone_config(config, model_name)
    _, rec = pretrain(config, model_name, bb, workdir, mesh)
    records.append(rec)
    _write_jsonl(os.path.join(workdir, "records.jsonl"), records)
  return records


def run_layer_probes(config, workdir: str) -> list[dict]:
  """Fig. 9: a linear classifier on every unit's pooled output of the frozen backbone.

  Features are computed once (eval mode, after updating BatchNorm statistics on the
  downstream data); each unit's classifier trains with `ncjax.train`'s train step. One record
  per (model, dataset) with ``layerwise_accuracy`` and ``layerwise_nc1`` ({unit: value});
  ``accuracy`` / ``nc1`` are the penultimate feature's."""
  import flax.linen as nn
  mesh = train.data_mesh()
  os.makedirs(workdir, exist_ok=True)
  seed, optim = int(config.seed), config.optim
  records = []
  for model_name in split_list(config.models):
    bb = backbone_config(config, model_name)
    pretrained = None
    if uses_pretraining(config, bb):
      pretrained, _ = pretrain(config, model_name, bb, workdir, mesh)
    image_size = int(bb["image_size"]) or None
    for ds_name, train_ds, test_ds in downstream_splits(config, bb):
      train_ds = materialize(config, train_ds)
      model = build_model(config, model_name, train_ds.num_classes, bb["options"])
      in_shape = input_shape(bb, train_ds)
      variables, origin = load_backbone(config, model_name, bb, init_variables(model, in_shape, seed),
                                        pretrained)
      mean, std = normalization(bb["normalization"], train_ds, in_shape[-1])
      prepare = make_prepare(mean, std, image_size, 1, in_shape[-1])
      batch = effective_batch(int(optim.batch_size), len(train_ds), mesh)
      eval_batch = effective_batch(int(config.eval_batch_size), 1 << 30, mesh)
      stats = recalibrate_batch_stats(train.model_forward(model), variables["params"],
                                      variables["batch_stats"], prepare, train_ds.images, batch,
                                      mesh, seed, steps=50)
      variables = {"params": variables["params"], "batch_stats": stats}
      f_train = extract(model, variables, prepare, train_ds.images, eval_batch, mesh)
      f_test = extract(model, variables, prepare, test_ds.images, eval_batch, mesh)
      k = train_ds.num_classes
      accs, nc1s = {}, {}
      for unit in list(models.units(model)) + ["penultimate"]:
        probe = nn.Dense(k)
        forward = lambda p, s, f, t, probe=probe: (probe.apply({"params": p}, f), s)
        params = probe.init(jax.random.PRNGKey(seed), f_train[unit][:1])["params"]
        mask = jax.tree.map(lambda _: True, params)
        steps = total_steps(optim, len(train_ds), batch)
        tx = train.make_optimizer(train.OptimConfig.from_config(optim), steps, mask)
        state, _ = train.fit(train.init_state(params, {}, tx),
                             train.make_train_step(forward, tx, mask), f_train[unit],
                             train_ds.labels, batch_size=batch, total_steps=steps, seed=seed,
                             mesh=mesh, desc=f"probe-{unit}")
        accs[unit] = train.accuracy(forward, state.params, {}, None, f_test[unit],
                                    test_ds.labels, eval_batch, mesh)
        nc1s[unit] = float(metrics.nc1(f_train[unit], train_ds.labels, k))
      pen_acc, pen_nc1 = accs.pop("penultimate"), nc1s.pop("penultimate")
      records.append({
          "model": model_name, "dataset": ds_name, "method": "linear", "unit": "",
          "accuracy": pen_acc, "nc1": pen_nc1,
          "cdnv": float(metrics.cdnv(f_train["penultimate"], train_ds.labels, k)),
          "numerical_rank": float(metrics.numerical_rank(f_train["penultimate"],
                                                         train_ds.labels, k)),
          "percent_params": 100.0 * (f_train["penultimate"].shape[1] + 1) * k
          / (models.count_params(variables["params"])),
          "layerwise_nc1": nc1s, "layerwise_accuracy": accs, "num_train": len(train_ds),
          "num_classes": k,
          "weights": origin, "seed": seed})
      _write_jsonl(os.path.join(workdir, "records.jsonl"), records)
  return records
