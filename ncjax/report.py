"""Results records -> JSON / CSV / Markdown tables / PNG plots that read like the paper.

This module only formats what the jobs produced; it imports numpy, json, csv and (lazily,
inside the plotting functions) matplotlib through the Agg canvas. It never imports jax, the
models or the training code, and it never touches pyplot's global state.

Results records
---------------
A record is a dict (``ncjax.records.Record.to_dict()``). Required fields
(``REQUIRED_FIELDS``):

* ``model`` (str): model name as in ``ncjax.models.get`` (``resnet18``, ``vit_b32``, ...).
* ``dataset`` (str): downstream dataset name (``cifar10``, ``dtd``, ``folder:<dir>`` ...);
  the source dataset for pre-training records.
* ``method`` (str): ``linear`` | ``layer`` | ``scl`` | ``full`` (others are shown as-is).
* ``unit`` (str or None): the fine-tuned unit (``block5``, ``layer8``); None or "" for
  methods without one.
* ``accuracy`` (float): test accuracy in **percent** (0-100).
* ``nc1`` (float): NC1 of the penultimate feature on the *training* data of ``dataset``.
* ``cdnv`` (float): class-distance normalised variance of the penultimate feature.
* ``numerical_rank`` (float): numerical rank of the penultimate feature.
* ``percent_params`` (float): share of the model's parameters fine-tuned, in **percent**.
* ``layerwise_nc1`` (dict unit -> float): NC1 of each unit's pooled feature on the same
  training data, in network order (may be empty).
* ``num_train`` (int): number of training examples used.

Optional fields: ``stage`` (``transfer`` | ``pretrain`` | ``probe``; a record without one is
a probe when it has ``layerwise_accuracy``, else a transfer), ``layerwise_accuracy`` (dict
unit -> percent: a linear probe on each unit's feature, Fig. 9), ``pretrain`` (the tag of the
pre-training variant), ``loss`` (pre-training loss), ``source_nc1`` / ``source_accuracy``
(the pre-trained model on its source data), ``seed``, ``wall_s``. Any other field is carried
through JSON and CSV. Numeric fields may be None or NaN (shown as "–"); a *missing* required
field is an error (``ValueError`` naming the field and the record's index).

What the report shows (``split_kinds``)
---------------------------------------
* **pretrain** records (Fig. 2): ``layerwise_nc1_table`` (rows = layers, columns = model /
  source dataset / loss or variant) and ``layerwise_nc1.png`` (NC1 against layer, log y).
* **transfer** records (Tables 3, 5-7, Figs. 10, 11, 14): ``transfer_table`` (Table 3: a
  column per (model, dataset), rows = methods, one row per unit for a unit sweep), with
  ``best_unit_table`` (Table 4) when a method was swept over units; ``layerwise_nc1.png``
  (Figs. 10 / 14: one panel per fine-tuned unit), ``nc1_vs_accuracy.png`` (accuracy against
  penultimate NC1 per dataset), ``accuracy_vs_size.png`` (Fig. 11).
* **variants**: transfer records of several pre-training variants of a model that carry the
  source NC1 (Table 1, Figs. 3-5, 13). One downstream dataset: Table 1's layout (a column
  per variant); several: ``variant_table`` (a row per variant). ``correlation_table`` gives
  Pearson's r of transfer accuracy with log10 NC1 (source data, the reference dataset of
  Fig. 5, the dataset itself). Plots: ``source_nc1_vs_accuracy.png`` (Table 1, Figs. 3, 4),
  ``nc1_vs_accuracy.png`` (Fig. 13: NC1 on each downstream dataset itself) and, with several
  downstream datasets, ``reference_nc1_vs_accuracy.png`` (Fig. 5: NC1 on CIFAR-10).
* **probe** records (Fig. 9): ``probe_table`` (rows = layers: probe accuracy, NC1) and
  ``nc1_vs_accuracy.png`` (left: accuracy and NC1 against layer; right: accuracy against NC1).
* **fewshot** records (Table 2; ``stage == "fewshot"``, one per (model, dataset, shots)
  with ``ways``, ``shots``, ``ci95`` and ``source_nc1`` = NC1 on the meta-train classes):
  ``fewshot_table`` (a column per model; accuracy ± ci95 per (dataset, ways, shots), NC1 on
  the meta-test / meta-train classes per dataset) and ``nc1_vs_fewshot_accuracy.png``.

A plot is only written when the records support it (e.g. no NC1 plot when NC1 was not
measured, no source plot without a variant sweep).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import textwrap
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ncjax.methods import METHODS
from ncjax.records import atomic_write

__all__ = [
    "REQUIRED_FIELDS",
    "OPTIONAL_FIELDS",
    "METHOD_NAMES",
    "MODEL_NAMES",
    "DATASET_NAMES",
    "validate",
    "stage",
    "split_kinds",
    "is_variant_sweep",
    "reference_dataset",
    "write_json",
    "read_json",
    "write_csv",
    "read_csv",
    "markdown_table",
    "transfer_table",
    "best_unit_table",
    "auto_unit_table",
    "unit_sweep_table",
    "variant_table",
    "correlation_table",
    "layerwise_nc1_table",
    "probe_table",
    "fewshot_table",
    "print_table",
    "plot_layerwise_nc1",
    "plot_nc1_vs_accuracy",
    "plot_source_nc1_vs_accuracy",
    "plot_reference_nc1_vs_accuracy",
    "plot_accuracy_vs_size",
    "plot_nc1_vs_fewshot_accuracy",
    "rank_table",
    "plot_scores_vs_accuracy",
    "pearson_r",
    "report_markdown",
    "write_all",
]

REQUIRED_FIELDS = (
    "model",
    "dataset",
    "method",
    "unit",
    "accuracy",
    "nc1",
    "cdnv",
    "numerical_rank",
    "percent_params",
    "layerwise_nc1",
    "num_train",
)
OPTIONAL_FIELDS = ("stage", "layerwise_accuracy", "pretrain", "loss", "seed", "wall_s",
                   "source_nc1", "source_accuracy")

# Typed CSV columns; strings are listed so that a tag like "1" does not come back an int.
_STRING_FIELDS = ("model", "dataset", "method", "unit", "pretrain", "stage", "loss", "run",
                  "weights", "candidate")
_FLOAT_FIELDS = ("accuracy", "nc1", "cdnv", "numerical_rank", "percent_params", "wall_s",
                 "source_nc1", "source_accuracy", "ci95", "regret", "cost_fraction",
                 "probe_cost_fraction")
_INT_FIELDS = ("num_train", "seed", "ways", "shots", "queries", "episodes")
_DICT_FIELDS = ("layerwise_nc1", "layerwise_accuracy")

METHOD_ORDER = METHODS
METHOD_NAMES = {
    "linear": "Linear Probe",
    "layer": "Layer FT",
    "scl": "SCL FT",
    "full": "Full Model FT",
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


# ----------------------------------------------------------------------------- validation


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def validate(records: Any) -> list[dict]:
  """Checks ``records`` and returns them as a list of dicts (the same dict objects).

  Raises ``ValueError`` naming the record index and the field when a required field is
  missing or has the wrong type. Numeric fields may be None/NaN (a missing measurement).
  """
  if isinstance(records, Mapping) or not isinstance(records, Iterable):
    raise ValueError("records must be a list of dicts")
  out = list(records)
  for i, r in enumerate(out):
    if not isinstance(r, Mapping):
      raise ValueError(f"record {i}: expected a dict, got {type(r).__name__}")
    for f in REQUIRED_FIELDS:
      if f not in r:
        raise ValueError(f"record {i}: missing required field '{f}'")
    for f in ("model", "dataset", "method"):
      if not isinstance(r[f], str) or not r[f]:
        raise ValueError(f"record {i}: field '{f}' must be a non-empty string, got {r[f]!r}")
    if r["unit"] is not None and not isinstance(r["unit"], str):
      raise ValueError(f"record {i}: field 'unit' must be a string or None, got {r['unit']!r}")
    for f in ("accuracy", "nc1", "cdnv", "numerical_rank", "percent_params"):
      if r[f] is not None and not _is_number(r[f]):
        raise ValueError(f"record {i}: field '{f}' must be a number, got {r[f]!r}")
    if not _is_number(r["num_train"]) or not float(r["num_train"]).is_integer():
      raise ValueError(f"record {i}: field 'num_train' must be an int, got {r['num_train']!r}")
    for f in _DICT_FIELDS:
      if f in r and r[f] is not None and not isinstance(r[f], Mapping):
        raise ValueError(f"record {i}: field '{f}' must be a dict unit -> float")
    if stage(r) == "fewshot":
      for f in ("ways", "shots"):
        v = r.get(f)
        if not _is_number(v) or not float(v).is_integer() or v < 1:
          raise ValueError(f"record {i}: few-shot field '{f}' must be a positive int, got {v!r}")
  return out


# ----------------------------------------------------------------------------- JSON / CSV


def _to_builtin(v: Any) -> Any:
  """numpy scalars/arrays -> Python builtins (for json)."""
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  raise TypeError(f"Object of type {type(v).__name__} is not JSON serializable")


def write_json(records: Sequence[Mapping], path: str) -> str:
  """Writes the records as a JSON list (numpy values become builtins). Returns ``path``.

  Non-finite floats are written as ``NaN``/``Infinity`` (Python's json reads them back).
  """
  records = validate(records)
  _makedirs_for(path)
  return atomic_write(path, json.dumps([dict(r) for r in records], indent=1,
                                       default=_to_builtin) + "\n")


def read_json(path: str) -> list[dict]:
  """Reads records written by ``write_json`` (also accepts ``{"records": [...]}``)."""
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, Mapping) and "records" in data:
    data = data["records"]
  return validate(data)


def _columns(records: Sequence[Mapping]) -> list[str]:
  cols = list(REQUIRED_FIELDS)
  for r in records:
    for k in r:
      if k not in cols:
        cols.append(k)
  return cols


def _csv_cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, np.ndarray):
    v = v.tolist()
  if isinstance(v, (Mapping, list, tuple)):
    return json.dumps(v, default=_to_builtin)
  if isinstance(v, float):
    return repr(v)  # shortest exact round-trip
  return str(v)


def write_csv(records: Sequence[Mapping], path: str) -> str:
  """Writes one row per record. Columns: the required fields, then every other field in
  first-seen order. Dict/list fields (``layerwise_nc1`` ...) are one column holding a JSON
  string; None is an empty cell. Returns ``path``."""
  records = validate(records)
  cols = _columns(records)
  _makedirs_for(path)
  f = io.StringIO(newline="")
  w = csv.writer(f)
  w.writerow(cols)
  for r in records:
    w.writerow([_csv_cell(r.get(c)) for c in cols])
  return atomic_write(path, f.getvalue())


def _parse_csv_cell(col: str, s: str) -> Any:
  if s == "":
    return None
  if col in _STRING_FIELDS:
    return s
  if col in _FLOAT_FIELDS:
    return float(s)
  if col in _INT_FIELDS:
    return int(s)
  if col in _DICT_FIELDS:
    return json.loads(s, object_pairs_hook=dict)
  try:
    return json.loads(s)
  except ValueError:
    return s


def read_csv(path: str) -> list[dict]:
  """Reads a file written by ``write_csv`` back into records. Known fields get their types
  back; other columns are JSON-decoded when possible, else kept as strings. Empty cells of
  optional columns are dropped (a record that lacked the field gets it back absent)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  out = []
  for row in rows:
    rec = {}
    for col, s in row.items():
      if s == "" and col not in REQUIRED_FIELDS:
        continue
      rec[col] = _parse_csv_cell(col, s)
    out.append(rec)
  return validate(out)


# ----------------------------------------------------------------------------- grouping


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
  if v is None or not _is_number(v):
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
  """The unit a row shows: 'auto' for a unit chosen by NC (`ncjax.autounit`; its record's
  ``unit`` is the chosen one, shown in `auto_unit_table`)."""
  return "auto" if r.get("unit_choice") else r["unit"]


def _row_label(row: tuple) -> str:
  method, unit = row
  return method_name(method) + (f" ({unit})" if unit is not None else "")


def _ordered_rows(rows: Iterable[tuple], rank: Mapping[str, int]) -> list[tuple]:
  return sorted(set(rows), key=lambda mu: (rank[mu[0]], _natural_key(mu[1])))


# ----------------------------------------------------------------------------- kinds


def stage(r: Mapping) -> str:
  """The record's stage: its ``stage`` field; a record without one (hand-made) is a probe
  when it carries ``layerwise_accuracy``, a few-shot record when its method is
  ``fewshot``, else a transfer record."""
  s = r.get("stage")
  if isinstance(s, str) and s:
    return s
  if r.get("layerwise_accuracy"):
    return "probe"
  return "fewshot" if r.get("method") == "fewshot" else "transfer"


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
          and any(_num(r.get("source_nc1")) is not None for r in records))


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


# ----------------------------------------------------------------------------- formatting


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


# ----------------------------------------------------------------------------- tables


def markdown_table(records: Sequence[Mapping], sections: Sequence[str] | None = None) -> str:
  """The job's main table as GitHub Markdown (what ``ncjax.jobs`` prints), by kind
  (`split_kinds`): pre-training -> `layerwise_nc1_table`; layer probes -> `probe_table`;
  transfer -> `transfer_table`; few-shot -> `fewshot_table`; a variant sweep -> `transfer_table` with one column per
  variant (Table 1's layout) when it has one downstream dataset, else `variant_table`.
  Records of several kinds give one table each under a "## <what it reproduces>" heading.
  With ``sections``, always the Table 3 layout of `transfer_table`. "" for no records."""
  records = validate(records)
  if not records:
    return ""
  if sections is not None:
    return transfer_table(records, sections)
  parts = [(kind, _main_table(kind, rs)) for kind, rs in split_kinds(records).items()]
  if len(parts) == 1:
    return parts[0][1]
  return "\n".join(f"## {_KIND_TITLES[k]}\n\n{t}" for k, t in parts)


def _main_table(kind: str, rs: list[dict]) -> str:
  if kind == "pretrain":
    return layerwise_nc1_table(rs)
  if kind == "probe":
    return probe_table(rs)
  if kind == "fewshot":
    return fewshot_table(rs)
  if kind == "rank":
    return rank_table(rs)
  if kind == "variants" and len({r["dataset"] for r in rs}) > 1:
    return variant_table(rs)
  return transfer_table(rs)


def transfer_table(records: Sequence[Mapping], sections: Sequence[str] | None = None) -> str:
  """Table 3 layout.

  Columns: (model, dataset) pairs in first-seen order, headed "ResNet18 / Cifar-10"; one
  column per ``pretrain`` tag when a pair has several ("MLP [mse] / Digits": Table 1's
  variants), per ``num_train`` when it has several sizes ("ResNet18 / Cifar-10 (n=500)").
  Sections (default): "Transfer accuracy" (percent, 2 decimals), "NC1 evaluated on the
  penultimate layer feature (downstream training data)" (2 decimals), "Percentage of
  parameters fine-tuned" ("8.27%", "100%"); ``sections`` may also name ``cdnv`` and
  ``numerical_rank``. Rows: one per method in the order linear, layer, scl, full, then others
  in first-seen order; a method with several units within one column (a unit sweep, Tables
  5-7) gets one row per unit, "Layer FT (block5)". When records carry ``source_nc1`` /
  ``source_accuracy`` (a model pre-trained by the job) these are properties of the
  pre-trained model, not of the method: one row each under "The pre-trained model on its
  source data". Missing cells are "–"; records sharing a cell are averaged.
  """
  records = validate(records)
  if not records:
    return ""
  if sections is None:
    sections = default_sections(records)
  for s in sections:
    if s not in _FORMATTERS:
      raise ValueError(f"unknown section {s!r}; choose from {sorted(_FORMATTERS)}")
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  cells: dict[tuple, list] = {}
  for r in records:
    cells.setdefault((cols.key(r), _row_key(r, split)), []).append(r)
  rows = _ordered_rows((rk for (_, rk) in cells), rank)
  by_col: dict[tuple, list] = {}
  for r in records:
    by_col.setdefault(cols.key(r), []).append(r)

  n = len(cols.keys)
  lines = [
      _md_row(["Method"] + [cols.label(k) for k in cols.keys]),
      "|:--" + "|--:" * n + "|",
  ]
  in_source = False
  for field in sections:
    fmt = _FORMATTERS[field]
    if field in _SOURCE_FIELDS:
      if not in_source:
        lines.append(_md_row([f"**{_SOURCE_SECTION}**"] + [""] * n))
        in_source = True
      lines.append(_md_row([_SECTION_TITLES[field]]
                           + [fmt(_mean(r.get(field) for r in by_col[k])) for k in cols.keys]))
      continue
    in_source = False
    lines.append(_md_row([f"**{_SECTION_TITLES[field]}**"] + [""] * n))
    for row in rows:
      vals = []
      for k in cols.keys:
        rs = cells.get((k, row))
        vals.append(fmt(_mean(r.get(field) for r in rs)) if rs else MISSING)
      lines.append(_md_row([_row_label(row)] + vals))
  return "\n".join(lines) + "\n"


_BEST_UNIT_TITLE = "Fine-tuned unit of the best result"


def _best_units(records: Sequence[Mapping], colkey) -> dict[tuple, tuple[str, list]]:
  """(column, method) -> (unit, records) of the unit with the highest mean accuracy, for
  methods that tune a unit. Ties go to the unit nearest the input (fewer parameters)."""
  groups: dict[tuple, dict] = {}
  for r in records:
    if r["unit"] and not r.get("unit_choice"):  # the best of the sweep, not of a choice
      groups.setdefault((colkey(r), r["method"]), {}).setdefault(r["unit"], []).append(r)
  best = {}
  for key, by_unit in groups.items():
    scored = [(u, rs, _mean(r["accuracy"] for r in rs)) for u, rs in by_unit.items()]
    scored = [s for s in scored if s[2] is not None]
    if scored:
      scored.sort(key=lambda s: _natural_key(s[0]))
      u, rs, _ = max(scored, key=lambda s: s[2])  # max keeps the first of equal scores
      best[key] = (u, rs)
  return best


def best_unit_table(records: Sequence[Mapping]) -> str:
  """Table 4: for each (model, dataset) column, the best result of each unit-wise method
  (Layer FT, SCL FT) over its unit sweep, i.e. the unit with the highest transfer accuracy,
  next to linear probing and full fine-tuning. Sections: transfer accuracy, penultimate NC1
  and percentage of parameters (of that best unit), then the unit itself. Computed from the
  Tables 5-7 sweep records; "" unless some method was run with several units in a column."""
  records = [r for r in validate(records) if stage(r) not in ("pretrain", "probe")]
  cols = _Columns(records)
  if not records or not _split_methods(records, cols.key):
    return ""
  rank = _method_rank(records)
  best = _best_units(records, cols.key)
  methods = sorted({r["method"] for r in records}, key=rank.__getitem__)
  unit_methods = [m for m in methods if any(k[1] == m for k in best)]
  n = len(cols.keys)

  def group(k, m):
    if (k, m) in best:
      return best[(k, m)][1]
    if m in unit_methods:  # every unit of this column lacked an accuracy
      return []
    return [r for r in records if cols.key(r) == k and r["method"] == m]

  lines = [_md_row(["Method"] + [cols.label(k) for k in cols.keys]), "|:--" + "|--:" * n + "|"]
  for field in DEFAULT_SECTIONS:
    lines.append(_md_row([f"**{_SECTION_TITLES[field]}**"] + [""] * n))
    for m in methods:
      vals = []
      for k in cols.keys:
        g = group(k, m)
        vals.append(_FORMATTERS[field](_mean(r.get(field) for r in g)) if g else MISSING)
      lines.append(_md_row([method_name(m)] + vals))
  lines.append(_md_row([f"**{_BEST_UNIT_TITLE}**"] + [""] * n))
  for m in unit_methods:
    lines.append(_md_row([method_name(m)]
                         + [best[(k, m)][0] if (k, m) in best else MISSING for k in cols.keys]))
  return "\n".join(lines) + "\n"


def _percent_of(fraction: Any) -> float | None:
  v = _num(fraction)
  return None if v is None else 100.0 * v


def auto_unit_table(records: Sequence[Mapping]) -> str:
  """The units chosen by NC (`ncjax.autounit`): one row per choice with the chosen unit, its
  accuracy, the best unit of the job's sweep over the same candidates (when it ran), the
  regret (points), and the compute of the probes and of the whole choice as fractions of the
  sweep's; then each choice's probe NC1 per candidate (the chosen one in bold). "" when no
  record was chosen by NC."""
  records = validate(records)
  auto = [r for r in records if r.get("unit_choice")]
  if not auto:
    return ""
  cols = _Columns(records)
  best = _best_units(records, cols.key)
  lines = [_md_row(["Model / dataset", "Method", "Chosen unit", "Accuracy", "Best swept unit",
                    "Its accuracy", "Regret (points)", "Probe cost", "Choice cost"]),
           "|:--|:--|:--|--:|:--|--:|--:|--:|--:|"]
  probes = []
  for r in auto:
    label, method = cols.label(cols.key(r)), method_name(r["method"])
    b_unit, b_rs = best.get((cols.key(r), r["method"]), (None, []))
    covered = _num(r.get("regret")) is not None
    lines.append(_md_row([
        label, method, r["unit"], fmt_accuracy(r["accuracy"]),
        b_unit if covered else MISSING,
        fmt_accuracy(_mean(x["accuracy"] for x in b_rs)) if covered else MISSING,
        f"{r['regret']:.2f}" if covered else MISSING,
        fmt_percent(_percent_of(r.get("probe_cost_fraction"))),
        fmt_percent(_percent_of(r.get("cost_fraction")))]))
    nc1 = ", ".join((f"**{u} {fmt_nc1(c.get('nc1'))}**" if u == r["unit"] else
                     f"{u} {fmt_nc1(c.get('nc1'))}") for u, c in r["unit_choice"].items())
    probes.append(f"- {label}, {method}: {nc1}")
  return "\n".join(lines) + "\n\nProbe NC1 (penultimate, downstream training data):\n\n" + \
      "\n".join(probes) + "\n"


def unit_sweep_table(records: Sequence[Mapping], min_units: int = 1) -> str:
  """Tables 5-7 transposed, one Markdown table per (model, dataset): rows = units (natural
  order: block1, block3, ..., block10), columns = accuracy (percent), penultimate NC1 and
  percentage of parameters for each unit-wise method present (layer, scl, then others
  that have a unit). Linear probe / full fine-tuning results, if present, are given below
  each table as a reference line. Only (model, dataset) columns with at least
  ``min_units`` distinct units get a table. Returns "" when there is none. (``write_all``
  does not repeat it: `transfer_table` already has one row per unit.)
  """
  records = validate(records)
  cols = _Columns(records)
  rank = _method_rank(records)
  out = []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    sweep = [r for r in rs if r["method"] not in ("linear", "full") and r["unit"]]
    if not sweep:
      continue
    methods = sorted({r["method"] for r in sweep}, key=rank.__getitem__)
    units = sorted({_unit(r) for r in sweep}, key=_natural_key)
    if len(units) < min_units:
      continue
    groups: dict[tuple, list] = {}
    for r in sweep:
      groups.setdefault((_unit(r), r["method"]), []).append(r)
    header = ["Unit"]
    for title in ("acc", "NC1", "% params"):
      header += [f"{method_name(m)} {title}" for m in methods]
    lines = [f"### {cols.label(key)}", "", _md_row(header),
             "|:--" + "|--:" * (len(header) - 1) + "|"]
    for u in units:
      row = [u]
      for field in ("accuracy", "nc1", "percent_params"):
        for m in methods:
          g = groups.get((u, m))
          row.append(_FORMATTERS[field](_mean(r[field] for r in g)) if g else MISSING)
      lines.append(_md_row(row))
    refs = []
    for m in ("linear", "full"):
      g = [r for r in rs if r["method"] == m]
      if g:
        refs.append(
            f"{method_name(m)} {fmt_accuracy(_mean(r['accuracy'] for r in g))} "
            f"(NC1 {fmt_nc1(_mean(r['nc1'] for r in g))}, "
            f"{fmt_percent(_mean(r['percent_params'] for r in g))} params)"
        )
    if refs:
      lines += ["", "Reference: " + "; ".join(refs) + "."]
    out.append("\n".join(lines))
  return "\n\n".join(out) + ("\n" if out else "")


# --- pre-training variants (Table 1, Figs. 3-5, 13)


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


def variant_table(records: Sequence[Mapping]) -> str:
  """A variant sweep over several downstream datasets (Fig. 5 / 13): one row per pre-training
  variant (``pretrain`` tag; "ResNet50 [aug3]" when several models), columns: the pre-trained
  model's NC1 on its source training data and its source test accuracy, then for each
  downstream dataset (and method, when several) the transfer accuracy and the penultimate NC1
  on that dataset's training data. Seeds are averaged."""
  records = validate(records)
  if not records:
    return ""
  keys, label = _variant_keys(records)
  rank = _method_rank(records)
  methods = sorted({r["method"] for r in records}, key=rank.__getitem__)
  datasets = _first_seen(r["dataset"] for r in records)
  combos = [(d, m) for d in datasets for m in methods
            if any(r["dataset"] == d and r["method"] == m for r in records)]
  header = ["Pre-training", "Source NC1 (source train)", "Source acc. (%)"]
  for d, m in combos:
    what = dataset_name(d) + (f" {method_name(m)}" if len(methods) > 1 else "")
    header += [f"{what} acc. (%)", f"{what} NC1 (train)"]
  rows = []
  for key in keys:
    rs = [r for r in records if (r["model"], _tag(r)) == key]
    row = [label(key), fmt_nc1(_mean(r.get("source_nc1") for r in rs)),
           fmt_accuracy(_mean(r.get("source_accuracy") for r in rs))]
    for d, m in combos:
      g = [r for r in rs if r["dataset"] == d and r["method"] == m]
      row += [fmt_accuracy(_mean(r["accuracy"] for r in g)), fmt_nc1(_mean(r["nc1"] for r in g))]
    rows.append(row)
  return _md_table(header, rows)


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


def correlation_table(records: Sequence[Mapping]) -> str:
  """How NC1 predicts transfer accuracy across pre-training variants: Pearson's r of the
  transfer accuracy with log10 NC1 measured on the source training data (Table 1, Figs. 3,
  4: the paper finds r > 0 up to a point), on the reference dataset (Fig. 5, only with
  several downstream datasets) and on the downstream dataset itself (Fig. 13). One row per
  (model, downstream dataset, method); "–" with fewer than 3 variants."""
  records = validate(records)
  if not records:
    return ""
  ref = reference_dataset(records)
  several = len({r["dataset"] for r in records}) > 1
  rank = _method_rank(records)
  header = ["Downstream", "Variants", "r: source NC1 (source train)"]
  if several:
    header.append(f"r: NC1 on {dataset_name(ref)} (train)")
  header.append("r: NC1 on the downstream data (train)")
  rows = []
  combos = _first_seen((r["model"], r["dataset"], r["method"]) for r in records)
  combos.sort(key=lambda c: rank[c[2]])  # stable: datasets keep their order within a method
  multi_model = len({c[0] for c in combos}) > 1
  for model, dataset, method in combos:
    pts = _variant_points(records, model, dataset, method)
    accs = [_mean(r["accuracy"] for r in g) for _, g in pts]
    src, n = _log_r([(_mean(r.get("source_nc1") for r in g), a) for (_, g), a in zip(pts, accs)])
    own, _ = _log_r([(_mean(r["nc1"] for r in g), a) for (_, g), a in zip(pts, accs)])
    what = dataset_name(dataset) + f" ({method_name(method)})"
    if multi_model:
      what = f"{model_name(model)} / {what}"
    row = [what, str(len(pts)), fmt_r(src)]
    if several:
      ref_nc1 = dict((t, _mean(r["nc1"] for r in g))
                     for t, g in _variant_points(records, model, ref, method))
      row.append(fmt_r(_log_r([(ref_nc1.get(t), a) for (t, _), a in zip(pts, accs)])[0]))
    row.append(fmt_r(own))
    rows.append(row)
  return _md_table(header, rows)


# --- layer-wise tables (Figs. 2, 9)


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


def layerwise_nc1_table(records: Sequence[Mapping]) -> str:
  """Fig. 2 as a table: the NC1 of each layer's feature on the source training data, one
  row per layer (network order; "1", "2", ... counted from the input when the columns'
  models name their layers differently), one column per (model, source dataset, variant or
  loss). Below: the geometric-mean NC1 ratio of consecutive layers (Fig. 2's "roughly equal
  multiplicative factor" per layer) and the model's test accuracy on the source data."""
  records = validate(records)
  groups = _pretrain_groups(records)
  if not groups:
    return ""
  values = [_mean_layerwise(g[-1], "layerwise_nc1") for g in groups]
  unit_lists = [list(v) for v in values]
  by_name = all(u == unit_lists[0] for u in unit_lists)
  depth = max(len(u) for u in unit_lists)
  rows = []
  for i in range(depth):
    name = unit_lists[0][i] if by_name else str(i + 1)
    rows.append([name] + [fmt_sig(list(v.values())[i]) if i < len(v) else MISSING
                          for v in values])
  ratio = []
  for v in values:
    pos = [x for x in v.values() if _positive(x) is not None]
    ratio.append(fmt_sig((pos[-1] / pos[0]) ** (1 / (len(pos) - 1))) if len(pos) > 1
                 else MISSING)
  rows.append(["NC1 ratio per layer (geometric mean)"] + ratio)
  rows.append(["Source test accuracy (%)"]
              + [fmt_accuracy(_mean(r["accuracy"] for r in g[-1])) for g in groups])
  header = (["Layer" if by_name else "Layer (from the input)"]
            + [_pretrain_label(*g[:3]) for g in groups])
  return _md_table(header, rows)


def probe_table(records: Sequence[Mapping]) -> str:
  """Fig. 9 as tables, one per (model, dataset[, variant]): rows = units in network order,
  columns = the test accuracy of a linear probe on the unit's pooled feature and the
  feature's NC1 on the downstream training data; a "penultimate" row when the classifier's
  input is not the last unit's feature (e.g. ViT's final LayerNorm); below, Pearson's r of
  the accuracy with log10 NC1 over the units (Fig. 9 right: near-linear, negative)."""
  records = validate(records)
  cols = _Columns(records)
  out = []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    acc = _mean_layerwise(rs, "layerwise_accuracy")
    nc1 = _mean_layerwise(rs, "layerwise_nc1")
    units = _first_seen(list(acc) + list(nc1))
    rows = [[u, fmt_accuracy(acc.get(u)), fmt_sig(nc1.get(u))] for u in units]
    pen_acc, pen_nc1 = _mean(r["accuracy"] for r in rs), _mean(r["nc1"] for r in rs)
    last = nc1.get(units[-1]) if units else None
    if pen_nc1 is not None and (last is None or abs(pen_nc1 - last) > 1e-6 * abs(last)):
      rows.append(["penultimate", fmt_accuracy(pen_acc), fmt_sig(pen_nc1)])
    r_, n = _log_r([(nc1.get(u), acc.get(u)) for u in units])
    d = dataset_name(key[1])
    out.append(f"### {cols.label(key)}\n\n"
               + _md_table(["Layer", "Probe test accuracy (%)", f"NC1 ({d} training data)"], rows)
               + f"\nPearson r of probe accuracy with log10 NC1 over {n} layers: {fmt_r(r_)}.\n")
  return "\n".join(out)


FEWSHOT_ACCURACY = "Few-shot accuracy (%, mean ± 95% CI over episodes)"
FEWSHOT_NC1 = "NC1 (meta-test): penultimate NC1 on the meta-test classes"
FEWSHOT_SOURCE_NC1 = "NC1 (meta-train): penultimate NC1 on the meta-train classes"


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


def fmt_accuracy_ci(acc: Any, ci: Any) -> str:
  """"61.59 ± 0.85" (2 decimals); the accuracy alone without a ci; "–" without accuracy."""
  if _num(acc) is None:
    return MISSING
  return fmt_accuracy(acc) + ("" if _num(ci) is None else f" ± {_num(ci):.2f}")


def fewshot_table(records: Sequence[Mapping]) -> str:
  """Table 2 layout. Columns: the models in first-seen order ("ConvNet4", "ResNet12",
  "SEResNet12"; "ResNet12 [tag]" when a model comes in several ``pretrain`` variants).
  Sections: few-shot accuracy, a row per (dataset, "<ways>-way <shots>-shot") in dataset
  first-seen order and ascending (ways, shots), cells "accuracy ± ci95" (percent, 2
  decimals); NC1 of the frozen penultimate embeddings on the meta-test classes, a row per
  dataset (3 significant digits; it does not depend on the shots, so records of one model
  and dataset share it); when some record has a finite ``source_nc1``, the NC1 on the
  meta-train classes, a row per dataset that has one. Records sharing a cell are averaged
  (accuracy and ci95 alike); missing cells are "–"."""
  records = validate(records)
  if not records:
    return ""
  keys, key, label = _fewshot_columns(records)
  datasets = _first_seen(r["dataset"] for r in records)

  def mean(field, dataset, k, setting=None):
    return _mean(r.get(field) for r in records if r["dataset"] == dataset and key(r) == k
                 and (setting is None or _setting(r) == setting))

  n = len(keys)
  lines = [_md_row(["Dataset"] + [label(k) for k in keys]), "|:--" + "|--:" * n + "|",
           _md_row([f"**{FEWSHOT_ACCURACY}**"] + [""] * n)]
  for d in datasets:
    for ways, shots in sorted({_setting(r) for r in records if r["dataset"] == d}):
      cells = [fmt_accuracy_ci(mean("accuracy", d, k, (ways, shots)),
                               mean("ci95", d, k, (ways, shots))) for k in keys]
      lines.append(_md_row([f"{dataset_name(d)} {ways}-way {shots}-shot"] + cells))
  lines.append(_md_row([f"**{FEWSHOT_NC1}**"] + [""] * n))
  for d in datasets:
    lines.append(_md_row([dataset_name(d)] + [fmt_sig(mean("nc1", d, k)) for k in keys]))
  src = [d for d in datasets
         if any(_num(r.get("source_nc1")) is not None for r in records if r["dataset"] == d)]
  if src:
    lines.append(_md_row([f"**{FEWSHOT_SOURCE_NC1}**"] + [""] * n))
    for d in src:
      lines.append(_md_row([dataset_name(d)]
                           + [fmt_sig(mean("source_nc1", d, k)) for k in keys]))
  return "\n".join(lines) + "\n"


def print_table(records: Sequence[Mapping], file=None) -> str:
  """Prints ``markdown_table(records)`` (to ``file`` or stdout) and returns it."""
  text = markdown_table(records)
  print(text, end="", file=file)
  return text


# ----------------------------------------------------------------------------- plots


def _makedirs_for(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)


def _save(fig, path: str) -> str:
  _makedirs_for(path)
  fig.savefig(path, dpi=110, format="png")
  return path


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


_METHOD_COLORS = {"linear": "C0", "layer": "C1", "scl": "C2", "full": "C3"}
_LABEL_SIZE = 8.5


def _method_color(method: str, rank: Mapping[str, int]) -> str:
  return _METHOD_COLORS.get(method, f"C{4 + rank[method] % 6}")


# A panel is a callable that draws on one Axes; a figure is rows of panels. Panels of a row
# may share their y axis (the same quantity on the same data, e.g. one dataset's Fig. 14 row),
# and a whole figure its x axis (e.g. the source NC1, the same for every downstream panel).
Panel = Callable[[Any], None]


def _pack(panels: Sequence[Panel], per_row: int = 3) -> list[list[Panel]]:
  return [list(panels[i:i + per_row]) for i in range(0, len(panels), per_row)]


def _draw(path: str, rows: Sequence[tuple[Sequence[Panel], bool]], title: str,
          sharex: bool = False, w: float = 4.4, h: float = 3.4) -> str:
  """Draws ``rows`` = [(panels, share y within the row)] on a pyplot-free Agg figure with
  ``title`` on top and saves it to ``path``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ncols = max(len(p) for p, _ in rows)
  fig = Figure(figsize=(w * ncols, h * len(rows) + 0.4), layout="constrained")
  FigureCanvasAgg(fig)
  grid = fig.subplots(len(rows), ncols, squeeze=False)
  for i, (panels, share) in enumerate(rows):
    for j in range(ncols):
      ax = grid[i][j]
      if j >= len(panels):
        ax.set_visible(False)
        continue
      if sharex and (i, j) != (0, 0):
        ax.sharex(grid[0][0])
      if share and j > 0:
        ax.sharey(grid[i][0])
      panels[j](ax)
      if share and j > 0:  # one y label and tick labels per shared row
        ax.set_ylabel("")
        ax.tick_params(labelleft=False)
  # ~11 characters of 10-pt text per inch: wrap rather than clip a narrow figure's title.
  title = re.sub(r"\b(Figs?\.|Tables?) (?=\d)", "\\1\u00a0", title)  # never wrap "Fig. | 2"
  fig.suptitle(textwrap.fill(title, width=max(40, int(11 * w * ncols)), break_on_hyphens=False),
               fontsize=10)
  return _save(fig, path)


def _log_ticks(lo: float, hi: float) -> list[float]:
  """Readable ticks for a log axis over [lo, hi]: decades when the range spans several, else
  1-2-5, else finer steps, so that there are at least 3 labelled ticks and at most ~7."""
  from matplotlib import ticker
  k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
  ticks: list[float] = []
  for subs in ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
    ticks = [float(f"{m}e{k}") for k in range(k0, k1 + 1) for m in subs]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) >= 3:
      break
  if len(ticks) < 3:  # under a factor ~1.5: evenly spaced values read best
    ticks = [float(t) for t in ticker.MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi and t > 0]
  if len(ticks) > 7:
    ticks = ticks[::-(-len(ticks) // 6)]
  return ticks


def _tick_label(t: float) -> str:
  return f"{t:.0f}" if t >= 1000 else f"{t:.3g}"


def _log_axis(ax, which: str, values: Iterable[Any], room: float = 0.0) -> None:
  """Log scale on ``which`` ('x' | 'y') with limits around ``values`` and plain-number tick
  labels ("0.05", "0.1", "2"); matplotlib's defaults label a range within one decade with
  unreadable minor ticks ("6x10^-1") or none at all. ``room``: extra space after the
  largest value, as a share of the range (for the labels of annotated points)."""
  from matplotlib import ticker
  vals = [v for v in (_positive(v) for v in values) if v is not None]
  (ax.set_xscale if which == "x" else ax.set_yscale)("log")
  if not vals:
    return
  lo, hi = min(vals), max(vals)
  if hi / lo < 1.6:  # a near-constant quantity: show it as such, not as a steep range
    c = math.sqrt(lo * hi)
    lo, hi = c / 1.26, c * 1.26
  span = hi / lo
  lo, hi = lo / span ** 0.08, hi * span ** (0.08 + room)
  (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
  ticks = _log_ticks(lo, hi)
  axis = ax.xaxis if which == "x" else ax.yaxis
  axis.set_major_locator(ticker.FixedLocator(ticks))
  axis.set_major_formatter(ticker.FixedFormatter([_tick_label(t) for t in ticks]))
  axis.set_minor_formatter(ticker.NullFormatter())


def _layer_xaxis(ax, units: Sequence[str]) -> None:
  """x = unit position 1..L. Units named <prefix><n> with one prefix ("block1".."block8")
  are labelled by their number under "<prefix> index"; others by their names."""
  ax.set_xticks(range(1, len(units) + 1))
  m = [re.fullmatch(r"([A-Za-z_]+?)(\d+)", u) for u in units]
  if units and all(m) and len({x.group(1) for x in m}) == 1:
    labels = [x.group(2) for x in m]
    if len(units) > 16:
      labels = [l if i % 2 == 0 else "" for i, l in enumerate(labels)]
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel(f"{m[0].group(1)} index (from the input)", fontsize=_LABEL_SIZE)
  else:
    ax.set_xticklabels(units, rotation=60, fontsize=7)
    ax.set_xlabel("unit", fontsize=_LABEL_SIZE)
  ax.set_xlim(0.5, len(units) + 0.5)


def _unit_number(unit: str) -> str:
  """"block7" -> "7" (other names as they are)."""
  return re.sub(r"^[A-Za-z_]+(?=\d+$)", "", unit)


def _unit_kind(units: Sequence[str]) -> str:
  """"block" for block1, block7; "unit" when the names differ in kind."""
  kinds = {re.sub(r"\d+$", "", u) for u in units}
  return kinds.pop() if len(kinds) == 1 and "" not in kinds else "unit"


def _fit_line(ax, xs, ys) -> None:
  """Least-squares line of y on log10(x) (straight on the log-x axis), r in the legend."""
  lx = np.log10(np.asarray(xs, dtype=np.float64))
  ys = np.asarray(ys, dtype=np.float64)
  if lx.size < 3 or lx.std() == 0:
    return
  slope, icpt = np.polyfit(lx, ys, 1)
  grid = np.linspace(lx.min(), lx.max(), 50)
  ax.plot(10**grid, slope * grid + icpt, color="0.35", ls="--", lw=1, zorder=1,
          label=f"fit on log10 NC1, r = {pearson_r(lx, ys):+.2f}")


def _annotate(ax, xs, ys, labels, color="0.15") -> None:
  """Labels points; points at the same place (e.g. two augmentation levels that do nothing
  to grayscale digits) get one joined label ("aug4, aug5"), not two overprinted ones."""
  spots: dict[tuple, list] = OrderedDict()
  for x, y, t in zip(xs, ys, labels):
    spots.setdefault((float(f"{x:.6g}"), float(f"{y:.6g}")), []).append(str(t))
  for (x, y), ts in spots.items():
    ax.annotate(", ".join(ts), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points",
                color=color)


def _family(tag: str) -> str:
  """A variant's family: its tag without the trailing level ("aug3" -> "aug", "adv8" ->
  "adv", "ce-proj2" -> "ce-proj"); a tag without a number is its own family."""
  return re.sub(r"[-_+]?[\d.]+$", "", tag) or tag


def _variant_scatter(ax, pts: Sequence[tuple[str, float, float]], fit: bool) -> None:
  """Pre-training variants as points (x, y) labelled by their tag, one colour per family;
  members of a family (augmentation levels, PGD radii, projection depths) are joined in
  tag order so that the family's trend reads as in Figs. 3, 4. ``fit``: a least-squares
  line on log10 x over all points."""
  families = _first_seen(_family(t) for t, _, _ in pts)
  sized = {f: sum(_family(t) == f for t, _, _ in pts) for f in families}
  for i, f in enumerate(families):
    sel = sorted((p for p in pts if _family(p[0]) == f), key=lambda p: _natural_key(p[0]))
    xs, ys = [p[1] for p in sel], [p[2] for p in sel]
    ax.plot(xs, ys, color=f"C{i % 10}", marker="o", ms=5, lw=1 if sized[f] > 1 else 0,
            label=f if sized[f] > 1 else None, zorder=3)
    _annotate(ax, xs, ys, [p[0] for p in sel], color=f"C{i % 10}")
  if fit:
    _fit_line(ax, [p[1] for p in pts], [p[2] for p in pts])
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def _r_note(pts) -> str:
  """" (r = +0.80)": Pearson's r of y with log10 x, for a title; "" below 3 points."""
  r, n = _log_r([(x, y) for _, x, y in pts])
  return f" (r = {r:+.2f} with log10 NC1)" if n >= 3 and not math.isnan(r) else ""


# --- layer-wise NC1 (Figs. 2, 10, 14)


def _layer_line(ax, units: Sequence[str], values: Mapping[str, Any], **kw) -> list[float]:
  pos = {u: i + 1 for i, u in enumerate(units)}
  pts = [(pos[u], _positive(v)) for u, v in values.items() if u in pos]
  pts = [(x, y) for x, y in pts if y is not None]
  ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, **kw)
  return [p[1] for p in pts]


def _pretrain_layer_panels(records: Sequence[Mapping]) -> list[Panel]:
  """Fig. 2: one panel per (model, source dataset), one line per variant / loss."""
  by_md: dict[tuple, list] = OrderedDict()
  for r in records:
    by_md.setdefault((r["model"], r["dataset"]), []).append(r)
  panels = []
  for (model, dataset), rs in by_md.items():
    def panel(ax, model=model, dataset=dataset, rs=rs):
      units = _layer_units(rs)
      vals = []
      for i, (_, _, what, g) in enumerate(_pretrain_groups(rs)):
        vals += _layer_line(ax, units, _mean_layerwise(g, "layerwise_nc1"), color=f"C{i % 10}",
                            label=what or "trained")
      _layer_xaxis(ax, units)
      _log_axis(ax, "y", vals)
      ax.set_ylabel("NC1 on the source training data", fontsize=_LABEL_SIZE)
      ax.set_title(f"{model_name(model)} trained on {dataset_name(dataset)}", fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return panels


def _transfer_layer_rows(records: Sequence[Mapping]) -> list[tuple[list[Panel], bool]]:
  """Figs. 10 / 14: per (model, dataset), one panel per fine-tuned unit of a unit sweep with
  the methods that tuned that unit and the ones without a unit (linear probe, full FT) as
  reference; without a sweep one panel with every method. The tuned unit is marked."""
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  rows, single = [], []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    swept = {r["method"] for r in rs if r["method"] in split and r["unit"]}
    units = _layer_units(rs)
    tuned_all = sorted({r["unit"] for r in rs if r["unit"]}, key=_natural_key)
    panels_units = ([u for u in tuned_all if any(r["unit"] == u and r["method"] in swept
                                                 for r in rs)] if swept else [None])
    panels = []
    for i, tuned in enumerate(panels_units):
      sel = [r for r in rs if tuned is None or r["method"] not in swept or r["unit"] == tuned]

      # The panels of a sweep row draw the same methods: one legend per row is enough.
      def panel(ax, sel=sel, tuned=tuned, key=key, units=units, legend=i == 0):
        lines: dict[tuple, list] = OrderedDict()
        for r in sorted(sel, key=lambda r: (rank[r["method"]], _natural_key(r["unit"]))):
          lines.setdefault(_row_key(r, split), []).append(r)
        vals = []
        for (method, unit), g in lines.items():
          vals += _layer_line(ax, units, _mean_layerwise(g, "layerwise_nc1"),
                              color=_method_color(method, rank),
                              label=_row_label((method, unit if tuned is None else None)))
        marks = [tuned] if tuned else sorted({r["unit"] for r in sel if r["unit"]},
                                             key=_natural_key)
        for u in marks:
          if u in units:
            ax.axvline(units.index(u) + 1, color="0.6", ls=":", lw=1)
        _layer_xaxis(ax, units)
        _log_axis(ax, "y", vals)
        ax.set_ylabel("NC1 on the downstream training data", fontsize=_LABEL_SIZE)
        what = f": {tuned} fine-tuned" if tuned else (
            f" (dotted: {', '.join(m for m in marks if m in units)} fine-tuned)" if marks else "")
        ax.set_title(cols.label(key) + what, fontsize=9)
        if legend:
          ax.legend(fontsize=7)
      panels.append(panel)
    if swept:
      rows.append((panels, True))
    else:
      single += panels
  return rows + [(row, False) for row in _pack(single)]


def _layer_points(r: Mapping) -> bool:
  return sum(_positive(v) is not None for v in (r["layerwise_nc1"] or {}).values()) >= 2


def plot_layerwise_nc1(records: Sequence[Mapping], path: str) -> str | None:
  """NC1 of each layer's feature against the layer (log y). Pre-training records: Fig. 2,
  NC1 on the source training data, one panel per (model, source dataset), a line per
  variant or loss. Transfer records: Figs. 10 / 14, NC1 on the downstream training data; a
  unit sweep gives one row per (model, dataset) and one panel per fine-tuned unit (linear
  probe, Layer FT and SCL FT of that unit, full FT), rows sharing their y axis. Variant
  sweeps and layer probes are left to their own plots. Returns ``path``, or None when no
  record has NC1 for two layers or more."""
  kinds = split_kinds(records)
  rows: list[tuple[list[Panel], bool]] = []
  pre = [r for r in kinds.get("pretrain", []) if _layer_points(r)]
  if pre:
    rows += [(row, False) for row in _pack(_pretrain_layer_panels(pre))]
  tr = [r for r in kinds.get("transfer", []) if _layer_points(r)]
  if tr:
    rows += _transfer_layer_rows(tr)
  if not rows:
    return None
  title = ("Layer-wise NC1 of the pre-trained models (Fig. 2)" if not tr else
           "Layer-wise NC1 per method (Figs. 10, 14)" if not pre else
           "Layer-wise NC1: pre-training (Fig. 2) and fine-tuning (Figs. 10, 14)")
  return _draw(path, rows, title)


# --- NC1 against accuracy (Figs. 5, 9, 13; Tables 1, 3)


def _probe_panels(r: Mapping, label: str) -> list[Panel] | None:
  """Fig. 9: (left) probe accuracy and NC1 against the layer, (right) accuracy against NC1."""
  acc, nc1 = r.get("layerwise_accuracy") or {}, r["layerwise_nc1"] or {}
  units = [u for u in nc1 if u in acc and _positive(nc1[u]) is not None
           and _num(acc[u]) is not None]
  if len(units) < 2:
    return None
  d = dataset_name(r["dataset"])
  xs, ys = [float(nc1[u]) for u in units], [float(acc[u]) for u in units]

  def left(ax):
    ax.plot(range(1, len(units) + 1), ys, color="C0", marker="o", ms=4)
    ax.set_ylabel("linear-probe test accuracy (%)", fontsize=_LABEL_SIZE, color="C0")
    _layer_xaxis(ax, units)
    twin = ax.twinx()
    twin.plot(range(1, len(units) + 1), xs, color="C3", marker="s", ms=4, ls="--")
    _log_axis(twin, "y", xs)
    twin.set_ylabel(f"NC1 on the {d} training data", fontsize=_LABEL_SIZE, color="C3")
    # Coloured axes and the title say which line is which: a legend would sit on a line.
    ax.set_title(f"{label}: probe accuracy (blue), NC1 (red)", fontsize=9)

  def right(ax):
    names = [_unit_number(u) for u in units]
    ax.scatter(xs, ys, color="C0", s=22, zorder=3)
    _annotate(ax, xs, ys, names)
    _fit_line(ax, xs, ys)
    _log_axis(ax, "x", xs, room=0.1)
    ax.margins(y=0.1)
    ax.set_xlabel(f"NC1 of the layer's feature on the {d} training data", fontsize=_LABEL_SIZE)
    ax.set_ylabel("linear-probe test accuracy (%)", fontsize=_LABEL_SIZE)
    ax.set_title(f"{label}: accuracy vs NC1 (points: layers)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return [left, right]


def _transfer_nc1_panels(records: Sequence[Mapping]) -> list[Panel]:
  """Per (model, dataset) column with two results or more: transfer accuracy against the
  penultimate NC1 on that dataset's training data, a point per method (and unit)."""
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  panels = []
  for key in cols.keys:
    groups: dict[tuple, list] = OrderedDict()
    for r in records:
      if cols.key(r) == key:
        groups.setdefault(_row_key(r, split), []).append(r)
    pts = [(row, _mean(r["nc1"] for r in g), _mean(r["accuracy"] for r in g))
           for row, g in groups.items()]
    pts = [(row, x, y) for row, x, y in pts if _positive(x) is not None and y is not None]
    if len(pts) < 2:
      continue
    pts.sort(key=lambda p: (rank[p[0][0]], _natural_key(p[0][1])))

    def panel(ax, pts=pts, key=key):
      for m in _first_seen(row[0] for row, _, _ in pts):
        sel = [(row, x, y) for row, x, y in pts if row[0] == m]
        ax.scatter([p[1] for p in sel], [p[2] for p in sel], color=_method_color(m, rank),
                   s=26, zorder=3, label=method_name(m))
        if m in split:  # the unit's number: "block7" labels would cover each other
          _annotate(ax, [p[1] for p in sel], [p[2] for p in sel],
                    [_unit_number(p[0][1]) for p in sel], color=_method_color(m, rank))
      _fit_line(ax, [p[1] for p in pts], [p[2] for p in pts])
      _log_axis(ax, "x", [p[1] for p in pts], room=0.1)
      ax.margins(y=0.1)
      ax.set_xlabel(f"penultimate NC1 on the {dataset_name(key[1])} training data",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer test accuracy (%)", fontsize=_LABEL_SIZE)
      swept = [row[1] for row, _, _ in pts if row[0] in split]
      ax.set_title(cols.label(key) + (f" (numbers: fine-tuned {_unit_kind(swept)})"
                                       if swept else ""), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return panels


def _variant_panels(records: Sequence[Mapping], x_of: Callable[[str, str, str, list], Any],
                    xlabel: Callable[[str], str], fit: bool) -> list[tuple[str, list[Panel]]]:
  """Variant-sweep scatter panels grouped by downstream dataset: [(dataset, panels)], one
  panel per (model, method) with >= 2 variants that have x and accuracy; ``x_of(model,
  dataset, method, tag) -> x``."""
  several_models = len({r["model"] for r in records}) > 1
  rank = _method_rank(records)
  out = []
  for dataset in _first_seen(r["dataset"] for r in records):
    panels = []
    combos = _first_seen((r["model"], r["method"]) for r in records if r["dataset"] == dataset)
    for model, method in sorted(combos, key=lambda c: rank[c[1]]):
      pts = []
      for tag, g in _variant_points(records, model, dataset, method):
        x, y = _positive(x_of(model, dataset, method, tag)), _mean(r["accuracy"] for r in g)
        if x is not None and y is not None:
          pts.append((tag or MISSING, x, y))
      if len(pts) < 2:
        continue

      def panel(ax, pts=pts, model=model, method=method, dataset=dataset):
        _variant_scatter(ax, pts, fit)
        ax.margins(y=0.12)  # room for the point labels
        ax.set_xlabel(xlabel(dataset), fontsize=_LABEL_SIZE)
        ax.set_ylabel(f"{dataset_name(dataset)} test accuracy (%)", fontsize=_LABEL_SIZE)
        ax.set_title((f"{model_name(model)}: " if several_models else "")
                     + f"{method_name(method)} on {dataset_name(dataset)}"
                     + ("" if fit else _r_note(pts)), fontsize=9)
      panels.append((panel, [p[1] for p in pts]))
    if panels:
      out.append((dataset, panels))
  return out


def _variant_rows(groups, share_x: bool) -> list[tuple[list[Panel], bool]]:
  """Lays out `_variant_panels` groups: a row per downstream dataset sharing its y axis when
  a dataset has several panels (methods, models), else all panels in rows of 4 (datasets
  differ in accuracy range: Aircraft ~40%, CIFAR-10 ~85%, so no shared y). ``share_x``:
  every panel gets the same x range (the x quantity is the same for all panels)."""
  xs = [x for _, ps in groups for _, px in ps for x in px]

  def wrap(p, px):
    def panel(ax):
      p(ax)
      _log_axis(ax, "x", xs if share_x else px, room=0.2)
    return panel
  if any(len(ps) > 1 for _, ps in groups):
    return [(row, True) for _, ps in groups for row in _pack([wrap(*q) for q in ps], 4)]
  return [(row, False) for row in _pack([wrap(*q) for _, ps in groups for q in ps], 4)]


def _nc1_by_variant(records: Sequence[Mapping]) -> dict[tuple, float | None]:
  """(model, dataset, method, tag) -> mean penultimate NC1 on that dataset."""
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["model"], r["dataset"], r["method"], _tag(r)), []).append(r["nc1"])
  return {k: _mean(v) for k, v in groups.items()}


def plot_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Accuracy against NC1 measured on the same downstream training data (log x).

  * Layer probes (Fig. 9): a row per (model, dataset): left, probe accuracy and NC1
    against the layer; right, accuracy against NC1 over the layers with a least-squares
    line (accuracy on log10 NC1) and Pearson's r.
  * Transfer records (Table 3): a panel per (model, dataset) with >= 2 results, a point per
    method (and unit of a sweep), with the fit when there are >= 3.
  * Variant sweeps (Fig. 13): a panel per downstream dataset (and method), a point per
    pre-training variant labelled by its tag, coloured by family, with the fit.
  Returns None when nothing has NC1 and accuracy for two points (e.g. ``collapse=False``)."""
  kinds = split_kinds(records)
  rows: list[tuple[list[Panel], bool]] = []
  titles = []
  probes = kinds.get("probe", [])
  pcols = _Columns(probes) if probes else None
  for r in probes:
    p = _probe_panels(r, pcols.label(pcols.key(r)))
    if p:
      rows.append((p, False))
  if len(rows):
    titles.append("Layer-wise transfer: probe accuracy and NC1 of each layer (Fig. 9)")
  if kinds.get("transfer"):
    panels = _transfer_nc1_panels(kinds["transfer"])
    if panels:
      rows += [(row, False) for row in _pack(panels)]
      titles.append("Transfer accuracy vs penultimate NC1 per fine-tuning method")
  if kinds.get("variants"):
    rs = kinds["variants"]
    nc1 = _nc1_by_variant(rs)
    groups = _variant_panels(
        rs, lambda m, d, meth, t: nc1.get((m, d, meth, t)),
        lambda d: f"penultimate NC1 on the {dataset_name(d)} training data", fit=True)
    vrows = _variant_rows(groups, share_x=False)
    if vrows:
      rows += vrows
      titles.append("Transfer accuracy vs NC1 on each downstream dataset (Fig. 13)")
  if not rows:
    return None
  return _draw(path, rows, "; ".join(titles))


def plot_source_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Table 1 / Figs. 3, 4: transfer accuracy (y) against the pre-trained model's NC1 on its
  *source* training data (``source_nc1``, x, log) over the variants of a sweep, each point
  labelled by its variant tag, one colour per family (aug1-aug5, adv1-adv8, ...). One panel
  per (downstream dataset, method); all panels share x (the source NC1 of a variant is the
  same everywhere) and a dataset's panels share y. Returns None unless the records are a
  variant sweep (`is_variant_sweep`) with two variants or more in some panel."""
  rs = split_kinds(records).get("variants")
  if not rs:
    return None
  src = {}
  for r in rs:
    src.setdefault((r["model"], _tag(r)), []).append(r.get("source_nc1"))
  groups = _variant_panels(rs, lambda m, d, meth, t: _mean(src.get((m, t), [])),
                           lambda d: "NC1 of the pre-trained model on the source training data",
                           fit=False)
  rows = _variant_rows(groups, share_x=True)
  if not rows:
    return None
  return _draw(path, rows, "Source NC1 vs transfer accuracy across pre-training variants "
               "(Table 1, Figs. 3, 4)", sharex=True)


def plot_reference_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 5: transfer accuracy on each downstream dataset (one panel each) against the NC1
  of the same pre-trained variant measured on one reference dataset (CIFAR-10 when present,
  `reference_dataset`), a point per variant, with a least-squares line and Pearson's r.
  Only for variant sweeps over two downstream datasets or more (else it is Fig. 13's
  ``nc1_vs_accuracy.png``); returns None otherwise."""
  rs = split_kinds(records).get("variants")
  if not rs or len({r["dataset"] for r in rs}) < 2:
    return None
  ref = reference_dataset(rs)
  nc1 = _nc1_by_variant(rs)
  groups = _variant_panels(rs, lambda m, d, meth, t: nc1.get((m, ref, meth, t)),
                           lambda d: f"penultimate NC1 on the {dataset_name(ref)} training data",
                           fit=True)
  rows = _variant_rows(groups, share_x=True)
  if not rows:
    return None
  return _draw(path, rows, f"Transfer accuracy vs NC1 on {dataset_name(ref)} (Fig. 5)",
               sharex=True)


def plot_accuracy_vs_size(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 11: transfer accuracy (percent) against ``num_train`` (log x), one line per
  method (and unit for swept methods), one subplot per (model, dataset) that has more
  than one ``num_train`` value; seeds at one size are averaged. Returns None when no
  (model, dataset) has several sizes."""
  records = split_kinds(records).get("transfer", [])
  if not records:
    return None
  cols = _Columns(records, by_size=False)
  keys = [k for k in cols.keys
          if len({int(r["num_train"]) for r in records if cols.key(r) == k}) > 1]
  if not keys:
    return None
  split = _split_methods(records, lambda r: (cols.key(r), int(r["num_train"])))
  rank = _method_rank(records)
  panels = []
  for key in keys:
    def panel(ax, key=key):
      lines: dict[tuple, dict[int, list]] = {}
      for r in records:
        if cols.key(r) == key:
          lines.setdefault(_row_key(r, split), {}).setdefault(int(r["num_train"]), []).append(
              r["accuracy"])
      sizes = []
      for row in _ordered_rows(lines, rank):
        pts = [(n, _mean(v)) for n, v in sorted(lines[row].items())]
        pts = [(n, a) for n, a in pts if a is not None]
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5,
                  color=_method_color(row[0], rank), label=_row_label(row))
          sizes += [p[0] for p in pts]
      _log_axis(ax, "x", sizes)
      ax.set_xlabel("downstream training examples", fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer test accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(cols.label(key), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return _draw(path, [(row, False) for row in _pack(panels)],
               "Transfer accuracy vs downstream training-set size (Fig. 11)")


_SHOT_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_nc1_vs_fewshot_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Table 2's negative correlation: few-shot accuracy (y) against the penultimate NC1 on
  the meta-test classes (x, log), one panel per dataset, one point per (model, shots)
  labelled by the model, one marker and colour per (ways, shots) setting with Pearson's r
  of accuracy with log10 NC1 over the models in the legend (3 models or more). Returns None
  unless some dataset has two points with NC1 and accuracy."""
  rs = split_kinds(records).get("fewshot", [])
  if not rs:
    return None
  keys, key, label = _fewshot_columns(rs)
  panels = []
  for d in _first_seen(r["dataset"] for r in rs):
    settings = sorted({_setting(r) for r in rs if r["dataset"] == d})
    series = []
    for s in settings:
      pts = []
      for k in keys:
        g = [r for r in rs if r["dataset"] == d and key(r) == k and _setting(r) == s]
        x, y = _positive(_mean(r["nc1"] for r in g)), _mean(r["accuracy"] for r in g)
        if g and x is not None and y is not None:
          pts.append((label(k), x, y))
      if pts:
        series.append((s, pts))
    if sum(len(p) for _, p in series) < 2:
      continue

    def panel(ax, d=d, series=series):
      xs = []
      for i, ((ways, shots), pts) in enumerate(series):
        r_, n = _log_r([(x, y) for _, x, y in pts])
        note = f" (r = {r_:+.2f})" if n >= 3 and not math.isnan(r_) else ""
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], color=f"C{i % 10}",
                   marker=_SHOT_MARKERS[i % len(_SHOT_MARKERS)], s=30, zorder=3,
                   label=f"{ways}-way {shots}-shot{note}")
        _annotate(ax, [p[1] for p in pts], [p[2] for p in pts], [p[0] for p in pts],
                  color=f"C{i % 10}")
        xs += [p[1] for p in pts]
      _log_axis(ax, "x", xs, room=0.25)
      ax.margins(y=0.12)
      ax.set_xlabel(f"penultimate NC1 on the meta-test classes ({dataset_name(d)})",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("few-shot query accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(f"{dataset_name(d)}: few-shot accuracy vs NC1 (points: models)",
                   fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  if not panels:
    return None
  return _draw(path, [(row, False) for row in _pack(panels)],
               "Few-shot accuracy vs NC1 of the frozen embeddings on the meta-test classes "
               "(Table 2)")


# ----------------------------------------------------------------------------- ranking

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


def rank_table(records: Sequence[Mapping]) -> str:
  """Job ``rank`` (`ncjax.ranking`): per (dataset, fine-tuning method) one table, a row per
  candidate with its measured accuracy and every estimator's score (higher = predicted to
  transfer better), then each estimator's Kendall tau and weighted tau against the
  accuracy, and its mean seconds beside one fine-tuning's."""
  rs = [r for r in validate(records) if stage(r) == "rank"]
  ests = _estimators(rs)
  out = []
  for d, (method, unit), g in _rank_groups(rs):
    truth = method_name(method) + (f" ({unit})" if unit else "")
    lines = [f"### {dataset_name(d)}: {truth} accuracy as the ground truth", "",
             _md_row(["Candidate", "Accuracy"] + [ESTIMATOR_NAMES.get(e, e) for e in ests]),
             "|:--|--:" + "|--:" * len(ests) + "|"]
    for r in sorted(g, key=lambda r: -(_num(r["accuracy"]) or -math.inf)):
      lines.append(_md_row([r["candidate"], fmt_accuracy(r["accuracy"])]
                           + [fmt_sig(r.get(f"score_{e}")) for e in ests]))
    for title, field in (("Kendall tau", "kendall_tau"), ("weighted tau", "weighted_tau")):
      lines.append(_md_row([f"**{title}**", ""] + [fmt_r(g[0].get(f"{field}_{e}"))
                                                   for e in ests]))
    tune = _mean(r.get("finetune_wall_s") for r in g)
    lines.append(_md_row(["**seconds** (one fine-tuning: "
                          f"{'–' if tune is None else f'{tune:.1f}'})", ""]
                         + [fmt_sig(_mean(r.get(f"seconds_{e}") for r in g)) for e in ests]))
    out.append("\n".join(lines))
  return "\n\n".join(out) + ("\n" if out else "")


def plot_scores_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """One panel per estimator: the measured accuracy (y) of every candidate against its score
  (x), a colour per (dataset, method) with Kendall's tau in the legend. None without rank
  records of two candidates."""
  rs = split_kinds(records).get("rank", [])
  groups = [(d, mu, g) for d, mu, g in _rank_groups(rs) if len(g) >= 2]
  if not groups:
    return None
  one_model = len({r["model"] for r in rs}) == 1  # then the variant tag names a point
  name = lambda r: (r.get("pretrain") if one_model and r.get("pretrain") else r["candidate"])
  panels = []
  for e in _estimators(rs):
    def panel(ax, e=e):
      for i, (d, (method, unit), g) in enumerate(groups):
        pts = [(r[f"score_{e}"], r["accuracy"], name(r)) for r in g
               if _num(r.get(f"score_{e}")) is not None and _num(r["accuracy"]) is not None]
        if not pts:
          continue
        tau = g[0].get(f"kendall_tau_{e}")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", s=30,
                   zorder=3, label=f"{dataset_name(d)}, {method_name(method)} "
                   f"(tau = {fmt_r(tau)})")
        _annotate(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                  color=f"C{i % 10}")
      ax.margins(x=0.2, y=0.12)
      ax.set_xlabel(f"{ESTIMATOR_NAMES.get(e, e)} score (higher: predicted better)",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(ESTIMATOR_NAMES.get(e, e), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return _draw(path, [(row, True) for row in _pack(panels)],
               "Transferability scores of the frozen candidates vs their transfer accuracy")


# ----------------------------------------------------------------------------- all

# What write_all may write, in order; a rerun removes the ones the records no longer support.
PLOTS = (
    ("layerwise_nc1.png", plot_layerwise_nc1),
    ("nc1_vs_accuracy.png", plot_nc1_vs_accuracy),
    ("reference_nc1_vs_accuracy.png", plot_reference_nc1_vs_accuracy),
    ("source_nc1_vs_accuracy.png", plot_source_nc1_vs_accuracy),
    ("accuracy_vs_size.png", plot_accuracy_vs_size),
    ("nc1_vs_fewshot_accuracy.png", plot_nc1_vs_fewshot_accuracy),
    ("scores_vs_accuracy.png", plot_scores_vs_accuracy),
)


def report_markdown(records: Sequence[Mapping]) -> str:
  """results.md: for each kind of record (`split_kinds`) a "## <what it reproduces>" section
  with its main table (`markdown_table`); transfer records swept over units add Table 4
  (`best_unit_table`), variant sweeps the correlation of accuracy with NC1
  (`correlation_table`)."""
  out = []
  for kind, rs in split_kinds(records).items():
    out.append(f"## {_KIND_TITLES[kind]}\n\n{_main_table(kind, rs)}")
    if kind == "transfer":
      best = best_unit_table(rs)
      if best:
        out.append("## Best unit per method (Table 4)\n\nLayer FT / SCL FT: the unit of "
                   "each sweep with the highest transfer accuracy (ties: the unit nearer the "
                   "input).\n\n" + best)
      auto = auto_unit_table(rs)
      if auto:
        out.append("## Units chosen by NC\n\nLayer FT / SCL FT with `unit=auto`: a short "
                   "probe per candidate unit, then the unit with the lowest penultimate NC1 "
                   "on the training data is fine-tuned fully. Costs are fractions of the "
                   "compute (XLA flops) of fine-tuning every candidate fully.\n\n" + auto)
    if kind == "variants":
      out.append("## Does NC1 predict transfer accuracy?\n\nPearson's r of the transfer "
                 "accuracy with log10 NC1 over the pre-training variants (r > 0: more NC1, "
                 "more accuracy).\n\n" + correlation_table(rs))
  return "\n".join(out)


def write_all(records: Sequence[Mapping], workdir: str, plots: bool = True) -> list[str]:
  """Writes ``results.json``, ``results.csv``, ``results.md`` (`report_markdown`) and, if
  ``plots``, the PNGs of `PLOTS` that the records support into ``workdir``; a PNG of `PLOTS`
  left there by an earlier report that these records do not support is removed, so the
  workdir never shows a plot of other results. Returns the paths written."""
  records = validate(records)
  os.makedirs(workdir, exist_ok=True)
  paths = [
      write_json(records, os.path.join(workdir, "results.json")),
      write_csv(records, os.path.join(workdir, "results.csv")),
      atomic_write(os.path.join(workdir, "results.md"), report_markdown(records)),
  ]
  if plots:
    for name, fn in PLOTS:
      target = os.path.join(workdir, name)
      p = fn(records, target)
      if p is not None:
        paths.append(p)
      elif os.path.exists(target):
        os.remove(target)
  return paths
