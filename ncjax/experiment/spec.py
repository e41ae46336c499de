"""The experiment spec: the only reader of a config.

`build(config)` turns an ``ml_collections.ConfigDict`` (see ``configs/default.py`` for every
field) into one typed, validated `Spec` per variant, checking everything at once before any
work: a value out of range, a bool typo, an unknown method, model, unit or dataset, a
reversed class range, a bad or duplicate variant tag all end up in one `ConfigError` whose
lines read ``--config.<field>=<value>: <why>``. `ncjax.experiment.assets` then opens every
dataset split and weights file the grid needs (shapes of weights against their architecture
included). Job ``metrics`` has its own small reader, `build_metrics`.

Each spec enumerates its runs (`Spec.runs`): the pre-training of a backbone, the fine-tuning
cells ``models x datasets x train sizes x methods x units``, or a layer-probe pass, each with
a path-safe id and a `fingerprint` of the config values that define it, which guards
resuming in a used workdir.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from ncjax import data, lora, methods, models, train
from ncjax.errors import ConfigError
from ncjax.experiment.fields import did_you_mean, field_names, suggest_fields
from ncjax.transferability import ESTIMATORS

JOBS = ("transfer", "pretrain", "layer_probe", "fewshot", "metrics", "rank")
TRAINS_CELLS = ("transfer", "rank")  # jobs that fine-tune the grid's cells
SOLVERS = ("jax", "sklearn")
SCHEDULES = ("cosine", "step")
COMPUTE_DTYPES = ("float32", "bfloat16")
LOSSES = ("ce", "mse", "supcon")
# Or a dataset name `data.stats_for` knows. 'checkpoint': the mean / std the weights file's own
# preprocessing config gives (`weights.preprocessing`: Hugging Face, timm hub files).
NORMALIZATIONS = ("dataset", "imagenet", "inception", "checkpoint")
AUTO_UNIT = "auto"  # a unit entry: choose the unit by NC (`ncjax.autounit`)
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


# ----------------------------------------------------------------------------- the typed spec

@dataclasses.dataclass(frozen=True)
class Optim:
  """An optimisation recipe: `train.OptimConfig`'s fields plus the schedule's length, batch
  and augmentation."""
  lr: float
  lr_end: float
  momentum: float
  weight_decay: float
  warmup_steps: int
  epochs: int       # used when steps == 0
  steps: int        # > 0 overrides epochs
  batch_size: int   # global, examples
  aug_level: int    # 1..5 (REFERENCE §4)
  schedule: str = "cosine"                # cosine (lr -> lr_end) | step (x decay_factor)
  decay_epochs: tuple[int, ...] = ()      # step: after these many epochs, increasing
  decay_factor: float = 0.1               # step: in (0, 1]
  layer_decay: float = 1.0                # unit i of L: lr x layer_decay ** (L - i) (`methods.
                                          # layer_decay_scales`); methods tuning several units

  def optimizer(self, steps_per_epoch: int):
    """`train.OptimConfig` of a run with `steps_per_epoch` optimizer steps per epoch (the
    unit of ``decay_epochs``, also when ``steps`` sets the run's length)."""
    return train.OptimConfig(lr=self.lr, lr_end=self.lr_end, momentum=self.momentum,
                             weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                             schedule=self.schedule, decay_factor=self.decay_factor,
                             decay_steps=tuple(e * steps_per_epoch for e in self.decay_epochs))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One model of the grid, with its ``config.backbone`` settings resolved."""
  model: str
  weights: str                 # a checkpoint path | 'pretrain' | '' (pretrain if enabled)
  units: tuple[str, ...]       # the unit(s) Layer FT / SCL FT tune (several: a sweep;
                               # AUTO_UNIT: the one chosen by NC, after the listed ones)
  image_size: int              # model input side (0: the data's own)
  channels: int                # model input channels (0: the data's own)
  normalization: str
  datasets: tuple[str, ...]    # downstream datasets
  options: dict                # `models.get` options
  origin: dict = dataclasses.field(default_factory=dict, compare=False)  # field -> where set

  @property
  def weights_path(self) -> str | None:
    return None if self.weights in ("", "pretrain") else os.path.expanduser(self.weights)


@dataclasses.dataclass(frozen=True)
class Pretrain:
  enabled: bool
  dataset: str
  classes: tuple[int, ...] | None
  train_size: int              # class-balanced subset of the source training split (0: all)
  loss: str
  projection_layers: int
  projection_width: int
  projection_dim: int
  temperature: float
  adversarial_eps: float       # l_inf radius in [0, 1] pixel units
  adversarial_steps: int
  optim: Optim


@dataclasses.dataclass(frozen=True)
class Fewshot:
  """N-way K-shot episodes with Q queries per class (`ncjax.fewshot.evaluate`)."""
  ways: int
  shots: tuple[int, ...]
  queries: int
  episodes: int
  solver: str
  split: str = "train"   # the downstream split episodes draw from (CIFAR-FS: meta_test)


@dataclasses.dataclass(frozen=True)
class Peft:
  """The settings of the parameter-efficient methods (issue 19; `ncjax.lora`, the ViT's VPT)."""
  lora_ranks: tuple[int, ...] = (8,)  # several: one lora run per rank (ids -r<rank>)
  lora_alpha: float = 8.0             # the update is (alpha / rank) * A @ B, alpha fixed
  lora_targets: tuple[str, ...] = ("attention", "mlp", "conv")  # `ncjax.lora.TARGETS`
  lp_ft_probe_fraction: float = 0.5   # LP-FT: the linear probe's share of the steps, (0, 1)
  vpt_tokens: int = 10
  vpt_deep: bool = True

  def lora_scale(self, rank: int) -> float:
    return self.lora_alpha / rank


MAX_SEED = 2 ** 31 - 1  # seeds (`seed`, each of `seeds`) are integers in [0, MAX_SEED]
UNIT_SELECTORS = ("nc", "rgn", "both")  # unit=auto: NC probes, Auto-RGN, or both side by side


@dataclasses.dataclass(frozen=True)
class Run:
  """One unit of work with its own checkpoints and record.

  kind: 'pretrain' | 'finetune' | 'probe' | 'fewshot' (`size` = shots). `id` is unique in the workdir and path-safe
  (``[<tag>/]<model>-<dataset>-<method>[-<unit>][-n<size>]``)."""
  kind: str
  id: str
  backbone: Backbone
  dataset: str = ""
  size: int = 0                # class-balanced training subset size (0: the whole split)
  method: str = ""
  unit: str | None = None
  fingerprint: tuple = ()      # ((dotted field, value), ...) that define the run
  selector: str = ""           # unit AUTO_UNIT: 'nc' or 'rgn' (`UNIT_SELECTORS`)
  lora_rank: int = 0           # method lora: its rank (one of ``peft.lora_ranks``)


@dataclasses.dataclass(frozen=True)
class Spec:
  """The whole job of one variant, validated."""
  job: str
  tag: str                     # its directory: the variant tag, '-s<seed>' added in a seed
                               # sweep ('' without either)
  variant: str                 # the variant tag alone ('' without variants): records' `pretrain`
  seed: int
  backbones: tuple[Backbone, ...]
  datasets: tuple[str, ...]    # the downstream datasets of backbones without their own
  downstream_classes: tuple[int, ...] | None
  methods: tuple[str, ...]
  train_sizes: tuple[int, ...]   # () = the whole training split
  test_split: str
  data_dir: str | None
  dataset_sources: dict        # dataset name -> `data.load` source
  pretrain: Pretrain
  optim: Optim
  eval_batch_size: int
  cache_linear_features: bool
  dtype: str
  data_budget_mb: float
  compile_cache_dir: str
  collapse: bool
  checkpoint_every: int
  plots: bool
  fewshot: Fewshot
  unit_budget: float           # AUTO_UNIT: largest unit, a fraction of the backbone's parameters
  unit_probe_fraction: float   # AUTO_UNIT: each probe's steps, a fraction of the cell's steps
  rank_estimators: tuple[str, ...]  # job 'rank': `ncjax.transferability.ESTIMATORS` to compute
  resolved: dict               # the resolved config as plain data (config.json)
  strict: bool = False         # a run that cannot learn (`runner.schedule_warnings`) is
                               # an error, not a warning
  peft: Peft = Peft()          # lora.*, lp_ft.*, vpt.*
  unit_selector: str = "nc"    # AUTO_UNIT: `UNIT_SELECTORS`

  def source(self, dataset: str) -> str:
    return self.dataset_sources.get(dataset) or dataset

  def uses_pretraining(self, bb: Backbone) -> bool:
    return _starts_from_pretraining(self.pretrain.enabled, bb)

  def runs(self) -> list[Run]:
    """Every run of the job, in execution order."""
    out = []
    prefix = f"{self.tag}/" if self.tag else ""
    for bb in self.backbones:
      if self.job == "pretrain" or self.uses_pretraining(bb):
        out.append(Run("pretrain", f"{prefix}pretrain-{bb.model}-{self.pretrain.dataset}", bb,
                       self.pretrain.dataset, fingerprint=self._fingerprint(bb, "pretrain")))
      if self.job == "fewshot":
        for ds in bb.datasets:
          for shots in self.fewshot.shots:
            out.append(Run("fewshot", f"{prefix}{bb.model}-{ds}-{self.fewshot.ways}way{shots}shot",
                           bb, ds, shots, fingerprint=self._fingerprint(bb, "fewshot", dataset=ds,
                                                                        shots=shots)))
      if self.job == "layer_probe":
        for ds in bb.datasets:
          out.append(Run("probe", f"{prefix}{bb.model}-{ds}-probes", bb, ds,
                         fingerprint=self._fingerprint(bb, "probe", dataset=ds)))
      if self.job == "rank":  # the estimators' scores of this candidate, per dataset
        for ds in bb.datasets:
          out.append(Run("score", f"{prefix}{bb.model}-{ds}-scores", bb, ds,
                         fingerprint=self._fingerprint(bb, "score", dataset=ds)))
      if self.job not in TRAINS_CELLS:
        continue
      for ds in bb.datasets:
        for size in self.train_sizes or (0,):
          for method in self.methods:
            # The NC choice runs after the sweep, so it can reuse the chosen unit's run.
            units = sorted(bb.units, key=lambda u: u == AUTO_UNIT)
            for unit in units if methods.needs_unit(method) else (None,):
              # unit_selector 'both': one auto run per selector, NC's keeping the plain id.
              for sel in self._selectors() if unit == AUTO_UNIT else ("",):
                for rank in self.peft.lora_ranks if method == "lora" else (0,):
                  shown = f"{unit}-{sel}" if sel not in ("", "nc") else unit
                  r_id = f"r{rank}" if rank and len(self.peft.lora_ranks) > 1 else ""
                  name = "-".join(p for p in (bb.model, ds, method, r_id, shown,
                                              f"n{size}" if size else "") if p)
                  out.append(Run("finetune", prefix + name, bb, ds, size, method, unit,
                                 self._fingerprint(bb, "finetune", dataset=ds, size=size,
                                                   method=method, unit=unit, selector=sel,
                                                   rank=rank),
                                 selector=sel, lora_rank=rank))
    return out

  def _selectors(self) -> tuple[str, ...]:
    return ("nc", "rgn") if self.unit_selector == "both" else (self.unit_selector,)

  def _fingerprint(self, bb: Backbone, kind: str, **cell) -> tuple:
    """The config values a run's checkpoints and record depend on, as dotted fields."""
    fields = {"seed": self.seed, "dtype": self.dtype, "model": bb.model,
              **{f"backbone.{bb.model}.{k}": v for k, v in _flat(dataclasses.asdict(bb)).items()
                 if k not in ("model", "units", "datasets") and not k.startswith("origin.")}}
    if kind == "pretrain" or self.uses_pretraining(bb):
      fields.update({f"pretrain.{k}": v for k, v in _flat(dataclasses.asdict(self.pretrain)).items()
                     if k != "enabled"})
    if kind != "pretrain":
      fields.update({"dataset": cell["dataset"],
                     f"dataset_sources.{cell['dataset']}": self.source(cell["dataset"]),
                     "downstream_classes": self.downstream_classes, "test_split": self.test_split,
                     "collapse": self.collapse})
    if kind in ("finetune", "probe"):  # few-shot trains nothing after pre-training
      fields.update({f"optim.{k}": v for k, v in dataclasses.asdict(self.optim).items()})
    if kind == "score":
      fields["rank.estimators"] = self.rank_estimators
    if kind == "fewshot":
      fields.update({f"fewshot.{k}": v for k, v in dataclasses.asdict(self.fewshot).items()
                     if k != "shots"}, shots=cell["shots"])
    if kind == "finetune":
      fields.update(train_size=cell["size"], method=cell["method"], unit=cell["unit"])
      if cell["unit"] == AUTO_UNIT:
        fields.update(unit_budget=self.unit_budget, unit_probe_fraction=self.unit_probe_fraction)
        if cell.get("selector", "nc") != "nc":  # NC's runs keep their fingerprints
          fields["unit_selector"] = cell["selector"]
      pf = self.peft
      fields.update({"lora": {"lora.rank": cell.get("rank"), "lora.alpha": pf.lora_alpha,
                              "lora.targets": pf.lora_targets},
                     "lp_ft": {"lp_ft.probe_fraction": pf.lp_ft_probe_fraction},
                     "vpt": {"vpt.tokens": pf.vpt_tokens, "vpt.deep": pf.vpt_deep},
                     }.get(cell["method"], {}))
      if cell["method"] == "linear":
        fields["cache_linear_features"] = self.cache_linear_features
    return tuple(sorted((k, _plain(v)) for k, v in fields.items() if not _unset(k, v, fields)))


# Fields added after workdirs existed: at these values they are left out of fingerprints, so
# the runs made before them stay resumable. The step decays count only with schedule 'step'.
_ADDED_DEFAULTS = {"optim.schedule": "cosine", "fewshot.split": "train", "pretrain.train_size": 0,
                   "optim.layer_decay": 1.0}
_STEP_ONLY = ("optim.decay_epochs", "optim.decay_factor")


def _unset(key: str, value, fields: dict) -> bool:
  """Whether fingerprint field `key` (``[pretrain.]optim.*`` included) is left out."""
  prefix, base = ("pretrain.", key[9:]) if key.startswith("pretrain.optim.") else ("", key)
  if base in _STEP_ONLY:
    return fields.get(prefix + "optim.schedule", "cosine") == "cosine"
  return base in _ADDED_DEFAULTS and value == _ADDED_DEFAULTS[base]


def _starts_from_pretraining(enabled: bool, bb: Backbone) -> bool:
  """Whether `bb` starts from the source pre-training (enabled, and no weights file)."""
  return enabled and bb.weights in ("", "pretrain")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "options":
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, dict):
      out.update({f"{prefix}{k}.{o}": w for o, w in sorted(v.items())} or {f"{prefix}{k}": {}})
    else:
      out[prefix + k] = v
  return out


def _plain(v):
  """JSON-like plain data (tuples as lists) so fingerprints compare equal after a round trip."""
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  return v


def fingerprint_diff(stored: dict, now: dict) -> list[str]:
  """``['optim.steps: 30 in the workdir, 15 now', ...]`` for every field that differs."""
  out = []
  for k in sorted(set(stored) | set(now)):
    a, b = stored.get(k, "<unset>"), now.get(k, "<unset>")
    if a != b:
      out.append(f"{k}: {a!r} in the workdir, {b!r} now")
  return out


# ----------------------------------------------------------------------------- reading a config

class Problems:
  """Collects every problem as ``--config.<field>=<value>: <why>``, once each."""

  def __init__(self):
    self.lines: list[str] = []

  def add(self, field: str, value, why: str) -> None:
    shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    line = f"--config.{field}={shown}: {why}"
    if line not in self.lines:
      self.lines.append(line)


def names(value) -> tuple[str, ...]:
  """A list of names from a config field: a tuple/list of strings, where the command line's
  ``--config.methods=linear,full`` arrives as one comma-joined element; a plain string is
  read the same way."""
  if isinstance(value, str):
    value = (value,)
  out = []
  for v in value:
    if not isinstance(v, str):
      raise TypeError(f"{v!r} is not a name")
    out.extend(p.strip() for p in v.split(",") if p.strip())
  return tuple(out)


def parse_classes(value) -> tuple[int, ...] | None:
  """``'5-9'`` -> (5, 6, 7, 8, 9); ``'0,2,4'`` / (0, 2, 4) -> (0, 2, 4); '' -> None (all).

  Raises ValueError for a reversed range (``'9-5'``), a negative id or a non-integer."""
  if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in value):
    parts = [str(v) for v in value]
  else:
    parts = list(names(value))
  out = []
  for part in parts:
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
  if len(set(out)) != len(out):
    raise ValueError("a class is listed twice")
  return tuple(out) or None


def _two_or_more(classes: tuple[int, ...] | None) -> tuple[int, ...] | None:
  """`classes` (None: all), refused when it names one class: a 1-way classifier learns
  nothing and its collapse metrics are undefined."""
  if classes is not None and len(classes) < 2:
    raise ValueError("needs at least 2 classes (a range lo-hi, or ids a,b,...)")
  return classes


def _int(p: Problems, field: str, value, lo: int, hi: int | None = None) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
      hi is not None and value > hi):
    p.add(field, value, f"must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None
                                                          else ""))
    return lo
  return value


def _float(p: Problems, field: str, value, *, positive=False, lo=None, hi=None,
           finite=True) -> float:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
  if ok and finite and not math.isfinite(value):  # an infinite rate diverges at step 1
    p.add(field, value, "must be a finite number")
    return 0.0
  if ok and ((positive and not value > 0) or (lo is not None and value < lo)
             or (hi is not None and value > hi)):
    low = "(0" if positive else f"[{lo:g}" if lo is not None else "(-inf"
    p.add(field, value, "must be > 0" if positive and hi is None else
          f"must be >= {lo:g}" if hi is None else f"must be in {low}, {hi:g}]")
  elif not ok:
    p.add(field, value, "must be a number")
    return 0.0
  return float(value)


def _bool(p: Problems, field: str, value) -> bool:
  if not isinstance(value, bool):
    p.add(field, value, "must be True or False")
    return False
  return value


def _str(p: Problems, field: str, value, choices=None) -> str:
  if not isinstance(value, str):
    p.add(field, value, "must be a string")
    return ""
  if choices is not None and value not in choices:
    p.add(field, value, f"must be one of {', '.join(choices)}")
  return value


def _names(p: Problems, field: str, value, choices=None, what="name") -> tuple[str, ...]:
  try:
    out = names(value)
  except TypeError:
    p.add(field, value, "must be a comma list of names")
    return ()
  for n in out:
    if choices is not None and n not in choices:
      p.add(field, value, f"unknown {what} {n!r}{did_you_mean(n, choices)} "
            f"(valid: {', '.join(choices)})")
  if len(set(out)) != len(out):
    p.add(field, value, f"a {what} is listed twice")
  return out


def _optim(p: Problems, prefix: str, o, own=None) -> Optim:
  # An inherited value is reported once, under the field that set it.
  field = lambda f: f"{prefix if own is None or f in own else 'optim'}.{f}"
  steps = _int(p, field("steps"), o.steps, 0)
  out = Optim(
      lr=_float(p, field("lr"), o.lr, positive=True),
      lr_end=_float(p, field("lr_end"), o.lr_end, lo=0.0),
      momentum=_float(p, field("momentum"), o.momentum, lo=0.0, hi=1.0),
      weight_decay=_float(p, field("weight_decay"), o.weight_decay, lo=0.0),
      warmup_steps=_int(p, field("warmup_steps"), o.warmup_steps, 0),
      epochs=_int(p, field("epochs"), o.epochs, 0 if steps else 1),
      steps=steps,
      batch_size=_int(p, field("batch_size"), o.batch_size, 1),
      aug_level=_int(p, field("aug_level"), o.aug_level, 1, 5),
      layer_decay=_float(p, field("layer_decay"), o.get("layer_decay", 1.0), positive=True,
                         hi=1.0),
      **_decays(p, field, o, steps))
  if out.lr_end > out.lr > 0 and out.schedule == "cosine":
    p.add(field("lr_end"), o.lr_end, f"must not exceed lr ({out.lr})")
  return out


def _decays(p: Problems, field, o, steps: int) -> dict:
  """``schedule``, ``decay_epochs``, ``decay_factor`` of an optim config (absent: cosine).
  The epochs must increase and, when ``epochs`` sets the length, fall inside the run; with
  ``steps`` the epoch length is known only from the data (`train.lr_schedule` checks)."""
  schedule = _str(p, field("schedule"), o.get("schedule", "cosine"), SCHEDULES)
  epochs = _positive_ints(p, field("decay_epochs"), o.get("decay_epochs", ()),
                          "must be positive integers (epochs)") or ()
  if any(b <= a for a, b in zip(epochs, epochs[1:])):
    p.add(field("decay_epochs"), epochs, "must increase")
  elif schedule == "step" and not steps and epochs and isinstance(o.epochs, int) and \
      epochs[-1] >= o.epochs:
    p.add(field("decay_epochs"), epochs, f"must be < epochs ({o.epochs}): a decay at the "
          "end of the run changes nothing")
  factor = _float(p, field("decay_factor"), o.get("decay_factor", 0.1), positive=True)
  if factor > 1:
    p.add(field("decay_factor"), factor, "must be in (0, 1]")
  return dict(schedule=schedule, decay_epochs=epochs, decay_factor=factor)


def _backbone(p: Problems, config, model: str, default_datasets) -> Backbone:
  bb = config.backbone
  fields = dict(bb.default) if "default" in bb else {}
  where = {k: "default" for k in fields}
  if model in bb:
    fields.update(dict(bb[model]))
    where.update({k: model for k in bb[model]})
  known = [f.name for f in dataclasses.fields(Backbone)]
  known[known.index("units")] = "unit"
  for k in fields:
    if k not in known:
      p.add(f"backbone.{where[k]}.{k}", fields[k],
            f"no such backbone field{did_you_mean(k, known)}")
  name = lambda k: f"backbone.{where.get(k, model)}.{k}"
  get = lambda k, d: fields.get(k, d)
  options = dict(get("options", {}) or {})
  bad_sizes = _size_options(p, name("options"), options)
  try:
    if bad_sizes:  # the model cannot be built with them: its units are unknown
      raise _Reported
    model_units = models.units(model, **{k: v for k, v in options.items()
                                         if k in ("depth", "widths")})
  except (TypeError, ValueError) as e:
    p.add(name("options"), options, str(e))
    model_units = ()
  except _Reported:
    model_units = ()
  try:
    if not bad_sizes:
      models.get(model, 2, **options)
  except (TypeError, ValueError) as e:
    p.add(name("options"), options, str(e))
  units = _names(p, name("unit"), get("unit", ()),
                 model_units + (AUTO_UNIT,) if model_units else None, f"unit of {model}")
  datasets = (_names(p, name("datasets"), get("datasets", ()), what="dataset")
              or default_datasets)
  norm = _str(p, name("normalization"), get("normalization", "dataset"))
  if norm and norm not in NORMALIZATIONS:
    try:
      data.stats_for(norm)
    except (KeyError, ValueError):
      p.add(name("normalization"), norm,
            f"must be one of {', '.join(NORMALIZATIONS)} or a dataset with stored statistics")
  return Backbone(
      model=model, weights=_str(p, name("weights"), get("weights", "")), units=units,
      image_size=_int(p, name("image_size"), get("image_size", 0), 0, 4096),
      channels=_int(p, name("channels"), get("channels", 0), 0, 4),
      normalization=norm, datasets=datasets, options=options,
      origin={k: f"backbone.{v}.{k}" for k, v in where.items()})


class _Reported(Exception):
  """A problem already added to `Problems`."""


# Model options that are sizes (layers, units, a reduction ratio): a zero or negative one
# builds no layer or fails deep inside flax with a broadcasting TypeError.
_SIZE_OPTIONS = ("depth", "width", "widths", "se_reduction", "representation_size")


def _size_options(p: Problems, field: str, options: dict) -> bool:
  """Adds a problem for every size option of `options` that is not a positive integer
  (``widths``: a list of them); returns whether there was one."""
  bad = False
  for k in _SIZE_OPTIONS:
    v = options.get(k)
    if v is None:
      continue
    values = v if k == "widths" and isinstance(v, (tuple, list)) else (v,)
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                             for x in values):
      p.add(f"{field}.{k}", v, "must be " + ("positive integers" if k == "widths" else
                                             "an integer >= 1"))
      bad = True
  return bad


def _resolved(config) -> dict:
  return _plain(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def with_overrides(config, overrides: dict, p: Problems):
  """A copy of `config` with the dotted `overrides` set. A value must have its field's type
  (an int may set a float field): a bool typo is an error, not False."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, last = key.split(".")
    holder = c
    try:
      for part in path:
        holder = holder[part]
      old = holder[last]
    except (KeyError, AttributeError, TypeError):
      close = suggest_fields(key, field_names(config))
      p.add(key, value, "no such config field" + (f", did you mean {close[0]!r}?" if close else ""))
      continue
    ok = (isinstance(value, bool) if isinstance(old, bool)
          else isinstance(value, int) and not isinstance(value, bool) if isinstance(old, int)
          else isinstance(value, (int, float)) and not isinstance(value, bool)
          if isinstance(old, float)
          else isinstance(value, (str, tuple, list)) if isinstance(old, tuple)
          else isinstance(value, type(old)))
    if not ok:
      p.add(key, value, f"must be a {type(old).__name__} like the field it overrides "
            f"({type(value).__name__} given)")
      continue
    holder[last] = (float(value) if isinstance(old, float) else
                    tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value)
  return c


def _variants(p: Problems, value) -> list[tuple[str, dict]]:
  """``config.variants``: a sequence of ``{'tag': str, 'overrides': {dotted field: value}}``."""
  out, seen = [], set()
  if not isinstance(value, (tuple, list)):
    p.add("variants", value, "must be a list of dict(tag=..., overrides={...})")
    return out
  for i, v in enumerate(value):
    if not isinstance(v, dict) or set(v) != {"tag", "overrides"} or not isinstance(
        v.get("overrides"), dict):
      p.add(f"variants[{i}]", v, "must be dict(tag=<str>, overrides={<dotted field>: value})")
      continue
    tag = v["tag"]
    if not isinstance(tag, str) or not _TAG.match(tag) or tag in (".", ".."):
      p.add(f"variants[{i}].tag", tag, "must be a path-safe name (letters, digits, _ . + = -; "
            "not starting with . or -)")
    elif tag in seen:
      p.add(f"variants[{i}].tag", tag, "is used twice (each variant needs its own directory)")
    seen.add(tag)
    out.append((tag, v["overrides"]))
  return out


def _seeds(p: Problems, value) -> tuple[int, ...]:
  """``config.seeds``: () or distinct integers in [0, MAX_SEED], each a whole job."""
  if not isinstance(value, (tuple, list)):
    p.add("seeds", value, "must be a tuple of integers, e.g. (0, 1, 2) (--config.seeds=0,1,2)")
    return ()
  seeds = []
  for i, s in enumerate(value):
    known = len(p.lines)
    _int(p, f"seeds[{i}]", s, 0, MAX_SEED)
    if len(p.lines) > known:
      continue
    if s in seeds:
      p.add(f"seeds[{i}]", s, "is given twice (each seed is one whole job)")
    else:
      seeds.append(s)
  return tuple(seeds)


def _sweep(p: Problems, config) -> list[tuple[str, str, dict]]:
  """(directory tag, variant tag, overrides) of every whole job: each variant (one untagged
  job without variants) crossed with every seed of ``config.seeds``."""
  variants = _variants(p, config.get("variants", ()))
  seeds = _seeds(p, config.get("seeds", ()))
  jobs = [(tag, tag, overrides) for tag, overrides in variants] or [("", "", {})]
  if not seeds:
    return jobs if variants else []
  return [(f"{tag}-s{s}" if tag else f"s{s}", tag, {**overrides, "seed": s})
          for tag, _, overrides in jobs for s in seeds]


def build(config) -> list[Spec]:
  """One validated `Spec` per variant and seed (one without either). Raises `ConfigError`
  listing every problem: those of the base config once, then each variant's own."""
  top = Problems()
  job = _str(top, "job", config.job, JOBS)
  sweep = _sweep(top, config)
  base = Problems()
  specs = [_build_one(base, config, job, "")]
  lines = top.lines + base.lines
  if sweep:
    specs = []
    for tag, variant, overrides in sweep:
      p = Problems()
      specs.append(_build_one(p, with_overrides(config, overrides, p), job, tag, variant))
      lines += [f"variant {tag!r}: {line}" for line in p.lines if line not in base.lines]
  if lines:
    raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
  return specs


def _build_one(p: Problems, c, job: str, tag: str, variant: str = "") -> Spec | None:
  seed = _int(p, "seed", c.seed, 0, MAX_SEED)
  model_names = _names(p, "models", c.models, models.names(), "model")
  if not model_names:
    p.add("models", c.models, "must name at least one model")
  datasets = _names(p, "datasets", c.datasets, what="dataset")
  # An unknown model is reported once, by name (not again by its options).
  backbones = tuple(_backbone(p, c, m, datasets) for m in model_names if m in models.names())
  method_names = tuple(m for m in _names(p, "methods", c.methods, methods.METHODS, "method")
                       if m in methods.METHODS)
  if job in TRAINS_CELLS and not method_names:
    p.add("methods", c.methods, "must name at least one method")
  for bb in backbones:
    if job in TRAINS_CELLS + ("fewshot",) and not bb.datasets:
      p.add("datasets", c.datasets, f"no downstream dataset for {bb.model}")
    if job in TRAINS_CELLS and any(methods.needs_unit(m) for m in method_names) and not bb.units:
      p.add(f"backbone.{bb.model}.unit", "", "Layer FT / SCL FT need a unit")
  try:
    classes = _two_or_more(parse_classes(c.downstream_classes))
  except (ValueError, TypeError) as e:
    p.add("downstream_classes", c.downstream_classes, str(e))
    classes = None
  sizes = _positive_ints(p, "train_sizes", c.train_sizes, "must be positive integers")
  pc = c.pretrain
  po = c.optim.copy_and_resolve_references()
  po.update(dict(pc.optim))
  pretraining = job == "pretrain" or any(_starts_from_pretraining(pc.enabled, b)
                                         for b in backbones)
  optim = _optim(p, "optim", c.optim)
  pre_p = p if pretraining else Problems()  # pre-training fields matter only when used
  try:
    pre_classes = _two_or_more(parse_classes(pc.classes))
  except (ValueError, TypeError) as e:
    pre_p.add("pretrain.classes", pc.classes, str(e))
    pre_classes = None
  pretrain = Pretrain(
      enabled=_bool(p, "pretrain.enabled", pc.enabled),
      dataset=_str(pre_p, "pretrain.dataset", pc.dataset),
      classes=pre_classes, train_size=_int(pre_p, "pretrain.train_size", pc.train_size, 0),
      loss=_str(pre_p, "pretrain.loss", pc.loss, LOSSES),
      projection_layers=_int(pre_p, "pretrain.projection_layers", pc.projection_layers, 0, 8),
      projection_width=_int(pre_p, "pretrain.projection_width", pc.projection_width, 0),
      projection_dim=_int(pre_p, "pretrain.projection_dim", pc.projection_dim, 1),
      temperature=_float(pre_p, "pretrain.temperature", pc.temperature, positive=True),
      adversarial_eps=_float(pre_p, "pretrain.adversarial_eps", pc.adversarial_eps, lo=0.0,
                             hi=1.0),
      adversarial_steps=_int(pre_p, "pretrain.adversarial_steps", pc.adversarial_steps, 1),
      optim=_optim(pre_p, "pretrain.optim", po, own=set(pc.optim)))
  if pretraining and pretrain.loss == "supcon" and pretrain.adversarial_eps > 0:
    p.add("pretrain.adversarial_eps", pc.adversarial_eps,
          "adversarial pre-training is implemented for the ce and mse losses only")
  for bb in backbones:
    if bb.weights == "pretrain" and not pc.enabled and job != "pretrain":
      p.add(f"backbone.{bb.model}.weights", "pretrain", "needs --config.pretrain.enabled=True")
    if bb.normalization == "checkpoint" and bb.weights_path is None:
      p.add(bb.origin.get("normalization", f"backbone.{bb.model}.normalization"), "checkpoint",
            "needs a weights file (backbone.<model>.weights) whose preprocessing config gives "
            "the mean and std")
  sources = c.get("dataset_sources", {}) or {}
  dtype = _str(p, "dtype", c.dtype, COMPUTE_DTYPES)
  budget = _float(p, "data_budget_mb", c.data_budget_mb, lo=0.0, finite=False)
  cache_dir = _str(p, "compile_cache_dir", c.compile_cache_dir)
  if cache_dir:
    why = not_creatable(os.path.expanduser(cache_dir))
    if why:
      p.add("compile_cache_dir", cache_dir, why)
  spec = Spec(
      job=job, tag=tag, variant=variant, seed=seed, backbones=backbones, datasets=datasets,
      downstream_classes=classes,
      methods=method_names, train_sizes=sizes or (),
      test_split=_str(p, "test_split", c.test_split),
      data_dir=_str(p, "data_dir", c.data_dir) or None,
      dataset_sources={k: str(v) for k, v in dict(sources).items()},
      pretrain=pretrain, optim=optim,
      eval_batch_size=_int(p, "eval_batch_size", c.eval_batch_size, 1),
      cache_linear_features=_bool(p, "cache_linear_features", c.cache_linear_features),
      dtype=dtype, data_budget_mb=budget, compile_cache_dir=cache_dir,
      collapse=_bool(p, "collapse", c.collapse),
      checkpoint_every=_int(p, "checkpoint_every", c.checkpoint_every, 0),
      plots=_bool(p, "plots", c.plots), fewshot=_fewshot(p, c.fewshot),
      unit_budget=_float(p, "unit_budget", c.unit_budget, positive=True, hi=1.0),
      unit_probe_fraction=_float(p, "unit_probe_fraction", c.unit_probe_fraction, positive=True,
                                 hi=1.0),
      rank_estimators=_estimators(p, c.rank.estimators),
      resolved=_resolved(c), strict=_bool(p, "strict", c.get("strict", False)),
      peft=_peft(p, c, backbones, method_names),
      unit_selector=_str(p, "unit_selector", c.get("unit_selector", "nc"), UNIT_SELECTORS))
  return None if p.lines else spec


def _peft(p: Problems, c, backbones, method_names) -> Peft:
  """``lora.*``, ``lp_ft.*`` and ``vpt.*`` (absent groups: `Peft`'s defaults), checked only
  where a method of the grid reads them: LoRA targets against every backbone's kernels, VPT
  against its architecture."""
  d = Peft()
  lo, lp, vp = (c.get(g) or {} for g in ("lora", "lp_ft", "vpt"))
  used = lambda m: m in method_names
  q = p if used("lora") else Problems()
  ranks = lo.get("rank", d.lora_ranks)
  ranks = _positive_ints(q, "lora.rank", ranks if isinstance(ranks, (tuple, list, str))
                         else (ranks,), "must be an integer >= 1 or distinct ones (a sweep)",
                         distinct=True, nonempty=True) or d.lora_ranks
  alpha = _float(q, "lora.alpha", lo.get("alpha", d.lora_alpha), positive=True)
  targets = _names(q, "lora.targets", lo.get("targets", d.lora_targets)) or d.lora_targets
  if used("lora"):
    for bb in backbones:
      why = lora.check_targets(targets, models.units(bb.model, **_unit_options(bb)))
      for line in why:
        q.add("lora.targets", targets, line)
      if not why and not _lora_sites(bb, targets):
        q.add("lora.targets", targets, f"selects no kernel of {bb.model}'s units")
  q = p if used("lp_ft") else Problems()
  frac = _float(q, "lp_ft.probe_fraction", lp.get("probe_fraction", d.lp_ft_probe_fraction),
                positive=True, hi=1.0)
  if frac == 1.0:
    q.add("lp_ft.probe_fraction", frac, "must be < 1 (1 leaves no fine-tuning)")
  q = p if used("vpt") else Problems()
  tokens = _int(q, "vpt.tokens", vp.get("tokens", d.vpt_tokens), 1)
  deep = _bool(q, "vpt.deep", vp.get("deep", d.vpt_deep))
  for bb in backbones if used("vpt") else ():
    if not bb.model.startswith("vit"):
      p.add("methods", method_names, f"vpt prompts a ViT; {bb.model} is not one")
  return Peft(lora_ranks=ranks, lora_alpha=alpha, lora_targets=targets,
              lp_ft_probe_fraction=frac, vpt_tokens=tokens, vpt_deep=deep)


def _unit_options(bb: Backbone) -> dict:
  return {k: v for k, v in bb.options.items() if k in ("depth", "widths")}


def _lora_sites(bb: Backbone, targets) -> list:
  """The kernels `targets` select in `bb`'s units, from its abstract parameters."""
  size = bb.image_size or (224 if bb.model.startswith("vit") else 32)
  try:
    params = models.param_shapes(bb.model, 2, image_size=size, channels=bb.channels or 3,
                                 **bb.options)["params"]
  except (TypeError, ValueError):
    return [None]  # the options' own problem, reported under backbone.*.options
  return lora.targeted(params, targets, models.units(bb.model, **_unit_options(bb)))


def _positive_ints(p: Problems, field: str, value, why: str, *, distinct: bool = False,
                   nonempty: bool = False) -> tuple[int, ...] | None:
  """A tuple of positive ints from a tuple field, where the command line's comma list
  (``--config.train_sizes=10,40``) arrives as strings; None after reporting `why`."""
  try:
    out = tuple(int(v) for v in (names(value) if isinstance(value, str) or any(
        isinstance(v, str) for v in value) else value))
    if (any(v < 1 for v in out) or (nonempty and not out)
        or (distinct and len(set(out)) != len(out))):
      raise ValueError
    return out
  except (ValueError, TypeError):
    p.add(field, value, why)
    return None


def _estimators(p: Problems, value) -> tuple[str, ...]:
  out = _names(p, "rank.estimators", value, ESTIMATORS, "estimator")
  if not out:
    p.add("rank.estimators", value, f"must name at least one of {', '.join(ESTIMATORS)}")
  return out


def _fewshot(p: Problems, f) -> Fewshot:
  shots = _positive_ints(p, "fewshot.shots", f.shots, "must be distinct positive integers",
                         distinct=True, nonempty=True) or (1,)
  return Fewshot(ways=_int(p, "fewshot.ways", f.ways, 2),
                 shots=shots, queries=_int(p, "fewshot.queries", f.queries, 1),
                 episodes=_int(p, "fewshot.episodes", f.episodes, 1),
                 solver=_str(p, "fewshot.solver", f.solver, SOLVERS),
                 split=_str(p, "fewshot.split", f.get("split", "train")) or "train")


def not_creatable(path: str) -> str | None:
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


# ----------------------------------------------------------------------------- job metrics

@dataclasses.dataclass(frozen=True)
class DigitsMetrics:
  """Job ``metrics``: the NC metrics of scikit-learn's digits, raw and through a fixed random
  ReLU map of `random_features` units drawn with `seed`."""
  split: str            # train | test | all
  random_features: int
  seed: int


def build_metrics(config) -> DigitsMetrics:
  """The typed job ``metrics`` of `config` (`ConfigError` listing every problem)."""
  p = Problems()
  out = DigitsMetrics(
      split=_str(p, "split", config.get("split", "train"), ("train", "test", "all")),
      random_features=_int(p, "random_features", config.get("random_features", 2048), 1),
      seed=_int(p, "seed", config.seed, 0, MAX_SEED))
  if p.lines:
    raise ConfigError("invalid config:\n  " + "\n  ".join(p.lines))
  return out
