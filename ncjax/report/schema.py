"""The one record schema: `Record` (what every run leaves), the report's checks of it and its
JSON / CSV files.

The column types of results.csv come from `Record`'s own field types, so a field added there
reads back with its type. JSON follows `ncjax.io`'s one NaN rule: a non-finite float is
written as ``null`` and a float field reads ``null`` back as NaN.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ncjax.io import NAN, atomic_write, dumps


@dataclasses.dataclass
class Record:
  """The result of one run. Accuracies are in percent (0-100); NaN where not measured."""
  model: str
  dataset: str               # downstream dataset (the source dataset for pre-training)
  method: str                # linear | layer | scl | full
  unit: str                  # the fine-tuned unit ('' for linear / full)
  accuracy: float = NAN      # test accuracy, percent
  nc1: float = NAN           # penultimate NC1 on the training data
  cdnv: float = NAN
  numerical_rank: float = NAN
  percent_params: float = NAN  # trainable parameters / all, percent
  layerwise_nc1: dict = dataclasses.field(default_factory=dict)        # unit -> NC1
  layerwise_accuracy: dict = dataclasses.field(default_factory=dict)   # unit -> percent
  num_train: int = 0
  num_test: int = 0
  num_classes: int = 0
  steps: int = 0             # optimizer steps
  batch_size: int = 0        # global batch, examples
  weights: str = ""          # where the initial weights came from: a path | pretrain | scratch
  normalization: str = ""    # input mean / std: dataset | imagenet | ... | checkpoint:<file>
  seed: int = 0
  final_train_loss: float = NAN  # mean loss of the last log window
  stage: str = "transfer"    # transfer | pretrain | probe | fewshot | unit_probe | score
  run: str = ""              # the run id (`ncjax.experiment.spec.Run.id`)
  pretrain: str = ""         # variant tag of the pre-training source
  loss: str = ""             # pre-training loss (pre-training records)
  projection_layers: int = 0
  adversarial_eps: float = 0.0
  aug_level: int = 0
  ways: int = 0              # few-shot episodes: classes, support images and queries per class
  shots: int = 0
  queries: int = 0
  episodes: int = 0
  ci95: float = NAN          # few-shot: 95% confidence half-width of `accuracy`, percent
  unit_choice: dict = dataclasses.field(default_factory=dict)  # unit=auto: unit -> its probe
  unit_selector: str = ""    # unit=auto: nc (probe NC1) | rgn (Auto-RGN)
  lora_rank: int = 0         # method lora: the rank of its updates
  step_s: float = NAN        # median seconds per train step over the log windows after the
                             # first (which compiles); the machine's load included
  probe_cost_fraction: float = NAN  # unit=auto: probes' compute / the whole unit sweep's
  cost_fraction: float = NAN  # unit=auto: (probes + the chosen unit's run) / the unit sweep
  regret: float = NAN        # unit=auto: best swept unit's accuracy - the chosen's, points
  candidate: str = ""        # job rank: the pre-trained model scored ([<variant tag>/]<model>)
  scores: dict = dataclasses.field(default_factory=dict)  # job rank: estimator -> score
  score_wall_s: dict = dataclasses.field(default_factory=dict)  # estimator -> seconds
  # job rank: estimators that found the candidate's features constant (transferability.WORST)
  degenerate: list = dataclasses.field(default_factory=list)
  source_nc1: float = NAN    # NC1 of the source training data (transfer records after pretrain)
  source_accuracy: float = NAN
  wall_s: float = NAN        # seconds this run took (the only field a rerun may change)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Record":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown record fields {sorted(unknown)}")
    return cls(**{k: (NAN if v is None and isinstance(getattr(cls, k, None), float) else v)
                  for k, v in d.items()})


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
OPTIONAL_FIELDS = tuple(f.name for f in dataclasses.fields(Record)
                        if f.name not in REQUIRED_FIELDS)

# Typed CSV columns, from `Record` (its annotations are strings under `annotations`); strings
# are typed so that a tag like "1" does not come back an int.
_TYPES = {f.name: f.type for f in dataclasses.fields(Record)}
_STRING_FIELDS = tuple(n for n, t in _TYPES.items() if t == "str")
_FLOAT_FIELDS = tuple(n for n, t in _TYPES.items() if t == "float")
_INT_FIELDS = tuple(n for n, t in _TYPES.items() if t == "int")
_DICT_FIELDS = tuple(n for n, t in _TYPES.items() if t == "dict")
_LAYERWISE_FIELDS = ("layerwise_nc1", "layerwise_accuracy")


def is_number(v: Any) -> bool:
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
      if r[f] is not None and not is_number(r[f]):
        raise ValueError(f"record {i}: field '{f}' must be a number, got {r[f]!r}")
    if not is_number(r["num_train"]) or not float(r["num_train"]).is_integer():
      raise ValueError(f"record {i}: field 'num_train' must be an int, got {r['num_train']!r}")
    for f in _LAYERWISE_FIELDS:
      if f in r and r[f] is not None and not isinstance(r[f], Mapping):
        raise ValueError(f"record {i}: field '{f}' must be a dict unit -> float")
    if stage(r) == "fewshot":
      for f in ("ways", "shots"):
        v = r.get(f)
        if not is_number(v) or not float(v).is_integer() or v < 1:
          raise ValueError(f"record {i}: few-shot field '{f}' must be a positive int, got {v!r}")
  return out


def _to_builtin(v: Any) -> Any:
  """numpy scalars/arrays -> Python builtins, in nested dicts and lists (for json)."""
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, Mapping):
    return {k: _to_builtin(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_to_builtin(x) for x in v]
  return v


def write_json(records: Sequence[Mapping], path: str) -> str:
  """Writes the records as a JSON list (numpy values become builtins; NaN / inf become
  ``null``, `ncjax.io`'s rule). Returns ``path``."""
  records = validate(records)
  return atomic_write(path, dumps([_to_builtin(dict(r)) for r in records], indent=1) + "\n")


def read_json(path: str) -> list[dict]:
  """Reads records written by ``write_json`` (also accepts ``{"records": [...]}``); a float
  field's ``null`` comes back NaN."""
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, Mapping) and "records" in data:
    data = data["records"]
  if isinstance(data, list):
    data = [{k: NAN if v is None and k in _FLOAT_FIELDS else v for k, v in r.items()}
            if isinstance(r, Mapping) else r for r in data]
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
    return json.dumps(_to_builtin(v))
  if isinstance(v, float):
    return repr(v)  # shortest exact round-trip
  return str(v)


def write_csv(records: Sequence[Mapping], path: str) -> str:
  """Writes one row per record. Columns: the required fields, then every other field in
  first-seen order. Dict/list fields (``layerwise_nc1`` ...) are one column holding a JSON
  string; None is an empty cell. Returns ``path``."""
  records = validate(records)
  cols = _columns(records)
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
