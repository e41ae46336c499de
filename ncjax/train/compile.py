"""Compilation: the jitted train step, compile statistics and the
persistent compilation cache.
"""
from __future__ import annotations

import functools
import os
import threading

import jax
from jax.sharding import Mesh

from ncjax.train.sharding import batch_sharded, replicated


# No XLA:CPU options for the train step. YNNPACK-for-dots-and-reductions-only
# (xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
# LIBRARY_FUSION_TYPE_REDUCE) was applied until issue 20's re-measurement: it helped ResNet-18
# on one machine (cc4889e, quiet: 1.75x -> 1.36x torch eager) but not on another
# (2026-12-08, load 0.9-1.8 with the benchmark itself: ResNet-18 224 batch 32 1.27x -> 1.27x,
# ViT-B/32 224 batch 16 1.04x -> 1.10x; `benchmarks/cpu_conv.py --variants base,ynn_no_conv
# --batch 32 --rounds 3`, and `--model vit_b32 --batch 16`), nor ViT-B/32 on the first
# (0.74x -> 0.74x). An option stays only where it helps both models.


def jit_train_step(step, mesh: Mesh):
  """The jitted step: state replicated and donated, batch sharded over ``'data'``."""
  rep, dat = replicated(mesh), batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, dat, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


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
