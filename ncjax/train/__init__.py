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

from ncjax.train.step import (
    Adversary, cross_entropy, Forward, head_forward, init_state, lr_schedule, make_optimizer,
    make_train_step, model_forward, OptimConfig, pgd_adversary, Prepare, PyTree, TrainState,
)
from ncjax.train.sharding import (
    batch_sharded, check_batch_size, data_mesh, local_rows, put_replicated, replicated,
    to_global, to_host,
)
from ncjax.train.compile import (
    compile_stats, CompileStats, CPU_TRAIN_COMPILER_OPTIONS, enable_compilation_cache,
    jit_train_step,
)
from ncjax.train.checkpoint import (
    remove_partial_saves, restore_latest,
)
from ncjax.train.evaluate import (
    accuracy, logits_fn, padded_batches, predict,
)
from ncjax.train.loop import (
    batch_iterator, fit, phase_dirs, train, train_phases,
)

__all__ = [
    "PyTree",
    "Forward",
    "Prepare",
    "TrainState",
    "OptimConfig",
    "lr_schedule",
    "make_optimizer",
    "init_state",
    "model_forward",
    "head_forward",
    "cross_entropy",
    "Adversary",
    "make_train_step",
    "pgd_adversary",
    "data_mesh",
    "replicated",
    "batch_sharded",
    "check_batch_size",
    "local_rows",
    "to_global",
    "put_replicated",
    "to_host",
    "CPU_TRAIN_COMPILER_OPTIONS",
    "jit_train_step",
    "CompileStats",
    "compile_stats",
    "enable_compilation_cache",
    "remove_partial_saves",
    "restore_latest",
    "padded_batches",
    "predict",
    "logits_fn",
    "accuracy",
    "batch_iterator",
    "fit",
    "train",
    "train_phases",
    "phase_dirs",
]
