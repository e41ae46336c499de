"""Following a run: progress on the console, per-step scalars on disk.

* `progress` / `phase` — tqdm on a terminal; a plain line every `every_s` seconds otherwise.
* `warn` — the one warning path; `defined` — a metric's value, or NaN (recorded as ``null``)
  with a warning naming where, when its features are degenerate (``metrics.ZeroSpreadError``).
* `RunLog` — per-step scalars of every run in a workdir. The files it owns there:

  * ``metrics.jsonl`` — one JSON object per line, ``{"run", "step", "time", **scalars}``
    (``time``: seconds since the epoch; scalars: floats). NaN and ±inf are written as
    ``null`` (`ncjax.io`'s rule for every JSON file ncjax writes) so every line is strict JSON
    (``jq``, JavaScript); `read_metrics` reads them back as NaN. Each line is one ``os.write``
    on an ``O_APPEND`` descriptor, so a kill leaves at most one torn line, which
    `read_metrics` skips.
  * ``tensorboard/<run>/`` — the same scalars as TensorBoard event files, written with
    tensorboardX (needs neither TensorFlow nor the tensorboard package).

Only process 0 (`jax.process_index()`) prints or writes; the other processes stay silent.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time

import jax
from absl import logging as absl_logging
from tqdm.auto import tqdm

from ncjax import io, metrics

def warn(message: str) -> None:
  """ncjax's one warning path: the absl log (cluster and file logs) and stderr (the terminal,
  whatever the absl verbosity), as one line ``WARNING: <message>``: on the command line
  without a log file, absl's own log is stderr, and it is not written twice there."""
  if not _absl_log_is_stderr():
    absl_logging.warning("%s", message)
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def defined(compute, where: str) -> float:
  """``float(compute())``, or NaN with a warning naming ``where`` when the metric is 0/0.

  A dead layer or constant features leave NC1 and CDNV undefined (the zero-spread rule of
  `ncjax.metrics`); a run records that as NaN (``null`` in its JSON files) and goes on, so
  that hours of training are not lost to one layer's measurement.  Any other error raises."""
  try:
    return float(compute())
  except metrics.ZeroSpreadError as e:
    warn(f"{where}: {e}; recorded as NaN (null)")
    return math.nan


def _absl_log_is_stderr() -> bool:
  """Whether absl writes its log to stderr: flags parsed (``absl.app.run``, the command
  line) and no log file (``--logtostderr``, or no ``--log_dir`` file opened)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    return False  # a library caller (tests, notebooks): absl's log is theirs to route
  if flags.FLAGS["logtostderr"].value:
    return True
  stream = getattr(absl_logging.get_absl_handler().python_handler, "stream", None)
  return stream in (sys.stderr, sys.__stderr__)


METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
_clock = time.monotonic  # a module attribute so tests can make rates deterministic


# ----------------------------------------------------------------------------- progress

def progress(iterable=None, *, total: int, desc: str, initial: int = 0, leave: bool = False,
             every_s: float = 30.0):
  """Wraps `iterable` (or, with None, counts `update(n)` calls) in a progress display.

  On a terminal: tqdm. When stdout is not a terminal (nohup, Slurm, Colab ``!python``): a
  line ``I <desc>: step 450/750, loss 0.4123, 14.8 steps/s, ~20 s left`` at most every
  `every_s` seconds, and a last ``done in … s`` line if any was printed, so a long phase is
  never silent and a short one adds nothing to the log. Either way the object is iterable,
  has ``update(n=1)``, ``set_postfix(**values)`` (shown in every line), ``close()`` and is a
  context manager. Processes other than 0 get a silent one."""
  silent = jax.process_index() != 0
  if silent or sys.stdout.isatty():
    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=leave,
                disable=silent or None)
  return _LogProgress(iterable, total, desc, initial, every_s)


def phase(desc: str, *, total: int, initial: int = 0, every_s: float = 30.0):
  """`progress` for work that is not one loop over an iterable:
  ``with phase("collapse", total=n) as p: … p.update(k)``."""
  return progress(None, total=total, desc=desc, initial=initial, every_s=every_s)


def format_line(desc: str, n: int, total: int, postfix: dict, steps: int,
                elapsed: float) -> str:
  """One progress line: `steps` done in the last `elapsed` seconds give the rate (steps/s);
  the time left is extrapolated from it, or the total time shown once ``n >= total``."""
  rate = steps / elapsed if elapsed > 0 else math.nan
  if n < total:
    tail = f"~{(total - n) / rate:.0f} s left" if rate > 0 else "~? s left"
  else:
    tail = f"done in {elapsed:.0f} s"
  fields = [f"step {n}/{total}", *(f"{k} {_format_value(v)}" for k, v in postfix.items()),
            f"{rate:.3g} steps/s", tail]
  return f"I {desc}: " + ", ".join(fields)


def _format_value(v) -> str:
  if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
    return f"{v:.4g}"
  return str(v)


class _LogProgress:
  """tqdm's interface (iteration, update, set_postfix, close, `with`) as periodic lines."""

  def __init__(self, iterable, total: int, desc: str, initial: int, every_s: float):
    self.iterable, self.total, self.desc, self.every_s = iterable, total, desc, every_s
    self.initial = self.n = initial
    self.postfix: dict = {}
    self._t0 = self._last = _clock()
    self._printed = self._closed = False

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update()
    self.close()  # as tqdm does, so a loop that ends normally needs no close()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = _clock()
    if now - self._last >= self.every_s and self.n < self.total:
      self._print(now)

  def set_postfix(self, **values) -> None:
    self.postfix = values

  def close(self) -> None:
    if self._printed and not self._closed:
      self._print(_clock())
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _print(self, now: float) -> None:
    print(format_line(self.desc, self.n, self.total, self.postfix, self.n - self.initial,
                      now - self._t0), flush=True)
    self._last, self._printed = now, True


# ----------------------------------------------------------------------------- scalars

class RunLog:
  """Appends per-step scalars of any number of runs to ``<workdir>/metrics.jsonl`` and
  ``<workdir>/tensorboard/<run>/`` (see the module docstring). Files and event writers are
  opened on the first `log` of each; a no-op on processes other than 0."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.fspath(workdir)
    self._active = jax.process_index() == 0
    self._fd: int | None = None
    self._writers: dict = {}

  def log(self, run: str, step: int, **scalars) -> None:
    """One record: `scalars` (anything `float()` accepts: Python, numpy or jax scalars)
    at `step` of `run`, stamped with the wall time."""
    if not self._active:
      return
    if "time" in scalars:
      raise ValueError("'time' is the record's timestamp; name the scalar differently")
    values = {k: float(v) for k, v in scalars.items()}
    now, step = time.time(), int(step)
    record = {"run": run, "step": step, "time": now, **values}
    line = (io.dumps(record) + "\n").encode()  # NaN / inf as null: `ncjax.io`'s one rule
    # One write per line: with O_APPEND it lands whole after whatever is there.
    path = os.path.join(self.workdir, METRICS)
    try:
      written = os.write(self._metrics_fd(), line)
    except OSError as e:  # name the file (e.g. a full disk)
      raise OSError(e.errno, e.strerror, path) from e
    if written != len(line):
      raise OSError(f"short write to {path}")
    writer = self._writers.get(run) or self._tensorboard_writer(run)
    for k, v in values.items():
      writer.add_scalar(k, v, step, walltime=now)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _metrics_fd(self) -> int:
    if self._fd is None:
      os.makedirs(self.workdir, exist_ok=True)
      path = os.path.join(self.workdir, METRICS)
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      if _ends_torn(path):
        # End the fragment a kill left, so that the next record starts a line of its own.
        os.write(self._fd, b"\n")
    return self._fd

  def _tensorboard_writer(self, run: str):
    from tensorboardX import SummaryWriter  # imported on first use: ~1 s, process 0 only
    # A NaN scalar (SupCon's accuracy, a diverged loss) is logged as NaN on purpose; without
    # this tensorboardX warns "NaN or Inf found in input tensor" at every such write.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    writer = SummaryWriter(os.path.join(self.workdir, TENSORBOARD, run), flush_secs=30)
    self._writers[run] = writer
    return writer


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a ``metrics.jsonl`` (`path`: the file or its workdir), in file order,
  with a scalar's ``null`` (a non-finite value, `ncjax.io`'s rule) read back as NaN. Lines
  that do not parse (a write torn by a kill) are skipped."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS)
  records = []
  with open(path, "rb") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # also UnicodeDecodeError: a write torn inside a character
        continue
      records.append({k: math.nan if v is None and k != "run" else v
                      for k, v in record.items()})
  return records


def _ends_torn(path: str) -> bool:
  with open(path, "rb") as f:
    if f.seek(0, os.SEEK_END) == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"
