"""Files ncjax writes, and the errors writing them meets.

* `atomic_write`: a temporary file in the same directory, fsync, rename: a reader sees the old
  file or the new one, never a torn one.
* One NaN rule for every JSON file (records, results.json, metrics.jsonl, config.json): a
  non-finite float is written as ``null``, so every file is valid JSON; readers that know a
  field is a float read ``null`` back as NaN.
* `disk_full`: the ENOSPC error somewhere in an exception's chain (libraries re-raise a full
  disk as their own error).
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from typing import Any, Iterator

NAN = float("nan")


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


def finite(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts and
  lists (tuples become lists, as JSON has them)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  return obj


def dumps(obj: Any, indent: int | None = None) -> str:
  """JSON with NaN/Inf written as null (valid JSON)."""
  return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any) -> str:
  return atomic_write(path, dumps(obj, indent=2) + "\n")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str, rows: list) -> str:
  return atomic_write(path, "".join(dumps(r) + "\n" for r in rows))


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
  """`exc` and every exception reachable from it through ``__cause__``, ``__context__`` and
  exception groups (asyncio's TaskGroup wraps what a save task raised)."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__]
    inner = getattr(e, "exceptions", ())  # an ExceptionGroup's members (Python >= 3.11)
    if isinstance(inner, (tuple, list)):
      todo += [x for x in inner if isinstance(x, BaseException)]


def disk_full(exc: BaseException | None, *, by_message: bool = False) -> BaseException | None:
  """The ENOSPC `OSError` in `exc`'s chain, or None; one that names its file wins (a cleanup
  that failed on the same disk later may not). `by_message`: also an error whose text says so
  (tensorstore raises ValueError and keeps only "[OS error 28: No space left on device]"),
  for a caller that knows it was writing to disk."""
  chain = list(exception_chain(exc))
  full = [e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC]
  if full:
    return next((e for e in full if e.filename), full[0])
  if by_message:
    return next((e for e in chain
                 if "no space left on device" in str(e).lower() or "ENOSPC" in str(e)), None)
  return None
