"""Results records -> JSON / CSV / Markdown tables / PNG plots.

This module only formats what ``ncjax.train`` produced; it imports numpy, json, csv and
(lazily, inside the plotting functions) matplotlib through the Agg canvas. It never imports
jax, the models or the training code, and it never touches pyplot's global state.

Results records
---------------
A record is a dict. Required fields (``REQUIRED_FIELDS``):

* ``model`` (str): model name as in ``ncjax.models.get`` (``resnet18``, ``vit_b32``, ...).
* ``dataset`` (str): downstream dataset name (``cifar10``, ``dtd``, ``folder:<dir>`` ...).
* ``method`` (str): ``linear`` | ``layer`` | ``scl`` | ``full`` (others are shown as-is).
* ``unit`` (str or None): the fine-tuned unit (``block5``, ``layer8``); None for
  methods without one.
* ``accuracy`` (float): downstream test accuracy in **percent** (0-100).
* ``nc1`` (float): NC1 of the penultimate feature on the downstream *train* data
  (dimensionless, >= 0).
* ``cdnv`` (float): class-distance normalised variance of the penultimate feature.
* ``numerical_rank`` (float): numerical rank of the penultimate feature.
* ``percent_params`` (float): share of the model's parameters fine-tuned, in **percent**
  (0-100; 100 for full fine-tuning).
* ``layerwise_nc1`` (dict unit -> float): NC1 of each unit's pooled feature, in network
  order (may be empty).
* ``num_train`` (int): number of downstream training examples used.

Optional fields: ``layerwise_accuracy`` (dict unit -> float, percent; accuracy of a linear
probe on each unit's feature, Fig. 9), ``pretrain`` (str tag of the pre-training source),
``seed`` (int), ``wall_s`` (float, seconds). Any other field is carried through JSON and CSV.

Numeric fields may be None or NaN (shown as "–"); a *missing* required field is an error
(``ValueError`` naming the field and the record's index).

Tables
------
``markdown_table`` lays records out like the paper's Table 3: one column per (model,
dataset) pair in first-seen order, and three sections (transfer accuracy, penultimate NC1,
percentage of parameters fine-tuned) with one row per method. If one (model, dataset) pair
has records with several ``pretrain`` tags, the tag is added to the column
("ViT-B/32 [jft] / DTD"); if it has several ``num_train`` values there is one column per
size ("ResNet18 / Cifar-10 (n=500)"). Records that share a cell (e.g. several seeds) are
averaged. ``unit_sweep_table`` gives the Tables 5-7 layout (rows = units).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
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
    "write_json",
    "read_json",
    "write_csv",
    "read_csv",
    "markdown_table",
    "unit_sweep_table",
    "print_table",
    "plot_layerwise_nc1",
    "plot_nc1_vs_accuracy",
    "plot_accuracy_vs_size",
    "pearson_r",
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
OPTIONAL_FIELDS = ("layerwise_accuracy", "pretrain", "seed", "wall_s", "source_nc1",
                   "source_accuracy")

_STRING_FIELDS = ("model", "dataset", "method", "unit", "pretrain")
_FLOAT_FIELDS = ("accuracy", "nc1", "cdnv", "numerical_rank", "percent_params", "wall_s",
                 "source_nc1", "source_accuracy")
_INT_FIELDS = ("num_train", "seed")
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
}

# Sections of the Table 3 layout: (title, field, formatter name).
_SECTION_TITLES = {
    "accuracy": "Transfer accuracy",
    "nc1": "NC1 evaluated on the penultimate layer feature",
    "percent_params": "Percentage of parameters fine-tuned",
    "cdnv": "CDNV of the penultimate layer feature",
    "numerical_rank": "Numerical rank of the penultimate layer feature",
    "source_nc1": "NC1 of the pre-trained model on the source data",
    "source_accuracy": "Source test accuracy of the pre-trained model",
}
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
    units.setdefault((colkey(r), r["method"]), set()).add(r["unit"])
  return {m for (_, m), us in units.items() if len(us) > 1}


def _row_key(r: Mapping, split: set) -> tuple:
  return (r["method"], r["unit"] if r["method"] in split else None)


def _row_label(row: tuple) -> str:
  method, unit = row
  return method_name(method) + (f" ({unit})" if unit is not None else "")


def _ordered_rows(rows: Iterable[tuple], rank: Mapping[str, int]) -> list[tuple]:
  return sorted(set(rows), key=lambda mu: (rank[mu[0]], _natural_key(mu[1])))


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


def fmt_percent(v: Any) -> str:
  """Percentage of parameters: "8.27%", and "100%" for 100; "–" when missing."""
  v = _num(v)
  if v is None:
    return MISSING
  if round(v, 2) == 100.0:
    return "100%"
  return f"{v:.2f}%"


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
  """`DEFAULT_SECTIONS`, plus the source-data sections when records carry them (Table 1)."""
  extra = tuple(f for f in ("source_nc1", "source_accuracy")
                if any(_num(r.get(f)) is not None for r in records))
  return DEFAULT_SECTIONS + extra


def _md_escape(s: str) -> str:
  return s.replace("|", "\\|")


def _md_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(_md_escape(c) for c in cells) + " |"


# ----------------------------------------------------------------------------- tables


def markdown_table(records: Sequence[Mapping], sections: Sequence[str] | None = None) -> str:
  """Table 3 layout as GitHub Markdown.

  Columns: (model, dataset) pairs in first-seen order, headed "ResNet18 / Cifar-10".
  Sections (default): "Transfer accuracy" (percent, 2 decimals), "NC1 evaluated on the
  penultimate layer feature" (2 decimals), "Percentage of parameters fine-tuned" ("8.27%",
  "100%"), and the source-data NC1 / accuracy when records carry ``source_nc1`` (Table 1);
  ``sections`` may also name ``cdnv`` and ``numerical_rank``. Rows: one per method
  in the order linear, layer, scl, full, then others in first-seen order. A method that
  has several units within one column (a unit sweep) gets one row per unit, labelled
  "Layer FT (block5)". Missing cells are "–"; records sharing a cell are averaged.
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

  n = len(cols.keys)
  lines = [
      _md_row(["Method"] + [cols.label(k) for k in cols.keys]),
      "|:--" + "|--:" * n + "|",
  ]
  for field in sections:
    fmt = _FORMATTERS[field]
    lines.append(_md_row([f"**{_SECTION_TITLES[field]}**"] + [""] * n))
    for row in rows:
      vals = []
      for k in cols.keys:
        rs = cells.get((k, row))
        vals.append(fmt(_mean(r[field] for r in rs)) if rs else MISSING)
      lines.append(_md_row([_row_label(row)] + vals))
  return "\n".join(lines) + "\n"


def unit_sweep_table(records: Sequence[Mapping], min_units: int = 1) -> str:
  """Tables 5-7 layout, one Markdown table per (model, dataset): rows = units (natural
  order: block1, block3, ..., block10), columns = accuracy (percent), penultimate NC1 and
  percentage of parameters for each unit-wise method present (layer, scl, then others
  that have a unit). Linear probe / full fine-tuning results, if present, are given below
  each table as a reference line. Only (model, dataset) columns with at least
  ``min_units`` distinct units get a table. Returns "" when there is none.
  """
  records = validate(records)
  cols = _Columns(records)
  rank = _method_rank(records)
  out = []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    sweep = [r for r in rs if r["method"] not in ("linear", "full") and r["unit"] is not None]
    if not sweep:
      continue
    methods = sorted({r["method"] for r in sweep}, key=rank.__getitem__)
    units = sorted({r["unit"] for r in sweep}, key=_natural_key)
    if len(units) < min_units:
      continue
    groups: dict[tuple, list] = {}
    for r in sweep:
      groups.setdefault((r["unit"], r["method"]), []).append(r)
    header = ["Unit"]
    for title in ("acc", "NC1", "% params"):
      header += [f"{method_name(m)} {title}" for m in methods]
    lines = [f"### {cols.label(key)}", "", _md_row(header), "|:--" + "|--:" * (len(header) - 1) + "|"]
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


def print_table(records: Sequence[Mapping], file=None) -> str:
  """Prints ``markdown_table(records)`` (to ``file`` or stdout) and returns it."""
  text = markdown_table(records)
  print(text, end="", file=file)
  return text


# ----------------------------------------------------------------------------- plots


def _makedirs_for(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)


def _figure(nplots: int, ncols_max: int = 3, w: float = 4.2, h: float = 3.3):
  """A pyplot-free Figure on an Agg canvas with ``nplots`` axes (flat list)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ncols = min(nplots, ncols_max)
  nrows = -(-nplots // ncols)
  fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
  for ax in axes[nplots:]:
    ax.set_visible(False)
  return fig, axes[:nplots]


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


def plot_layerwise_nc1(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 10: layer-wise NC1 (log y) against unit index, one line per record (method, and
  unit when a method is swept), one subplot per (model, dataset). Returns ``path``, or
  None when no record has a non-empty ``layerwise_nc1``."""
  records = validate(records)
  usable = [r for r in records if r["layerwise_nc1"] and any(_positive(v) for v in r["layerwise_nc1"].values())]
  if not usable:
    return None
  cols = _Columns(usable)
  split = _split_methods(usable, cols.key)
  rank = _method_rank(usable)
  fig, axes = _figure(len(cols.keys))
  for ax, key in zip(axes, cols.keys):
    rs = [r for r in usable if cols.key(r) == key]
    units: list = []
    for r in rs:
      for u in r["layerwise_nc1"]:
        if u not in units:
          units.append(u)
    pos = {u: i for i, u in enumerate(units)}
    rs.sort(key=lambda r: (rank[r["method"]], _natural_key(r["unit"])))
    for r in rs:
      xs, ys = [], []
      for u, v in r["layerwise_nc1"].items():
        v = _positive(v)
        if v is not None:
          xs.append(pos[u])
          ys.append(v)
      ax.plot(xs, ys, marker="o", ms=3, label=_row_label(_row_key(r, split)))
    ax.set_yscale("log")
    ax.set_xticks(range(len(units)))
    ax.set_xticklabels(units, rotation=60, fontsize=7)
    ax.set_xlabel("unit")
    ax.set_ylabel("NC1")
    ax.set_title(cols.label(key), fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


def _scatter_with_fit(ax, xs, ys, label: str, annotate: Sequence[str] | None = None, **kw):
  ax.scatter(xs, ys, label=label, s=18, **kw)
  if annotate:
    for x, y, t in zip(xs, ys, annotate):
      ax.annotate(t, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")


def _fit_line(ax, xs, ys, color="k"):
  """Least-squares line of y on log10(x) (straight on the log-x axis), r in the legend."""
  lx = np.log10(np.asarray(xs, dtype=np.float64))
  ys = np.asarray(ys, dtype=np.float64)
  if lx.size < 3 or lx.std() == 0:
    return
  slope, icpt = np.polyfit(lx, ys, 1)
  grid = np.linspace(lx.min(), lx.max(), 50)
  r = pearson_r(lx, ys)
  ax.plot(10**grid, slope * grid + icpt, color=color, ls="--", lw=1,
          label=f"fit vs log10 NC1, r = {r:.2f}")


def plot_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 9: transfer accuracy (percent, y) against penultimate NC1 (x, log scale).

  First panel: one point per record (coloured by method) when at least two records have
  a positive NC1 and an accuracy, with a least-squares line (accuracy on log10 NC1) and
  its Pearson r in the legend when there are >= 3 points. Then one panel per record that
  has ``layerwise_accuracy``: points (layerwise_nc1[u], layerwise_accuracy[u]) over the
  units u, labelled by unit, with the same fit. Returns None when neither can be drawn.
  """
  records = validate(records)
  pts = [(r, _positive(r["nc1"]), _num(r["accuracy"])) for r in records]
  pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None]
  cross = len(pts) >= 2
  layer_panels = []
  for r in records:
    la = r.get("layerwise_accuracy") or {}
    lw = r["layerwise_nc1"] or {}
    us = [u for u in lw if u in la and _positive(lw[u]) is not None and _num(la[u]) is not None]
    if len(us) >= 2:
      layer_panels.append((r, us))
  if not cross and not layer_panels:
    return None
  fig, axes = _figure(int(cross) + len(layer_panels))
  cols = _Columns(records)
  it = iter(axes)
  if cross:
    ax = next(it)
    rank = _method_rank(records)
    for m in sorted({r["method"] for r, _, _ in pts}, key=rank.__getitem__):
      sel = [(x, y) for r, x, y in pts if r["method"] == m]
      _scatter_with_fit(ax, [p[0] for p in sel], [p[1] for p in sel], method_name(m))
    _fit_line(ax, [p[1] for p in pts], [p[2] for p in pts])
    ax.set_xscale("log")
    ax.set_xlabel("NC1 (penultimate, train)")
    ax.set_ylabel("transfer accuracy (%)")
    ax.set_title("all records", fontsize=9)
    ax.legend(fontsize=7)
  for (r, us), ax in zip(layer_panels, it):
    xs = [float(r["layerwise_nc1"][u]) for u in us]
    ys = [float(r["layerwise_accuracy"][u]) for u in us]
    _scatter_with_fit(ax, xs, ys, "units", annotate=us)
    _fit_line(ax, xs, ys)
    ax.set_xscale("log")
    ax.set_xlabel("NC1 of unit feature")
    ax.set_ylabel("linear-probe accuracy (%)")
    title = f"{cols.label(cols.key(r))}: {_row_label((r['method'], r['unit']))}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_source_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Table 1 / Fig. 4: transfer accuracy (percent, y) against the pre-trained model's NC1
  on the *source* data (``source_nc1``, x, log scale), one point per record labelled by its
  ``pretrain`` tag, one subplot per (model, dataset, method). Returns None unless some
  panel has two or more such points."""
  records = validate(records)
  panels: dict[tuple, list] = {}
  for r in records:
    x, y = _positive(r.get("source_nc1")), _num(r["accuracy"])
    if x is not None and y is not None:
      panels.setdefault((r["model"], r["dataset"], r["method"]), []).append(
          (x, y, str(r.get("pretrain") or "")))
  panels = {k: v for k, v in panels.items() if len(v) >= 2}
  if not panels:
    return None
  fig, axes = _figure(len(panels))
  for ((model, dataset, method), pts), ax in zip(panels.items(), axes):
    xs, ys, tags = zip(*pts)
    _scatter_with_fit(ax, xs, ys, method_name(method), annotate=tags)
    _fit_line(ax, xs, ys)
    ax.set_xscale("log")
    ax.set_xlabel("NC1 on the source data (pre-training)")
    ax.set_ylabel("transfer accuracy (%)")
    ax.set_title(f"{MODEL_NAMES.get(model, model)} / {DATASET_NAMES.get(dataset, dataset)}",
                 fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_accuracy_vs_size(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 11: transfer accuracy (percent) against ``num_train`` (log x), one line per
  method (and unit for swept methods), one subplot per (model, dataset) that has more
  than one ``num_train`` value; seeds at one size are averaged. Returns None when no
  (model, dataset) has several sizes."""
  records = validate(records)
  cols = _Columns(records, by_size=False)
  keys = [k for k in cols.keys if len({int(r["num_train"]) for r in records if cols.key(r) == k}) > 1]
  if not keys:
    return None
  split = _split_methods(records, lambda r: (cols.key(r), int(r["num_train"])))
  rank = _method_rank(records)
  fig, axes = _figure(len(keys))
  for ax, key in zip(axes, keys):
    rs = [r for r in records if cols.key(r) == key]
    lines: dict[tuple, dict[int, list]] = {}
    for r in rs:
      lines.setdefault(_row_key(r, split), {}).setdefault(int(r["num_train"]), []).append(r["accuracy"])
    for row in _ordered_rows(lines, rank):
      pts = sorted((n, _mean(v)) for n, v in lines[row].items())
      pts = [(n, a) for n, a in pts if a is not None]
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=_row_label(row))
    ax.set_xscale("log")
    ax.set_xlabel("downstream training examples")
    ax.set_ylabel("transfer accuracy (%)")
    ax.set_title(cols.label(key), fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


# ----------------------------------------------------------------------------- all


def write_all(records: Sequence[Mapping], workdir: str, plots: bool = True) -> list[str]:
  """Writes ``results.json``, ``results.csv``, ``results.md`` (Table 3 layout, plus the
  unit-sweep tables when a method was swept over units) and, if ``plots``, the PNGs the
  records support (``layerwise_nc1.png``, ``nc1_vs_accuracy.png``,
  ``accuracy_vs_size.png``, ``source_nc1_vs_accuracy.png``) into ``workdir``. Returns the paths written."""
  records = validate(records)
  os.makedirs(workdir, exist_ok=True)
  paths = [
      write_json(records, os.path.join(workdir, "results.json")),
      write_csv(records, os.path.join(workdir, "results.csv")),
  ]
  md = io.StringIO()
  md.write("## Transfer results\n\n")
  md.write(markdown_table(records))
  cols = _Columns(records)
  if _split_methods(records, cols.key):
    md.write("\n## Unit sweeps\n\n")
    md.write(unit_sweep_table(records, min_units=2))
  md_path = os.path.join(workdir, "results.md")
  paths.append(atomic_write(md_path, md.getvalue()))
  if plots:
    for fn, name in (
        (plot_layerwise_nc1, "layerwise_nc1.png"),
        (plot_nc1_vs_accuracy, "nc1_vs_accuracy.png"),
        (plot_accuracy_vs_size, "accuracy_vs_size.png"),
        (plot_source_nc1_vs_accuracy, "source_nc1_vs_accuracy.png"),
    ):
      p = fn(records, os.path.join(workdir, name))
      if p is not None:
        paths.append(p)
  return paths
