"""Names, number formats, Markdown and the grouping of records every table and plot shares.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ncjax.methods import METHODS
from ncjax.report.schema import is_number, stage, validate


METHOD_ORDER = METHODS

METHOD_NAMES = {
    "linear": "Linear Probe",
    "layer": "Layer FT",
    "scl": "SCL FT",
    "full": "Full Model FT",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "lp_ft": "LP-FT",
    "vpt": "VPT",
}

MODEL_NAMES = {
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "resnet50": "ResNet50",
    "resnet12": "ResNet12",
    "vit_b32": "ViT-B/32",
    "vit_b16": "ViT-B/16",
    "vit_s16": "ViT-S/16",
    "vit_ti16": "ViT-Ti/16",
    "mlp": "MLP",
    "convnet4": "ConvNet4",
    "seresnet12": "SEResNet12",
}

DATASET_NAMES = {
    "cifar10": "Cifar-10",
    "cifar100": "Cifar-100",
    "aircraft": "Aircraft",
    "fgvc_aircraft": "Aircraft",
    "dtd": "DTD",
    "pet": "PET",
    "oxford_iiit_pet": "PET",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "digits": "Digits",
    "cifar_fs": "CIFAR-FS",
    "cifarfs": "CIFAR-FS",
    "mini_imagenet": "miniImageNet",
    "miniimagenet": "miniImageNet",
    "tiered_imagenet": "tieredImageNet",
    "tieredimagenet": "tieredImageNet",
}

LOSS_NAMES = {"ce": "CE", "mse": "MSE", "supcon": "SupCon"}

# Table 3 sections: per-method fields get one row per method; the pre-trained model's
# source fields are one value per column, so they get a single row each.
_SECTION_TITLES = {
    "accuracy": "Transfer accuracy",
    "nc1": "NC1 evaluated on the penultimate layer feature (downstream training data)",
    "percent_params": "Percentage of parameters fine-tuned",
    "cdnv": "CDNV of the penultimate layer feature (downstream training data)",
    "numerical_rank": "Numerical rank of the penultimate layer feature (downstream training data)",
    "source_nc1": "NC1 of the pre-trained model on the source data (training split)",
    "source_accuracy": "Source test accuracy of the pre-trained model",
}

_SOURCE_FIELDS = ("source_nc1", "source_accuracy")

_SOURCE_SECTION = "The pre-trained model on its source data"

DEFAULT_SECTIONS = ("accuracy", "nc1", "percent_params")

MISSING = "\u2013"  # en dash, as in the paper's tables


def method_name(method: str) -> str:
  """Display name of a method ("Layer FT"); unknown methods as-is."""
  return METHOD_NAMES.get(method, method)


def _natural_key(s: str | None):
  if s is None:
    return (0,)
  parts = re.split(r"(\d+)", s)
  return (1,) + tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def _method_rank(records: Sequence[Mapping]) -> dict[str, int]:
  rank = {m: i for i, m in enumerate(METHOD_ORDER)}
  for r in records:
    if r["method"] not in rank:
      rank[r["method"]] = len(rank)
  return rank


def _num(v: Any) -> float | None:
  if v is None or not is_number(v):
    return None
  v = float(v)
  return None if math.isnan(v) else v


def _mean(values: Iterable[Any]) -> float | None:
  xs = [x for x in (_num(v) for v in values) if x is not None]
  return float(np.mean(xs)) if xs else None


class _Columns:
  """Column keys (model, dataset, pretrain|None, num_train|None), in first-seen order of
  (model, dataset); pretrain / num_train are only part of the key when one (model,
  dataset) pair has several values of them."""

  def __init__(self, records: Sequence[Mapping], by_size: bool = True):
    pretrains: dict[tuple, list] = OrderedDict()
    for r in records:
      md = (r["model"], r["dataset"])
      p = r.get("pretrain")
      pretrains.setdefault(md, [])
      if p not in pretrains[md]:
        pretrains[md].append(p)
    self._need_pretrain = {md: len(ps) > 1 for md, ps in pretrains.items()}
    sizes: dict[tuple, set] = OrderedDict()
    for r in records:
      sizes.setdefault(self._base(r), set()).add(int(r["num_train"]))
    self._need_size = {b: by_size and len(s) > 1 for b, s in sizes.items()}
    self.keys = []
    for b, s in sizes.items():
      if self._need_size[b]:
        self.keys.extend(b + (n,) for n in sorted(s))
      else:
        self.keys.append(b + (None,))

  def _base(self, r: Mapping) -> tuple:
    md = (r["model"], r["dataset"])
    return md + ((r.get("pretrain") if self._need_pretrain[md] else None),)

  def key(self, r: Mapping) -> tuple:
    b = self._base(r)
    return b + ((int(r["num_train"]) if self._need_size[b] else None),)

  @staticmethod
  def label(key: tuple) -> str:
    model, dataset, pretrain, n = key
    s = MODEL_NAMES.get(model, model)
    if pretrain is not None:
      s += f" [{pretrain}]"
    s += " / " + DATASET_NAMES.get(dataset, dataset)
    if n is not None:
      s += f" (n={n})"
    return s


def _split_methods(records: Sequence[Mapping], colkey: Callable[[Mapping], tuple]) -> set:
  """Methods that have several units inside one column (a unit sweep)."""
  units: dict[tuple, set] = {}
  for r in records:
    units.setdefault((colkey(r), r["method"]), set()).add(_unit(r))
  return {m for (_, m), us in units.items() if len(us) > 1}


def _row_key(r: Mapping, split: set) -> tuple:
  return (r["method"], _unit(r) if r["method"] in split else None)


def _unit(r: Mapping) -> str:
  """The unit a row shows: 'auto' for a unit chosen by NC, 'auto-rgn' by Auto-RGN
  (`stages.autounit`; its record's ``unit`` is the chosen one, shown in `auto_unit_table`)."""
  if r["method"] == "lora" and r.get("lora_rank"):  # a rank sweep splits like a unit sweep
    return f"r{r['lora_rank']}"
  if not r.get("unit_choice"):
    return r["unit"]
  return "auto" if r.get("unit_selector", "nc") in ("", "nc") else f"auto-{r['unit_selector']}"


def _row_label(row: tuple) -> str:
  method, unit = row
  return method_name(method) + (f" ({unit})" if unit is not None else "")


def _ordered_rows(rows: Iterable[tuple], rank: Mapping[str, int]) -> list[tuple]:
  return sorted(set(rows), key=lambda mu: (rank[mu[0]], _natural_key(mu[1])))


def _tag(r: Mapping) -> str:
  return r.get("pretrain") or ""


def is_variant_sweep(records: Sequence[Mapping]) -> bool:
  """Transfer records of several pre-training variants (Table 1, Figs. 3-5): some (model,
  dataset) has several ``pretrain`` tags, and the records carry the source NC1. (Several
  tags without a source NC1, e.g. ViT-B/32 from JFT and from ImageNet-21k, are Table 3
  columns.)"""
  tags: dict[tuple, set] = {}
  for r in records:
    tags.setdefault((r["model"], r["dataset"]), set()).add(_tag(r))
  return (any(len(t) > 1 for t in tags.values())
          and any(_num(r.get("source_nc1")) is not None for r in records)
          and not is_seed_replicates(records))


def is_seed_replicates(records: Sequence[Mapping]) -> bool:
  """Whether the records hold seed replicates: several seeds of one variant (a ``seeds``
  sweep), or, in workdirs written before ``seeds`` existed, variants that are seeds (several
  tags, each tag one seed, no two tags the same seed)."""
  seeds: dict[str, set] = {}
  for r in records:
    seeds.setdefault(_tag(r), set()).add(r.get("seed", 0))
  if any(len(ss) > 1 for ss in seeds.values()):
    return True
  flat = [s for ss in seeds.values() for s in ss]
  return len(seeds) > 1 and len(set(flat)) == len(flat)


PEFT_METHODS = ("bitfit", "lora", "lp_ft", "vpt")


def peft_label(r: Mapping) -> str:
  """A method as the PEFT comparison names it: "LoRA r4", "Layer FT auto-rgn", "BitFit"."""
  name = method_name(r["method"])
  if r["method"] == "lora" and r.get("lora_rank"):
    return f"{name} r{r['lora_rank']}"
  return f"{name} {_unit(r)}" if r.get("unit") else name


def peft_groups(records: Sequence[Mapping]) -> list[tuple[str, list[tuple[str, list]]]]:
  """[(column label, [(method label, records over seeds), ...]), ...] of the transfer
  records, methods in Table 3's order then first seen."""
  rank = _method_rank(records)
  out: dict[tuple, dict[str, list]] = {}
  key = lambda r: (r["model"], r["dataset"], int(r.get("num_train") or 0))
  for r in sorted(records, key=lambda r: rank[r["method"]]):
    out.setdefault(key(r), {}).setdefault(peft_label(r), []).append(r)
  label = lambda k: f"{model_name(k[0])} / {dataset_name(k[1])}, n={k[2]}"
  return [(label(k), list(v.items())) for k, v in out.items()]


# Student's t quantile t_{0.975, df} for df = 1..30 (95% two-sided); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
  """(mean, 95% half-width of Student's t interval, n) of the finite values; the half-width
  is None below 2 values."""
  v = [x for x in (_num(y) for y in values) if x is not None]
  if not v:
    return None, None, 0
  m = float(np.mean(v))
  if len(v) < 2:
    return m, None, 1
  t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
  return m, t * float(np.std(v, ddof=1)) / math.sqrt(len(v)), len(v)


_KIND_TITLES = {
    "pretrain": "Layer-wise NC1 on the source training data (Fig. 2)",
    "transfer": "Transfer results (Table 3)",
    "variants": "Pre-training variants: source NC1 and transfer accuracy (Table 1, Figs. 3-5)",
    "probe": "Layer-wise linear probes (Fig. 9)",
    "fewshot": "Few-shot accuracy and NC1 on the meta-test classes (Table 2)",
    "rank": "Ranking pre-trained models without fine-tuning them (Fig. 6)",
}


def split_kinds(records: Sequence[Mapping]) -> dict[str, list[dict]]:
  """The records by what they study, in report order: ``pretrain`` (stage pretrain),
  ``transfer`` or ``variants`` (the transfer records; `is_variant_sweep` decides), ``probe``,
  ``fewshot``. Kinds without records are left out."""
  records = validate(records)
  by_stage: dict[str, list] = {}
  for r in records:
    s = stage(r)
    by_stage.setdefault(s if s in ("pretrain", "probe", "fewshot", "rank") else "transfer",
                        []).append(r)
  out = {}
  for s in ("pretrain", "transfer", "probe", "fewshot", "rank"):
    rs = by_stage.get(s)
    if rs:
      out["variants" if s == "transfer" and is_variant_sweep(rs) else s] = rs
  return out


def _first_seen(values: Iterable) -> list:
  return list(OrderedDict.fromkeys(values))


def fmt_accuracy(v: Any) -> str:
  """Accuracy in percent, 2 decimals ("92.12"); "–" when missing."""
  v = _num(v)
  return MISSING if v is None else f"{v:.2f}"


def fmt_nc1(v: Any) -> str:
  """NC1 with 2 decimals ("0.32"); values below 0.005 in scientific notation so that a
  non-zero NC1 never prints as 0.00; "–" when missing."""
  v = _num(v)
  if v is None:
    return MISSING
  if v != 0 and abs(v) < 0.005:
    return f"{v:.1e}"
  return f"{v:.2f}"


def fmt_sig(v: Any) -> str:
  """3 significant digits ("0.0375", "2.99", "0.001"): layer-wise NC1 spans decades, where a
  fixed 2 decimals would print the deep layers as 0.04 and 0.04."""
  v = _num(v)
  return MISSING if v is None else f"{v:.3g}"


def fmt_percent(v: Any) -> str:
  """Percentage of parameters: "8.27%", and "100%" for 100; "–" when missing."""
  v = _num(v)
  if v is None:
    return MISSING
  if round(v, 2) == 100.0:
    return "100%"
  return f"{v:.2f}%"


def fmt_r(v: Any) -> str:
  """A correlation coefficient, 2 decimals with a sign ("-0.97"); "–" when undefined."""
  v = _num(v)
  return MISSING if v is None else f"{v:+.2f}"


_FORMATTERS = {
    "accuracy": fmt_accuracy,
    "nc1": fmt_nc1,
    "percent_params": fmt_percent,
    "cdnv": fmt_nc1,
    "numerical_rank": lambda v: MISSING if _num(v) is None else f"{_num(v):.1f}",
    "source_nc1": fmt_nc1,
    "source_accuracy": fmt_accuracy,
}


def default_sections(records: Sequence[Mapping]) -> tuple[str, ...]:
  """`DEFAULT_SECTIONS`, plus the source-data rows when records carry them (Table 1)."""
  extra = tuple(f for f in _SOURCE_FIELDS if any(_num(r.get(f)) is not None for r in records))
  return DEFAULT_SECTIONS + extra


def _md_escape(s: str) -> str:
  return s.replace("|", "\\|")


def _md_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(_md_escape(c) for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  lines = [_md_row(header), "|:--" + "|--:" * (len(header) - 1) + "|"]
  lines += [_md_row(r) for r in rows]
  return "\n".join(lines) + "\n"


def model_name(model: str) -> str:
  return MODEL_NAMES.get(model, model)


def dataset_name(dataset: str) -> str:
  return DATASET_NAMES.get(dataset, dataset)


def _variant_keys(records: Sequence[Mapping]) -> tuple[list[tuple], Callable[[tuple], str]]:
  """The (model, tag) pairs in first-seen order and their labels: the tag alone when one
  model was pre-trained, "ResNet18 [mse]" when several were."""
  keys = _first_seen((r["model"], _tag(r)) for r in records)
  several = len({m for m, _ in keys}) > 1

  def label(key):
    model, tag = key
    t = tag or MISSING
    return f"{model_name(model)} [{t}]" if several else t
  return keys, label


def reference_dataset(records: Sequence[Mapping]) -> str:
  """Fig. 5's dataset of reference for NC1: CIFAR-10 when the records have it, else the
  first downstream dataset."""
  datasets = _first_seen(r["dataset"] for r in records)
  return "cifar10" if "cifar10" in datasets else datasets[0]


def _log_r(points: Sequence[tuple[float | None, float | None]]) -> tuple[float, int]:
  """Pearson's r of y with log10 x over the points where both exist (x > 0), and their
  number; NaN below 3 points (two points always give +-1)."""
  pts = [(_positive(x), _num(y)) for x, y in points]
  pts = [(x, y) for x, y in pts if x is not None and y is not None]
  if len(pts) < 3:
    return float("nan"), len(pts)
  return pearson_r([math.log10(x) for x, _ in pts], [y for _, y in pts]), len(pts)


def _variant_points(records: Sequence[Mapping], model: str, dataset: str, method: str):
  """[(tag, record group)] of one (model, downstream dataset, method), variants in
  first-seen order."""
  out = OrderedDict()
  for r in records:
    if (r["model"], r["dataset"], r["method"]) == (model, dataset, method):
      out.setdefault(_tag(r), []).append(r)
  return list(out.items())


def _layer_units(records: Sequence[Mapping], field: str = "layerwise_nc1") -> list[str]:
  return _first_seen(u for r in records for u in (r.get(field) or {}))


def _mean_layerwise(rs: Sequence[Mapping], field: str) -> dict[str, float | None]:
  units = _layer_units(rs, field)
  return {u: _mean((r.get(field) or {}).get(u) for r in rs) for u in units}


def _pretrain_groups(records: Sequence[Mapping]) -> list[tuple[str, str, str, list]]:
  """Pre-training records grouped by (model, source dataset, variant): [(model, dataset,
  what, records)], ``what`` = the variant tag, else the loss ("CE"), else ""."""
  groups: dict[tuple, list] = OrderedDict()
  for r in records:
    groups.setdefault((r["model"], r["dataset"], _tag(r), r.get("loss") or ""), []).append(r)
  return [(model, dataset, tag or LOSS_NAMES.get(loss, loss), rs)
          for (model, dataset, tag, loss), rs in groups.items()]


def _pretrain_label(model: str, dataset: str, what: str) -> str:
  """"MLP / Digits (CE)"."""
  return f"{model_name(model)} / {dataset_name(dataset)}" + (f" ({what})" if what else "")


def _fewshot_columns(records: Sequence[Mapping]) -> tuple[list[tuple], Callable, Callable]:
  """Few-shot columns (model, pretrain tag or None) in first-seen order, the tag only when a
  model has several on one dataset (table2's variant per dataset -- one pre-training each --
  keeps one column per model); returns (keys, key of a record, label of a key:
  "ResNet12 [tag]")."""
  tags: dict[tuple, list] = OrderedDict()
  for r in records:
    ts = tags.setdefault((r["model"], r["dataset"]), [])
    if _tag(r) not in ts:
      ts.append(_tag(r))
  several = {m for (m, _), ts in tags.items() if len(ts) > 1}

  def key(r):
    return (r["model"], _tag(r) if r["model"] in several else None)

  def label(k):
    return model_name(k[0]) + (f" [{k[1] or MISSING}]" if k[1] is not None else "")
  return _first_seen(key(r) for r in records), key, label


def _setting(r: Mapping) -> tuple[int, int]:
  return int(r["ways"]), int(r["shots"])


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson correlation of two equal-length sequences (NaN if undefined)."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.size < 2 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def _positive(v: Any) -> float | None:
  v = _num(v)
  return v if v is not None and v > 0 and math.isfinite(v) else None


ESTIMATOR_NAMES = {"nc1": "-NC1", "logme": "LogME", "hscore": "H-score", "leep": "LEEP",
                   "ncti": "NCTI"}


def _estimators(rs: Sequence[Mapping]) -> list[str]:
  return [k[len("score_"):] for k in _first_seen(k for r in rs for k in r)
          if k.startswith("score_") and k != "score_wall_s"]


def _rank_groups(rs: Sequence[Mapping]) -> list[tuple[str, tuple, list]]:
  """(dataset, (method, unit), records) in first-seen order."""
  keys = _first_seen((r["dataset"], (r["method"], r["unit"] or None)) for r in rs)
  return [(d, mu, [r for r in rs if (r["dataset"], (r["method"], r["unit"] or None)) ==
                   (d, mu)]) for d, mu in keys]


def fmt_accuracy_ci(acc: Any, ci: Any) -> str:
  """"61.59 ± 0.85" (2 decimals); the accuracy alone without a ci; "–" without accuracy."""
  if _num(acc) is None:
    return MISSING
  return fmt_accuracy(acc) + ("" if _num(ci) is None else f" ± {_num(ci):.2f}")
