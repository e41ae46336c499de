"""Evaluation: batched, sharded prediction over a whole split (padded last batch) and accuracy.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from ncjax import data, telemetry
from ncjax.train.step import Forward, Prepare
from ncjax.train.sharding import (
    batch_sharded, check_batch_size, data_mesh, local_rows, put_replicated, replicated,
    to_global, to_host,
)


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Index arrays of length `batch_size` covering ``0..n-1`` (the last one padded by repeating
  index 0) and the number of valid rows, so every batch has one shape (one compilation)."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    valid = len(idx)
    if valid < batch_size:
      idx = np.concatenate([idx, np.zeros(batch_size - valid, idx.dtype)])
    yield idx, valid


@functools.lru_cache(maxsize=None)
def _jit_eval(fn, mesh: Mesh, num_args: int):
  rep, dat = replicated(mesh), batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep,) * num_args + (dat,))


def predict(fn: Callable[..., Any], inputs, batch_size: int, *, args: tuple = (),
            mesh: Mesh | None = None, desc: str = "eval") -> Iterator[tuple[Any, slice]]:
  """Runs ``fn(*args, x)`` over `inputs` in padded global batches; yields the host outputs
  trimmed to the valid rows and the rows' slice of `inputs`.

  `fn` must be a stable function object (module level or cached): its jitted version is
  cached per ``(fn, mesh)``, and `args` (parameters, statistics, a `data.Preprocess`) are
  traced arguments, so evaluating another model state reuses the compiled program.
  `inputs` may be a numpy array or a lazily decoded `data.ImageSource` (read ahead in a
  background thread)."""
  mesh = mesh or data_mesh()
  check_batch_size(batch_size, mesh)
  jitted = _jit_eval(fn, mesh, len(args))
  args = put_replicated(mesh, args)
  rows = local_rows(batch_size)
  n = len(inputs)
  batches = data.prefetch((idx, valid, inputs[idx][rows])
                          for idx, valid in padded_batches(n, batch_size))
  for idx, valid, x in telemetry.progress(batches, total=-(-n // batch_size), desc=desc):
    out = jitted(*args, to_global(mesh, x))
    out = jax.tree.map(lambda a: to_host(a)[:valid], out)
    yield out, slice(int(idx[0]), int(idx[0]) + valid)


@functools.lru_cache(maxsize=None)
def logits_fn(forward: Forward, static_prepare: Prepare | None = None):
  """``fn(params, batch_stats, prepare, x) -> logits`` (eval mode), one per forward.

  `prepare` is a traced argument when it is a pytree of arrays (`data.Preprocess`); a plain
  function is bound here as `static_prepare` instead (and `prepare` passed as None)."""
  def fn(params, batch_stats, prepare, x):
    prepare = static_prepare or prepare
    if prepare is not None:
      x = prepare(None, x, False)  # eval: no augmentation, so no key
    return forward(params, batch_stats, x, False)[0]
  return fn


def _is_array_tree(tree) -> bool:
  return all(hasattr(leaf, "dtype") for leaf in jax.tree.leaves(tree))


def accuracy(forward: Forward, params, batch_stats, prepare: Prepare | None, images, labels,
             batch_size: int, mesh: Mesh | None = None) -> float:
  """Top-1 accuracy in percent (eval mode, no augmentation)."""
  correct = 0
  traced = _is_array_tree(prepare)
  fn = logits_fn(forward, None if traced else prepare)
  for logits, rows in predict(fn, images, batch_size, mesh=mesh,
                              args=(params, batch_stats, prepare if traced else None),
                              desc="eval"):
    correct += int(np.sum(np.argmax(logits, -1) == labels[rows]))
  return 100.0 * correct / len(labels)
