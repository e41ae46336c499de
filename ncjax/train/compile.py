"""Compilation: the jitted train step (and its XLA:CPU options), compile statistics and the
persistent compilation cache.
"""
from __future__ import annotations

import functools
import os
import threading

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ncjax.train.sharding import batch_sharded, replicated


# XLA:CPU (jaxlib >= 0.10) runs convolutions through YNNPACK by default, whose weight-gradient
# convolutions measured 2-4x slower than XLA's own (Eigen) ones; YNNPACK stays on for dots and
# reductions (BatchNorm statistics), where it is fast. Full-FT step, 224x224, quiet 2-core CPU,
# `benchmarks/cpu_conv.py --variants base,ynn_no_conv --rounds 3` (step / torch eager, same run):
# - Sapphire Rapids, cc4889e, ResNet-18 batch 32: jaxlib default 1.75x, these options 1.36x.
# - AMD EPYC, 2026-12-08: ResNet-18 batch 32 1.65x -> 1.28x; ViT-B/32 batch 16 1.04x -> 1.01x
#   (its only convolution is the patch embedding: the same within noise).
# Without them the bfloat16 default job's linear probe read 84.9% against float32's 88.3%: its
# 30-epoch pre-training follows another rounding path with other kernels, which moves that
# probe by several points either way (tests/test_configs.py's bfloat16 test), not a defect.
# (A 2026-12-08 run that read "no gain" compiled both variants with these options: options
# given to jax.jit stay in force under compile(compiler_options=None); see jit_train_step.)
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


def jit_train_step(step, mesh: Mesh, compiler_options: dict | None = None):
  """The jitted step: state replicated and donated, batch sharded over ``'data'``.

  ``compiler_options``: None for ncjax's choice (`CPU_TRAIN_COMPILER_OPTIONS` on CPU, none
  elsewhere); a dict for exactly those XLA options, ``{}`` for the jaxlib defaults.  (Options
  given to ``jax.jit`` stay in force when the lowered step is compiled with
  ``compile(compiler_options=None)``, so a benchmark of the defaults must pass ``{}`` here.)
  """
  rep, dat = replicated(mesh), batch_sharded(mesh)
  if compiler_options is None and mesh.devices.flat[0].platform == "cpu":
    compiler_options = _cpu_train_options()
  return jax.jit(step, in_shardings=(rep, dat, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,), compiler_options=compiler_options or None)


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
