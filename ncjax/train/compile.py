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
# reductions (BatchNorm statistics), where it is fast. ResNet-18 224x224 full-FT step, batch
# 32, quiet 2-core CPU, `benchmarks/cpu_conv.py --variants base,ynn_no_conv --batch 32
# --rounds 3` at cc4889e (issue 20): default 1.75x torch's eager time, these options 1.36x.
# (An earlier run, 2026-11-26, had read 1.64x -> 0.95x; it did not hold when re-measured.)
# On a 2-core AMD EPYC (2026-12-08) they gained nothing: ResNet-18 1.27x -> 1.27x torch,
# ViT-B/32 batch 16 1.04x -> 1.10x. Kept for now: without them the bfloat16 default job's
# linear probe read 84.9% against float32's 88.3% (tests/test_configs.py bounds the gap at 3
# points); that numerical difference needs its own look before the options go.
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
