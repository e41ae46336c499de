"""Old against new `metrics.nc1` (or `--metric`) in one process, alternated (issue 20).

    git worktree add /tmp/old <commit>
    python benchmarks/nc1_ab.py --old /tmp/old          # this checkout's metrics is "new"
    python benchmarks/nc1_ab.py --old /tmp/old --metric numerical_rank --classes 10

N = 50,000, float32, d in {512, 2048}, K in {10, 100}; for each row the best of --rounds
medians of --reps calls, the read floor (a jitted column sum) and the GEMM floor (2 N d K
flops at the rate of a 2048^3 matmul measured in the same run). Checks the two values agree.
"""
import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ncjax import metrics as new  # noqa: E402


def median_ms(fn, reps):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)) * 1e3


# --metric: name -> the values one call gives (compared between old and new)
METRICS = {
    "nc1": lambda m, h, y, k: [m.nc1(h, y, k)],
    "cdnv": lambda m, h, y, k: [m.cdnv(h, y, k)],
    "numerical_rank": lambda m, h, y, k: [m.numerical_rank(h, y, k)],
    "layerwise": lambda m, h, y, k: list(m.layerwise({"layer": h}, y, k)["layer"].values()),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--old", required=True, help="a checkout of the old commit")
  p.add_argument("--n", type=int, default=50000)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--metric", choices=sorted(METRICS), default="nc1")
  p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
  a = p.parse_args(argv)
  spec = importlib.util.spec_from_file_location("old_metrics",
                                                os.path.join(a.old, "ncjax", "metrics.py"))
  old = importlib.util.module_from_spec(spec)
  sys.modules["old_metrics"] = old           # dataclasses look their module up by name
  spec.loader.exec_module(old)
  floor = jax.jit(lambda h: jnp.sum(h, 0))
  sq = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  rate = 2 * 2048 ** 3 / (median_ms(lambda: mm(sq), a.reps) / 1e3)
  print(f"# GEMM rate {rate / 1e9:.1f} GFLOP/s, N={a.n}, float32, ms")
  fn = METRICS[a.metric]
  print(f"# metric: {a.metric}")
  print("| d | K | floor | GEMM floor | old | new | old/floor | new/floor | new/GEMM "
        "| new/old |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  n = a.n
  for d in (512, 2048):
    for k in a.classes:
      rng = np.random.default_rng(0)
      y = rng.integers(0, k, n).astype(np.int32)
      y[:k] = np.arange(k)
      mu = rng.normal(size=(k, d)).astype(np.float32) * 2
      h = jax.device_put(mu[y] + rng.standard_normal((n, d), dtype=np.float32))
      y = jax.device_put(y)
      f, o, w = [], [], []
      for _ in range(a.rounds):
        f.append(median_ms(lambda: floor(h), a.reps))
        o.append(median_ms(lambda: fn(old, h, y, k), a.reps))
        w.append(median_ms(lambda: fn(new, h, y, k), a.reps))
      f, o, w = min(f), min(o), min(w)
      g = 2 * n * d * k / rate * 1e3
      for vo, vn in zip(fn(old, h, y, k), fn(new, h, y, k)):
        vo, vn = float(vo), float(vn)
        assert abs(vo - vn) <= 1e-5 * abs(vo), (vo, vn)
      print(f"| {d} | {k} | {f:.1f} | {g:.1f} | {o:.1f} | {w:.1f} | {o / f:.2f} | {w / f:.2f} "
            f"| {w / g:.2f} | {w / o:.2f} |", flush=True)


if __name__ == "__main__":
  main()
