"""Result records and the run directory's files, written atomically.

One `Record` schema serves pre-training, fine-tuning and layer probes (`ncjax.report`
documents how tables read it). Every file here is written to a temporary file in the same
directory and renamed over the target, so a kill or a full disk leaves either the old file
or the new one, never a torn one. The workdir holds::

  config.json        the resolved config, the ncjax version and git commit
  records.jsonl      every record so far, one JSON object a line
  runs/<run id>/     fingerprint.json (what defines the run), record.json once it finished,
                     checkpoints/ (orbax steps)
  metrics.jsonl, tensorboard/   per-step scalars (`ncjax.telemetry`)
  results.{json,csv,md}, *.png  the report (`ncjax.report`)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import tempfile
from typing import Any

NAN = float("nan")


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
  seed: int = 0
  final_train_loss: float = NAN  # mean loss of the last log window
  stage: str = "transfer"    # transfer | pretrain | probe | fewshot | unit_probe | score
  run: str = ""              # the run id (`ncjax.spec.Run.id`)
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
  probe_cost_fraction: float = NAN  # unit=auto: probes' compute / the whole unit sweep's
  cost_fraction: float = NAN  # unit=auto: (probes + the chosen unit's run) / the unit sweep
  regret: float = NAN        # unit=auto: best swept unit's accuracy - the chosen's, points
  candidate: str = ""        # job rank: the pre-trained model scored ([<variant tag>/]<model>)
  scores: dict = dataclasses.field(default_factory=dict)  # job rank: estimator -> score
  score_wall_s: dict = dataclasses.field(default_factory=dict)  # estimator -> seconds
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


def final_loss(history: list[dict]) -> float:
  """`final_train_loss`: the mean loss of a training history's last log window."""
  return history[-1]["loss"] if history else NAN


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path: str, text: str | bytes) -> str:
  """Writes `text` to `path` through a temporary file in the same directory and a rename."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(text.encode() if isinstance(text, str) else text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    if isinstance(e, OSError) and not e.filename:  # name the file (e.g. a full disk)
      raise OSError(e.errno, e.strerror, path) from e
    raise
  return path


def dumps(obj: Any, indent: int | None = None) -> str:
  """JSON with NaN/Inf written as null (valid JSON; read back as NaN by `Record.from_dict`)."""
  return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj):
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def write_json(path: str, obj: Any) -> str:
  return atomic_write(path, dumps(obj, indent=2) + "\n")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str, rows: list) -> str:
  return atomic_write(path, "".join(dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- the run directory

def run_dir(workdir: str, run_id: str) -> str:
  return os.path.join(workdir, "runs", run_id)


def checkpoint_dir(workdir: str, run_id: str) -> str:
  return os.path.join(run_dir(workdir, run_id), "checkpoints")


def load_record(workdir: str, run_id: str) -> Record | None:
  """The finished run's record, or None (not finished, or its file unreadable)."""
  path = os.path.join(run_dir(workdir, run_id), "record.json")
  try:
    return Record.from_dict(read_json(path))
  except (OSError, ValueError, TypeError):
    return None


def save_record(workdir: str, record: Record) -> None:
  write_json(os.path.join(run_dir(workdir, record.run), "record.json"), record.to_dict())


def version_info() -> dict:
  """The ncjax version and, in a git checkout, its commit (with '+dirty' for local changes)."""
  from ncjax import __version__
  info = {"ncjax_version": __version__}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    info["git_commit"] = commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def read_fingerprint(workdir: str, run_id: str) -> dict | None:
  """The stored fingerprint of a run ({dotted field: value}); None when the run never started;
  ``{'<unreadable>': path}`` when its file cannot be read."""
  directory = run_dir(workdir, run_id)
  if not os.path.isdir(directory):
    return None
  path = os.path.join(directory, "fingerprint.json")
  try:
    return dict(read_json(path))
  except (OSError, ValueError, TypeError):
    return {"<fingerprint.json>": "missing or unreadable"}


def write_fingerprint(workdir: str, run_id: str, fingerprint: dict) -> None:
  write_json(os.path.join(run_dir(workdir, run_id), "fingerprint.json"), fingerprint)
