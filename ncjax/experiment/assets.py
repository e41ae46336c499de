"""The assets a grid reads: every dataset split and weights file, listed (`assets`) and opened
(`check_assets`) before any work, each problem under the config field that set it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import data, models, telemetry, weights
from ncjax.errors import ConfigError
from ncjax.experiment import assemble, spec as spec_lib
from ncjax.experiment.spec import Backbone, Spec


def assets(specs: list[Spec]) -> Iterator[tuple[str, str, tuple]]:
  """``(field, what, key)`` for every dataset split and weights file the grid reads, once:
  ``key`` is ``('data', source, split, image_size, data_dir)`` or
  ``('weights', path, model, spec, backbone)``."""
  seen = set()
  for spec in specs:
    for bb in spec.backbones:
      wanted = []
      if spec.job == "pretrain" or spec.uses_pretraining(bb):
        wanted += [("pretrain.dataset", spec.pretrain.dataset, s) for s in ("train", "test")]
      if spec.job != "pretrain":
        splits = (spec.fewshot.split,) if spec.job == "fewshot" else ("train", spec.test_split)
        wanted += [("datasets" if bb.datasets == spec.datasets else
                    f"backbone.{bb.model}.datasets", d, s)
                   for d in bb.datasets for s in splits]
      for field, name, split in wanted:
        key = ("data", spec.source(name), split, bb.image_size or None, spec.data_dir)
        if key not in seen:
          seen.add(key)
          yield field, f"{name}:{split}", key
      if bb.weights_path and ("weights", bb.weights_path, bb.model) not in seen:
        seen.add(("weights", bb.weights_path, bb.model))
        yield (bb.origin.get("weights", f"backbone.{bb.model}.weights"), bb.weights,
               ("weights", bb.weights_path, bb.model, spec, bb))


def check_assets(specs: list[Spec], progress=print) -> None:
  """Opens every dataset split (lazily: labels only) and weights file the grid needs, and
  loads each weights file against its architecture's shapes (for the input the backbone will
  see: its `image_size` / `channels`, else its data's). Raises `ConfigError` listing every
  missing or unfit asset, each under the field the user set (`_set_by`)."""
  p = spec_lib.Problems()
  todo, failed, shapes, counts = list(assets(specs)), set(), {}, {}
  # TFDS label passes over large splits take a while.
  for field, what, key in telemetry.progress(todo, total=len(todo), desc="checking assets"):
    progress(f"checking {what}")
    if key[:2] in failed:
      continue  # one line per missing dataset, not one per split
    try:
      if key[0] == "data":
        _, source, split, size, data_dir = key
        ds = data.load(source, split, data_dir=data_dir, decode_size=size)
        shapes[key] = ds.images.shape[1:]
        counts[key] = (np.bincount(ds.labels, minlength=ds.num_classes), ds.class_names)
      else:
        _, path, model, spec, bb = key
        # This backbone's data splits came first in `assets`: one check per input shape.
        data_keys = [("data", spec.source(d), "train", bb.image_size or None, spec.data_dir)
                     for d in (bb.datasets if spec.job != "pretrain" else
                               (spec.pretrain.dataset,))]
        for data_shape in dict.fromkeys(shapes[k] for k in data_keys if k in shapes) or (None,):
          weights.load(path, model, abstract_variables(spec, bb, 2, data_shape))
        _check_normalization(p, path, bb)
    except (OSError, ValueError, ImportError, KeyError) as e:
      failed.add(key[:2])
      why, value = " ".join(str(e).split()), key[1] if key[0] == "data" else what
      # `data.load`'s hint names its argument; a config sets it as the backbone's image_size.
      why = why.replace("pass decode_size=... (the model's input size)",
                        "set --config.backbone.default.image_size=<the model's input side> "
                        "(or backbone.<model>.image_size)")
      set_by = _set_by(specs, value)
      if set_by:  # a data source is shown with its field; the split goes with the reason
        p.add(set_by, value, f"{what}: {why}" if key[0] == "data" else why)
      else:
        p.add(field, what, why)
  for spec in specs:
    _class_problems(p, spec, counts)
  if p.lines:
    raise ConfigError("missing or unusable assets:\n  " + "\n  ".join(p.lines))


def _class_problems(p: spec_lib.Problems, spec: Spec, counts: dict) -> None:
  """What only the labels reveal, before any work: class ids past a dataset's classes, fewer
  than 2 classes, a class without images in a split it is trained or evaluated on (an empty
  or missing class directory), few-shot ways and shots the split cannot fill. `counts`:
  data key -> (images per class, class names) of every split `check_assets` opened."""
  for bb in spec.backbones:
    uses = []  # (field of the classes, their ids or None, dataset, splits)
    if spec.job == "pretrain" or spec.uses_pretraining(bb):
      uses.append(("pretrain.classes", spec.pretrain.classes, spec.pretrain.dataset,
                   ("train", "test")))
    if spec.job == "fewshot":
      uses += [("downstream_classes", spec.downstream_classes, d, ()) for d in bb.datasets]
    elif spec.job != "pretrain":
      uses += [("downstream_classes", spec.downstream_classes, d, ("train", spec.test_split))
               for d in bb.datasets]
    for field, classes, name, splits in uses:
      key = lambda split: ("data", spec.source(name), split, bb.image_size or None,
                           spec.data_dir)
      for split in splits or (spec.fewshot.split,):
        if key(split) not in counts:
          continue  # not readable: reported already
        n, class_names = counts[key(split)]
        what = f"{name}:{split}"
        out = [c for c in classes or () if c >= len(n)]
        if out:  # one line per dataset: its splits share the classes
          p.add(field, classes, f"class {out[0]} is out of range: {what} has {len(n)} "
                f"class(es) (ids 0-{len(n) - 1})")
          break
        ids = list(classes) if classes else list(range(len(n)))
        if classes is None and len(n) < 2:
          p.add("pretrain.dataset" if field == "pretrain.classes" else "datasets", name,
                f"{what} has {len(n)} class ({', '.join(map(str, class_names))}); a "
                "classifier needs at least 2 (an image folder: one directory per class)")
          break
        sizes = (() if split != "train" else spec.train_sizes if field == "downstream_classes"
                 else (spec.pretrain.train_size,) if spec.pretrain.train_size else ())
        size_field = "train_sizes" if field == "downstream_classes" else "pretrain.train_size"
        for size in sizes:  # what `assemble.balanced` would meet after pre-training
          try:
            need = data.balanced_need(len(ids), size, spec.seed)
          except ValueError as e:
            p.add(size_field, size, f"{e} ({what})")
            continue
          # As `data.balanced_subset` says it, classes numbered as selected.
          short = [(j, c, int(n[c]), int(k)) for j, (c, k) in enumerate(zip(ids, need))
                   if n[c] < k]
          if short:
            j, c, have, want = short[0]
            name = f" ({class_names[c]!r})" if c < len(class_names) else ""
            p.add(size_field, size, f"class {j}{name} has {have} examples in {what}, fewer "
                  f"than the {want} a balanced subset of {size} needs"
                  + (f" ({len(short)} classes are short)" if len(short) > 1 else ""))
        if splits:
          empty = [c for c in ids if n[c] == 0]
          if empty:
            shown = ", ".join(f"{c} ({class_names[c]!r})" if c < len(class_names) else str(c)
                              for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
            p.add(field if classes else "datasets" if field != "pretrain.classes" else
                  "pretrain.dataset", ",".join(map(str, classes)) if classes else name,
                  f"{what}: {len(empty)} class(es) without images: {shown} (every split "
                  "needs images of every class: add them, or remove the class everywhere)")
        else:  # few-shot episodes draw `ways` classes with shots + queries images each
          f = spec.fewshot
          need = max(f.shots) + f.queries
          full = sum(1 for c in ids if n[c] >= need)
          if f.ways > full:
            among = " among --config.downstream_classes" if classes else ""
            p.add("fewshot.ways", f.ways, f"{what} has {full} class(es){among} with at least "
                  f"shots + queries = {max(f.shots)} + {f.queries} images; lower "
                  "--config.fewshot.ways" + (" or the shots / queries" if full < len(ids)
                                             else ""))


# Top-level config fields `build` reads. Any other top-level field can only matter by reference
def _check_normalization(p: spec_lib.Problems, path: str, bb) -> None:
  """``normalization=checkpoint`` needs the weights' preprocessing config; weights that have
  one and a run that normalises otherwise get a warning line naming both (a timm / Hugging
  Face ViT trained on [-1, 1] inputs fed ImageNet statistics loses accuracy silently)."""
  pre = weights.preprocessing(path)
  field = bb.origin.get("normalization", f"backbone.{bb.model}.normalization")
  if bb.normalization == "checkpoint":
    if pre is None or pre.get("mean") is None or pre.get("std") is None:
      p.add(field, "checkpoint", f"{path} has no preprocessing config giving a mean and std "
            "(a Hugging Face preprocessor_config.json, or timm's pretrained_cfg): choose one of "
            "imagenet, inception, dataset")
    return
  if pre is None or pre.get("mean") is None or pre.get("std") is None:
    return
  if bb.normalization != "dataset":  # the training split's statistics are never a model's
    # The statistics the run will use, for the checkpoint's channel count (no data needed).
    mean, std = assemble.normalization(bb.normalization, None, len(pre["mean"]))
    theirs = tuple(pre["mean"]) + tuple(pre["std"])
    if all(abs(a - b) <= 1e-3 for a, b in zip(tuple(mean) + tuple(std), theirs)):
      return
  telemetry.warn(
      f"{path} was trained with mean {_fmt(pre['mean'])} and std {_fmt(pre['std'])} "
      f"({pre['source']}); {field}={bb.normalization} normalises otherwise: "
      f"--config.{field}=checkpoint uses the checkpoint's")


def _fmt(values) -> str:
  return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# (an ml_collections FieldReference, as configs/custom.py's `data`, `weights` and `model`).
_READ_FIELDS = frozenset(f.name for f in dataclasses.fields(Spec)) | {"models", "backbone",
                                                                        "variants"}


def _set_by(specs: list[Spec], value: str) -> str | None:
  """The field to name for an asset problem, when not the field that read it: a top-level
  field `build` never reads whose value is the asset's, so that it feeds that field by
  reference (``--config.weights`` rather than ``backbone.default.weights``); else None."""
  for spec in specs:
    for name, v in spec.resolved.items():
      if name not in _READ_FIELDS and isinstance(v, str) and v and v == value:
        return name
  return None


def abstract_variables(spec: Spec, bb: Backbone, num_classes: int,
                       data_shape: tuple[int, int, int] | None = None) -> dict:
  """Shapes and dtypes of `bb`'s variables (no computation) for the input the model will
  see: (image_size, image_size) and `channels` where the backbone sets them, else the data's
  own `data_shape` (H, W, C) (32 x 32 x 3 when unknown)."""
  model = models.get(bb.model, num_classes, **bb.options)
  h, w, c = data_shape or (32, 32, 3)
  hw = (bb.image_size, bb.image_size) if bb.image_size else (h, w)
  x = jax.ShapeDtypeStruct((1, *hw, bb.channels or c), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                           train=False))
