"""Training: one jitted train step for every model and fine-tuning method.

The pieces, each a plain function over pytrees:

* `lr_schedule` — the learning rate per step: the paper's cosine annealing or RFS's x0.1 step
  decays (optional linear warm-up), the one definition used by the optimizer and by whoever
  logs the learning rate.
* `make_optimizer` — SGD + momentum + weight decay on `lr_schedule`, wrapped in
  `optax.masked(…, mask)` so frozen leaves keep no optimizer state.
* `make_train_step` — the single train step. It splits the parameters with the method's mask
  (`ncjax.methods.partition`) and differentiates the loss with respect to the trainable
  partition only, so XLA never builds the backward pass of the frozen prefix of the network
  nor any gradient of a frozen weight. Every BatchNorm runs in train mode, so running
  statistics are updated on the downstream data for every method (REFERENCE §3).
* Data parallelism: the step is `jax.jit`-ed over a one-axis `Mesh` (``'data'``) with the batch
  sharded and the state replicated. The same code runs on one CPU, 8 simulated CPU devices, a
  GPU, a TPU pod slice and several hosts (`jax.distributed`; each process feeds its own slice
  of the global batch through `jax.make_array_from_process_local_data`).
* `fit` — the loop: deterministic data order and augmentation from the seed and the step; log
  windows end at fixed steps (every `log_every`, every checkpoint, the end); a NaN/Inf loss
  stops the run with an error naming the step; progress on a terminal or as log lines (`ncjax.telemetry`).

Checkpoint lifecycle (orbax, one directory per run; whether a directory may be reused is
decided upstream, from config fingerprints, before training starts):

* Each checkpoint holds the `TrainState` and the log history up to its step, and is written
  only after the losses of its window and the parameters were checked finite, so a diverging
  run never rotates its last finite checkpoints out.
* `fit` with a `checkpoint_dir` always continues from the newest readable checkpoint there.
  Since windows end at every checkpoint step, a run killed and resumed returns the parameters
  and the history of an uninterrupted run, bit for bit.
* Before resuming, orbax's ``*.orbax-checkpoint-tmp*`` leftovers (a save killed midway) are
  removed with a warning; an unreadable newest checkpoint is renamed aside
  (``<step>.unreadable``, never deleted) with a warning and the next newest one is used; no
  readable checkpoint at all is a `CheckpointError`.
* A full disk while saving is reported as ``OSError(ENOSPC, ..., <checkpoint path>)``.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ncjax import io, methods, telemetry
from ncjax.errors import CheckpointError

PyTree = Any
# forward(params, batch_stats, x, train) -> (logits, new_batch_stats)
Forward = Callable[[PyTree, PyTree, jax.Array, bool], tuple[jax.Array, PyTree]]
# prepare(rng, images, train) -> model input (normalise, resize, augment on device)
Prepare = Callable[[jax.Array, jax.Array, bool], jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The paper's recipe (Appendix B): SGD momentum 0.9, wd 1e-4, cosine 0.1 -> 1e-4.

  ``schedule='step'`` is RFS's instead (Table 2): ``lr`` multiplied by ``decay_factor`` at
  each of ``decay_steps`` (optimizer steps, increasing; ``lr_end`` unused)."""
  lr: float = 0.1
  lr_end: float = 1e-4
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "cosine"            # cosine | step
  decay_steps: tuple[int, ...] = ()   # step: the steps from which each further decay applies
  decay_factor: float = 0.1           # step: the factor per decay, in (0, 1]

  @classmethod
  def from_config(cls, cfg) -> "OptimConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: cfg[k] for k in fields if k in cfg})


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate of update ``count`` (0-based optimizer steps): linear warm-up from 0
  over ``cfg.warmup_steps`` (none: starts at ``cfg.lr``), then

  * ``cosine``: cosine from ``cfg.lr`` down to ``cfg.lr_end`` at `total_steps`;
  * ``step``: ``cfg.lr * cfg.decay_factor ** d`` with d the number of ``cfg.decay_steps``
    <= count. RFS (``adjust_learning_rate``: ``lr * rate ** sum(epoch > decay_epochs)``, epochs
    from 1) decays after ``e`` full epochs, i.e. from step ``e * steps_per_epoch`` on.

  Raises ValueError for a milestone outside ``(0, total_steps)``, a non-increasing one, or a
  factor outside (0, 1]."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if cfg.schedule == "step":
    bounds = tuple(int(b) for b in cfg.decay_steps)
    if (any(b <= a for a, b in zip(bounds, bounds[1:]))
        or any(not 0 < b < total_steps for b in bounds)):
      raise ValueError(f"decay_steps {bounds} must increase within (0, {total_steps})")
    if not 0 < cfg.decay_factor <= 1:
      raise ValueError(f"decay_factor must be in (0, 1], got {cfg.decay_factor}")
    lr, factor, warmup = cfg.lr, cfg.decay_factor, cfg.warmup_steps
    marks = jnp.asarray(bounds or (total_steps,), jnp.int32)  # no bounds: constant lr

    def step_schedule(count):
      decayed = lr * factor ** jnp.sum(count >= marks)
      if warmup:  # as optax's warm-up of the cosine schedule: 0 -> lr linearly
        decayed = jnp.where(count < warmup, lr * count / warmup, decayed)
      return decayed
    return step_schedule
  if cfg.schedule != "cosine":
    raise ValueError(f"schedule must be 'cosine' or 'step', got {cfg.schedule!r}")
  if cfg.lr_end > cfg.lr:
    raise ValueError(f"lr_end ({cfg.lr_end}) must not exceed lr ({cfg.lr})")
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.lr if cfg.warmup_steps == 0 else 0.0, peak_value=cfg.lr,
      warmup_steps=cfg.warmup_steps, decay_steps=max(total_steps, cfg.warmup_steps + 1),
      end_value=cfg.lr_end)


def make_optimizer(cfg: OptimConfig, total_steps: int, mask: PyTree) -> optax.GradientTransformation:
  """Masked SGD on `lr_schedule`: frozen leaves (``mask`` False) get neither updates nor
  optimizer state."""
  inner = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),  # PyTorch-style L2 on the gradient
      optax.sgd(lr_schedule(cfg, total_steps), momentum=cfg.momentum),
  )
  return optax.masked(inner, mask)


def init_state(params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats if batch_stats is not None else {},
                    opt_state=jax.jit(tx.init)(params))  # one program, not one per shape


@functools.lru_cache(maxsize=None)
def model_forward(model) -> Forward:
  """`Forward` of a Flax model whose ``__call__(x, train)`` returns logits.

  Cached per model (Flax modules hash by their fields), so the jitted evaluation functions
  below, keyed on the forward, compile once per model and input shape, not once per run."""
  def forward(params, batch_stats, x, train):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if train and batch_stats:
      logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, mutated["batch_stats"]
    return model.apply(variables, x, train=train), batch_stats
  return forward


@functools.lru_cache(maxsize=None)
def head_forward(num_classes: int) -> Forward:
  """`Forward` that runs only the classifier ``params['head']`` (a Dense layer, see
  docs/design.md) on cached penultimate features (N, D)."""
  import flax.linen as nn
  dense = nn.Dense(num_classes)

  def forward(params, batch_stats, feats, train):
    del train
    return dense.apply({"params": params[methods.HEAD]}, feats), batch_stats
  return forward


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


# adversary(params, batch_stats, x, labels, rng) -> perturbed x (model-input units)
Adversary = Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def make_train_step(forward: Forward, tx: optax.GradientTransformation, mask: PyTree,
                    prepare: Prepare | None = None,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
                    adversary: Adversary | None = None):
  """The one train step shared by every model and method (not jitted; see `jit_train_step`).

  `prepare` turns the raw batch into model input on device (augmentation draws from the step's
  key); `adversary` (e.g. `pgd_adversary`) perturbs that input before the update (adversarial
  pre-training). Returns ``step(state, x, labels, rng) -> (state, metrics)``; ``metrics``
  holds the scalar ``loss`` and ``accuracy`` (fraction; NaN when the outputs are not one row
  of logits per label, e.g. SupCon embeddings) of the batch before the update.
  """
  def step(state: TrainState, x, labels, rng):
    rng = jax.random.fold_in(rng, state.step)
    if prepare is not None:
      x = prepare(rng, x, True)
    if adversary is not None:
      x = adversary(state.params, state.batch_stats, x, labels, jax.random.fold_in(rng, 1))
    trainable, frozen = methods.partition(state.params, mask)

    def objective(trainable):
      params = methods.combine(trainable, frozen)
      logits, new_stats = forward(params, state.batch_stats, x, True)
      logits = logits.astype(jnp.float32)  # a bfloat16 model's loss is still float32
      return loss_fn(logits, labels), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=methods.combine(trainable, frozen),
                              batch_stats=new_stats, opt_state=opt_state)
    if logits.shape[0] == labels.shape[0]:
      acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    else:
      acc = jnp.full((), jnp.nan)
    return new_state, {"loss": loss, "accuracy": acc}
  return step


def pgd_adversary(forward: Forward, loss_fn, eps, *, steps: int = 7,
                  step_size=None) -> Adversary:
  """l_inf PGD (Madry et al.): `steps` signed-gradient ascent steps of size `step_size`
  (default 2.5 eps / steps) from a uniform random start in the eps-ball.

  `eps` is in model-input units: for inputs normalised per channel by `std`, pass
  ``eps_pixels / std`` (shape (C,)) to bound the attack in [0, 1] pixel units. The attack runs
  the model in train mode (batch statistics, as the update does) and discards its BatchNorm
  updates."""
  eps = jnp.asarray(eps, jnp.float32)
  size = 2.5 * eps / steps if step_size is None else jnp.asarray(step_size, jnp.float32)

  def attack(params, batch_stats, x, labels, rng):
    def loss_of(delta):
      return loss_fn(forward(params, batch_stats, x + delta, True)[0], labels)

    def body(_, delta):
      g = jax.grad(loss_of)(delta)
      return jnp.clip(delta + size * jnp.sign(g), -eps, eps)

    delta = jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0) * eps
    delta = jax.lax.fori_loop(0, steps, body, delta)
    return jax.lax.stop_gradient(x + delta)
  return attack


# ----------------------------------------------------------------------------- sharding

def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh ``('data',)`` over all (global) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh")


def local_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (processes feed contiguous slices)."""
  per = global_batch // jax.process_count()
  start = jax.process_index() * per
  return slice(start, start + per)


def to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """Assembles per-process batch slices into one batch-sharded global array."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), np.asarray(local))


def put_replicated(mesh: Mesh, tree: PyTree, copy: bool = False) -> PyTree:
  """`tree` replicated over `mesh`; ``copy=True`` never aliases the input buffers (a
  transfer, not a compiled copy per leaf shape)."""
  sharding = replicated(mesh)
  return jax.device_put(tree, sharding, may_alias=False if copy else None)


def to_host(x: jax.Array) -> np.ndarray:
  """Global array -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# XLA:CPU (jaxlib >= 0.10) runs convolutions through YNNPACK by default, whose weight-gradient
# convolutions measured 2-4x slower than XLA's own (Eigen) ones; YNNPACK stays on for dots and
# reductions (BatchNorm statistics), where it is fast. ResNet-18 224x224 full-FT step, batch
# 32, quiet 2-core CPU: 1.64x torch's eager time -> 0.95x (benchmarks/cpu_conv.py).
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _cpu_train_options() -> dict | None:
  """`CPU_TRAIN_COMPILER_OPTIONS` where this jaxlib knows the option, else None."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_TRAIN_COMPILER_OPTIONS).lower(
        jnp.zeros(2)).compile()
    return CPU_TRAIN_COMPILER_OPTIONS
  except Exception:  # noqa: BLE001 - an older or newer jaxlib without the option
    return None


def jit_train_step(step, mesh: Mesh):
  """The jitted step: state replicated and donated, batch sharded over ``'data'``."""
  rep, dat = replicated(mesh), batch_sharded(mesh)
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return jax.jit(step, in_shardings=(rep, dat, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,), compiler_options=_cpu_train_options() if on_cpu else None)


# ----------------------------------------------------------------------------- checkpoints

# orbax writes a step under `<step>.orbax-checkpoint-tmp…` and renames it once complete.
_TMP_MARK = ".orbax-checkpoint-tmp"
_UNREADABLE = ".unreadable"


def _checkpoint_manager(directory: str, max_to_keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False))


def _warn(message: str) -> None:
  """A warning in the absl log (cluster and file logs) and on stderr (the terminal, whatever
  the absl verbosity)."""
  logging.warning("%s", message)
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


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
    _warn(f"removing {len(leftovers)} incomplete checkpoint save(s) left by an interrupted run "
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
  import orbax.checkpoint as ocp
  if not directory or not os.path.isdir(directory):
    return None
  directory = os.path.abspath(directory)
  target = _abstract(abstract_state)
  mngr = _checkpoint_manager(directory)
  failed, restored = [], None
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
      _warn(f"checkpoint step {bad} in {directory} is unreadable ({_one_line(e)}); renamed it "
            f"to {aside} (not deleted) and resuming from step {step}")
  _sync("ncjax.restore_latest")
  return state, history


def _save_checkpoint(mngr, step: int, state: TrainState, history: list[dict]) -> None:
  """Saves `state` and `history` as checkpoint `step` (synchronously).

  Raises:
    OSError: ENOSPC with the checkpoint's path as filename (from the original error, however
      deeply orbax wrapped it), so the caller can report a full disk in one line.
  """
  import orbax.checkpoint as ocp
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            history=ocp.args.JsonSave([dict(h) for h in history]))
  try:
    mngr.save(step, args=args, force=True)
    mngr.wait_until_finished()
  except Exception as e:
    if io.disk_full(e) is not None:
      path = os.path.join(str(mngr.directory), str(step))
      raise OSError(errno.ENOSPC, "No space left on device", path) from e
    raise


# ----------------------------------------------------------------------------- the loop

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
    FloatingPointError: a loss, or a parameter before a save, was NaN or Inf (the message
      names the step; the checkpoints on disk, all finite, are kept).
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
      raise FloatingPointError(f"{desc}: non-finite loss {losses[bad[0]]} at step {s} "
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
      raise FloatingPointError(f"{desc}: non-finite parameters after step {upto_step} "
                               "(lower the learning rate); the checkpoints on disk are kept")
    _save_checkpoint(mngr, upto_step, state, history)

  from ncjax import data
  # Batches are gathered (and, for a lazily decoded split, decoded) a few steps ahead in a
  # background thread while the device runs the current step.
  batches = data.prefetch(batch_iterator(images, labels, batch_size, seed=seed,
                                         start_step=start, total_steps=total_steps), size=3)
  bar = telemetry.progress(batches, total=total_steps, initial=start, desc=desc)
  step, since = start, time.perf_counter()
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


# ----------------------------------------------------------------------------- evaluation

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
  from ncjax import data
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


# ----------------------------------------------------------------------------- compilation

class CompileStats:
  """Counts XLA compilations and their wall time (from `jax.monitoring` events), and loads
  from the persistent compilation cache. One process-wide instance: `compile_stats()`."""

  def __init__(self):
    self.count, self.seconds, self.cache_hits = 0, 0.0, 0
    self._lock = threading.Lock()

  def _on_duration(self, event: str, seconds: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      with self._lock:
        self.count += 1
        self.seconds += seconds

  def _on_event(self, event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      with self._lock:
        self.cache_hits += 1

  def snapshot(self) -> tuple[int, float, int]:
    with self._lock:
      return self.count, self.seconds, self.cache_hits

  def summary(self, since: tuple[int, float, int] = (0, 0.0, 0)) -> str:
    n, s, h = (a - b for a, b in zip(self.snapshot(), since))
    return (f"{n} XLA compilations in {s:.1f} s"
            + (f" ({h} loaded from the persistent cache)" if h else ""))


@functools.lru_cache(maxsize=None)
def compile_stats() -> CompileStats:
  stats = CompileStats()
  jax.monitoring.register_event_duration_secs_listener(stats._on_duration)
  jax.monitoring.register_event_listener(stats._on_event)
  return stats


def enable_compilation_cache(directory: str) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (``~`` expanded); '' leaves
  it off. Programs that took over a second to compile are stored, so a rerun (or the next
  config on the same machine) loads them instead of compiling. Returns the path used."""
  if not directory:
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# ----------------------------------------------------------------------------- one entry

def train(forward: Forward, params: PyTree, batch_stats: PyTree, mask: PyTree | None,
          optim: OptimConfig, inputs, labels, *, batch_size: int, steps: int, seed: int,
          mesh: Mesh | None = None, prepare: Prepare | None = None, loss_fn=cross_entropy,
          adversary=None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
          desc: str = "train", on_log=None) -> tuple[TrainState, list[dict]]:
  """Trains the `mask`-ed leaves of `params` (None: all) for `steps` steps of `batch_size`:
  the optimizer (`make_optimizer`), the one train step (`make_train_step`), the state and
  the loop (`fit`, which resumes from `checkpoint_dir`'s newest readable checkpoint).
  Returns the final state and the history of log windows."""
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  tx = make_optimizer(optim, steps, mask)
  step = make_train_step(forward, tx, mask, prepare, loss_fn=loss_fn, adversary=adversary)
  return fit(init_state(params, batch_stats, tx), step, inputs, labels, batch_size=batch_size,
             total_steps=steps, seed=seed, mesh=mesh, checkpoint_dir=checkpoint_dir,
             checkpoint_every=checkpoint_every, desc=desc, lr_fn=lr_schedule(optim, steps),
             on_log=on_log)
