"""Tests for ncjax.metrics against an independent float64 numpy reference (written here)."""
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from ncjax import metrics
from ncjax.metrics import CollapseStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- numpy reference
def ref_parts(h, y, k):
    h = np.asarray(h, np.float64)
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    centred = means - means.mean(0)
    return h, means, centred


def ref_nc1(h, y, k, rtol=None):
    """Literal eq. (4) in float64; Sigma_B^+ from an explicit eigendecomposition (top K-1 pairs)."""
    h, means, centred = ref_parts(h, y, k)
    n, d = h.shape
    r = h - means[y]
    sw = r.T @ r / n
    sb = centred.T @ centred / k
    w, u = np.linalg.eigh(sb)
    w, u = w[::-1][: min(k - 1, d)], u[:, ::-1][:, : min(k - 1, d)]
    keep = w > (1e-12 if rtol is None else rtol) * w[0]
    pinv = (u[:, keep] / w[keep]) @ u[:, keep].T
    return float(np.trace(sw @ pinv) / k)


def ref_sigma_b_condition(h, y, k):
    """Largest / smallest nonzero eigenvalue of Sigma_B: NC1's sensitivity to rounding."""
    _, _, centred = ref_parts(h, y, k)
    s = np.linalg.svd(centred, compute_uv=False)[: min(k - 1, h.shape[1])] ** 2
    return float(s[0] / s[-1])


def ref_cdnv(h, y, k):
    h, means, _ = ref_parts(h, y, k)
    var = [np.mean(np.sum((h[y == c] - means[c]) ** 2, axis=1)) for c in range(k)]
    vals = [(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
            for i in range(k) for j in range(i + 1, k)]
    return float(np.mean(vals))


def ref_numrank(h, y, k):
    h = np.asarray(h, np.float64)
    return float(np.mean([np.linalg.norm(h[y == c], "fro") ** 2 / np.linalg.norm(h[y == c], 2) ** 2
                          for c in range(k)]))


def ref_nc2(h, y, k):
    _, _, m = ref_parts(h, y, k)
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    g = m @ m.T
    e = k / (k - 1) * (np.eye(k) - 1.0 / k)
    return float(np.linalg.norm(g / np.linalg.norm(g) - e / np.linalg.norm(e)))


def ref_nc3(h, y, k, w):
    _, _, m = ref_parts(h, y, k)
    return float(np.linalg.norm(w / np.linalg.norm(w) - m / np.linalg.norm(m)))


def make_data(n=300, d=16, k=5, noise=1.0, seed=0, imbalanced=False, offset=0.0):
    rng = np.random.default_rng(seed)
    if imbalanced:
        p = np.arange(1, k + 1, dtype=float) ** 2
        y = rng.choice(k, size=n, p=p / p.sum())
    else:
        y = rng.integers(0, k, n)
    y[:k] = np.arange(k)                                  # every class present
    mu = rng.normal(size=(k, d)) * 3.0
    h = mu[y] + noise * rng.normal(size=(n, d)) + offset
    return h.astype(np.float32), y.astype(np.int32)


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


# ----------------------------------------------------------------------------- NC1 vs reference
CASES = {
    "balanced": dict(n=300, d=16, k=5),
    "imbalanced": dict(n=300, d=16, k=5, imbalanced=True),
    "d_lt_k": dict(n=200, d=3, k=6),
    "d_gg_n": dict(n=30, d=120, k=4),
    "nearly_collapsed": dict(n=300, d=16, k=5, noise=1e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nc1_matches_float64_reference(case):
    h, y = make_data(**CASES[case])
    k = int(y.max()) + 1
    want = ref_nc1(h, y, k)
    tol = 2e-3 if case == "nearly_collapsed" else 1e-4
    assert rel(metrics.nc1(h, y), want) < tol
    assert rel(metrics.nc1_pinv(h, y, num_classes=k), want) < max(tol, 1e-3)
    assert float(metrics.nc1(h, y)) >= 0.0


def test_imbalanced_uses_mean_of_class_means():
    h, y = make_data(imbalanced=True, seed=3)
    k = 5
    # Reference with the *sample* mean as global mean (tding1 convention) differs.
    hh = np.asarray(h, np.float64)
    means = np.stack([hh[y == c].mean(0) for c in range(k)])
    cs = means - hh.mean(0)
    r = hh - means[y]
    peer = np.trace((r.T @ r / len(y)) @ np.linalg.pinv(cs.T @ cs / k)) / k
    ours = float(metrics.nc1(h, y))
    assert rel(ours, ref_nc1(h, y, k)) < 1e-4
    assert rel(ours, peer) > 1e-3


def test_nc1_and_pinv_agree_well_conditioned():
    h, y = make_data(n=500, d=32, k=8, seed=1)
    a, b = float(metrics.nc1(h, y)), float(metrics.nc1_pinv(h, y))
    assert rel(a, b) < 1e-4


@pytest.mark.parametrize("eps,kept", [(0.3, 2), (2e-3, 1)])
def test_rank_cutoff_matches_pinv(eps, kept):
    # Three nearly collinear class means: the second direction of Sigma_B has eigenvalue
    # ratio eps^2/3: far above, or below (1.3e-6 < 9.5e-6), the pinv default cutoff 10*d*eps32,
    # yet far above float32 rounding noise.
    rng = np.random.default_rng(0)
    d, k = 8, 3
    mu = np.zeros((k, d))
    mu[:, 0] = [-1.0, 0.0, 1.0]
    mu[1, 1] = eps
    y = np.repeat(np.arange(k), 50).astype(np.int32)
    noise = 0.05 * rng.normal(size=(len(y), d))
    noise -= np.stack([noise[y == c].mean(0) for c in range(k)])[y]   # class means exactly mu
    h = (mu[y] + noise).astype(np.float32)
    a, b = float(metrics.nc1(h, y)), float(metrics.nc1_pinv(h, y))
    cut = 10 * d * np.finfo(np.float32).eps
    want = ref_nc1(h, y, k, rtol=cut)
    assert rel(a, want) < 1e-3 and rel(b, want) < 1e-3
    if kept == 1:   # the tiny direction is dropped; keeping it would blow NC1 up
        assert a < 1.0 and ref_nc1(h, y, k, rtol=1e-14) > 100.0
    else:
        assert rel(a, ref_nc1(h, y, k)) < 1e-4 and a > 0.01


# ----------------------------------------------------------------------------- invariances
def _orth(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("fn", [metrics.nc1, metrics.cdnv, metrics.nc2_etf])
def test_invariances(fn):
    h, y = make_data(seed=2)
    base = float(fn(h, y))
    q = _orth(h.shape[1], 5).astype(np.float32)
    perm = np.random.default_rng(1).permutation(5)
    assert rel(fn(h * 7.5, y), base) < 1e-4
    assert rel(fn(h @ q, y), base) < 1e-4
    assert rel(fn(h + 20.0, y), base) < 1e-4
    assert rel(fn(h, perm[y].astype(np.int32)), base) < 1e-4


def test_numerical_rank_invariant_to_scale_rotation_relabel():
    h, y = make_data(seed=2)
    base = float(metrics.numerical_rank(h, y, exact=True))
    q = _orth(h.shape[1], 5).astype(np.float32)
    perm = np.random.default_rng(1).permutation(5)
    assert rel(metrics.numerical_rank(h * 3.0, y, exact=True), base) < 1e-5
    assert rel(metrics.numerical_rank(h @ q, y, exact=True), base) < 1e-4
    assert rel(metrics.numerical_rank(h, perm[y].astype(np.int32), exact=True), base) < 1e-5
    # not translation invariant (uncentred by definition)
    assert rel(metrics.numerical_rank(h + 5.0, y, exact=True), base) > 1e-2


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0), shift=st.floats(-20, 20))
def test_property_nc1_invariant_and_nonnegative(seed, scale, shift):
    h, y = make_data(n=120, d=6, k=4, seed=seed)
    base = float(metrics.nc1(h, y))
    assert base >= 0.0
    q = _orth(6, seed).astype(np.float32)
    moved = (h @ q) * np.float32(scale) + np.float32(shift)
    assert rel(metrics.nc1(moved, y), base) < 5e-4
    assert rel(base, ref_nc1(h, y, 4)) < 1e-4


# ----------------------------------------------------------------------------- hand-computed cases
def test_perfect_collapse_gives_zero():
    y = np.repeat(np.arange(4), [3, 5, 8, 2]).astype(np.int32)
    mu = np.random.default_rng(0).integers(-5, 6, size=(4, 7)).astype(np.float32)
    h = mu[y]
    assert 0.0 <= float(metrics.nc1(h, y)) < 1e-12     # rounding of H V vs mu V only
    assert 0.0 <= float(metrics.cdnv(h, y)) < 1e-12
    assert abs(float(metrics.nc1_pinv(h, y))) < 1e-12


@pytest.mark.parametrize("d", [1, 3])
def test_two_classes_plus_minus_one(d):
    a = 0.3
    x = np.array([1 - a, 1 + a, -1 - a, -1 + a], np.float32)
    h = np.zeros((4, d), np.float32)
    h[:, 0] = x
    y = np.array([0, 0, 1, 1], np.int32)
    # Var = a^2, means +-1, mu_G = 0, Sigma_B = 1 (one direction), Sigma_W = a^2.
    assert rel(metrics.nc1(h, y), a * a / 2) < 1e-5
    assert rel(metrics.nc1_pinv(h, y), a * a / 2) < 1e-5
    assert rel(metrics.cdnv(h, y), a * a / 4) < 1e-5
    assert rel(metrics.numerical_rank(h, y), 1.0) < 1e-6          # each class is rank 1
    assert rel(metrics.numerical_rank(h, y, exact=True), 1.0) < 1e-6


def test_numerical_rank_hand_case():
    # class 0: rows diag(3, 1) -> ||.||_F^2 = 10, ||.||_2^2 = 9; class 1: identity(2) -> 2.
    h = np.array([[3, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    y = np.array([0, 0, 1, 1], np.int32)
    want = (10 / 9 + 2) / 2
    assert rel(metrics.numerical_rank(h, y, exact=True), want) < 1e-6
    assert rel(metrics.numerical_rank(h, y), want) < 1e-5


@pytest.mark.parametrize("case", ["balanced", "imbalanced", "d_gg_n"])
def test_numerical_rank_vs_reference(case):
    h, y = make_data(**CASES[case])
    k = int(y.max()) + 1
    want = ref_numrank(h, y, k)
    exact = float(metrics.numerical_rank(h, y, exact=True))
    power = float(metrics.numerical_rank(h, y))
    assert rel(exact, want) < 1e-5
    assert rel(power, want) < 1e-4
    assert power >= exact * (1 - 1e-6)          # Rayleigh quotient: upper bound on the rank


def test_power_iteration_converges_on_centred_data():
    # Centred classes (mean ~ 0): the start vector carries little information, spectrum
    # gap sigma_2/sigma_1 ~ 0.7 (as a population value); more iterations must approach the exact value monotonically.
    rng = np.random.default_rng(4)
    k, d, n = 3, 10, 300
    y = np.repeat(np.arange(k), n // k).astype(np.int32)
    scales = np.concatenate([[1.0], np.linspace(0.7, 0.3, d - 1)])
    h = (rng.normal(size=(n, d)) * scales).astype(np.float32)
    exact = float(metrics.numerical_rank(h, y, exact=True))
    errs = [float(metrics.numerical_rank(h, y, num_iters=t)) - exact for t in (1, 5, 50)]
    assert errs[0] >= errs[1] >= errs[2] >= -1e-5
    assert errs[2] / exact < 1e-4 and errs[0] / exact > 1e-3


def test_power_iteration_stops_only_when_converged():
    # The iteration stops early once every quotient has converged to float32 precision:
    # on slowly converging classes (sigma_2/sigma_1 ~ 0.97) 20 steps are 3.5% off and must
    # not stop there when allowed 200, while fast (uncentred) classes stop at the same value
    # whatever the budget.
    rng = np.random.default_rng(5)
    k, d, n = 2, 10, 4000
    y = np.repeat(np.arange(k), n // k).astype(np.int32)
    scales = np.concatenate([[1.0, 0.97], np.linspace(0.5, 0.3, d - 2)])
    h = (rng.normal(size=(n, d)) * scales).astype(np.float32)
    exact = ref_numrank(h.astype(np.float64), y, k)
    err = {t: rel(metrics.numerical_rank(h, y, num_iters=t), exact) for t in (20, 200, 1000)}
    assert err[20] > 1e-2 and err[200] < 2e-6 and err[1000] == err[200], err
    fast = h + 3.0                                             # a dominant mean direction
    exact = ref_numrank(fast.astype(np.float64), y, k)
    vals = [float(metrics.numerical_rank(fast, y, num_iters=t)) for t in (20, 1000)]
    assert vals[0] == vals[1] and rel(vals[0], exact) < 1e-6, (vals, exact)


def test_cdnv_and_nc2_nc3_vs_reference():
    for case in ("balanced", "imbalanced", "d_lt_k"):
        h, y = make_data(**CASES[case])
        k = int(y.max()) + 1
        assert rel(metrics.cdnv(h, y), ref_cdnv(h, y, k)) < 1e-4
        assert rel(metrics.nc2_etf(h, y), ref_nc2(h, y, k)) < 1e-4
        w = np.random.default_rng(7).normal(size=(k, h.shape[1])).astype(np.float32)
        assert rel(metrics.nc3_duality(h, y, w), ref_nc3(h, y, k, w)) < 1e-4


def test_simplex_etf_gives_nc2_zero_and_w_equal_m_gives_nc3_zero():
    k, d = 5, 9
    etf = np.eye(k) - 1.0 / k                                       # simplex vertices in R^k
    q = _orth(d, 3)[:k]                                              # embed + rotate into R^d
    mu = 4.0 * etf @ q + 2.5                                         # scale + translate
    y = np.repeat(np.arange(k), 4).astype(np.int32)
    h = mu[y].astype(np.float32)
    assert float(metrics.nc2_etf(h, y)) < 1e-5
    h2 = h.copy()
    h2[y == 0] *= 1.5                                                # breaks the ETF
    assert float(metrics.nc2_etf(h2, y)) > 1e-2
    m = (mu - mu.mean(0)).astype(np.float32)
    assert float(metrics.nc3_duality(h, y, 3.0 * m)) < 1e-5
    assert float(metrics.nc3_duality(h, y, (3.0 * m).T, flax_kernel=True)) < 1e-5
    assert float(metrics.nc3_duality(h, y, np.roll(m, 1, axis=0))) > 0.1


# ----------------------------------------------------------------------------- dtype and jit
def test_float64_mode():
    h, y = make_data(**CASES["nearly_collapsed"])
    h64 = h.astype(np.float64) + np.random.default_rng(0).normal(size=h.shape) * 1e-9
    with jax.enable_x64(True):
        v = metrics.nc1(h64, y)
        assert v.dtype == jnp.float64
        assert rel(v, ref_nc1(h64, y, 5)) < 1e-9
        assert rel(metrics.nc1_pinv(h64, y), ref_nc1(h64, y, 5)) < 1e-6
        assert rel(metrics.cdnv(h64, y), ref_cdnv(h64, y, 5)) < 1e-10
        assert rel(metrics.numerical_rank(h64, y, exact=True), ref_numrank(h64, y, 5)) < 1e-10
        s = CollapseStats.create(5, h.shape[1], dtype=jnp.float64).update(h64, y)
        assert s.sums.dtype == jnp.float64 and rel(s.nc1(), ref_nc1(h64, y, 5)) < 1e-9
    assert metrics.nc1(h, y).dtype == jnp.float32


def test_works_under_jit_and_invalid_values_give_nan():
    h, y = make_data()
    f = jax.jit(lambda a, b: (metrics.nc1(a, b, num_classes=5), metrics.cdnv(a, b, 5),
                              metrics.numerical_rank(a, b, 5), metrics.nc2_etf(a, b, 5),
                              metrics.nc1_pinv(a, b, 5)))
    got = [float(v) for v in f(h, y)]
    want = [metrics.nc1(h, y), metrics.cdnv(h, y), metrics.numerical_rank(h, y),
            metrics.nc2_etf(h, y), metrics.nc1_pinv(h, y)]
    np.testing.assert_allclose(got, [float(v) for v in want], rtol=1e-5)
    bad_label = y.copy()
    bad_label[3] = 7
    empty = np.where(y == 4, 0, y).astype(np.int32)
    nan_h = h.copy()
    nan_h[2, 2] = np.nan
    for a, b in [(h, bad_label), (h, empty), (nan_h, y)]:
        assert all(np.isnan(float(v)) for v in f(a, b))
    with pytest.raises(ValueError, match="num_classes must be given"):
        jax.jit(lambda a, b: metrics.nc1(a, b))(h, y)


# ----------------------------------------------------------------------------- streaming
def _stream(h, y, sizes, k, **kw):
    s = CollapseStats.create(k, h.shape[1], **kw)
    i = 0
    for m in sizes:
        s = s.update(h[i:i + m], y[i:i + m])
        i += m
    assert i == len(y)
    return s


def test_streaming_equals_one_shot():
    h, y = make_data(n=300, imbalanced=True)
    order = np.argsort(y, kind="stable")                # first batches miss classes entirely
    h, y = h[order], y[order]
    s = _stream(h, y, [7, 93, 100, 100], 5, per_class_second_moment=True)
    assert rel(s.nc1(), metrics.nc1(h, y)) < 1e-4
    assert rel(s.cdnv(), metrics.cdnv(h, y)) < 1e-4
    assert rel(s.numerical_rank(), metrics.numerical_rank(h, y, exact=True)) < 1e-5
    assert rel(s.nc1(), ref_nc1(h, y, 5)) < 1e-4


def test_streaming_update_is_jittable():
    h, y = make_data()
    upd = jax.jit(lambda s, a, b: s.update(a, b))
    s = CollapseStats.create(5, h.shape[1])
    for i in range(0, 300, 100):
        s = upd(s, h[i:i + 100], y[i:i + 100])
    assert rel(jax.jit(lambda s: s.nc1())(s), metrics.nc1(h, y)) < 1e-4


@pytest.mark.parametrize("noise", [1.0, 1e-3])
def test_streaming_large_offset_float32(noise):
    # ||mu|| ~ 1e4 >> spread: sum hh^T - n mu mu^T would lose every digit in float32.
    h, y = make_data(n=300, noise=noise, seed=6)
    h64 = h.astype(np.float64) + 1e4
    h32 = h64.astype(np.float32)
    s = _stream(h32, y, [7, 93, 100, 100], 5)
    want_nc1 = ref_nc1(h32.astype(np.float64), y, 5)
    want_cdnv = ref_cdnv(h32.astype(np.float64), y, 5)
    assert rel(s.nc1(), want_nc1) < 1e-3
    assert rel(s.cdnv(), want_cdnv) < 1e-3


def _allclose_stats(a, b, rtol=1e-5, atol=1e-4):
    for x, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=rtol, atol=atol)


def test_merge_associative_and_matches_one_shot():
    h, y = make_data(n=300, offset=30.0)
    order = np.argsort(y, kind="stable")
    h, y = h[order], y[order]
    parts = [CollapseStats.create(5, 16, per_class_second_moment=True).update(h[s], y[s])
             for s in (slice(0, 7), slice(7, 100), slice(100, 300))]
    a, b, c = parts
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    _allclose_stats(left, right)
    empty = CollapseStats.create(5, 16, per_class_second_moment=True)
    _allclose_stats(empty.merge(left), left)
    _allclose_stats(left.merge(empty), left)
    assert rel(c.merge(a).merge(b).nc1(), metrics.nc1(h, y)) < 1e-4
    assert rel(left.nc1(), metrics.nc1(h, y)) < 1e-4
    assert rel(left.numerical_rank(), metrics.numerical_rank(h, y, exact=True)) < 1e-5


def test_merge_across_8_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_metrics_shards.py")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")


# ----------------------------------------------------------------------------- layerwise
def test_layerwise_pooling_and_order():
    h, y = make_data(n=120, d=8, k=4)
    rng = np.random.default_rng(0)
    conv = h[:, None, None, :] + rng.normal(size=(120, 3, 2, 8)).astype(np.float32)
    tokens = h[:, None, :] + rng.normal(size=(120, 5, 8)).astype(np.float32)
    feats = {"z_conv": conv, "a_tokens": tokens, "m_flat": h}
    out = metrics.layerwise(feats, y)
    assert list(out) == ["z_conv", "a_tokens", "m_flat"]
    assert all(isinstance(v, float) for r in out.values() for v in r.values())
    assert list(out["m_flat"]) == ["nc1", "cdnv", "numerical_rank"]
    assert rel(out["z_conv"]["nc1"], metrics.nc1(conv.mean(axis=(1, 2)), y)) < 1e-5
    assert rel(out["a_tokens"]["nc1"], metrics.nc1(tokens.mean(axis=1), y)) < 1e-5
    assert rel(out["m_flat"]["cdnv"], metrics.cdnv(h, y)) < 1e-6
    cls = metrics.layerwise({"t": tokens}, y, token_index=0, metrics=("nc1", "nc2_etf"))
    assert rel(cls["t"]["nc1"], metrics.nc1(tokens[:, 0], y)) < 1e-6
    assert set(cls["t"]) == {"nc1", "nc2_etf"}


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    h, y = make_data(n=60, d=4, k=3)
    nan_h = h.copy()
    nan_h[5, 1] = np.nan
    inf_h = h.copy()
    inf_h[7, 0] = np.inf
    neg = y.copy()
    neg[0] = -2
    big = y.copy()
    big[0] = 9
    empty = np.where(y == 1, 0, y).astype(np.int32)
    huge = y.astype(np.int64)
    huge[0] = 2**32 + 4                                  # bincount would want 32 GiB
    return [
        ("features_3d", (h[:, None], y), {}, "features must be 2-D"),
        ("features_1d", (h[:, 0], y), {}, "features must be 2-D"),
        ("labels_2d", (h, y[:, None]), {}, "labels must be 1-D"),
        ("labels_float", (h, y.astype(np.float32)), {}, "labels must be integers"),
        ("length", (h[:-1], y), {}, "length mismatch"),
        ("negative_label", (h, neg), {}, "label -2 is outside"),
        ("label_too_big", (h, big), {"num_classes": 3}, "label 9 is outside"),
        ("empty_class", (h, empty), {}, "class 1 has no samples"),
        ("one_class", (h, np.zeros_like(y)), {}, "K >= 2"),
        ("k_lt_2", (h, np.zeros_like(y)), {"num_classes": 1}, "K >= 2"),
        ("nan", (nan_h, y), {}, r"NaN or Inf \(first at index \(5, 1\)"),
        ("inf", (inf_h, y), {}, r"NaN or Inf \(first at index \(7, 0\)"),
        ("complex", (h.astype(np.complex64), y), {}, "real numbers"),
        ("d_zero", (h[:, :0], y), {}, "empty dimension"),
        ("no_rows", (h[:0], y[:0]), {}, "no samples"),
        ("huge_inferred_k", (h, huge), {}, "label 4294967300 implies K=4294967301 classes"),
        ("huge_num_classes", (h, y), {"num_classes": 10**12}, "only 60 samples"),
        ("float_num_classes", (h, y), {"num_classes": 3.7}, "num_classes must be an integer"),
        ("bool_num_classes", (h, y), {"num_classes": True}, "num_classes must be an integer"),
    ]


@pytest.mark.parametrize("fn", [metrics.nc1, metrics.nc1_pinv, metrics.cdnv,
                                metrics.numerical_rank, metrics.nc2_etf])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(fn, case):
    _, args, kw, match = case
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


def test_bad_input_other_entry_points():
    h, y = make_data(n=60, d=4, k=3)
    w = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="pass flax_kernel=True"):
        metrics.nc3_duality(h, y, w.T)
    with pytest.raises(ValueError, match="does not match"):
        metrics.nc3_duality(h, y, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="classifier contains NaN"):
        metrics.nc3_duality(h, y, w * np.nan)
    s = CollapseStats.create(3, 4)
    with pytest.raises(ValueError, match="feature dimension 5"):
        s.update(np.ones((2, 5), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="label 3 is outside"):
        s.update(h[:2], np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.update(h[:2] * np.nan, y[:2])
    with pytest.raises(ValueError, match="class 2 has no samples"):
        s.update(h[y < 2], y[y < 2]).nc1()
    with pytest.raises(ValueError, match="per_class_second_moment"):
        s.update(h, y).numerical_rank()
    with pytest.raises(ValueError, match="num_classes >= 2"):
        CollapseStats.create(1, 4)
    with pytest.raises(ValueError, match="different num_classes"):
        s.merge(CollapseStats.create(4, 4))
    with pytest.raises(ValueError, match=r"features must be 2-D or 3-D or 4-D"):
        metrics.layerwise({"x": h[:, :, None, None, None]}, y)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.layerwise({"x": h}, y, metrics=("nc9",))
    with pytest.raises(ValueError, match="token_index 5 out of range"):
        metrics.layerwise({"x": np.ones((60, 2, 4), np.float32)}, y, token_index=5)
    with pytest.raises(ValueError, match="num_iters"):
        metrics.numerical_rank(h, y, num_iters=0)
    with pytest.raises(ValueError, match="num_iters must be an integer, got 1.5"):
        metrics.numerical_rank(h, y, num_iters=1.5)
    with pytest.raises(ValueError, match="token_index must be an integer, got 1.5"):
        metrics.layerwise({"x": np.ones((60, 2, 4), np.float32)}, y, token_index=1.5)
    with pytest.raises(ValueError, match="num_classes must be an integer, got 3.7"):
        CollapseStats.create(3.7, 4)
    with pytest.raises(ValueError, match="need dim >= 1"):
        CollapseStats.create(3, 0)
    with pytest.raises(ValueError, match="empty dimension"):
        metrics.layerwise({"x": np.ones((60, 0, 4), np.float32)}, y)
    with pytest.raises(ValueError, match="num_classes=1000000000 but there are only 60 samples"):
        jax.jit(lambda a, b: metrics.nc1(a, b, 10**9))(h, y)      # checked before allocating K


# ------------------------------------------------------------ offsets, dtypes and scale (issue 10)
def _offset_data(n=5000, d=64, k=10, offset=1e6, sep=1.0, seed=0):
    """Float32 features far from the origin (offset) with unit within-class spread."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    y[:k] = np.arange(k)
    h = sep * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d)) + offset
    return h.astype(np.float32), y


@pytest.mark.parametrize("offset,sep", [(1e6, 1.0), (1e4, 1e3), (0.0, 1e4)])
def test_large_offset_and_strong_collapse_float32(offset, sep):
    # The reference sees the same float32 values: input quantisation is not the metric's error.
    h, y = _offset_data(offset=offset, sep=sep)
    k, d = 10, 64
    hr = h.astype(np.float64)
    want = ref_nc1(hr, y, k, rtol=10 * d * np.finfo(np.float32).eps)
    want_cdnv = ref_cdnv(hr, y, k)
    s = CollapseStats.create(k, d).update(h[:1700], y[:1700]).update(h[1700:], y[1700:])
    assert rel(metrics.nc1_pinv(h, y), want) < 1e-5
    assert rel(metrics.cdnv(h, y), want_cdnv) < 1e-5
    assert rel(s.nc1(), want) < 1e-5 and rel(s.cdnv(), want_cdnv) < 1e-5
    # nc1's second pass keeps one common shift: error ~ eps / sqrt(NC1) under strong collapse.
    assert rel(metrics.nc1(h, y), want) < (1e-5 if sep < 1e4 else 1e-4)


@pytest.mark.parametrize("offset,small", [(0.0, True), (1.0, True), (1e3, False), (1e6, False)])
def test_nc1_reads_the_features_unshifted_only_where_their_offset_is_small(offset, small):
    """Issue 20: both passes of nc1 read h itself (a plain scatter and a plain matmul, at
    read speed) when the offset is small next to the spread; a large one keeps the shifted
    frame, which the unshifted passes would get wrong (their error grows with the offset)."""
    h, y = _offset_data(offset=offset)
    hj, yj = jnp.asarray(h), jnp.asarray(y)
    assert bool(metrics._offset_is_small(hj, yj, 10)) is small
    want = ref_nc1(h.astype(np.float64), y, 10, rtol=10 * 64 * np.finfo(np.float32).eps)
    assert rel(metrics.nc1(h, y), want) < 2e-6
    assert rel(jax.jit(lambda a, b: metrics.nc1(a, b, 10))(h, y), want) < 2e-6  # traced choice
    shifted = float(metrics._nc1_plain(hj, yj, 10, False)[0])
    unshifted = float(metrics._nc1_plain(hj, yj, 10, True)[0])
    assert rel(shifted, want) < 2e-6
    assert (rel(unshifted, want) < 2e-6) if small else (rel(unshifted, want) > 1e-5)


def test_float64_without_x64_is_accurate_and_warns_once(monkeypatch):
    monkeypatch.setattr(metrics, "_warned_float32", False)
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 50).astype(np.int32)
    h = rng.normal(size=(4, 6))[y] * 1e-3 + rng.normal(size=(200, 6)) * 1e-4 + 1e6    # float64
    with pytest.warns(UserWarning, match="float64 input but jax_enable_x64 is off") as rec:
        got = [metrics.nc1(h, y), metrics.nc1_pinv(h, y), metrics.cdnv(h, y)]
        s = CollapseStats.create(4, 6).update(h[:77], y[:77]).update(h[77:], y[77:])
    assert len([w for w in rec if "jax_enable_x64" in str(w.message)]) == 1
    assert all(v.dtype == jnp.float32 for v in got)
    # float32 of h would keep nothing of the spread (ulp 0.06 at 1e6); the host shift keeps it.
    want = [ref_nc1(h, y, 4), ref_nc1(h, y, 4), ref_cdnv(h, y, 4)]
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-4
    assert rel(s.nc1(), want[0]) < 1e-4 and rel(s.cdnv(), want[2]) < 1e-4


def test_int64_features_beyond_int32_are_exact():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 40).astype(np.int32)
    h = (rng.integers(-1000, 1000, size=(3, 5))[y] + rng.integers(-300, 300, size=(120, 5))
         + 2**40).astype(np.int64)
    hr = h.astype(np.float64)
    assert rel(metrics.nc1(h, y), ref_nc1(hr, y, 3)) < 1e-5
    assert rel(metrics.cdnv(h, y), ref_cdnv(hr, y, 3)) < 1e-5
    s = CollapseStats.create(3, 5).update(h, y)
    assert rel(s.nc1(), ref_nc1(hr, y, 3)) < 1e-5
    small = h - 2**40                          # int64 inside int32 range: device path, no host
    assert rel(metrics.nc1(small.astype(np.int32), y), ref_nc1(hr, y, 3)) < 1e-5


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_one_shot_metrics_are_scale_invariant_at_extreme_scales(scale):
    h, y = make_data(n=120, d=5, k=4, seed=8)
    hs = (h.astype(np.float64) * scale).astype(np.float32)
    hr = hs.astype(np.float64)
    assert rel(metrics.nc1(hs, y), ref_nc1(hr, y, 4)) < 1e-5
    assert rel(metrics.nc1_pinv(hs, y), ref_nc1(hr, y, 4)) < 1e-5
    assert rel(metrics.cdnv(hs, y), ref_cdnv(hr, y, 4)) < 1e-5
    assert rel(metrics.nc2_etf(hs, y), ref_nc2(hr, y, 4)) < 1e-5
    assert rel(metrics.numerical_rank(hs, y, exact=True), ref_numrank(hr, y, 4)) < 1e-5
    assert rel(metrics.numerical_rank(hs, y), ref_numrank(hr, y, 4)) < 1e-4


def test_overflow_and_underflow_raise_value_error():
    h, y = make_data(n=3000, d=4, k=3)
    huge = h * np.float32(1e36)                # finite, but the class sums overflow float32
    assert np.all(np.isfinite(huge))
    for fn in (metrics.nc1, metrics.nc1_pinv, metrics.cdnv, metrics.numerical_rank,
               metrics.nc2_etf):
        with pytest.raises(ValueError, match="overflow float32"):
            fn(huge, y)
    s = CollapseStats.create(3, 4)
    with pytest.raises(ValueError, match="overflow float32"):
        s.update(h * np.float32(1e20), y)      # squares overflow the statistics
    with pytest.raises(ValueError, match="too small"):
        s.update(h * np.float32(1e-20), y)     # squares underflow: a silent 0 otherwise
    f = jax.jit(lambda a, b: metrics.nc1(a, b, num_classes=3))
    assert np.isnan(float(f(huge, y)))


# ------------------------------------------------------------------------ masked streaming update
def test_masked_update_ignores_masked_rows_even_garbage():
    h, y = make_data(n=300, offset=1e5, seed=4)
    valid = np.random.default_rng(0).random(300) < 0.7
    valid[:5] = True                                          # every class counted
    junk_h = np.where(valid[:, None], h, np.nan).astype(np.float32)
    junk_y = np.where(valid, y, -1).astype(np.int32)          # padding label -1
    want = CollapseStats.create(5, 16, per_class_second_moment=True).update(h[valid], y[valid])
    upd = jax.jit(lambda s, a, b, m: s.update(a, b, mask=m))
    for mask in (valid, valid.astype(np.float32), valid.astype(np.int32)):
        s = CollapseStats.create(5, 16, per_class_second_moment=True)
        for i in range(0, 300, 128):                          # last batch is padded
            s = upd(s, junk_h[i:i + 128], junk_y[i:i + 128], mask[i:i + 128])
        assert np.array_equal(np.asarray(s.counts), np.bincount(y[valid], minlength=5))
        assert rel(s.nc1(), ref_nc1(h[valid], y[valid], 5)) < 1e-4
        assert rel(s.cdnv(), ref_cdnv(h[valid], y[valid], 5)) < 1e-4
        assert rel(s.numerical_rank(), ref_numrank(h[valid], y[valid], 5)) < 1e-4
        assert rel(s.nc1(), want.nc1()) < 1e-4
    eager = CollapseStats.create(5, 16).update(junk_h, junk_y, mask=valid)
    assert rel(eager.nc1(), want.nc1()) < 1e-4
    all_out = CollapseStats.create(5, 16).update(junk_h, junk_y, mask=np.zeros(300, bool))
    assert int(np.sum(np.asarray(all_out.counts))) == 0 and np.all(np.asarray(all_out.sums) == 0)


def test_jitted_update_with_bad_rows_gives_nan_not_a_subset():
    h, y = make_data(n=100, d=6, k=3)
    upd = jax.jit(lambda s, a, b, m: s.update(a, b, mask=m))
    stats_nc1 = jax.jit(lambda s: s.nc1())
    ok = np.ones(100, bool)
    big = y.copy()
    big[7] = 3                                                # label >= K on a counted row
    half = ok.astype(np.float32)
    half[3] = 0.5                                             # weight other than 0/1
    nan_h = h.copy()
    nan_h[2, 1] = np.nan
    for a, b, m in [(h, big, ok), (h, y, half), (nan_h, y, ok), (h * 1e-25, y, ok)]:
        s = upd(CollapseStats.create(3, 6), a, b, m)
        assert np.isnan(np.asarray(s.sums)).any() and np.isnan(np.asarray(s.scatter)).any()
        assert np.isnan(float(stats_nc1(s)))
        with pytest.raises(ValueError, match="NaN or Inf.*outside \\[0, K\\)"):
            s.nc1()
        with pytest.raises(ValueError, match="already NaN"):
            s.update(h, y)
    big[7] = -1                                               # masked out: harmless
    m = ok.copy()
    m[7] = False
    s = upd(CollapseStats.create(3, 6), h, big, m)
    assert rel(stats_nc1(s), ref_nc1(h[m], y[m], 3)) < 1e-4


def test_update_mask_validation():
    h, y = make_data(n=40, d=4, k=3)
    s = CollapseStats.create(3, 4)
    with pytest.raises(ValueError, match="mask must have shape \\(40,\\)"):
        s.update(h, y, mask=np.ones(39, bool))
    with pytest.raises(ValueError, match="mask must be boolean or 0/1 weights, got 0.5 at row 2"):
        s.update(h, y, mask=np.array([1, 1, 0.5] + [1] * 37))
    with pytest.raises(ValueError, match="mask must be boolean or 0/1 weights, got dtype"):
        s.update(h, y, mask=np.ones(40, np.complex64))
    bad = y.copy()
    bad[0] = 7
    m = np.ones(40, bool)
    with pytest.raises(ValueError, match="label 7 is outside"):
        s.update(h, bad, mask=m)
    m[0] = False
    s.update(h, bad, mask=m)                                  # the bad row does not count


# ----------------------------------------------------------------------------- exact numerical rank
@pytest.mark.parametrize("n,d,imbalanced", [(600, 8, True), (40, 120, False), (45, 30, True)])
def test_exact_numerical_rank_class_by_class(n, d, imbalanced):
    # d x d Grams over each class's row blocks (n >> d), or small per-class Grams (d >> n).
    h, y = make_data(n=n, d=d, k=5, imbalanced=imbalanced, seed=3)
    want = ref_numrank(h, y, 5)
    assert rel(metrics.numerical_rank(h, y, exact=True), want) < 1e-5
    f = jax.jit(lambda a, b: metrics.numerical_rank(a, b, 5, exact=True))   # window = N
    assert rel(f(h, y), want) < 1e-5


# ----------------------------------------------------------------------------- property tests
SHAPES = [(60, 3, 4), (90, 12, 3), (48, 40, 5)]      # d < K-1, d > K, d close to N


def _draw_features(draw, n, d, k):
    """(h float64 values as given to the metrics, y, dtype): random imbalance, offset, scale."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = (np.arange(k) + 1.0) ** draw(st.floats(0.0, 3.0))
    y = rng.choice(k, size=n, p=p / p.sum())
    y[:2 * k] = np.tile(np.arange(k), 2)                       # every class has >= 2 rows
    y = rng.permutation(y).astype(np.int32)
    offset = draw(st.sampled_from([0.0, 1.0, 1e3, 1e6])) * draw(st.sampled_from([-1.0, 1.0]))
    scale = 10.0 ** draw(st.integers(-15, 15))
    dtype = draw(st.sampled_from(["float32", "float64", "int64"]))
    h = 3.0 * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d)) + offset
    if dtype == "int64":                                       # integers, beyond int32 too
        return np.round(h * 100).astype(np.int64) + (2**35 if offset else 0), y, dtype
    h = h * scale
    return (h.astype(np.float32) if dtype == "float32" else h), y, dtype


@settings(max_examples=30, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES))
def test_property_one_shot_metrics_vs_float64_reference(data, shape):
    n, d, k = shape
    h, y, dtype = _draw_features(data.draw, n, d, k)
    hr = h.astype(np.float64)
    # Well posed: the K x K Gram of the centred means turns eps into eps * cond(Sigma_B)
    # (measured ~2e-7 * cond in float32, for nc1 and the statistics alike).
    assume(ref_sigma_b_condition(hr, y, k) < 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {name: float(f(h, y)) for name, f in [
            ("nc1", metrics.nc1), ("nc1_pinv", metrics.nc1_pinv), ("cdnv", metrics.cdnv),
            ("nc2", metrics.nc2_etf),
            ("rank", lambda a, b: metrics.numerical_rank(a, b, exact=True))]}
    cut = 10 * d * np.finfo(np.float32).eps
    assert got["nc1"] >= 0.0
    assert rel(got["nc1"], ref_nc1(hr, y, k, rtol=cut)) < 1e-4
    assert rel(got["nc1_pinv"], ref_nc1(hr, y, k, rtol=cut)) < 1e-4
    assert rel(got["cdnv"], ref_cdnv(hr, y, k)) < 1e-4
    assert abs(got["nc2"] - ref_nc2(hr, y, k)) < 1e-4
    assert rel(got["rank"], ref_numrank(hr, y, k)) < 1e-4


@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES[:2]), batch=st.sampled_from([16, 32]))
def test_property_masked_streaming_vs_float64_reference(data, shape, batch):
    n, d, k = shape
    h, y, dtype = _draw_features(data.draw, n, d, k)
    if dtype != "int64":                      # the statistics hold squares: |h - c| in 1e+-19
        h = h / np.abs(h).max() * 10.0 ** data.draw(st.integers(-8, 8))
        h = h.astype(np.float32) if dtype == "float32" else h
    keep = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    keep[np.concatenate([np.flatnonzero(y == c)[:2] for c in range(k)])] = True
    kept_y = y[keep]
    hr = h.astype(np.float64)[keep]
    assume(ref_sigma_b_condition(hr, kept_y, k) < 200)
    pad = -n % batch                          # a padded last batch, as the pipeline makes
    hp = np.concatenate([h, np.full((pad, d), np.nan if h.dtype.kind == "f" else 0, h.dtype)])
    yp = np.concatenate([y, np.full(pad, -1, np.int32)])
    mp = np.concatenate([keep, np.zeros(pad, bool)])
    s = CollapseStats.create(k, d, per_class_second_moment=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(0, n + pad, batch):
            s = s.update(hp[i:i + batch], yp[i:i + batch], mask=mp[i:i + batch])
    cut = 10 * d * np.finfo(np.float32).eps
    # 64-bit input without x64: the float32 shift is the first row rounded, so residuals
    # carry up to half a float32 ulp u of |h| in common (CollapseStats' docstring): the
    # bound adds eps (u / 2 sigma)^2 cond, 0 unless |h| > 2^24 sigma (int64 at 2^35 here).
    sigma = np.sqrt(np.mean(np.sum((hr - np.stack(
        [hr[kept_y == c].mean(0) for c in range(k)])[kept_y]) ** 2, axis=1)) / d)
    eps = np.finfo(np.float32).eps
    u = np.spacing(np.float32(np.abs(hr).max())) if h.dtype.itemsize == 8 else 0.0
    tol = 1e-4 + 10 * eps * (u / (2 * sigma)) ** 2 * ref_sigma_b_condition(hr, kept_y, k)
    assert rel(s.nc1(), ref_nc1(hr, kept_y, k, rtol=cut)) < tol
    assert rel(s.cdnv(), ref_cdnv(hr, kept_y, k)) < tol
    assert rel(s.numerical_rank(), ref_numrank(hr, kept_y, k)) < 1e-4


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(["float16", "bfloat16", "int32", "uint8"]))
def test_property_narrow_dtypes_convert_exactly(seed, dtype):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 20).astype(np.int32)
    v = 3.0 * rng.normal(size=(3, 5))[y] + rng.normal(size=(60, 5))
    if dtype in ("int32", "uint8"):
        h = np.clip(np.round(v * 10) + 100, 0, 255).astype(dtype)
    else:
        h = jnp.asarray(v, dtype)
    hr = np.asarray(jnp.asarray(h, jnp.float32), np.float64)         # exact for these dtypes
    assert rel(metrics.nc1(h, y), ref_nc1(hr, y, 3)) < 1e-4
    assert rel(metrics.cdnv(h, y), ref_cdnv(hr, y, 3)) < 1e-4
