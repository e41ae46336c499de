"""Helper for tests/test_metrics.py: CollapseStats merged across 8 simulated CPU devices.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be
set before jax is imported).  Exits non-zero (AssertionError) on any mismatch; prints "OK".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ncjax import metrics  # noqa: E402


def main():
    assert len(jax.devices()) == 8, jax.devices()
    k, d, n = 5, 12, 8 * 37
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(k, d)) * 2.0 + 50.0           # large common offset
    y = np.sort(rng.integers(0, k, n)).astype(np.int32)  # sorted: most shards see 1-2 classes
    y[:k] = np.arange(k)                                 # every class present somewhere
    y = np.sort(y)
    h = (mu[y] + rng.normal(size=(n, d))).astype(np.float32)

    # jax.make_mesh defaults to Explicit axis types in this jax; shard_map works with both.
    mesh = jax.make_mesh((8,), ("data",))
    sh = NamedSharding(mesh, P("data"))
    hs, ys = jax.device_put(h, sh), jax.device_put(y, sh)

    def local(hb, yb):
        stats = metrics.CollapseStats.create(k, d, per_class_second_moment=True).update(hb, yb)
        return stats.psum("data")

    merged = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                   out_specs=P()))(hs, ys)
    assert int(np.sum(np.asarray(merged.counts))) == n

    ref_nc1 = float(metrics.nc1(h, y))
    ref_cdnv = float(metrics.cdnv(h, y))
    ref_rank = float(metrics.numerical_rank(h, y, exact=True))
    got = (float(merged.nc1()), float(merged.cdnv()), float(merged.numerical_rank()))
    print("psum", got, "one-shot", (ref_nc1, ref_cdnv, ref_rank))
    np.testing.assert_allclose(got, (ref_nc1, ref_cdnv, ref_rank), rtol=2e-4)

    # A row mask inside shard_map (a padded last batch that never leaves the devices): garbage
    # rows (NaN features, label -1) are masked out on every shard; psum then equals the
    # one-shot metrics on the kept rows.
    keep = np.ones(n, bool)
    keep[np.arange(n) % 37 >= 33] = False               # the last 4 rows of each shard
    keep[[int(np.flatnonzero(y == c)[0]) for c in range(k)]] = True
    hg = np.where(keep[:, None], h, np.nan).astype(np.float32)
    yg = np.where(keep, y, -1).astype(np.int32)

    def local_masked(hb, yb, mb):
        stats = metrics.CollapseStats.create(k, d).update(hb, yb, mask=mb)
        return stats.psum("data")

    masked = jax.jit(jax.shard_map(local_masked, mesh=mesh, in_specs=(P("data"),) * 3,
                                   out_specs=P()))(*(jax.device_put(a, sh) for a in (hg, yg, keep)))
    assert int(np.sum(np.asarray(masked.counts))) == int(keep.sum())
    np.testing.assert_allclose((float(masked.nc1()), float(masked.cdnv())),
                               (float(metrics.nc1(h[keep], y[keep])),
                                float(metrics.cdnv(h[keep], y[keep]))), rtol=2e-4)

    # Host-side merge tree of the 8 per-shard statistics gives the same numbers.
    shards = np.split(np.arange(n), 8)
    parts = [metrics.CollapseStats.create(k, d).update(h[s], y[s]) for s in shards]
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) for i in range(0, len(parts), 2)]
    np.testing.assert_allclose(float(parts[0].nc1()), ref_nc1, rtol=2e-4)

    # One-shot metrics directly on sharded arrays (jit, Auto-mode mesh) agree too.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    hs, ys = jax.device_put(h, sh), jax.device_put(y, sh)
    jit_nc1 = jax.jit(lambda a, b: metrics.nc1(a, b, num_classes=k))
    np.testing.assert_allclose(float(jit_nc1(hs, ys)), ref_nc1, rtol=2e-4)
    np.testing.assert_allclose(float(metrics.nc1(hs, ys)), ref_nc1, rtol=2e-4)
    print("OK")


if __name__ == "__main__":
    main()
