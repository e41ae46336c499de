"""Transferability estimators: LogME, H-score, LEEP, NCTI, NC1; Kendall tau and weighted tau.

Each estimator scores one candidate pre-trained model from its frozen features (or, for LEEP,
its source-head probabilities) on the labelled downstream training split.  Sign convention of
every score here: **higher means predicted to transfer better** (:func:`nc1_score` is minus
NC1 for that reason).  The rank correlations compare such scores with measured accuracies.

Notation: features ``F`` of shape ``(N, D)`` (any units), integer labels ``y`` of shape
``(N,)`` with every class of ``[0, K)`` present, ``K >= 2``; ``n_k`` examples in class k.

Pure NumPy in float64 (the inputs may be float32: they are widened block by block, never
as one N x D copy).  Cost: one Gram matrix of the smaller side of ``F`` (``F^T F``, D x D,
when N >= D; ``F F^T``, N x N, otherwise) and its eigendecomposition, which is the thin SVD
of ``F`` (``F = U S V^T``, ``sigma = S^2``) without the N x D factor; no D x D inverse is ever
formed.  ``benchmarks/transferability.py`` times every estimator against one NC1 call.

Degenerate candidates and scale
-------------------------------
* **Constant features** (every row equal to the first within 16 ulps of ``max |F|`` in the
  input's dtype -- exact equality for integers; all-zero features, a dead layer, included)
  carry no information about the labels.  Every estimator returns ``WORST = -inf`` for them,
  never an error and never a value that could beat an informative model (before: -NC1 gave
  -0.0, the best score; LogME a finite intercept-only fit; H-score 0; NCTI a LinAlgError).
  The test is made here, relative to the data's own scale, not read off the estimator's
  0/0: :func:`nc1_score` gives -inf whatever ``metrics.nc1`` does with such input, and maps
  a non-finite NC1 (``+inf``: classes inseparable; NaN: 0/0) to -inf as well.
* **LEEP** takes source probabilities, not features: the degenerate case is a head whose
  output does not depend on the input, every row equal to the first within 1e-12
  (absolute; constant features give exactly that).  Its LEEP would be the class prior's
  log-likelihood; it is -inf instead, like the other estimators' dead candidates.
* **NCTI**: a constant candidate's three terms are -inf, its combined score is -inf, and it
  takes no part in the min-max normalisation, so the other candidates score exactly as
  without it.  A candidate with NaN terms (not scored) gets NaN, likewise left out.
* A ranking sorts -inf last.  The rank correlations (:func:`kendall_tau`) still require
  finite scores: callers decide whether to drop such candidates or rank them last.
* **Scale.**  Every estimator works on ``F / 2^e``, ``2^e`` the power of two just above
  ``max |F|`` over a strided sample of 64 rows (O(64 D), no pass over the data): a power
  of two rescales without rounding, so ordinary features get the same numbers, while
  float64 features at 1e-200 or 1e200 neither underflow nor overflow in the Gram.  H-score,
  LogME and NC1 are scale-invariant in exact arithmetic and give the unscaled answer there
  (to 1e-9 for H-score and LogME; NC1 to float32 accuracy unless x64 is on).  NCTI's terms are
  scale-invariant for a fixed ``shrinkage``; the authors' ``'auto'`` rule depends on the
  scale by design and is evaluated in the features' own units (shrinkage 1e-10 at 1e200,
  1 at 1e-200).  LogME's fixed point starts from alpha = beta = 1 in the rescaled units.
* **LogME with N < D** is computed on the N x N Gram (the authors' SVD of the smaller side)
  and equals LogME on the features' coordinates in their N-dimensional row span; it is
  finite (it was -inf when the fixed point ran to the interpolating maximum).

References
----------
* LogME: K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained
  Models for Transfer Learning", ICML 2021 (Algorithm 1).
* H-score: Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas, "An
  Information-Theoretic Approach to Transferability in Task Transfer Learning", ICIP 2019.
* LEEP: C. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to Evaluate
  Transferability of Learned Representations", ICML 2020.
* NCTI: Z. Wang, Y. Luo, L. Zheng, Z. Huang, M. Baktashmotlagh, "How Far Pre-trained Models
  Are from Neural Collapse on the Target Dataset Informs their Transferability", ICCV 2023.
* Weighted tau: S. Vigna, "A weighted correlation index for rankings with ties", WWW 2015
  (the hyperbolic, additive weighting of ``scipy.stats.weightedtau``, used by the LogME and
  NCTI papers to evaluate rankings).
"""
from typing import NamedTuple, Sequence

import numpy as np

# The estimators `job=rank` (`ncjax.ranking`) computes, by config name.
ESTIMATORS = ("nc1", "logme", "hscore", "leep", "ncti")

_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny
# Rows widened to float64 at a time: 2**22 values (32 MiB) keep the temporary small while
# each block product stays a large, BLAS-efficient matrix multiply.
_BLOCK_VALUES = 1 << 22
# Rows of "constant" features may differ by this many ulps of max |F| (rounding of a dead
# layer's output computed in different batch positions; module docstring).
_CONSTANT_ULPS = 16
_CONSTANT_PROB_TOL = 1e-12
# Feature scales nc1_score hands to metrics.nc1 (float32) without rescaling: squares and
# their N-fold sums stay far inside float32's range (1e-38 .. 3e38).
_NC1_SAFE = (2.0 ** -32, 2.0 ** 32)
# The score of a degenerate candidate (module docstring): the worst, so it ranks last.
WORST = -np.inf


# ----------------------------------------------------------------------------- validation
def _check_features(features, name: str = "features") -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be a float or integer array, got dtype {x.dtype}")
  if x.shape[0] < 2 or x.shape[1] < 1:
    raise ValueError(f"{name} needs at least 2 rows and 1 column, got shape {x.shape}")
  if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def _check_labels(labels, n: int, name: str = "labels"):
  """Returns (y as int64 (N,), K, counts (K,)); every class of [0, K) must occur, K >= 2."""
  y = np.asarray(labels)
  if y.ndim != 1 or y.shape[0] != n:
    raise ValueError(f"{name} must have shape ({n},) to match the N rows, got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} must be integers in [0, K), got dtype {y.dtype}")
  if y.min() < 0:
    raise ValueError(f"{name} must be in [0, K), got minimum {y.min()}")
  y = y.astype(np.int64)
  counts = np.bincount(y)
  k = counts.shape[0]
  if k < 2:
    raise ValueError(f"{name} must contain at least 2 classes, got {k}")
  if (counts == 0).any():
    missing = np.flatnonzero(counts == 0)[:5].tolist()
    raise ValueError(f"{name}: classes {missing} of [0, {k}) have no example; relabel to "
                     "consecutive integers 0..K-1")
  return y, k, counts


# ----------------------------------------------------------------------------- degenerate inputs
def _unit(x: np.ndarray) -> tuple[float, float]:
  """``(amax, scale)``: ``amax`` the largest ``|x|`` on a strided sample of about 64 rows
  (all rows when those are all zero) and the power of two ``scale`` with ``amax / scale``
  in [0.5, 1) (1.0 when x is all zero).

  Every estimator works on ``x / scale``: a power of two rescales without rounding, so the
  common case's numbers do not move, while features at 1e-200 or 1e200 neither underflow nor
  overflow in their Gram (whose entries are squares; :func:`_block_units` leaves 2^400 of
  room, so the sample need not hold the largest row).  The sample keeps this O(64 D): it
  scales with x, as a unit must, and it is max |x| itself for constant features, where
  :func:`_is_constant` uses it.
  """
  amax = 0.0
  for rows in (x[:: max(1, x.shape[0] // 64)], x):
    amax = max(float(rows.max()), -float(rows.min()))
    if amax > 0.0:
      break
  if amax == 0.0:
    return 0.0, 1.0
  return amax, float(np.ldexp(1.0, np.frexp(amax)[1]))


def _block_units(scale: float) -> tuple[float, float]:
  """``(pre, post)``: rows are widened as ``x * pre`` and products of them rescaled by
  ``post`` per factor, so that results are in units of ``x / scale``.

  Ordinary scales widen as given (``pre = 1``) and rescale the small results, which costs
  nothing per row; beyond 2^+-400 a Gram entry (a sum of N squares) would under- or
  overflow float64, so rows are rescaled as they are widened.  Powers of two either way:
  both give the same numbers.
  """
  if 2.0 ** -400 <= scale <= 2.0 ** 400:
    return 1.0, 1.0 / scale
  return 1.0 / scale, 1.0


def _widen(rows: np.ndarray, pre: float) -> np.ndarray:
  """float64 ``rows * pre`` in one pass (astype alone when pre is 1, the common case)."""
  return rows.astype(np.float64) if pre == 1.0 else np.multiply(rows, pre, dtype=np.float64)


def _is_constant(x: np.ndarray, amax: float) -> bool:
  """Whether every row of x equals the first within ``_CONSTANT_ULPS`` ulps of ``amax``
  (:func:`_unit`; ``max |x|`` whenever the rows are that close).

  The tolerance is relative to the data's own scale and to its dtype's precision (exact
  equality for integers); all-zero features are constant.
  """
  eps = np.finfo(x.dtype).eps if np.issubdtype(x.dtype, np.floating) else 0.0
  return _rows_equal_first(x, _CONSTANT_ULPS * eps * amax)


def _constant_probs(p: np.ndarray) -> bool:
  """Whether every row of the (N, C_s) probabilities equals the first within 1e-12 (absolute:
  probabilities have a scale of their own, and this is well above float64 softmax rounding)."""
  return _rows_equal_first(p, _CONSTANT_PROB_TOL)


def _rows_equal_first(x: np.ndarray, tol: float) -> bool:
  """Whether ``max_ij |x_ij - x_0j| <= tol``.  A strided sample of 64 rows answers for
  informative inputs at O(64 D) cost; only (near-)constant ones are read in full, by blocks."""
  ref = x[0].astype(np.float64)
  if np.abs(x[:: max(1, x.shape[0] // 64)] - ref).max() > tol:
    return False
  return all(np.abs(x[i:j] - ref).max() <= tol for i, j in _row_blocks(*x.shape))


# ----------------------------------------------------------------------------- shared algebra
def _row_blocks(n: int, d: int):
  step = max(1, _BLOCK_VALUES // max(d, 1))
  return ((i, min(i + step, n)) for i in range(0, n, step))


def _column_mean(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
  """(D,) float64 column mean of ``x / scale``."""
  total = np.zeros(x.shape[1])
  inv = 1.0 / scale
  for i, j in _row_blocks(*x.shape):
    if scale <= 2.0 ** 960:   # a block's sum cannot overflow: sum, then rescale (no temporary)
      total += x[i:j].sum(0, dtype=np.float64) * inv
    else:
      total += np.multiply(x[i:j], inv, dtype=np.float64).sum(0)
  return total / x.shape[0]


def _spectrum(x: np.ndarray, y: np.ndarray, k: int, mean=None, scale: float = 1.0):
  """Thin SVD of ``F = x / scale - mean`` through the Gram of its smaller side, plus its
  class sums (``scale`` a power of two from :func:`_unit`, ``mean`` in those units).

  Returns ``(sigma, basis, sums, side)``: ``sigma`` the eigenvalues ``S^2`` (>= 0, ascending),
  ``sums`` (K, D) the class sums of F's rows, and ``basis`` either V (D x r, ``side='d'``,
  when N >= D) or U (N x r, ``side='n'``).  float64 throughout.
  """
  n, d = x.shape
  pre, post = _block_units(scale)
  shift = None if mean is None else mean * (pre * scale)   # the mean in block units
  widen = lambda rows: _widen(rows, pre)  # noqa: E731
  sums = np.zeros((k, d))
  if n >= d:
    gram = np.zeros((d, d))
    for i, j in _row_blocks(n, d):
      b = widen(x[i:j])
      if shift is not None:
        b -= shift
      gram += b.T @ b
      sums += _onehot(y[i:j], k).T @ b
    side = "d"
  else:
    f = widen(x)
    if shift is not None:
      f -= shift
    gram = f @ f.T
    sums += _onehot(y, k).T @ f
    side = "n"
  if post != 1.0:
    gram *= post * post
    sums *= post
  sigma, basis = np.linalg.eigh(gram)
  # Rounding can leave eigenvalues of a PSD Gram slightly negative; they are zero.
  return np.maximum(sigma, 0.0), basis, sums, side


def _onehot(y, k):
  """(N, K) float64 indicator; class sums as ``onehot.T @ rows`` run in BLAS, not np.add.at."""
  out = np.zeros((y.shape[0], k))
  out[np.arange(y.shape[0]), y] = 1.0
  return out


def _pinv_keep(sigma: np.ndarray, n: int, d: int) -> np.ndarray:
  """Eigenvalues of the Gram that the pseudo-inverse keeps: sigma > max(N, D) * eps * max.

  The Gram's entries carry a rounding error of order eps * max(sigma) per summed term, so
  eigenvalues below ``max(N, D) * eps * max(sigma)`` cannot be told from zero; inverting them
  would amplify noise (the public H-score code's ``pinv(rcond=1e-15)`` does).  The same rule
  as ``np.linalg.pinv(cov, rcond=max(N, D) * eps, hermitian=True)``.
  """
  return sigma > max(n, d) * _EPS * sigma.max()


# ----------------------------------------------------------------------------- LogME
def logme(features, labels, *, tol: float = 1e-10, max_iter: int = 1000) -> float:
  """LogME (You et al., ICML 2021): mean per-example log evidence of a Bayesian linear model.

  For each class k the target is the 0/1 indicator ``y_k`` (one-vs-rest) and the model is
  ``y_k = F w + noise`` with prior ``w ~ N(0, alpha^-1 I_D)`` and noise precision ``beta``.
  The log evidence (paper eq. 2)

      L_k(alpha, beta) = D/2 log alpha + N/2 log beta - N/2 log 2 pi
                         - beta/2 ||F m - y_k||^2 - alpha/2 m^T m - 1/2 log|A|,
      A = alpha I + beta F^T F,   m = beta A^-1 F^T y_k,

  is maximised by the paper's fixed-point iteration (Algorithm 1) from alpha = beta = 1:
  ``gamma = sum_i beta sigma_i / (alpha + beta sigma_i)``, ``alpha <- gamma / m^T m``,
  ``beta <- (N - gamma) / ||F m - y_k||^2``, with ``sigma_i`` the eigenvalues of ``F^T F``.
  All K classes iterate together on the spectrum of one SVD of F, each step O(min(N,D) K).
  The score is ``mean_k L_k / N``.  Features are not centred, as in the paper; they are
  divided by a power of two (module docstring), which changes the maximised evidence not at
  all and only puts the start alpha = beta = 1 in units where ``max |F|`` is about 1.
  Constant features score -inf (module docstring).

  Differences from the authors' code (thuml/LogME), which change the value, not the method:
  the iteration runs to a relative change of alpha and beta below ``tol`` (theirs stops at
  1e-3 on alpha/beta or after 11 steps, and adds 1e-5 to two denominators); ``log|A|``
  counts the D - rank(F) eigenvalues equal to alpha when N < D (their fixed-point code drops
  them, which adds ``(D - N)/(2N) log alpha`` to each class's score).  With N < D the
  evidence can have a second, interpolating maximum (large beta); the iteration from
  alpha = beta = 1 returns the stationary point it reaches, as the paper's algorithm does.

  Args:
    features: (N, D) float array, any units; N < D and N >= D both work.
    labels: (N,) integers in [0, K), every class present, K >= 2.
    tol: relative change of alpha and beta (every class) at which the iteration stops.
    max_iter: iteration cap (the iteration typically converges in well under 100 steps).
  Returns:
    LogME in nats per example (a log-likelihood: typically negative). Higher means predicted
    to transfer better.
  """
  x = _check_features(features)
  y, k, counts = _check_labels(labels, x.shape[0])
  amax, scale = _unit(x)
  if _is_constant(x, amax):
    return WORST
  evidence, _, _ = _logme_classes(x, y, k, counts, tol, max_iter, scale)
  return float(np.mean(evidence))


def _logme_classes(x, y, k, counts, tol, max_iter, scale: float | None = None):
  """Per-class maximised evidence / N, and the maximising alpha, beta; each (K,).

  Runs on ``x / scale`` (``scale`` from :func:`_unit` unless given): the maximised evidence
  is invariant to the scale of F (alpha absorbs it), so only the start alpha = beta = 1 is
  taken in those units.  The alpha returned is in the units of x (``alpha_x = alpha scale^2``).
  """
  n = x.shape[0]
  if scale is None:
    scale = _unit(x)[1]
  sigma, basis, sums, side = _spectrum(x, y, k, scale=scale)
  if side == "d":
    # g = V^T F^T y_k = S U^T y_k; the terms below are written in g, never dividing by a
    # singular value, so tiny sigma_i lose no precision.
    coef = (basis.T @ sums.T) ** 2                      # g^2, (D, K)
  else:
    # z = U^T y_k, U the complete N x N eigenvectors of F F^T (so ||z|| = ||y_k||).
    coef = (basis.T @ _onehot(y, k)) ** 2               # z^2, (N, K)
  terms = _LogMETerms(sigma[:, None], coef, counts.astype(np.float64), side == "d", n)
  alpha = np.ones(k)
  beta = np.ones(k)
  for _ in range(max_iter):
    gamma, mm, res = terms(alpha, beta)
    new_alpha = gamma / np.maximum(mm, _TINY)
    new_beta = (n - gamma) / np.maximum(res, _TINY)
    done = (np.abs(new_alpha - alpha) <= tol * new_alpha).all() and \
        (np.abs(new_beta - beta) <= tol * new_beta).all()
    alpha, beta = new_alpha, new_beta
    if done:
      break
  _, mm, res = terms(alpha, beta)
  # D/2 log alpha - 1/2 log|A| = -1/2 sum_i log(1 + beta sigma_i / alpha): the D - r
  # eigenvalues of A equal to alpha cancel exactly, and log1p keeps small terms exact.
  evidence = (-0.5 * np.log1p(beta * terms.sigma / alpha).sum(0) + 0.5 * n * np.log(beta)
              - 0.5 * n * np.log(2 * np.pi) - 0.5 * beta * res - 0.5 * alpha * mm)
  with np.errstate(over="ignore"):  # alpha_x of features near 1e200 is past float64: inf
    return evidence / n, alpha * np.float64(scale) ** 2, beta


class _LogMETerms(NamedTuple):
  """gamma, m^T m and ||F m - y||^2 per class at (alpha, beta), from the spectrum of F."""
  sigma: np.ndarray   # (r, 1) eigenvalues of the Gram
  coef: np.ndarray    # (r, K) g^2 (in_g) or z^2
  yy: np.ndarray      # (K,) ||y_k||^2 = n_k
  in_g: bool
  n: int

  def __call__(self, alpha, beta):
    s, c = self.sigma, self.coef
    den = alpha + beta * s
    gamma = (beta * s / den).sum(0)
    if self.in_g:
      # m = V diag(beta / den) g;  ||F m - y||^2 = ||y||^2 - sum beta g^2 (2 alpha + beta s)/den^2
      mm = (beta ** 2 * c / den ** 2).sum(0)
      res = self.yy - (beta * c * (2 * alpha + beta * s) / den ** 2).sum(0)
    else:
      mm = (beta ** 2 * s * c / den ** 2).sum(0)
      res = ((alpha / den) ** 2 * c).sum(0)
    # A perfect fit (N <= rank F: the interpolating maximum, beta -> inf) leaves a residual of
    # rounding size; one floor on both sides, so F (N x D, N < D) and F V (its N-dimensional
    # span, N >= D there) iterate alike.  Without it the N < D side ran to alpha = 0: -inf.
    res = np.maximum(res, self.n * _EPS * self.yy)
    return gamma, mm, res


# ----------------------------------------------------------------------------- H-score
def hscore(features, labels) -> float:
  """H-score (Bao et al., ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``.

  ``cov(f)`` is the covariance of the features and ``cov(E[f|y])`` that of the class-mean
  vector of each example (each class weighted by n_k).  Both use the same normalisation, so
  1/N or 1/(N-1) cancels; with ``F_c`` the centred features and ``P`` the orthogonal
  projection onto the column space of ``F_c`` the score equals

      H = sum_k ||P y_k||^2 / n_k                       (y_k the 0/1 indicator of class k),

  i.e. the in-sample R^2 of regressing the scaled class indicators on the features, which is
  what is computed, from the thin SVD of ``F_c`` (one Gram eigendecomposition, no D x D
  inverse).  0 <= H <= K - 1; invariant to invertible affine maps of the features while
  ``cov(f)`` stays non-singular.

  Pseudo-inverse: the Moore-Penrose inverse of ``cov(f)`` with eigenvalues below
  ``max(N, D) * eps * max eigenvalue`` treated as zero (numerically indistinguishable from
  zero in a float64 covariance; see :func:`_pinv_keep`).  The public code's
  ``pinv(cov, rcond=1e-15)`` inverts such noise directions.  No shrinkage (the
  Ledoit-Wolf variant of Ibrahim et al. 2022 is not implemented): with N < D, or with
  (nearly) collinear features, every direction is kept and H tends to its maximum K - 1
  whatever the features -- the known small-sample failure of the H-score.

  Args:
    features: (N, D) float array, any units.
    labels: (N,) integers in [0, K), every class present, K >= 2.
  Returns:
    H-score (dimensionless, in [0, K-1]). Higher means predicted to transfer better.
  """
  x = _check_features(features)
  n, d = x.shape
  y, k, counts = _check_labels(labels, n)
  amax, scale = _unit(x)
  if _is_constant(x, amax):
    return WORST
  sigma, basis, sums, side = _spectrum(x, y, k, mean=_column_mean(x, scale), scale=scale)
  keep = _pinv_keep(sigma, n, d)
  if side == "d":
    # v_i^T (mu_k - mu) = s_i u_i^T y_k / n_k, so ||U^T y_k||^2 / n_k = n_k sum_i (v_i^T d_k)^2 / sigma_i.
    proj = basis[:, keep].T @ (sums.T / counts)         # (r, K); sums of centred rows / n_k
    return float((counts * (proj ** 2 / sigma[keep, None]).sum(0)).sum())
  proj = basis[:, keep].T @ _onehot(y, k)               # U^T y_k, (r, K)
  return float(((proj ** 2).sum(0) / counts).sum())


# ----------------------------------------------------------------------------- LEEP
def leep(source_probs, labels) -> float:
  """LEEP (Nguyen et al., ICML 2020): log expected empirical prediction.

  With ``theta_i`` the source head's class probabilities for example i (paper's notation):

      P(y, z) = (1/N) sum_{i: y_i = y} theta_i[z],   P(y | z) = P(y, z) / sum_y' P(y', z),
      LEEP = (1/N) sum_i log( sum_z P(y_i | z) theta_i[z] ).

  A source class no example gives mass (``P(z) = 0``) has ``theta_i[z] = 0`` for every i and
  contributes nothing; its undefined ``P(y | z)`` is taken as 0.

  Args:
    source_probs: (N, C_s) probabilities of the source classes (rows non-negative, summing
      to 1 within 1e-3; e.g. the softmax of the pre-trained head on the target examples).
    labels: (N,) target labels in [0, K), every class present, K >= 2.
  Returns:
    LEEP in nats (<= 0). Higher means predicted to transfer better.
  """
  p = _check_features(source_probs, "source_probs").astype(np.float64)
  n = p.shape[0]
  y, k, _ = _check_labels(labels, n)
  if (p < 0).any():
    raise ValueError("source_probs must be non-negative")
  row = p.sum(1)
  if np.abs(row - 1.0).max() > 1e-3:
    raise ValueError(f"source_probs rows must sum to 1 (max deviation {np.abs(row - 1).max():.3g})")
  if _constant_probs(p):
    return WORST
  joint = _onehot(y, k).T @ p / n                       # (K, C_s)
  marginal = joint.sum(0)
  cond = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
  eep = (p * cond[y]).sum(1)                            # sum_z P(y_i|z) theta_i[z]
  return float(np.mean(np.log(eep)))


# ----------------------------------------------------------------------------- NC1
def nc1_score(features, labels) -> float:
  """Minus NC1 (``ncjax.metrics.nc1``, paper eq. (4)): higher means predicted to transfer better.

  The paper (Fig. 6) finds that features more collapsed on the downstream data (smaller NC1)
  transfer better; the sign is flipped so that every score here ranks the same way.  Runs in
  JAX (float32 unless x64 is enabled), imported on first use so this module needs only NumPy.
  """
  from ncjax import metrics  # pylint: disable=import-outside-toplevel
  x = _check_features(features)
  y, k, _ = _check_labels(labels, x.shape[0])
  amax, scale = _unit(x)
  if _is_constant(x, amax):
    # Decided here, not from metrics.nc1's 0/0 answer (0.0, NaN or an error, by version).
    return WORST
  if np.issubdtype(x.dtype, np.floating) and not _NC1_SAFE[0] <= scale <= _NC1_SAFE[1]:
    # A power of two commutes with rounding to float32, so this changes no digit of NC1;
    # it only keeps float32 sums of squares clear of underflow and overflow.  One copy,
    # made only for such extreme scales.
    x = x * x.dtype.type(1.0 / scale)
  value = float(metrics.nc1(x, y, num_classes=k))
  # +inf (classes inseparable) and NaN (0/0) both mean no usable class structure.
  return WORST if not np.isfinite(value) else -value


# ----------------------------------------------------------------------------- NCTI
class NCTITerms(NamedTuple):
  """The three un-normalised NCTI terms of one candidate (Wang et al., ICCV 2023, Sec. 3).

  Every term is oriented so that higher means closer to neural collapse on the target data,
  i.e. predicted to transfer better.
  """
  seli: float  # S_seli: nuclear norm of the centred discriminant features (rank proxy)
  ncc: float   # S_ncc: mean posterior of the true class under the nearest-centre (Gaussian) rule
  vc: float    # S_vc: minus the summed nuclear norms of the class-wise posterior matrices


def ncti_terms(features, labels, *, pca_dim: int = 64, shrinkage="auto") -> NCTITerms:
  """The three NCTI terms of one candidate's (N, D) features; see :func:`ncti`.

  Steps (the paper's definitions; the projection details follow the authors' code,
  github.com/BUserName/NCTI ``metrics.py`` ``NCTI_Score``):

  1. Centre the features and keep the top ``p = min(pca_dim, D, N)`` principal components
     (exact PCA from the Gram eigendecomposition; the authors' sklearn PCA may pick the
     randomized solver for large inputs).
  2. Gaussian class model with shared covariance in that space: class means ``mu_c``, priors
     ``pi_c = n_c / N``, within-class covariance ``S_w = (1/N) sum_i (x_i - mu_{y_i})(...)^T``
     shrunk to ``S = (1 - g) S_w + g (tr S_w / p) I``.  ``shrinkage='auto'`` is the authors'
     rule ``g = max(exp(-sum of the top 32 PCA variances), 1e-10)`` (variances with 1/(N-1),
     as sklearn's ``explained_variance_``); note it depends on the features' scale.
  3. ``Z`` (N, K): posteriors ``softmax_c(-1/2 (x - mu_c)^T S^-1 (x - mu_c) + log pi_c)``
     (the paper's nearest-centre classifier by Bayes' rule; the logits ``Z`` of the paper).
  4. ``ncc = (1/N) sum_i Z[i, y_i]``; ``vc = -sum_c ||Z_c||_*`` with ``Z_c`` the rows of class
     c (the authors' code takes ``log`` of the sum; the paper's ``S_vc`` has none -- the
     paper's form is used); ``seli = ||X_lda||_*``, the nuclear norm of the centred features
     projected on the ``min(K-1, p)`` leading Fisher discriminant directions (generalised
     eigenvectors of ``(S_b, S)``, ``v^T S v = 1``, ``S_b = sum_c pi_c (mu_c - mu)(mu_c - mu)^T``).
     ``vc`` is not monotone in separability: posteriors that carry no class information
     (all rows ~ priors) are rank one as well, so it is informative only among candidates
     that already separate the classes; ``seli`` and ``ncc`` grow with separability.
     The authors' code takes ``S_b`` from sklearn's eigen solver, i.e. shrunk total minus
     shrunk within covariance, which adds ``g (tr S_b / p) I``; identical when ``g`` is small
     (features whose top PCA variances sum to more than ~25).

  Args:
    features: (N, D) float array, any units.
    labels: (N,) integers in [0, K), every class present, K >= 2.
    pca_dim: PCA dimension (the authors use 64).
    shrinkage: ``'auto'`` or a float in [0, 1].
  Returns:
    :class:`NCTITerms` (seli in the units of the whitened features, ncc in [0, 1], vc <= 0).
  """
  x = _check_features(features)
  n, d = x.shape
  y, k, counts = _check_labels(labels, n)
  if not (isinstance(pca_dim, (int, np.integer)) and pca_dim >= 1):
    raise ValueError(f"pca_dim must be a positive integer, got {pca_dim!r}")
  if isinstance(shrinkage, str):
    if shrinkage != "auto":
      raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {shrinkage!r}")
  elif not 0.0 <= float(shrinkage) <= 1.0:
    raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {shrinkage!r}")
  amax, scale = _unit(x)
  if _is_constant(x, amax):
    # No direction to project on: S_w = 0 and the Cholesky factor below does not exist.
    return NCTITerms(seli=WORST, ncc=WORST, vc=WORST)
  # Everything below runs on x / scale; the posteriors and the whitened LDA features do not
  # depend on that unit, and the 'auto' shrinkage is evaluated in the units of x.
  mean = _column_mean(x, scale)
  sigma, basis, _, side = _spectrum(x, y, k, mean=mean, scale=scale)
  p = min(int(pca_dim), d, n)
  top = np.argsort(sigma)[::-1][:p]
  if side == "d":
    xp = np.empty((n, p))
    pre, post = _block_units(scale)
    proj = basis[:, top] * post                         # folds x / scale into the D x p basis
    for i, j in _row_blocks(n, d):
      xp[i:j] = (_widen(x[i:j], pre) - mean * (pre * scale)) @ proj
  else:
    xp = basis[:, top] * np.sqrt(sigma[top])            # PCA scores U S
  if isinstance(shrinkage, str):
    # The authors' rule on the variances in the units of x: exp(-inf) = 0 past float64's
    # range (scale 1e200), exp(-0) = 1 below it (1e-200), as exact arithmetic gives.
    top32 = float(np.sort(sigma)[::-1][:32].sum()) * scale / (n - 1) * scale
    gam = max(float(np.exp(-top32)), 1e-10)
  else:
    gam = float(shrinkage)
  onehot = _onehot(y, k)
  means = onehot.T @ xp / counts[:, None]               # (K, p); xp is centred, so mu = 0
  resid = xp - means[y]
  s_w = resid.T @ resid / n
  s = (1.0 - gam) * s_w + gam * np.trace(s_w) / p * np.eye(p)
  # Whiten with the Cholesky factor of S: Mahalanobis distances become Euclidean.
  chol = np.linalg.cholesky(s)
  xw = np.linalg.solve(chol, xp.T).T                    # (N, p)
  mw = np.linalg.solve(chol, means.T).T                 # (K, p)
  logits = xw @ mw.T - 0.5 * (mw ** 2).sum(1) + np.log(counts / n)
  logits -= logits.max(1, keepdims=True)
  post = np.exp(logits)
  post /= post.sum(1, keepdims=True)
  ncc = float(post[np.arange(n), y].mean())
  vc = -sum(_nuclear_norm(post[y == c]) for c in range(k))
  # Fisher directions: eigenvectors of the whitened between-class scatter.
  priors = counts / n
  s_b_w = (mw * priors[:, None]).T @ mw                 # L^-1 S_b L^-T
  _, evec = np.linalg.eigh(s_b_w)
  lda = xw @ evec[:, ::-1][:, : min(k - 1, p)]          # = xp @ L^-T w, so v^T S v = 1
  seli = _nuclear_norm(lda - lda.mean(0))
  return NCTITerms(seli=float(seli), ncc=ncc, vc=float(vc))


def _nuclear_norm(a: np.ndarray) -> float:
  # Sum of singular values from the small side's Gram (a is tall: n_c x K or N x (K-1)).
  ev = np.linalg.eigvalsh(a.T @ a)
  return float(np.sqrt(np.maximum(ev, 0.0)).sum())


def ncti(features_per_candidate: Sequence, labels, *, pca_dim: int = 64,
         shrinkage="auto") -> np.ndarray:
  """NCTI (Wang et al., ICCV 2023) of M candidate models on the same labelled examples.

  ``S_total^m = norm(seli^m) + norm(ncc^m) + norm(vc^m)``, each term min-max normalised over
  the M candidates (``(t - min) / (max - min)``, the authors' normalisation), so a score is
  only meaningful relative to the other candidates of the same call.  A term that is equal
  for every candidate (or M = 1) contributes 0 instead of 0/0.  The authors' code adds
  ``norm(seli) + norm(ncc) - norm(log sum ||Z_c||_*)``; with ``vc = -sum ||Z_c||_*`` that
  is this sum up to the log (see :func:`ncti_terms`) and a constant 1.

  Args:
    features_per_candidate: sequence of M arrays (N, D_m) -- the same N examples in the same
      order for every candidate; D_m may differ.
    labels: (N,) integers in [0, K), every class present, K >= 2.
    pca_dim, shrinkage: see :func:`ncti_terms`.
  Returns:
    (M,) float64 scores in [0, 3]. Higher means predicted to transfer better.
  """
  if isinstance(features_per_candidate, np.ndarray) and features_per_candidate.ndim == 2:
    raise ValueError("features_per_candidate must be a sequence of (N, D) arrays, one per "
                     "candidate, not a single array")
  if len(features_per_candidate) < 1:
    raise ValueError("features_per_candidate must hold at least one candidate")
  return ncti_from_terms([ncti_terms(f, labels, pca_dim=pca_dim, shrinkage=shrinkage)
                          for f in features_per_candidate])


def ncti_from_terms(terms: Sequence[NCTITerms]) -> np.ndarray:
  """(M,) NCTI scores of M candidates from their :func:`ncti_terms` (the min-max
  normalisation of :func:`ncti`), for callers that compute each candidate's terms apart."""
  terms = np.array(terms, np.float64).reshape(len(terms), 3)       # (M, 3)
  # Degenerate candidates (terms -inf, see ncti_terms) score -inf, unscored ones (NaN terms)
  # NaN; neither takes part in the normalisation, so the others score as without them.
  # (A NaN used to make the min and max NaN and silently turn every score into 0.)
  ok = np.isfinite(terms).all(1)
  out = np.where(np.isnan(terms).any(1), np.nan, WORST)
  if ok.any():
    low = terms[ok].min(0)
    span = terms[ok].max(0) - low
    normed = np.divide(terms[ok] - low, span, out=np.zeros_like(terms[ok]), where=span > 0)
    out[ok] = normed.sum(1)
  return out


# ----------------------------------------------------------------------------- rank correlation
def _check_pair(scores, truth):
  x = np.asarray(scores, np.float64)
  t = np.asarray(truth, np.float64)
  if x.ndim != 1 or x.shape != t.shape:
    raise ValueError(f"scores and truth must be 1-D of the same length, got {x.shape} and {t.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"scores needs at least 2 candidates, got {x.shape[0]}")
  if not (np.isfinite(x).all() and np.isfinite(t).all()):
    raise ValueError("scores and truth must be finite")
  return x, t


def _signs(a):
  # (n, n) sign(a_i - a_j); 0 on ties.
  return np.sign(a[:, None] - a[None, :])


def _tau(sx, sy, w):
  """sum_{i<j} w_ij sx sy / sqrt(sum_{untied in x} w_ij * sum_{untied in y} w_ij)."""
  upper = np.triu(np.ones_like(w, dtype=bool), 1)
  num = (w * sx * sy)[upper].sum()
  den = np.sqrt((w * (sx != 0))[upper].sum() * (w * (sy != 0))[upper].sum())
  return float(num / den) if den > 0 else float("nan")


def kendall_tau(scores, truth) -> float:
  """Kendall's tau-b of two rankings (ties handled as ``scipy.stats.kendalltau``'s default).

  ``(C - D) / sqrt((P - T_x)(P - T_y))`` over the P = n(n-1)/2 pairs: C concordant, D
  discordant, T_x / T_y pairs tied in scores / truth.  O(n^2) memory: meant for candidate
  sets (tens to thousands of models).

  Args:
    scores: (n,) estimator scores (higher = predicted better).
    truth: (n,) measured accuracies.
  Returns:
    tau in [-1, 1]; NaN when either argument is constant.
  """
  x, t = _check_pair(scores, truth)
  return _tau(_signs(x), _signs(t), np.ones((x.shape[0], x.shape[0])))


def weighted_kendall_tau(scores, truth) -> float:
  """Weighted tau (Vigna 2015) as ``scipy.stats.weightedtau(scores, truth)`` with its defaults.

  Pair (i, j) weighs ``1/(r_i + 1) + 1/(r_j + 1)`` (hyperbolic, additive), ``r`` the rank of
  an element in decreasing lexicographic order; the tau-b formula above is evaluated with
  these weights for the rank by (scores, truth) and for the rank by (truth, scores), and the
  two values averaged.  Exchanges among the best candidates therefore cost most -- the
  evaluation of the LogME and NCTI papers.

  Args:
    scores: (n,) estimator scores (higher = predicted better).
    truth: (n,) measured accuracies.
  Returns:
    weighted tau in [-1, 1]; NaN when either argument is constant.
  """
  x, t = _check_pair(scores, truth)
  sx, st = _signs(x), _signs(t)
  out = []
  for first, second in ((x, t), (t, x)):
    order = np.lexsort((second, first))[::-1]           # decreasing by first, then second
    rank = np.empty(x.shape[0])
    rank[order] = np.arange(x.shape[0])
    w = 1.0 / (rank + 1.0)
    out.append(_tau(sx, st, w[:, None] + w[None, :]))
  return float(np.mean(out))
