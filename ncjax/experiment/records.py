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

import contextlib
import errno
import fcntl
import os
import socket
import subprocess

import ncjax
from ncjax.errors import WorkdirError
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


# read_fingerprint's answer for a run directory without a readable fingerprint.json.
NO_FINGERPRINT = "<fingerprint.json>"


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
    return {NO_FINGERPRINT: "missing or unreadable"}


def write_fingerprint(workdir: str, run_id: str, fingerprint: dict) -> None:
  write_json(os.path.join(run_dir(workdir, run_id), "fingerprint.json"), fingerprint)


def has_checkpoints(workdir: str, run_id: str) -> bool:
  directory = checkpoint_dir(workdir, run_id)
  return os.path.isdir(directory) and bool(os.listdir(directory))


# ----------------------------------------------------------------------------- the workdir

def workdir_problem(workdir: str) -> tuple[str, bool] | None:
  """Why `workdir` cannot hold a job's files, and whether it is an existing directory that
  only cannot be written (a finished job there can still be reported); None when it can.
  Writing is probed with a file (permission bits say nothing for root, nor for a read-only
  mount)."""
  if not workdir.strip():
    return "--workdir is empty; pass a directory (it is created if missing)", False
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"lies under {existing}, a file"
    return (f"--workdir={workdir} {where}, not a directory; pass a directory (it is created "
            "if missing)"), False
  try:
    fd = os.open(os.path.join(existing, f".ncjax-probe-{os.getpid()}"),
                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.unlink(os.path.join(existing, f".ncjax-probe-{os.getpid()}"))
  except OSError as e:
    if e.errno == errno.ENOSPC:
      return None  # a full disk is reported, in one line, where the first write meets it
    return (f"--workdir={workdir}: cannot write in {existing} ({e.strerror}); make it "
            "writable or pass another --workdir"), existing == path
  return None


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``<workdir>/.lock`` (flock) while a job runs in `workdir`, creating the workdir.
  A second job there stops at once (`WorkdirError` naming the process that holds it); the
  kernel drops the lock when its process ends, even by kill -9, so it never goes stale."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirError(f"--workdir={workdir} is in use by another run ({holder}); wait for "
                         "it to end, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
