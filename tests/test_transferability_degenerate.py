"""Issue 23's transferability rows: degenerate candidates score -inf (the documented worst),
extreme float64 scales give the unscaled answer, LogME at N < D equals LogME on the
features' N-dimensional span.  References: numpy float64 definitions written here, the
module docstring's rule, and exact-arithmetic identities named at each assertion."""
import jax
import numpy as np
import pytest

from ncjax import metrics
from ncjax import transferability as T
# blobs(seed, n, d, k, sep) and the literal evidence _evidence(f, t, log alpha, log beta)
from test_transferability import _evidence, blobs

pytestmark = pytest.mark.filterwarnings("ignore:ncjax.metrics.nc1")


FEATURE_SCORES = {
    "nc1": T.nc1_score,
    "logme": T.logme,
    "hscore": T.hscore,
    "ncti_seli": lambda f, y: T.ncti_terms(f, y).seli,
    "ncti_ncc": lambda f, y: T.ncti_terms(f, y).ncc,
    "ncti_vc": lambda f, y: T.ncti_terms(f, y).vc,
}


def _constant(kind, n=200, d=16, dtype=np.float64):
  if kind == "zero":                 # a dead ReLU layer
    return np.zeros((n, d), dtype)
  if kind == "bias":                 # every row the same, columns differ (a dead layer's bias)
    return np.tile(np.random.default_rng(0).normal(size=d) * 3, (n, 1)).astype(dtype)
  # rows equal up to a few ulps of max |F| (the same bias computed in different batch slots)
  row = np.random.default_rng(0).normal(size=d).astype(dtype)
  ulps = np.random.default_rng(1).integers(-4, 5, size=(n, d))
  return (row + ulps * np.finfo(dtype).eps * np.abs(row).max()).astype(dtype)


# ----------------------------------------------------------------------------- worst score
@pytest.mark.parametrize("kind", ["zero", "bias", "ulps32", "ulps64"])
@pytest.mark.parametrize("name", sorted(FEATURE_SCORES))
def test_constant_features_score_worst(name, kind):
  dtype = np.float32 if kind == "ulps32" else np.float64
  f, y = blobs(0, 200, 16, 4, 1.0)
  informative = FEATURE_SCORES[name](f.astype(dtype), y)
  dead = FEATURE_SCORES[name](_constant(kind.rstrip("0123456789"), dtype=dtype), y)
  assert dead == -np.inf and np.isfinite(informative)   # so a ranking puts it last


@pytest.mark.parametrize("name", ["nc1", "logme", "hscore"])
def test_constant_tolerance_is_relative_to_the_data(name):
  # The rule (module docstring): rows within 16 ulps of max |F| of the first row are
  # constant.  At scale 1e6: +-6 ulps of noise (12 between rows, plus the rounding of the
  # sum) is constant; a class-dependent 800 ulps is data and gets a finite score.
  y = np.arange(200) % 4
  rng = np.random.default_rng(2)
  row = 1e6 * (1 + rng.random(16))                      # max |F| in [1e6, 2e6)
  ulp = np.finfo(float).eps * np.abs(row).max()
  inside = row + rng.integers(-6, 7, size=(200, 16)) * ulp
  outside = row + (y[:, None] - 1.5) * 800 * ulp
  assert FEATURE_SCORES[name](inside, y) == -np.inf
  assert np.isfinite(FEATURE_SCORES[name](outside, y))


def test_integer_features_are_constant_only_when_equal():
  y = np.arange(40) % 2
  f = np.full((40, 3), 7, np.int64)
  assert T.hscore(f, y) == -np.inf
  f[::2, 0] += 1                                        # feature 0 = class: H = 1 by hand
  assert T.hscore(f, y) == pytest.approx(1.0, rel=1e-12)


def test_ncti_combination_skips_degenerate_candidates():
  y = np.arange(300) % 4
  feats = [blobs(20 + i, 300, 32, 4, sep)[0] for i, sep in enumerate((0.15, 0.3, 0.6))]
  dead = np.zeros((300, 32))
  got = T.ncti([feats[0], dead, feats[1], feats[2]], y)
  terms = np.array([T.ncti_terms(f, y) for f in feats])
  # the others are normalised by their own min and max, as if the dead one were absent
  want = ((terms - terms.min(0)) / (terms.max(0) - terms.min(0))).sum(1)
  np.testing.assert_allclose(got[[0, 2, 3]], want, rtol=1e-12)
  assert got[1] == -np.inf and got.argmin() == 1
  assert T.ncti([dead, dead], y).tolist() == [-np.inf, -np.inf]
  # NaN terms (a candidate not scored; a -inf read back from JSON) give that candidate NaN
  # and leave the others as without it (it used to turn every score into 0).
  nan = T.NCTITerms(np.nan, np.nan, np.nan)
  got = T.ncti_from_terms([terms[0], nan, terms[1], terms[2]])
  np.testing.assert_allclose(got[[0, 2, 3]], want, rtol=1e-12)
  assert np.isnan(got[1])


@pytest.mark.parametrize("probs", [
    np.full((60, 5), 0.2),                                  # uniform head
    np.tile([0.7, 0.1, 0.1, 0.1], (60, 1)),                 # input-independent head
    np.tile([0.0, 1.0, 0.0], (60, 1)),                      # always the same class
])
def test_leep_constant_probabilities_score_worst(probs):
  y = np.arange(60) % 3
  assert T.leep(probs, y) == -np.inf
  # One row moved by 1e-9 (past the 1e-12 tolerance) is a head that reacts to its input:
  # finite, and by the definition (P(y|z) = n_y / N for an input-independent head, so
  # EEP_i = n_{y_i} / N) within ~1e-9 of the class prior's log-likelihood.
  moved = probs.copy()
  moved[0] = (1 - 1e-9) * probs[0] + 1e-9 * np.eye(probs.shape[1])[0]
  prior_ll = np.log(np.bincount(y)[y] / 60).mean()
  assert T.leep(moved, y) == pytest.approx(prior_ll, abs=1e-8)


def test_nc1_score_does_not_rely_on_metrics_for_degenerate_cases(monkeypatch):
  f, y = blobs(0, 200, 16, 4, 1.0)

  def refuse(*args, **kwargs):
    raise ValueError("nc1: both spreads are zero (a dead layer)")  # the new eager contract
  monkeypatch.setattr(metrics, "nc1", refuse)
  assert T.nc1_score(np.zeros((200, 16)), y) == -np.inf
  assert T.nc1_score(_constant("bias"), y) == -np.inf
  for answer in (np.inf, np.nan):                        # inseparable; 0/0 under jit
    monkeypatch.setattr(metrics, "nc1", lambda *a, v=answer, **k: np.float32(v))
    assert T.nc1_score(f, y) == -np.inf
  monkeypatch.setattr(metrics, "nc1", lambda *a, **k: np.float32(0.25))
  assert T.nc1_score(f, y) == -0.25


# ----------------------------------------------------------------------------- scale
def _hscore_reference(f, y):
  """Literal tr(cov(f)^+ cov(E[f|y])), float64 numpy, features rescaled to unit max first
  (H-score is invariant to that scale in exact arithmetic)."""
  f = f / np.abs(f).max()
  means = np.stack([f[y == c].mean(0) for c in range(y.max() + 1)])
  cutoff = max(f.shape) * np.finfo(float).eps
  return np.trace(np.linalg.pinv(np.cov(f.T), rcond=cutoff, hermitian=True) @ np.cov(means[y].T))


@pytest.mark.parametrize("factor", [1e-200, 1e200])
def test_hscore_scale_invariant(factor):
  f, y = blobs(0, 200, 16, 4, 1.0)
  ref = _hscore_reference(f, y)
  assert T.hscore(f, y) == pytest.approx(ref, rel=1e-9)
  assert T.hscore(f * factor, y) == pytest.approx(ref, rel=1e-9)   # was 0 / LinAlgError


@pytest.mark.parametrize("factor", [1e-200, 1e-30, 1e30, 1e200])
@pytest.mark.parametrize("n,d", [(200, 16), (20, 64)])
def test_logme_scale_invariant(factor, n, d):
  f, y = blobs(0, n, d, 4, 1.0)
  base = T.logme(f, y)
  assert np.isfinite(base) and T.logme(f * factor, y) == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("factor", [1e-200, 1e200])
def test_ncti_scale(factor):
  f, y = blobs(3, 300, 48, 5, 0.4)
  # With a fixed shrinkage every term is scale-invariant in exact arithmetic.
  np.testing.assert_allclose(T.ncti_terms(f * factor, y, shrinkage=0.05),
                             T.ncti_terms(f, y, shrinkage=0.05), rtol=1e-6)
  # 'auto' is the authors' exp(-sum of the top 32 variances): 0 -> clipped to 1e-10 at
  # 1e200, exp(-0) = 1 at 1e-200.  Evaluated exactly, not as a LinAlgError.
  g = 1e-10 if factor > 1 else 1.0
  np.testing.assert_allclose(T.ncti_terms(f * factor, y), T.ncti_terms(f, y, shrinkage=g),
                             rtol=1e-6)


@pytest.mark.parametrize("factor", [1e-200, 1e200])
def test_nc1_score_scale_invariant_in_float64(factor):
  f, y = blobs(0, 200, 16, 4, 1.0)
  with jax.enable_x64(True):
    assert T.nc1_score(f * factor, y) == pytest.approx(T.nc1_score(f, y), rel=1e-6)


def test_nc1_score_power_of_two_scale_is_exact_in_float32():
  # float32 at 2^-100 (~1e-30): its squares underflow float32 unless rescaled; a power of
  # two commutes with rounding, so the score must be identical, not merely close.
  f, y = blobs(0, 200, 16, 4, 1.0)
  f = f.astype(np.float32)
  base = T.nc1_score(f, y)
  assert T.nc1_score(f * np.float32(2.0 ** -100), y) == base
  assert T.nc1_score(f * np.float32(2.0 ** 100), y) == base
  # float64 at 1e-200 / 1e200 without x64 (was -0.0 / a float32-overflow ValueError): the
  # unscaled score to float32 accuracy (the rescaled values round to float32 differently).
  f64 = f.astype(np.float64)
  for factor in (1e-200, 1e200):
    assert T.nc1_score(f64 * factor, y) == pytest.approx(T.nc1_score(f64, y), rel=2e-5)


# ----------------------------------------------------------------------------- LogME, N < D
@pytest.mark.parametrize("rank", [20, 5])
def test_logme_n_below_d_equals_its_span(rank):
  rng = np.random.default_rng(1)
  y = np.arange(20) % 4
  f, _ = blobs(1, 20, 64, 4, 1.0)
  if rank < 20:
    f = f[:, :rank] @ rng.normal(size=(rank, 64))       # 20 x 64 of rank 5
  got = T.logme(f, y)
  # The N-dimensional span: coordinates in the first N right singular vectors (N x N).
  span = f @ np.linalg.svd(f, full_matrices=False)[2].T
  assert np.isfinite(got)                               # was -inf
  assert got == pytest.approx(T.logme(span, y), rel=1e-6)
  # ... and the value is the literal evidence at the returned (alpha, beta), per class,
  # with the N x D features (the D - N prior directions cancel in eq. (2)).  beta is large
  # there (the interpolating maximum): the literal D x D solve loses digits, hence 1e-4.
  ev, alpha, beta = T._logme_classes(f, y, 4, np.bincount(y), 1e-10, 1000)
  for c in range(4):
    t = (y == c).astype(float)
    assert ev[c] == pytest.approx(_evidence(f, t, np.log(alpha[c]), np.log(beta[c])), rel=1e-4, abs=1e-7)
    assert _evidence(span, t, np.log(alpha[c]), np.log(beta[c])) == pytest.approx(
        _evidence(f, t, np.log(alpha[c]), np.log(beta[c])), rel=1e-4, abs=1e-7)
