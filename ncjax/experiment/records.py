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

import os
import subprocess

import ncjax
from ncjax.io import NAN, read_json, write_json
from ncjax.report.schema import Record


def final_loss(history: list[dict]) -> float:
  """`final_train_loss`: the mean loss of a training history's last log window."""
  return history[-1]["loss"] if history else NAN


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
  info = {"ncjax_version": ncjax.__version__}
  root = os.path.dirname(os.path.dirname(os.path.abspath(ncjax.__file__)))
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
