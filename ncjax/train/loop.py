"""The training loop: deterministic batches from the seed and the step, log windows, the
finiteness checks, checkpoints; `train` builds optimizer, step and state and runs `fit`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ncjax import data, telemetry
from ncjax.errors import CheckpointError, Diverged
from ncjax.train.step import (
    cross_entropy, Forward, init_state, lr_schedule, make_optimizer, make_train_step,
    OptimConfig, Prepare, PyTree, TrainState,
)
from ncjax.train.sharding import (
    check_batch_size, data_mesh, local_rows, put_replicated, replicated, to_global,
)
from ncjax.train.compile import jit_train_step
from ncjax.train.checkpoint import (
    _checkpoint_manager, remove_partial_saves, restore_latest, _save_checkpoint,
)


#: Between log windows the progress display's loss (the mean of the window so far) is
#: refreshed at most this often, in wall-clock seconds: a long run's progress line shows its
#: loss before the first window ends, at the cost of one wait for the device per refresh.
LOSS_EVERY_S = 1.0


def batch_iterator(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int,
                   start_step: int, total_steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Global batches for steps ``start_step..total_steps-1``; epoch ``e`` is shuffled by
  ``default_rng((seed, e))``, so the batch of a step never depends on where a run resumed."""
  n = len(labels)
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
  step = start_step
  while step < total_steps:
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    for j in range(i, per_epoch):
      if step >= total_steps:
        return
      idx = np.sort(perm[j * batch_size:(j + 1) * batch_size])
      yield images[idx], labels[idx]
      step += 1


def fit(state: TrainState, step_fn, images: np.ndarray, labels: np.ndarray, *,
        batch_size: int, total_steps: int, seed: int, mesh: Mesh | None = None,
        checkpoint_dir: str | None = None, checkpoint_every: int = 0, log_every: int = 50,
        desc: str = "train", lr_fn: Callable[[int], Any] | None = None,
        on_log: Callable[[dict], None] | None = None) -> tuple[TrainState, list[dict]]:
  """Runs `step_fn` (from `make_train_step`) until ``state.step == total_steps``.

  Args:
    state: the initial state, copied (the caller's arrays stay alive). When `checkpoint_dir`
      holds a checkpoint, only its structure and shardings are used.
    images, labels: the whole training set on the host (global; every process holds it).
    batch_size: global batch size (divisible by the number of devices).
    seed: fixes the data order and the augmentation of every step.
    checkpoint_dir: orbax checkpoints (state and history) go there at every multiple of
      `checkpoint_every` (0: none) and at `total_steps`. Training always continues from the
      newest readable checkpoint already there (`restore_latest`), after removing orbax's
      incomplete saves (`remove_partial_saves`); nothing else is deleted. Whether the
      directory belongs to this run is the caller's decision.
    log_every: a log window ends every `log_every` steps, at every multiple of
      `checkpoint_every` (with or without a directory) and at `total_steps`: window ends depend
      on the step only, so a resumed run logs exactly the windows of an uninterrupted one.
    desc: the progress bar's label and the prefix of error messages.
    lr_fn: the learning rate at an optimizer step (e.g. `lr_schedule`), for `on_log`.
    on_log: called at the end of every window (after its checkpoint is saved) with
      ``{'step', 'loss', 'accuracy', 'lr', 'examples_per_s'}``: the window's mean loss and
      accuracy (fraction), ``lr_fn(step)`` (NaN without `lr_fn`) and the window's global
      examples per wall-clock second (the first window includes compilation).
  Returns:
    the final state and the history, one ``{'step', 'loss', 'accuracy'}`` (window means,
    Python floats) per window since step 0: windows before a resume come from the checkpoint,
    so a killed and resumed run returns the history of an uninterrupted one, bit for bit.
  Raises:
    Diverged: (a FloatingPointError) a loss, or a parameter before a save, was NaN or Inf
      (the message names the step; the checkpoints on disk, all finite, are kept).
    CheckpointError: `checkpoint_dir` holds checkpoints but none is readable, or the newest
      one is past `total_steps`.
    OSError: errno ENOSPC, the disk filled up while saving (filename: the checkpoint's path).
  """
  if log_every < 1 or checkpoint_every < 0:
    raise ValueError(f"log_every must be >= 1 and checkpoint_every >= 0, got {log_every} "
                     f"and {checkpoint_every}")
  mesh = mesh or data_mesh()
  check_batch_size(batch_size, mesh)
  train_step = jit_train_step(step_fn, mesh)
  # The step donates its state; copy so the caller's arrays (e.g. pre-trained weights shared
  # by several runs) stay alive.
  state = put_replicated(mesh, state, copy=True)
  history: list[dict] = []
  mngr = None
  if checkpoint_dir:
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    remove_partial_saves(checkpoint_dir)
    restored = restore_latest(checkpoint_dir, state)
    if restored is not None:
      state, history = restored
      if int(state.step) > total_steps:
        raise CheckpointError(f"{desc}: the newest checkpoint in {checkpoint_dir} is at step "
                              f"{int(state.step)}, past total_steps={total_steps}")
    mngr = _checkpoint_manager(checkpoint_dir)
  start = int(state.step)
  if start > total_steps:
    raise ValueError(f"{desc}: the state is at step {start}, past total_steps={total_steps}")
  rng = jax.device_put(jax.random.PRNGKey(seed), replicated(mesh))
  rows = local_rows(batch_size)
  window = []

  def checkpoint_step(step):
    return checkpoint_every > 0 and step % checkpoint_every == 0

  def flush(upto_step, since) -> dict:
    """Ends the window at `upto_step` (started at perf_counter `since`): appends its means to
    the history and returns the `on_log` entry."""
    losses = np.asarray([float(m["loss"]) for m in window])  # waits for the device
    seconds = time.perf_counter() - since
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      s = upto_step - len(window) + int(bad[0])
      raise Diverged(f"{desc}: non-finite loss {losses[bad[0]]} at step {s} "
                               f"(lower the learning rate, or check the input data)")
    means = {"step": upto_step, "loss": float(losses.mean()),
             "accuracy": float(np.mean([float(m["accuracy"]) for m in window]))}
    history.append(means)
    entry = dict(means, lr=float(lr_fn(upto_step)) if lr_fn is not None else float("nan"),
                 examples_per_s=len(window) * batch_size / max(seconds, 1e-9))
    window.clear()
    return entry

  def save(upto_step):
    # The window's losses were checked by `flush`; never write diverged parameters either:
    # they could rotate the last finite checkpoints out.
    if not bool(_all_finite((state.params, state.opt_state))):
      raise Diverged(f"{desc}: non-finite parameters after step {upto_step} "
                               "(lower the learning rate); the checkpoints on disk are kept")
    _save_checkpoint(mngr, upto_step, state, history)

  # Batches are gathered (and, for a lazily decoded split, decoded) a few steps ahead in a
  # background thread while the device runs the current step.
  batches = data.prefetch(batch_iterator(images, labels, batch_size, seed=seed,
                                         start_step=start, total_steps=total_steps), size=3)
  bar = telemetry.progress(batches, total=total_steps, initial=start, desc=desc)
  step, since = start, time.perf_counter()
  shown = since  # when the progress display's loss was last refreshed
  try:
    for x, y in bar:
      state, m = train_step(state, to_global(mesh, x[rows]), to_global(mesh, y[rows]), rng)
      step += 1
      window.append(m)
      if step % log_every == 0 or checkpoint_step(step) or step == total_steps:
        entry = flush(step, since)
        if mngr is not None and (checkpoint_step(step) or step == total_steps):
          save(step)
        bar.set_postfix(loss=entry["loss"])
        if on_log is not None:
          on_log(entry)
        since = time.perf_counter()  # the next window's time excludes saving and logging
      elif time.perf_counter() - shown >= LOSS_EVERY_S:
        bar.set_postfix(loss=float(np.mean([float(w["loss"]) for w in window])))
        shown = time.perf_counter()
    if mngr is not None and mngr.latest_step() != step:
      save(step)  # a state that took no step here (already at total_steps)
  finally:
    bar.close()
    batches.close()  # stops the prefetch thread when the loop ended early
    if mngr is not None:
      mngr.close()
  return state, history


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train(forward: Forward, params: PyTree, batch_stats: PyTree, mask: PyTree | None,
          optim: OptimConfig, inputs, labels, *, batch_size: int, steps: int, seed: int,
          mesh: Mesh | None = None, prepare: Prepare | None = None, loss_fn=cross_entropy,
          adversary=None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
          desc: str = "train", on_log=None, lr_scale: PyTree | None = None
          ) -> tuple[TrainState, list[dict]]:
  """Trains the `mask`-ed leaves of `params` (None: all) for `steps` steps of `batch_size`:
  the optimizer (`make_optimizer`), the one train step (`make_train_step`), the state and
  the loop (`fit`, which resumes from `checkpoint_dir`'s newest readable checkpoint).
  `lr_scale`: per-leaf learning-rate factors (`make_optimizer`). Returns the final state and
  the history of log windows."""
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  tx = make_optimizer(optim, steps, mask, lr_scale)
  step = make_train_step(forward, tx, mask, prepare, loss_fn=loss_fn, adversary=adversary)
  return fit(init_state(params, batch_stats, tx), step, inputs, labels, batch_size=batch_size,
             total_steps=steps, seed=seed, mesh=mesh, checkpoint_dir=checkpoint_dir,
             checkpoint_every=checkpoint_every, desc=desc, lr_fn=lr_schedule(optim, steps),
             on_log=on_log)


def phase_dirs(checkpoint_dir: str | None, phases: int) -> list[str | None]:
  """Where each of `phases` phases keeps its checkpoints: the last in `checkpoint_dir` itself
  (so the run's final weights are where a one-phase run keeps them), phase i < last in
  ``<checkpoint_dir>-phase<i>`` (its optimizer state has another structure)."""
  if not checkpoint_dir:
    return [None] * phases
  return [f"{checkpoint_dir}-phase{i + 1}" for i in range(phases - 1)] + [checkpoint_dir]


def train_phases(forward: Forward, params: PyTree, batch_stats: PyTree,
                 phases: list[tuple[PyTree, int]], optim: OptimConfig, inputs, labels, *,
                 batch_size: int, seed: int, prepare: Prepare | None = None,
                 checkpoint_dir: str | None = None, lr_scale: PyTree | None = None,
                 **kw) -> tuple[TrainState, list[dict]]:
  """`train` in consecutive phases ``[(mask, steps), ...]`` (LP-FT: the linear probe's mask,
  then every parameter): each phase has its own optimizer on its own schedule of `steps`
  (`optim`'s recipe; momentum starts at zero) and starts from the previous one's parameters
  and BatchNorm statistics. The step counter runs on across phases, so the data order and
  the augmentation of a step are those of a one-phase run. Phase checkpoints go to
  `phase_dirs`; a killed run resumes in the phase it was in (the earlier phases' final
  checkpoints are restored, not retrained). Returns the final state and the history of
  every phase's windows."""
  if not phases or any(n < 1 for _, n in phases):
    raise ValueError(f"every phase needs >= 1 step, got {[n for _, n in phases]}")
  start, history, state = 0, [], None
  lr_of = lambda sched, s0: (lambda count: sched(count - s0))
  for (mask, n), ckpt in zip(phases, phase_dirs(checkpoint_dir, len(phases))):
    tx = make_optimizer(optim, n, mask, lr_scale)
    step = make_train_step(forward, tx, mask, prepare)
    state = init_state(params, batch_stats, tx).replace(step=jnp.asarray(start, jnp.int32))
    state, h = fit(state, step, inputs, labels, batch_size=batch_size, total_steps=start + n,
                   seed=seed, checkpoint_dir=ckpt, lr_fn=lr_of(lr_schedule(optim, n), start),
                   **kw)
    params, batch_stats = state.params, state.batch_stats
    history += h
    start += n
  return state, history
