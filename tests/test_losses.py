"""Tests for ncjax.losses against independent references (float64 numpy loops, torch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ncjax import losses

# Jitted once per shape: op-by-op eager dispatch is several times slower on 2 CPU cores.
# (Eager calls are covered by test_all_losses_jit and the error tests.)
_ce = jax.jit(losses.cross_entropy)
_mse = jax.jit(losses.mse)
_supcon = jax.jit(losses.supcon)


# ----------------------------------------------------------------------------- references
def _supcon_loop(x, y, tau, tau_base=None):
    """Khosla et al. L_out written anchor by anchor with explicit sums (float64)."""
    tau_base = tau if tau_base is None else tau_base
    n, v, d = x.shape
    views = []
    for i in range(n):
        for a in range(v):
            vec = np.asarray(x[i, a], np.float64)
            views.append((vec / np.linalg.norm(vec), int(y[i])))
    anchor_losses = []
    for i, (zi, yi) in enumerate(views):
        denom = 0.0
        for a, (za, _) in enumerate(views):
            if a != i:
                denom += np.exp(np.dot(zi, za) / tau)
        terms = []
        for p, (zp, yp) in enumerate(views):
            if p != i and yp == yi:
                terms.append(np.log(np.exp(np.dot(zi, zp) / tau) / denom))
        if terms:
            anchor_losses.append(-(tau / tau_base) * sum(terms) / len(terms))
    return float(np.mean(anchor_losses)) if anchor_losses else 0.0


def _x64(fn, *args, **kw):
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in args]
        return float(fn(*args, **kw))


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35, 1.0])
def test_cross_entropy_matches_torch(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(13, 7)) * 3
    labels = rng.integers(0, 7, size=13)
    want = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                           label_smoothing=eps).item()
    got = _x64(_ce, logits, labels, label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cross_entropy_float32_large_logits_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 500.0, 0.0]], np.float32)
    labels = np.array([0, 0])
    want = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                           label_smoothing=0.1).item()
    got = float(_ce(logits, labels, label_smoothing=0.1))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- MSE
def test_mse_hand_computed():
    # example 1: label 1, f = (1, 0, 0.5), M=2, k=3: 1^2 + 3*(0-2)^2 + 0.5^2 = 13.25
    # example 2: label 0, f = (2, -1, 1):             3*(2-2)^2 + 1 + 1       = 2
    f = np.array([[1.0, 0.0, 0.5], [2.0, -1.0, 1.0]])
    y = np.array([1, 0])
    np.testing.assert_allclose(_x64(_mse, f, y, scale=2.0, positive_weight=3.0),
                               (13.25 + 2.0) / 2, rtol=1e-14)
    # plain one-hot target, k=1: (1-0)^2 + (0-1)^2 + 0.25 = 2.25 ; (2-1)^2 + 1 + 1 = 3
    np.testing.assert_allclose(_x64(_mse, f, y), (2.25 + 3.0) / 2, rtol=1e-14)
    # only the true-class term is weighted: k=5, M=1 -> 1 + 5*1 + .25 ; 5*1 + 1 + 1
    np.testing.assert_allclose(_x64(_mse, f, y, positive_weight=5.0),
                               (6.25 + 7.0) / 2, rtol=1e-14)


def test_mse_zero_at_target_and_sum_over_classes():
    y = np.array([2, 0, 1, 2])
    target = 4.0 * np.eye(3)[y]
    assert _x64(_mse, target, y, scale=4.0, positive_weight=7.0) == 0.0
    # zero logits: only the true class contributes k*M^2 per example (sum, not mean, over K)
    np.testing.assert_allclose(_x64(_mse, np.zeros((4, 3)), y, scale=4.0,
                                    positive_weight=7.0), 7.0 * 16.0, rtol=1e-14)


# ----------------------------------------------------------------------------- SupCon
@pytest.mark.parametrize("v", [1, 2])
@pytest.mark.parametrize("tau,tau_base", [(0.1, None), (0.5, 0.07)])
def test_supcon_matches_loop(v, tau, tau_base):
    rng = np.random.default_rng(v)
    y = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3])      # imbalanced; with V=1 class 2 has
    x = rng.normal(size=(len(y), v, 5)) * rng.uniform(0.5, 3, size=(len(y), v, 1))
    want = _supcon_loop(x, y, tau, tau_base)           # an anchor without positives
    got = _x64(_supcon, x, y, temperature=tau, base_temperature=tau_base)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_supcon_anchor_without_positive_is_excluded():
    rng = np.random.default_rng(3)
    y = np.array([0, 0, 1, 1, 2])
    x = rng.normal(size=(5, 1, 4))
    # The singleton's loop term would be -log(0/..) = inf if it were counted.
    full = _x64(_supcon, x, y)
    np.testing.assert_allclose(full, _supcon_loop(x, y, 0.1), rtol=1e-10)
    assert np.isfinite(full)
    # Its presence still matters as a negative for the others.
    assert abs(full - _x64(_supcon, x[:4], y[:4])) > 1e-6


def test_supcon_no_positive_at_all_is_zero():
    x = np.random.default_rng(4).normal(size=(4, 1, 3)).astype(np.float32)
    out = _supcon(x, np.arange(4))
    assert float(out) == 0.0
    g = jax.grad(lambda e: _supcon(e, jnp.arange(4)))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    # one example, one view
    assert float(_supcon(x[:1], np.array([0]))) == 0.0


def test_supcon_v2_singleton_class_has_positive():
    # V=2: a class with one example still has a positive (its other view).
    x = np.random.default_rng(5).normal(size=(3, 2, 4))
    y = np.array([0, 1, 2])
    got = _x64(_supcon, x, y)
    assert got > 0
    np.testing.assert_allclose(got, _supcon_loop(x, y, 0.1), rtol=1e-10)


def test_supcon_invariant_to_embedding_scale():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 2, 6)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 2, 2, 0, 3])
    c = rng.uniform(0.01, 100, size=(8, 2, 1)).astype(np.float32)
    np.testing.assert_allclose(float(_supcon(x * c, y)), float(_supcon(x, y)),
                               rtol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_supcon_finite_gradient_at_collapse(tau):
    # Perfect collapse: every view of class k equals the k-th simplex-ETF vertex (scaled).
    k, n_per, v, d = 4, 3, 2, 6
    etf = np.eye(k, d) - np.eye(k, d).mean(0)
    y = np.repeat(np.arange(k), n_per)
    x = np.repeat(etf[y][:, None, :], v, axis=1).astype(np.float32) * 7.0
    loss, g = jax.value_and_grad(lambda e: _supcon(e, y, temperature=tau))(x)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g)))
    # value at collapse: all positives at cosine 1, negatives at -1/(K-1)
    m_pos = n_per * v - 1
    cos_neg = -1.0 / (k - 1)
    # computed with the row max subtracted (= 1/tau) to avoid overflow at tau=0.01
    denom = m_pos + (k - 1) * n_per * v * np.exp((cos_neg - 1) / tau)
    np.testing.assert_allclose(float(loss), np.log(denom), rtol=1e-5)


def test_supcon_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 2, 3))
    y = np.array([0, 0, 1, 1, 1, 2])
    with jax.enable_x64(True):
        f = lambda e: _supcon(e, jnp.asarray(y), temperature=0.3)
        g = np.asarray(jax.grad(f)(jnp.asarray(x)))
        d = rng.normal(size=x.shape)
        h = 1e-6
        fd = (float(f(jnp.asarray(x + h * d))) - float(f(jnp.asarray(x - h * d)))) / (2 * h)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-6)


# ----------------------------------------------------------------------------- jit, registry
def test_all_losses_jit():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=10)
    emb = rng.normal(size=(10, 2, 5)).astype(np.float32)
    for fn, args, kw in [(losses.cross_entropy, (logits, y), dict(label_smoothing=0.2)),
                         (losses.mse, (logits, y), dict(scale=3.0, positive_weight=2.0)),
                         (losses.supcon, (emb, y), dict(temperature=0.2))]:
        eager = float(fn(*args, **kw))
        jitted = float(jax.jit(lambda a, b: fn(a, b, **kw))(*args))
        np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    # hyper-parameters may be traced too
    t = jax.jit(lambda e, b, tau: losses.supcon(e, b, temperature=tau))(emb, y, 0.2)
    np.testing.assert_allclose(float(t), float(losses.supcon(emb, y, temperature=0.2)),
                               rtol=1e-5)


def test_get():
    assert losses.get("ce") is losses.cross_entropy
    assert losses.get("mse") is losses.mse
    assert losses.get("supcon") is losses.supcon
    with pytest.raises(ValueError, match=r"unknown loss 'l1'; valid names: ce, mse, supcon"):
        losses.get("l1")


# ----------------------------------------------------------------------------- errors
_L = np.zeros((4, 3), np.float32)
_Y = np.array([0, 1, 2, 0])
_E = np.ones((4, 2, 5), np.float32)


@pytest.mark.parametrize("fn", [losses.cross_entropy, losses.mse])
@pytest.mark.parametrize("args,msg", [
    ((_L[0], _Y), r"logits must be 2-D \(N, K\), got shape \(3,\)"),
    ((_L, _Y[:, None]), r"labels must be 1-D"),
    ((_L, _Y[:3]), r"length mismatch: 4 rows of logits but 3 labels"),
    ((_L, _Y.astype(np.float32)), r"labels must be integers"),
    ((_L, np.array([0, 1, 3, 0])), r"labels must lie in \[0, 3\)"),
    ((_L, np.array([0, -1, 2, 0])), r"labels must lie in \[0, 3\)"),
    ((_L[:0], _Y[:0]), r"at least one example"),
])
def test_logit_loss_errors(fn, args, msg):
    with pytest.raises(ValueError, match=msg):
        fn(*args)


@pytest.mark.parametrize("args,msg", [
    ((_E[:, 0], _Y), r"embeddings must be 3-D \(N, V, D\), got shape \(4, 5\)"),
    ((_E, _Y[:, None]), r"labels must be 1-D"),
    ((_E, _Y[:3]), r"length mismatch: 4 examples of embeddings but 3 labels"),
    ((_E, _Y.astype(np.float32)), r"labels must be integers"),
    ((_E[:, :0], _Y), r"need N, V, D >= 1"),
])
def test_supcon_shape_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        losses.supcon(*args)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"label_smoothing must be <= 1"):
        losses.cross_entropy(_L, _Y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be >= 0"):
        losses.cross_entropy(_L, _Y, label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"scale must be > 0"):
        losses.mse(_L, _Y, scale=0.0)
    with pytest.raises(ValueError, match=r"positive_weight must be > 0"):
        losses.mse(_L, _Y, positive_weight=-1.0)
    with pytest.raises(ValueError, match=r"supcon: temperature must be > 0"):
        losses.supcon(_E, _Y, temperature=0.0)
    with pytest.raises(ValueError, match=r"base_temperature must be > 0"):
        losses.supcon(_E, _Y, base_temperature=-1.0)


def test_shape_errors_raise_at_trace_time():
    with pytest.raises(ValueError, match=r"length mismatch"):
        jax.jit(losses.supcon)(_E, _Y[:3])
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        jax.jit(losses.cross_entropy)(_E, _Y)
    with pytest.raises(ValueError, match=r"length mismatch"):
        jax.jit(losses.mse)(_L, _Y[:2])
