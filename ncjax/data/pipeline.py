"""Host-side feeding: a background thread that keeps batches ahead of the device, and a
thread pool for decoding images.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence


def _threaded(fn, items: Sequence[Any], desc: str) -> list:
  from tqdm.auto import tqdm

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(tqdm(pool.map(fn, items), total=len(items), desc=desc,
                     disable=len(items) < 1000, mininterval=5))


def prefetch(iterator: Iterable[Any], size: int = 2,
             transform: Callable[[Any], Any] | None = None) -> Iterator[Any]:
  """Runs ``iterator`` (and ``transform``, e.g. ``jax.device_put``) in a background thread,
  keeping up to ``size`` items ready.  Exceptions are re-raised in the consumer."""
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()
  end = object()

  def worker():
    try:
      for item in iterator:
        if transform is not None:
          item = transform(item)
        while not stop.is_set():
          try:
            q.put(("item", item), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(("end", end))
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
      q.put(("error", e))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      kind, item = q.get()
      if kind == "end":
        return
      if kind == "error":
        raise item
      yield item
  finally:
    stop.set()
