"""Benchmark NC1: ncjax.metrics.nc1 vs the literal d x d pinv path vs a peer-style numpy/scipy code.

    python benchmarks/nc1.py                 # N=50,000, d in {512, 2048}, K in {10, 100}
    python benchmarks/nc1.py --quick         # N=5,000, d in {128, 512}, K in {10}
    python benchmarks/nc1.py --n 20000 --reps 7
    python benchmarks/nc1.py --offset 1e6      # features with a large common offset
    python benchmarks/nc1.py --accuracy        # timings, then float32 errors at offsets 0, 1e3, 1e6
    python benchmarks/nc1.py --accuracy-only   # the errors only

Times (median of --reps runs after one warm-up, block_until_ready; each function in its own
loop: alternated with nc1 call by call, the floor itself read 2x slower at d = 512, 11.2 ms
against 5, on the 2-core CPU, 2026-12-08):
  floor  one read pass over the features (jitted column sum)
  gemm   the GEMM floor: 2 N d K flops at the machine's GEMM rate, measured in the same run
         on a 2048 x 2048 float32 matmul (at K = 100 nc1's cost is the N x d by d x K product)
  nc1    ncjax.metrics.nc1 (low-rank exact path, jitted inside)
  pinv   ncjax.metrics.nc1_pinv (d x d Sigma_W, Sigma_B, jnp.linalg.pinv)
  peer   numpy/scipy in the style of tding1/Neural-Collapse: sample mean as global mean,
         d x d Sigma_W accumulated per class with numpy, scipy.linalg.pinv(Sigma_B)
         (host; float32 features; skipped with --no-peer or when scipy is missing)
Runs unchanged on GPU (jax picks the default device; the peer baseline stays on the host).

--accuracy prints, after the timings, the relative error of nc1, nc1_pinv, cdnv and
CollapseStats (float32) against a float64 NumPy computation on the same float32 values, for
features with unit within-class spread at common offsets 0, 1e3 and 1e6 (N=5000, d=64, K=10).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ncjax import metrics  # noqa: E402

try:
    import scipy.linalg
except ImportError:  # pragma: no cover
    scipy = None


def peer_nc1(h, y, k):
    """Peer-style NC1 (tding1/Neural-Collapse conventions): sample global mean, scipy pinv."""
    d = h.shape[1]
    mu_g = h.mean(axis=0)
    sigma_w = np.zeros((d, d), h.dtype)
    means = np.zeros((k, d), h.dtype)
    for c in range(k):
        hc = h[y == c]
        means[c] = hc.mean(axis=0)
        r = hc - means[c]
        sigma_w += r.T @ r
    sigma_w /= h.shape[0]
    m = means - mu_g
    sigma_b = m.T @ m / k
    return float(np.trace(sigma_w @ scipy.linalg.pinv(sigma_b)) / k)


def ref_nc1_cdnv(h, y, k):
    """float64 NumPy NC1 (eq. (4), Sigma_B^+ on its top K-1 eigenpairs, pinv's float32 cutoff)
    and CDNV, mean of class means as global mean."""
    h = np.asarray(h, np.float64)
    n, d = h.shape
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    centred = means - means.mean(0)
    r = h - means[y]
    w, u = np.linalg.eigh(centred.T @ centred / k)
    w, u = w[::-1][: k - 1], u[:, ::-1][:, : k - 1]
    keep = w > 10 * d * np.finfo(np.float32).eps * w[0]
    nc1 = np.trace((r.T @ r / n) @ (u[:, keep] / w[keep]) @ u[:, keep].T) / k
    var = np.array([np.mean(np.sum(r[y == c] ** 2, axis=1)) for c in range(k)])
    iu = np.triu_indices(k, 1)
    dist2 = np.sum((centred[:, None] - centred[None]) ** 2, axis=-1)[iu]
    return float(nc1), float(np.mean((var[:, None] + var[None])[iu] / (2 * dist2)))


def accuracy(n=5000, d=64, k=10):
    print(f"# float32 relative error vs float64 on the same float32 values; N={n}, d={d}, K={k}, "
          "unit within-class spread")
    print(f"{'offset':>8} | {'nc1':>8} {'nc1_pinv':>8} {'cdnv':>8} {'stats.nc1':>9} {'stats.cdnv':>10}")
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n).astype(np.int32)
    y[:k] = np.arange(k)
    base = rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))
    for offset in (0.0, 1e3, 1e6):
        h = (base + offset).astype(np.float32)
        want_nc1, want_cdnv = ref_nc1_cdnv(h, y, k)
        stats = metrics.CollapseStats.create(k, d).update(h[: n // 2], y[: n // 2])
        stats = stats.update(h[n // 2:], y[n // 2:])
        got = [(metrics.nc1(h, y), want_nc1), (metrics.nc1_pinv(h, y), want_nc1),
               (metrics.cdnv(h, y), want_cdnv), (stats.nc1(), want_nc1),
               (stats.cdnv(), want_cdnv)]
        errs = [abs(float(a) - b) / abs(b) for a, b in got]
        print(f"{offset:8.0e} | " + " ".join(f"{e:8.1e}" for e in errs[:3])
              + f" {errs[3]:9.1e} {errs[4]:10.1e}", flush=True)


def timeit(fn, reps):
    jax.block_until_ready(fn())                       # warm-up / compile
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="samples N (default 50000; 5000 with --quick)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="feature dims d")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class counts K")
    p.add_argument("--reps", type=int, default=5, help="timed runs per entry (median reported)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--no-peer", action="store_true", help="skip the numpy/scipy baseline")
    p.add_argument("--no-pinv", action="store_true", help="skip nc1_pinv")
    p.add_argument("--offset", type=float, default=0.0,
                   help="common offset added to every feature (default 0)")
    p.add_argument("--accuracy", action="store_true",
                   help="also print float32 errors at large offsets")
    p.add_argument("--accuracy-only", action="store_true", help="only the errors, no timings")
    a = p.parse_args(argv)
    if a.accuracy_only:
        return accuracy()
    n = a.n or (5000 if a.quick else 50000)
    dims = a.dims or ([128, 512] if a.quick else [512, 2048])
    classes = a.classes or ([10] if a.quick else [10, 100])
    peer = not a.no_peer and scipy is not None

    dev = jax.devices()[0]
    print(f"# device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, N={n}, "
          f"float32, offset {a.offset:g}, median of {a.reps} runs; times in ms")
    floor_fn = jax.jit(lambda h: jnp.sum(h, axis=0))
    sq = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x: jnp.dot(x, x))
    rate = 2 * 2048 ** 3 / timeit(lambda: matmul(sq), a.reps)      # flop/s
    print(f"# GEMM rate (2048^3 float32 matmul): {rate / 1e9:.1f} GFLOP/s")
    hdr = (f"{'d':>5} {'K':>4} | {'floor':>8} {'gemm':>8} {'nc1':>8} {'pinv':>8} {'peer':>8} | "
           f"{'nc1/floor':>9} {'nc1/gemm':>8} {'pinv/nc1':>8} {'peer/nc1':>8} | "
           f"{'rel|nc1-pinv|':>13}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for d in dims:
        for k in classes:
            y_np = rng.integers(0, k, n).astype(np.int32)
            y_np[:k] = np.arange(k)
            mu = rng.normal(size=(k, d)).astype(np.float32) * 2.0
            h_np = mu[y_np] + rng.standard_normal((n, d), dtype=np.float32) + np.float32(a.offset)
            h, y = jax.device_put(h_np), jax.device_put(y_np)
            t_floor = timeit(lambda: floor_fn(h), a.reps)
            t_nc1 = timeit(lambda: metrics.nc1(h, y, k), a.reps)
            v_nc1 = float(metrics.nc1(h, y, k))
            if a.no_pinv:
                t_pinv, v_pinv = float("nan"), float("nan")
            else:
                t_pinv = timeit(lambda: metrics.nc1_pinv(h, y, k), max(1, min(a.reps, 3)))
                v_pinv = float(metrics.nc1_pinv(h, y, k))
            t_peer = timeit(lambda: peer_nc1(h_np, y_np, k), max(1, min(a.reps, 3))) if peer else float("nan")
            ms = lambda t: f"{t * 1e3:8.1f}"  # noqa: E731
            t_gemm = 2 * n * d * k / rate
            print(f"{d:>5} {k:>4} | {ms(t_floor)} {ms(t_gemm)} {ms(t_nc1)} {ms(t_pinv)} "
                  f"{ms(t_peer)} | {t_nc1 / t_floor:9.2f} {t_nc1 / t_gemm:8.2f} "
                  f"{t_pinv / t_nc1:8.1f} {t_peer / t_nc1:8.1f} | "
                  f"{abs(v_nc1 - v_pinv) / abs(v_pinv):13.2e}", flush=True)
            del h, y, h_np
    if a.accuracy:
        accuracy()


if __name__ == "__main__":
    main()
