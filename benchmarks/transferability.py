"""Wall time of each transferability estimator, as a ratio to one NC1 call.

    python benchmarks/transferability.py            # N in {10k, 50k}, D in {512, 2048}, K in {10, 100}
    python benchmarks/transferability.py --quick    # N=10k, D=512, K=10 only
    python benchmarks/transferability.py --reps 3

Features are float32 Gaussian blobs (what a backbone hands over); the estimators widen them
to float64 block by block.  Times are the median of --reps runs (NC1 after one jit warm-up):
  nc1     ncjax.metrics.nc1 (JAX, float32, low-rank exact path) -- the unit of the ratios
  logme   ncjax.transferability.logme (one Gram + eigh, fixed point over all classes)
  hscore  ncjax.transferability.hscore (centred Gram + eigh)
  ncti    ncjax.transferability.ncti_terms (centred Gram + eigh, PCA 64, Gaussian posteriors)
  leep    ncjax.transferability.leep on (N, 1000) source probabilities
"""
import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ncjax import metrics  # noqa: E402
from ncjax import transferability as T  # noqa: E402


def timed(fn, reps):
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return float(np.median(out))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=1)
  args = ap.parse_args()
  grid = [(10_000, 512, 10)] if args.quick else list(
      itertools.product((10_000, 50_000), (512, 2048), (10, 100)))
  print("|      N |    D |   K | nc1 ms | logme s | hscore s | ncti s | leep s |"
        " logme/nc1 | hscore/nc1 | ncti/nc1 | leep/nc1 |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for n, d, k in grid:
    rng = np.random.default_rng(0)
    y = np.arange(n) % k
    f = (rng.standard_normal((n, d), np.float32)
         + 0.3 * rng.standard_normal((k, d), np.float32)[y])
    logits = rng.standard_normal((n, 1000)).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    metrics.nc1(f, y, num_classes=k).block_until_ready()        # jit warm-up
    t_nc1 = timed(lambda: metrics.nc1(f, y, num_classes=k).block_until_ready(), max(args.reps, 3))
    t = {name: timed(lambda fn=fn: fn(), args.reps) for name, fn in (
        ("logme", lambda: T.logme(f, y)), ("hscore", lambda: T.hscore(f, y)),
        ("ncti", lambda: T.ncti_terms(f, y)), ("leep", lambda: T.leep(probs, y)))}
    print(f"| {n:6d} | {d:4d} | {k:3d} | {1e3 * t_nc1:6.1f} | {t['logme']:7.2f} | "
          f"{t['hscore']:8.2f} | {t['ncti']:6.2f} | {t['leep']:6.2f} | "
          + " | ".join(f"{t[e] / t_nc1:6.0f}" for e in ("logme", "hscore", "ncti", "leep")) + " |",
          flush=True)


if __name__ == "__main__":
  main()
