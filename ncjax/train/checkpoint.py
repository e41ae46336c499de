"""The checkpoint lifecycle (orbax, one directory per run): save after the finiteness checks,
resume from the newest readable step, set an unreadable one aside, never delete one.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from ncjax import io, telemetry
from ncjax.errors import CheckpointError
from ncjax.train.step import PyTree, TrainState


# orbax writes a step under `<step>.orbax-checkpoint-tmp…` and renames it once complete.
_TMP_MARK = ".orbax-checkpoint-tmp"
_UNREADABLE = ".unreadable"


class _NoOrbaxErrors(logging.Filter):
  """Drops orbax's own ERROR log of an exception it raises to us: the save or restore that
  failed is reported once, by its caller (a full disk: one line; an unreadable step: a
  warning and the step before it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


@contextlib.contextmanager
def _quiet_orbax_errors():
  logger, quiet = logging.getLogger("absl"), _NoOrbaxErrors()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _checkpoint_manager(directory: str, max_to_keep: int = 2):
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False))


def _one_line(exc: BaseException, limit: int = 300) -> str:
  """``Type: message`` on one line, at most about `limit` characters of message."""
  text = " ".join(str(exc).split()) or "(no message)"
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(exc).__name__}: {text}"


def _is_chief() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """Waits for every process (several hosts share one checkpoint directory; only process 0
  renames or removes in it)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def remove_partial_saves(directory: str) -> list[str]:
  """Removes orbax's temporary directories (``<step>.orbax-checkpoint-tmp*``) from
  `directory`, with a warning naming them; returns their paths.

  orbax gives a save its final name only once it is complete, so such a directory is a save
  that was killed midway: never readable, and in the way of the next save of its step."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    return []
  leftovers = sorted(os.path.join(directory, n) for n in os.listdir(directory) if _TMP_MARK in n)
  if leftovers and _is_chief():
    telemetry.warn(f"removing {len(leftovers)} incomplete checkpoint save(s) left by an interrupted run "
          f"in {directory}: {', '.join(os.path.basename(p) for p in leftovers)}")
    for path in leftovers:
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  _sync("ncjax.remove_partial_saves")
  return leftovers


def _abstract(state: PyTree) -> PyTree:
  """`state` with each array replaced by its shape, dtype and sharding (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, state)


def _checked_history(history, step: int) -> list[dict]:
  """`history` as restored from json, checked to be windows ``{'step', 'loss', 'accuracy'}``
  ending in increasing order by `step` (a garbled file can still parse)."""
  if not isinstance(history, list) or not all(
      isinstance(h, dict) and {"step", "loss", "accuracy"} <= set(h) for h in history):
    raise ValueError("the history is not a list of {'step', 'loss', 'accuracy'} entries")
  steps = [h["step"] for h in history]
  if any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps)) or (
      steps and steps[-1] > step):
    raise ValueError(f"the history's steps {steps} are not increasing up to step {step}")
  return [dict(h) for h in history]


def _set_aside(directory: str, step: int) -> str:
  """Renames the step directory `step` to a free ``<step>.unreadable[-k]``; returns the name."""
  base = f"{step}{_UNREADABLE}"
  name, k = base, 0
  while os.path.exists(os.path.join(directory, name)):
    k += 1
    name = f"{base}-{k}"
  os.rename(os.path.join(directory, str(step)), os.path.join(directory, name))
  return name


def restore_latest(directory: str, abstract_state: TrainState
                   ) -> tuple[TrainState, list[dict]] | None:
  """The newest readable checkpoint in `directory` (written by `fit`): its state, restored
  into the structure and shardings of `abstract_state` (a `TrainState` of arrays or of
  `jax.ShapeDtypeStruct`), and the `fit` history saved with it. None when `directory` holds
  no checkpoint.

  Newer checkpoints that cannot be restored (truncated or garbled files, an empty step
  directory) are renamed aside to ``<step>.unreadable`` with a warning: kept for inspection,
  and out of the way of the next save of that step.

  Raises:
    CheckpointError: `directory` holds checkpoints but none is readable (nothing is renamed;
      the one-line message names the directory and the newest checkpoint's error).
  """
  if not directory or not os.path.isdir(directory):
    return None
  directory = os.path.abspath(directory)
  target = _abstract(abstract_state)
  failed, restored = [], None
  # orbax also logs the unreadable steps it meets (from reading their metadata on): they are
  # this function's warning below, or its error.
  with _quiet_orbax_errors():
    mngr = _checkpoint_manager(directory)
    try:
      steps = sorted(mngr.all_steps(), reverse=True)
      for step in steps:
        try:
          r = mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
          restored = (step, r.state, _checked_history(r.history, int(r.state.step)))
          break
        # Whatever fails (orbax, tensorstore, json, a missing item), this step cannot be used.
        except Exception as e:  # noqa: BLE001
          failed.append((step, e))
    finally:
      mngr.close()
  if not steps:
    return None
  if restored is None:
    raise CheckpointError(
        f"no readable checkpoint in {directory} (steps {', '.join(map(str, steps))}; newest: "
        f"{_one_line(failed[0][1])}); move the directory aside to start the run afresh")
  step, state, history = restored
  if _is_chief():
    for bad, e in failed:
      aside = _set_aside(directory, bad)
      telemetry.warn(f"checkpoint step {bad} in {directory} is unreadable ({_one_line(e)}); renamed it "
            f"to {aside} (not deleted) and resuming from step {step}")
  _sync("ncjax.restore_latest")
  return state, history


def _save_checkpoint(mngr, step: int, state: TrainState, history: list[dict]) -> None:
  """Saves `state` and `history` as checkpoint `step` (synchronously).

  Raises:
    OSError: ENOSPC with the checkpoint's path as filename (from the original error, however
      deeply orbax wrapped it), so the caller can report a full disk in one line.
  """
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            history=ocp.args.JsonSave([dict(h) for h in history]))
  try:
    with _quiet_orbax_errors():
      mngr.save(step, args=args, force=True)
      mngr.wait_until_finished()
  except Exception as e:
    if io.disk_full(e, by_message=True) is not None:
      path = os.path.join(str(mngr.directory), str(step))
      raise OSError(errno.ENOSPC, "No space left on device", path) from e
    raise
