"""The zero-spread rule (ncjax.metrics docstring, docs/metrics.md) against float64 NumPy.

Rows of issue 23: a dead layer, constant features, classes whose means coincide (to
rounding), a class that is all zeros.  Each answer is checked against a float64 NumPy
computation of the spreads the rule is stated in, or against a float64 reference metric.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import metrics
from ncjax.metrics import CollapseStats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_metrics import ref_cdnv, ref_nc1 as _ref_nc1  # noqa: E402  (float64 references)

K, D = 5, 8
RTOL32 = 10 * D * np.finfo(np.float32).eps            # the rule's tolerance at d = D


def spreads64(h, y, k):
    """float64 (tr Sigma_B, tr(P Sigma_W), tr Sigma_W), P the projector on the eigenvectors of
    Sigma_B that the pseudo-inverse keeps (top K-1 above 10 d eps times the largest)."""
    h = np.asarray(h, np.float64)
    d = h.shape[1]
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    centred = means - means.mean(0)
    r = h - means[y]
    sw, sb = r.T @ r / len(h), centred.T @ centred / k
    w, u = np.linalg.eigh(sb)
    w, u = w[::-1][: k - 1], u[:, ::-1][:, : k - 1]
    u = u[:, w > 10 * d * np.finfo(np.float32).eps * w[0]] if w[0] > 0 else u[:, :0]
    return float(np.trace(sb)), float(np.trace(u.T @ sw @ u)), float(np.trace(sw))


def rule64(h, y, k):
    """The documented rule's answer from the float64 spreads: 'dead', 'inf' or 'finite'."""
    between, within, within_all = spreads64(h, y, k)
    within = within_all if between == 0 else within
    if between == 0 and within == 0:
        return "dead"
    return "inf" if between <= RTOL32 ** 2 * within else "finite"


def ref_nc1(h, y, k):
    """float64 eq. (4) with the float32 pseudo-inverse cutoff ``10 d eps``."""
    return _ref_nc1(h, y, k, rtol=10 * h.shape[1] * np.finfo(np.float32).eps)


def ref_numrank(h, y, k):
    """float64, a class that is all zeros counted as rank 0 (the rule)."""
    h = np.asarray(h, np.float64)
    ranks = []
    for c in range(k):
        hc = h[y == c]
        fro2 = np.sum(hc ** 2)
        ranks.append(0.0 if fro2 == 0 else fro2 / np.linalg.norm(hc, 2) ** 2)
    return float(np.mean(ranks))


def labels(n_per=40, k=K):
    return np.repeat(np.arange(k), n_per).astype(np.int32)


def same_means(n_per=40, k=K, d=D, seed=0, delta=None):
    """Every class holds the same unit-noise rows, each in its own order: the class means
    agree up to float32 rounding.  ``delta`` (k, d) adds exact per-class mean shifts."""
    rng = np.random.default_rng(seed)
    block = rng.normal(size=(n_per, d)).astype(np.float32)
    h = np.concatenate([block[rng.permutation(n_per)] for _ in range(k)])
    if delta is not None:
        h = (h + np.repeat(delta, n_per, axis=0)).astype(np.float32)
    return h, labels(n_per, k)


def stats_of(h, y, k=K, per_class=False):
    s = CollapseStats.create(k, h.shape[1], per_class_second_moment=per_class)
    return s.update(h[::2], y[::2]).update(h[1::2], y[1::2])          # two batches


DEAD = {"zeros": 0.0, "constant": 3.25}


# ----------------------------------------------------------------------------- both spreads zero
@pytest.mark.parametrize("value", DEAD.values(), ids=DEAD.keys())
def test_both_spreads_zero_raise_eagerly_naming_the_case(value):
    h, y = np.full((K * 40, D), value, np.float32), labels()
    assert rule64(h, y, K) == "dead"
    for fn in (metrics.nc1, metrics.nc1_pinv, metrics.cdnv):
        with pytest.raises(ValueError, match="both zero|0/0"):
            fn(h, y)
    for method in ("nc1", "cdnv"):
        with pytest.raises(ValueError, match="both zero|0/0"):
            getattr(stats_of(h, y), method)()
    with pytest.raises(ValueError, match=r"layerwise\['dead'\].*0/0"):
        metrics.layerwise({"dead": h}, y, metrics=("nc1",))


@pytest.mark.parametrize("value", DEAD.values(), ids=DEAD.keys())
def test_both_spreads_zero_give_nan_under_jit(value):
    h, y = jnp.full((K * 40, D), value, jnp.float32), jnp.asarray(labels())
    for fn in (metrics.nc1, metrics.nc1_pinv, metrics.cdnv):
        assert np.isnan(float(jax.jit(lambda a, b: fn(a, b, K))(h, y)))
    s = stats_of(np.asarray(h), np.asarray(y))
    assert np.isnan(float(jax.jit(lambda st: st.nc1())(s)))
    assert np.isnan(float(jax.jit(lambda st: st.cdnv())(s)))


def test_perfect_collapse_is_still_zero_not_degenerate():
    """Within-class spread zero, between-class spread not: NC1 = CDNV = 0 (NC1's common-point
    projection leaves float32 rounding, ~eps^2)."""
    mu = np.random.default_rng(1).normal(size=(K, D)).astype(np.float32)
    y = labels()
    h = mu[y]
    assert spreads64(h, y, K)[2] == 0.0 and spreads64(h, y, K)[0] > 0
    assert 0.0 <= float(metrics.nc1(h, y)) < 1e-12
    assert float(metrics.cdnv(h, y)) == 0.0
    assert 0.0 <= float(stats_of(h, y).nc1()) < 1e-12


# ----------------------------------------------------------------------------- inseparable classes
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coinciding_means_give_inf(seed):
    h, y = same_means(seed=seed)
    assert rule64(h, y, K) == "inf"               # the premise: zero relative to within
    for fn in (metrics.nc1, metrics.nc1_pinv, metrics.cdnv):
        assert float(fn(h, y)) == np.inf, fn.__name__
        assert float(jax.jit(lambda a, b: fn(a, b, K))(h, y)) == np.inf, fn.__name__
    assert float(stats_of(h, y).nc1()) == np.inf
    assert float(stats_of(h, y).cdnv()) == np.inf


# Above the tolerance by 16 in squared size (4 in distance): at 4 the literal d x d path
# (nc1_pinv) is no longer accurate in float32 (its tr(Sigma_W Sigma_B^+) mixes a Sigma_W
# 1e10 times Sigma_B with the rounding of Sigma_B's null space); nc1 and CollapseStats are.
@pytest.mark.parametrize("factor, finite", [(0.25, False), (16.0, True)])
def test_rule_boundary_is_rtol_times_the_within_spread(factor, finite):
    """Means apart by sqrt(factor) * rtol * (within-class size in their directions): inf
    below the tolerance, the float64 reference above it."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(K, D))
    u -= u.mean(0)
    h0, y = same_means(seed=3)
    # within-class spread in the directions of u (the future Sigma_B's range), float64
    q = np.linalg.qr(u.T)[0][:, : K - 1]
    r0 = np.asarray(h0, np.float64) - np.stack([h0[y == c].mean(0) for c in range(K)])[y]
    within = np.trace(q.T @ (r0.T @ r0 / len(y)) @ q)
    # tr(Sigma_B) = |u|_F^2 a^2 / K = factor rtol^2 within  ->  a:
    a = np.sqrt(factor * RTOL32 ** 2 * within * K / np.sum(u ** 2))
    h, _ = same_means(seed=3, delta=(a * u).astype(np.float32))
    assert rule64(h, y, K) == ("finite" if finite else "inf")
    got = [metrics.nc1(h, y), metrics.nc1_pinv(h, y), stats_of(h, y).nc1()]
    if finite:
        want = ref_nc1(h, y, K)
        # float32 class means carry rounding ~eps next to distances ~2 rtol: ~1% here
        for g in got:
            assert np.isfinite(float(g)) and abs(float(g) - want) / want < 0.05, (g, want)
    else:
        assert all(float(g) == np.inf for g in got)


def test_finite_sample_inseparable_classes_stay_finite():
    """Same distribution, independent samples: means differ by ~1/sqrt(n), far above the
    tolerance, so NC1 and CDNV are the (large) float64 reference values."""
    rng = np.random.default_rng(4)
    y = labels(200)
    h = rng.normal(size=(len(y), D)).astype(np.float32)
    between, _, within_all = spreads64(h, y, K)
    assert between > 1e4 * RTOL32 ** 2 * within_all
    for got, want in ((metrics.nc1(h, y), ref_nc1(h, y, K)),
                      (metrics.nc1_pinv(h, y), ref_nc1(h, y, K)),
                      (stats_of(h, y).nc1(), ref_nc1(h, y, K)),
                      (metrics.cdnv(h, y), ref_cdnv(h, y, K)),
                      (stats_of(h, y).cdnv(), ref_cdnv(h, y, K))):
        assert abs(float(got) - want) / want < 1e-4, (got, want)


def test_cdnv_one_coinciding_pair_is_inf_and_one_dead_pair_raises():
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(K, D)) * 3
    h, y = same_means(seed=5)
    h = h + mu[y].astype(np.float32)
    h[y == 1] = h[y == 0][rng.permutation(40)]        # classes 0 and 1 coincide
    assert float(metrics.cdnv(h, y)) == np.inf
    assert float(stats_of(h, y).cdnv()) == np.inf
    assert np.isfinite(float(metrics.nc1(h, y)))      # other directions still separate
    h[y == 0] = 7.0                                   # classes 0 and 1: both zero spread
    h[y == 1] = 7.0
    with pytest.raises(ValueError, match="0/0"):
        metrics.cdnv(h, y)
    # NC1's rule is global: the other classes separate, so NC1 is the float64 reference
    assert abs(float(metrics.nc1(h, y)) - ref_nc1(h, y, K)) / ref_nc1(h, y, K) < 1e-4


# ----------------------------------------------------------------------------- numerical rank
@pytest.mark.parametrize("exact", [False, True])
def test_numerical_rank_of_an_all_zero_class_is_zero(exact):
    rng = np.random.default_rng(6)
    y = labels()
    h = (rng.normal(size=(K, D)) * 3)[y] + rng.normal(size=(len(y), D))
    h = h.astype(np.float32)
    h[y == 2] = 0.0
    want = ref_numrank(h, y, K)
    got = metrics.numerical_rank(h, y, exact=exact, num_iters=200)
    assert abs(float(got) - want) / want < 1e-4
    stats = stats_of(h, y, per_class=True).numerical_rank()
    assert abs(float(stats) - want) / want < 1e-4


def test_numerical_rank_of_all_zero_features_is_zero():
    h, y = np.zeros((K * 40, D), np.float32), labels()
    assert float(metrics.numerical_rank(h, y)) == 0.0
    assert float(metrics.numerical_rank(h, y, exact=True)) == 0.0
    assert float(stats_of(h, y, per_class=True).numerical_rank()) == 0.0
    assert float(jax.jit(lambda a, b: metrics.numerical_rank(a, b, K))(h, y)) == 0.0
