"""Neural-collapse metrics in JAX: NC1, CDNV, numerical rank, NC2, NC3, streaming statistics.

The API (features ``(N, d)`` float, labels ``(N,)`` int in ``[0, K)``; ``num_classes=None``:
K = the largest label + 1; every class needs an example):

* ``nc1(features, labels, num_classes=None)`` -> scalar jax.Array >= 0:
  tr(Sigma_W Sigma_B^+)/K, exact, without a d x d matrix. ``nc1_pinv``: the same by the
  literal d x d pseudo-inverse (the paper's eq. (4), a reference).
* ``cdnv(...)`` -> scalar: (Var_i + Var_j) / (2 ||mu_i - mu_j||^2) averaged over class pairs
  (``inf`` when two class means coincide).
* ``numerical_rank(..., exact=False, num_iters=20)`` -> scalar in [0, min(n_k, d)]:
  (1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2 (an all-zero class counts 0).
* ``nc2_etf(...)`` -> scalar >= 0: distance of the centred class means from a simplex ETF.
* ``nc3_duality(features, labels, classifier, ..., flax_kernel=False)`` -> scalar >= 0:
  distance between the classifier rows (K, d) and the centred class means.
* ``layerwise({layer: features}, labels, num_classes=None, token_index=None,
  metrics=("nc1", "cdnv", "numerical_rank"))`` -> ``{layer: {metric: float}}``; 4-D maps
  and 3-D tokens are pooled first (``token_index=0``: a ViT's class token).
* ``CollapseStats.create(num_classes, dim)``, ``.update(features, labels, mask=None)``,
  ``.merge(other)``, ``.psum(axis_name)``, then ``.nc1()`` / ``.cdnv()`` /
  ``.numerical_rank()``: the same metrics streamed over batches, hosts and devices
  (jittable).

Raises ``ValueError`` (naming the function) for features of the wrong rank, labels that are
not (N,) integers in [0, K), a class without examples, K < 2 or non-finite features, and
``ZeroSpreadError`` (a ValueError) where NC1 or CDNV is 0/0 (a dead layer; see "Zero
spread: one rule"); inside a caller's ``jax.jit`` these are NaN instead. float64 input is
computed in float32 unless ``jax_enable_x64`` is on (one warning).

Example::

  h = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)  # (N, d)
  y = np.arange(100) % 4                                                   # (N,) in [0, K)
  metrics.nc1(h, y), metrics.layerwise({"penultimate": h}, y)["penultimate"]["cdnv"]

Notation: features ``H`` of shape ``(N, d)``, integer labels ``y`` of shape ``(N,)`` in
``[0, K)``, ``n_k`` samples in class ``k`` (classes may be imbalanced), class means
``mu_k = (1/n_k) sum_{i: y_i = k} h_i``.

Conventions (paper eq. (4) and Appendix A; project REFERENCE.md section 1)
----------------------------------------------------------------------------------
* Global mean ``mu_G = (1/K) sum_k mu_k`` -- the mean of the class means (equals the sample
  mean only for balanced classes).
* ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` -- normalised by the total
  number of samples N (the paper's ``1/(nK)`` for balanced classes).
* ``Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T`` -- normalised by K, rank <= K-1.
* ``NC1 = (1/K) trace(Sigma_W Sigma_B^+)``.  Invariant to ``H -> cH``, rotations and
  translations of feature space, and relabelling of classes.

How other public codes differ: tding1/Neural-Collapse takes ``mu_G`` as the *sample* mean
and inverts ``Sigma_B`` with ``scipy.linalg.pinv`` (identical to ours for balanced classes,
different for imbalanced ones); the Papyan-Han-Donoho notebook uses the mean of class means
and inverts ``Sigma_B`` on its top K-1 eigenpairs (what :func:`nc1` does); several codes drop
the ``1/K`` (their NC1 is K times ours); a plain ``pinv`` of a ``Sigma_B`` that rounding made
slightly non-PSD can give a *negative* NC1 (tding1 issue #3) -- :func:`nc1` is a sum of
squares divided by positive numbers and can never be negative.

Exact NC1 without a d x d matrix (:func:`nc1`)
---------------------------------------------
Let ``M`` (K x d) hold the centred class means ``mu_k - mu_G`` and ``M = U S V^T`` its thin
SVD, obtained from the eigendecomposition of the K x K Gram ``M M^T = U S^2 U^T`` and
``V = M^T U S^-1``.  Then ``Sigma_B = M^T M / K = V (S^2/K) V^T`` and ``Sigma_B^+ = K V S^-2 V^T``, so

    NC1 = (1/K) tr(Sigma_W Sigma_B^+) = sum_j v_j^T Sigma_W v_j / s_j^2
        = sum_j (1/N) ||R v_j||^2 / s_j^2,         R = H - mu_y  (N x d residuals).

Two read passes over H (class sums, then the projected residuals ``R V``), no N x d
temporary and no d x d matrix, both in the shifted frame described below.  The second pass
needs the directions V, which depend on every class mean, so no single pass can give NC1
exactly (one pass would have to form the d x d scatter, N d^2 flops).  On XLA:CPU the
projection ``(h - c) V`` onto 64 or more directions (K > 56) is compiled with YNNPACK's dot
fusion (``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT``, where the jaxlib
knows it), which reads h once at the speed of the plain ``h @ V``; for fewer directions,
inside a caller's ``jit`` (where
our compiler options do not apply) and on other backends it is written as a sum of products
that XLA fuses with the shift.  At K = 100 the projection is the N x d by d x K GEMM and
dominates; at K = 10 nc1 takes about 3 read passes' time on the 2-core CPU (the first pass's
row-blocked scatter ~1.6 reads, the skinny projection ~1.5: ``benchmarks/nc1.py``).
At most ``r = min(K-1, d)`` directions are kept, and a direction is kept only if
``s_j^2 > rtol * s_max^2`` with ``rtol = 10 * d * eps(dtype)`` -- exactly the default cutoff
``jnp.linalg.pinv(Sigma_B, hermitian=True)`` applies to the eigenvalues ``s_j^2/K`` of the
d x d ``Sigma_B``, so :func:`nc1` and :func:`nc1_pinv` agree.

Precision: the shifted frame, dtypes and scale
----------------------------------------------
Every sum and every product is taken in a *shifted frame*, never on ``h`` itself.  The first
pass sums ``h_i - c_{y_i}`` with ``c_k`` the first row of class k (an exact data point, so the
difference is of the order of the within-class spread whatever the features' offset);
class means are kept as ``c_k + m_k`` and never added up, and centred means are formed as
``(c_k - c_0) + m_k`` minus their mean.  :func:`cdnv` takes the class variances from the
same pass, as ``mean ||h - c_k||^2 - ||m_k||^2`` (no second pass), and :func:`nc1_pinv`
forms its residuals about the same per-class shifts; the second pass of :func:`nc1` works on
``h_i - c`` with ``c`` the mean of the class means (one common point: a per-class shift
needs a gather that XLA:CPU cannot fuse into the matmul kernel).  So a common offset costs no precision -- post-ReLU features
with large means included -- and the summing itself is shifted too (``sum h`` in float32 at
offset 1e6 is wrong by more than the spread).  Measured in float32 against a float64
computation on the same float32 values (offset 1e6, unit spread, N=5000, d=64, K=10):
relative errors 1e-7 to 3e-7 for nc1, nc1_pinv, cdnv and :class:`CollapseStats`, where the
unshifted code was wrong by a factor of up to 200.  Under strong collapse :func:`nc1` keeps
the float32 rounding of the between-class distances: a relative error of order
``eps / sqrt(NC1)`` (1e-5 at NC1 = 2e-9), like the unshifted code without offset; cdnv,
nc1_pinv and CollapseStats stay near 1e-7 there.
On CPU XLA fuses ``h - c`` neither into the scatter of the first pass nor into a matmul: it
writes the shifted N x d array to freshly allocated memory (measured 4-8x slower than the
pass itself).  So the first pass runs over row blocks (the shifted block stays in cache),
and the second pass of nc1 is written as a sum of products, which XLA:CPU compiles into one
kernel together with the shift.  Where the shift buys nothing -- every class's first row is
no longer than twice the typical distance between them (centred features, post-ReLU
features of unit-order means) -- :func:`nc1` reads ``h`` itself in both passes: a plain
scatter and a plain matmul ``h v - c v``, whose rounding is then of the same order
(measured over 6 seeds at offset 0, N=5000, d=64, K=10: mean relative error 2.2e-7 against
3.9e-7 shifted).  The choice is made on the host for concrete arrays, by ``lax.cond`` under
jit.
Scale: before anything is squared, the centred means, projections and residuals are divided
by a power of two taken from the centred means (exact), so features scaled by 1e-30 or 1e30
give the same metrics; only class sums that overflow the dtype raise.

Dtypes (the rule): computation is in float64 for float64 or 64-bit integer features when
``jax_enable_x64`` is on, and in float32 otherwise (float16, bfloat16, float32, integers).
Float64 (or 64-bit integer) NumPy input without x64 is never cast blindly: it is first
translated in float64 on the host (by its column mean; the metrics are translation invariant),
then rounded to float32, so only the relative rounding of the *spread* is lost; a float64
input warns once per process that float32 was used.  (:func:`numerical_rank` is not
translation invariant and rounds directly: its value is well conditioned.)  Integers are
converted to float before any arithmetic (never summed as integers, never narrowed to
int32: NumPy int64 goes through float64 on the host, exact below 2**53).  Inside ``jit``,
int32 features convert to float32 exactly only below 2**24 in magnitude.

Other metrics
-------------
* :func:`cdnv`: mean over unordered pairs ``i < j`` of ``(Var_i + Var_j) / (2 ||mu_i - mu_j||^2)``
  with ``Var_k = mean_{i in k} ||h_i - mu_k||^2`` (the mean over ordered pairs is the same).
  Two coinciding class means give ``inf`` (see the zero-spread rule).
* :func:`numerical_rank`: ``(1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2`` with ``H_k`` the
  *uncentred* class-k features.  The spectral norm is found by power iteration (see the
  function for its accuracy) or exactly (``exact=True``, O(N d^2) to form the class Grams).
* :func:`nc2_etf`: ``|| G/||G||_F - E/||E||_F ||_F`` with ``G`` the K x K Gram matrix of the
  centred class means after normalising each to unit length and ``E = K/(K-1) (I - 11^T/K)``
  the simplex-ETF Gram.  0 iff the centred means form a simplex ETF up to per-class scale
  (the row normalisation deliberately ignores equinorm-ness; measure that separately).
* :func:`nc3_duality`: ``|| W/||W||_F - M/||M||_F ||_F`` with ``W`` (K x d) the classifier and
  ``M`` the centred class means (Papyan et al.'s notebook reports the square of this).

Zero spread: one rule
---------------------
With ``rtol = 10 d eps(dtype)`` (the pseudo-inverse cutoff of :func:`nc1`, applied here to
sizes, i.e. square roots of spreads) and every spread a squared size in the features' units:

* **between-class spread zero relative to the within-class spread** -- classes
  inseparable, e.g. classes with the same mean plus noise, whose computed means then differ
  only by rounding: NC1 is ``+inf`` when ``tr(Sigma_B) <= rtol^2 tr(P Sigma_W)``, P the
  projector on the directions of ``Sigma_B`` that the pseudo-inverse keeps (the part of
  ``Sigma_W`` that NC1 weighs; ``P = I`` where ``Sigma_B`` is exactly 0).  CDNV applies the
  rule per pair: a pair with ``2 ||mu_i - mu_j||^2 <= rtol^2 (Var_i + Var_j)`` contributes
  ``+inf``, so CDNV is ``+inf``.
* **both spreads zero** (0/0: every class's features are one and the same vector -- a dead
  layer, constant features): NC1 (``Sigma_B = 0`` and ``Sigma_W = 0``), or CDNV (a pair with
  equal means and zero variances), raises :class:`ZeroSpreadError` (a ``ValueError``)
  naming the case for concrete inputs and is NaN inside ``jit``, as every other invalid
  input (below).  ncjax's own runs record such a metric as NaN (``null``) and warn with the
  layer's name.
* the within-class spread zero and the between-class spread not (perfect collapse): 0.
* :func:`numerical_rank`: a class that is all zeros has rank 0 (``0/0`` read as no
  direction at all); :class:`CollapseStats` agrees.

The tolerance is relative to the data's own spread, so the rule is invariant to ``H -> cH``;
rounding makes the computed class means of inseparable classes differ by about eps times the
spread, far below rtol, while independent samples of one distribution differ by about
``1/sqrt(n_k)`` times it and get a finite NC1 for ``n_k`` up to about ``1/rtol^2`` (7e9 in
float32 at d = 10, 1e7 at d = 512).  :func:`layerwise` re-raises such a ValueError with the layer's name.

Input checking and jit
----------------------
Every public function checks shapes, dtypes and Python arguments (always, also at trace
time) and, when the inputs are concrete arrays, their values: labels in ``[0, K)``, every
class non-empty, ``K >= 2``, finite features, no overflow.  Violations raise ``ValueError``
naming the problem: wrong rank or dtype, ``d = 0`` or no rows, non-integer ``num_classes``,
``num_iters`` or ``token_index``, an inferred ``K = max(label) + 1`` larger than the number of
samples (checked before any allocation of K), NaN/Inf features, and class sums or Grams that
overflow the dtype.  The finiteness check costs nothing extra: NaN/Inf in the features make
the class sums non-finite, which the computation reports back.

Inside a caller's ``jax.jit`` the inputs are tracers and the value checks cannot run.  A
jitted caller must then (a) pass ``num_classes`` (it cannot be inferred from traced labels),
and guarantee (b) labels in ``[0, num_classes)``, (c) every class has at least one sample,
(d) finite features.  If (b)-(d) fail, the metrics return NaN (not an exception and not a
silently wrong number): out-of-range labels and empty classes are detected from the counts,
non-finite features and overflow from the sums and the result.  ``num_iters`` of
:func:`numerical_rank` and the ``exact`` flag must be Python values.

Sharded inputs: the one-shot functions run on arrays sharded over a mesh whose axes are
``Auto`` (``jax.sharding.Mesh(devices, names)``), the usual data-parallel setting.  With
``Explicit`` axes (the default of ``jax.make_mesh`` in jax 0.10) XLA refuses the reductions
over the sharded batch axis; there, accumulate :class:`CollapseStats` per shard inside
``jax.shard_map`` and combine them with ``stats.psum(axis_name)``.

Streaming (:class:`CollapseStats`)
---------------------------------
Additive sufficient statistics about a fixed *per-class shift* ``c_k`` (the first row of
class k that an update saw): counts ``n_k``, sums ``sum (h - c_k)``, squared norms
``sum ||h - c_k||^2``, the total d x d scatter ``sum (h - c_{y})(h - c_{y})^T`` and, optionally,
per-class K x d x d scatters (needed for the numerical rank).  Memory is
``O(K d + d^2)`` (``O(K d^2)`` with ``per_class_second_moment=True``), independent of N.
Because every quantity is taken about a point of its own class, neither a large common
offset nor strong collapse causes the catastrophic cancellation of ``sum hh^T - n mu mu^T``
in float32.  ``update(features, labels, mask)`` takes a row mask, so a padded last batch
never has to leave the device.  Two statistics with different shifts are merged by exactly
re-expressing one about the other's shift (associative up to rounding);
``stats.psum(axis_name)`` does the same across a mesh axis inside ``jit``/``shard_map``.
The statistics hold squared features, so residuals ``|h - c_k|`` must lie between about 1e-19
and 1e19 in float32 (1e-154 and 1e154 in float64); outside, an update raises (concrete) or
gives NaN statistics (jit).  The one-shot functions have no such limit.
64-bit NumPy features without x64 are shifted in float64 on the host, but the shift ``c_k``
is stored in float32, so it is the class's first row rounded: each class's residuals then
share a common part up to half a float32 ulp ``u`` of the features, and NC1 and CDNV lose
about ``eps * (u / 2 sigma)^2 * cond(Sigma_B)`` relative precision (``sigma`` the
within-class spread) once the features exceed ``2^24 sigma``: measured up to 2.5e-4 for
integers at 2^35 with spread 100 (``u = 4096``), where the one-shot functions give 1e-6.
Enable x64 for such features, or subtract their offset before streaming them.

Only ``jax`` and ``numpy`` are imported.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "nc1", "nc1_pinv", "cdnv", "numerical_rank", "nc2_etf", "nc3_duality",
    "CollapseStats", "layerwise",
]

_HI = lax.Precision.HIGHEST
# Bytes of float32 features per row block of the shifted first pass on CPU (_row_block).
_BLOCK_BYTES = 1 << 21
_warned_float32 = False


# ----------------------------------------------------------------------------- validation
def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _on_device(x) -> bool:
  return isinstance(x, (jax.Array, jax.core.Tracer))


def _wide(dt) -> bool:
  """A 64-bit float or integer dtype (kept on device only with x64)."""
  dt = np.dtype(dt)
  return dt.itemsize == 8 and dt.kind in "fiu"


def _compute_dtype(dtype):
  """float64 for 64-bit floats/integers under x64, else float32 (module docstring)."""
  if _wide(dtype) and jax.config.jax_enable_x64:
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def _warn_float32(fn: str):
  global _warned_float32
  if not _warned_float32:
    _warned_float32 = True
    warnings.warn(f"ncjax.metrics.{fn}: float64 input but jax_enable_x64 is off: computing "
                  "in float32 (after centring in float64 on the host, so the result stays "
                  "accurate for well-posed inputs); enable x64 for float64 results.  This "
                  "warning is shown once.", stacklevel=3)


def _as_int(value, name: str, fn: str, minimum: int | None = None) -> int:
  """A Python or NumPy integer (bool, float and str are refused, never truncated)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{fn}: {name} must be an integer, got {value!r}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{fn}: need {name} >= {minimum}, got {value}")
  return value


def _check_features(features, fn: str, ndims=(2,)):
  if not hasattr(features, "shape") or not hasattr(features, "dtype"):
    features = np.asarray(features)
  if features.ndim not in ndims:
    want = " or ".join(f"{n}-D" for n in ndims)
    raise ValueError(f"{fn}: features must be {want}, got shape {tuple(features.shape)}")
  dt = np.dtype(features.dtype)
  if dt == np.bool_ or not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)
                            or dt == jnp.bfloat16):
    raise ValueError(f"{fn}: features must be real numbers (float or int), got dtype {dt}")
  if features.shape[0] == 0:
    raise ValueError(f"{fn}: no samples (features have shape {tuple(features.shape)})")
  if 0 in features.shape:
    raise ValueError(f"{fn}: features have an empty dimension (shape "
                     f"{tuple(features.shape)}; d = 0?)")
  return features


def _check_labels(labels, n: int, fn: str):
  if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
    labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{fn}: labels must be 1-D, got shape {tuple(labels.shape)}")
  dt = np.dtype(labels.dtype)
  if dt == np.bool_ or not np.issubdtype(dt, np.integer):
    raise ValueError(f"{fn}: labels must be integers, got dtype {dt}")
  if labels.shape[0] != n:
    raise ValueError(f"{fn}: length mismatch: {n} feature rows but {labels.shape[0]} labels")
  return labels


def _resolve_classes(labels, num_classes, fn: str, require_all: bool = True) -> int:
  """Checks label values (when concrete) and returns the static number of classes K.

  K is bounded before anything of size K is allocated: with every class required to be
  non-empty, K <= N (a stray label 2**32 would otherwise make ``bincount`` ask for 32 GiB).
  """
  if num_classes is not None:
    num_classes = _as_int(num_classes, "num_classes", fn)
  n = labels.shape[0]

  def check_k(k, src, claim):
    if k < 2:
      raise ValueError(f"{fn}: need K >= 2 classes, got {src}")
    if require_all and k > n:
      raise ValueError(f"{fn}: {claim} but there are only {n} samples, so some class is "
                       "empty (labels must be 0..K-1)")

  if _is_traced(labels):
    if num_classes is None:
      raise ValueError(f"{fn}: num_classes must be given when labels are traced "
                       "(inside jax.jit); it cannot be inferred from traced values")
    check_k(num_classes, f"num_classes={num_classes}", f"num_classes={num_classes}")
    return num_classes
  lab = np.asarray(labels)
  if lab.size == 0:
    raise ValueError(f"{fn}: no samples (empty labels)")
  lo, hi = int(lab.min()), int(lab.max())
  if lo < 0:
    raise ValueError(f"{fn}: label {lo} is outside [0, K): labels must be non-negative")
  k = hi + 1 if num_classes is None else num_classes
  if hi >= k:
    raise ValueError(f"{fn}: label {hi} is outside [0, {k}) (num_classes={k})")
  if num_classes is None:
    check_k(k, f"K={k}", f"label {hi} implies K={k} classes")
  else:
    check_k(k, f"num_classes={k}", f"num_classes={k}")
  if require_all:                               # k <= n: bincount allocates at most N
    counts = np.bincount(lab.astype(np.int64), minlength=k)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      raise ValueError(f"{fn}: class {int(empty[0])} has no samples"
                       + (f" (empty classes: {empty[:10].tolist()})" if empty.size > 1 else ""))
  return k


def _raise_nonfinite(features, fn: str, dtype):
  f = np.asarray(features)
  bad = np.argwhere(~np.isfinite(f))
  if bad.size:
    i = tuple(int(v) for v in bad[0])
    raise ValueError(f"{fn}: features contain NaN or Inf (first at index {i}: {f[i]})")
  raise ValueError(f"{fn}: non-finite intermediate result: the features overflow "
                   f"{np.dtype(dtype).name} (their class sums or squares exceed its range; "
                   "rescale them or use float64)")


def _to_jax(features, fn: str, translate: bool):
  """Features as a jax array without any lossy cast (see the dtype rule in the docstring).

  Device arrays and tracers are returned as they are (the jitted code casts them block by
  block).  64-bit NumPy input without x64 is centred in float64 here, where the precision
  exists, and then rounded to float32.
  """
  if _on_device(features):
    return features
  a = np.asarray(features)
  if not _wide(a.dtype) or jax.config.jax_enable_x64:
    return jnp.asarray(a)
  if a.dtype.kind == "f":
    _warn_float32(fn)
  a = a.astype(np.float64)
  if translate:
    with np.errstate(invalid="ignore", over="ignore"):
      a = a - a.mean(axis=0)
  with np.errstate(over="ignore"):
    return jnp.asarray(a.astype(np.float32))


def _labels_int32(labels):
  if _on_device(labels):
    return labels.astype(jnp.int32)
  return jnp.asarray(np.asarray(labels).astype(np.int32))


def _prepare(features, labels, num_classes, fn, translate=True):
  """Checks everything checkable; returns (h, y, K, concrete) with h uncast (see _to_jax)."""
  features = _check_features(features, fn)
  labels = _check_labels(labels, features.shape[0], fn)
  k = _resolve_classes(labels, num_classes, fn)
  concrete = not (_is_traced(features) or _is_traced(labels))
  return _to_jax(features, fn, translate), _labels_int32(labels), k, concrete


class ZeroSpreadError(ValueError):
  """Both spreads are zero (0/0, a dead layer or constant features): the metric is undefined.

  A ``ValueError``, so callers that catch those keep working; experiments catch this one to
  record the metric as NaN and name the layer (a dead layer is a finding, not a crash)."""


_DEAD = ("the between-class and the within-class spread are both zero (every class's "
         "features are one and the same vector, e.g. a dead layer or constant features): "
         "{metric} is 0/0")


def _finish(value, ok, features, concrete, fn, dead=None, what: str | None = None):
  """Concrete inputs: raise if the computation flagged invalid values (see _pass1).

  ``dead`` flags the 0/0 case of the zero-spread rule (module docstring); its message is
  ``what`` (default: the :data:`_DEAD` sentence for ``fn``).  Under jit the value is NaN.
  """
  if concrete and not bool(ok):
    _raise_nonfinite(features, fn, value.dtype)
  if concrete and dead is not None and bool(dead):
    raise ZeroSpreadError(f"{fn}: " + (what or _DEAD.format(metric=fn.upper())))
  return value


# ----------------------------------------------------------------------------- building blocks
def _row_block(n: int, d: int) -> int:
  """Rows per block of the shifted first pass (static).

  On CPU XLA does not fuse ``h - c`` into the scatter: it writes the shifted N x d array to
  freshly allocated memory first (4-8x slower than the plain pass, measured).  Blocks of
  2 MiB (1024 rows at d=512, 256 at d=2048) measured best with jax 0.10.2, N=50,000 on the
  2-core CPU (load 0.3): the first pass took 6.6 / 27 ms against 10.7 / 44 ms with the
  128 KiB blocks an earlier jaxlib preferred (512 KiB: 6.9 / 28 ms; 1 MiB: 7.2 / 33 ms),
  with squares 10.3 / 42 ms against 13.9 / 54 ms.  Other backends fuse the shift: one block.
  """
  if jax.default_backend() != "cpu":
    return n
  b = max(8, _BLOCK_BYTES // (4 * d))
  return min(n, 1 << (b.bit_length() - 1))


def _fold_rows(body, carry, block: int, *arrays):
  """``carry = body(carry, *blocks)`` over consecutive row blocks of ``arrays``, in order."""
  n = arrays[0].shape[0]
  if block >= n:
    return body(carry, *arrays)
  full = n // block
  if full:
    def step(i, c):
      return body(c, *(lax.dynamic_slice_in_dim(a, i * block, block) for a in arrays))
    carry = lax.fori_loop(0, full, step, carry)
  if n % block:
    carry = body(carry, *(a[full * block:] for a in arrays))
  return carry


def _add_rows(acc, y, rows):
  """``acc[y_i] += rows_i`` (in place on acc); rows with y outside [0, K) are dropped.

  (``.at[]`` would wrap negative labels around like Python indexing.)
  """
  return acc.at[jnp.where(y < 0, acc.shape[0], y)].add(rows, mode="drop")


def _first_rows(h, y, k):
  """The row where each class first occurs (K, d): a reference point inside each class."""
  n = h.shape[0]
  first = jax.ops.segment_min(jnp.arange(n, dtype=jnp.int32), y, num_segments=k)
  return h[jnp.clip(first, 0, n - 1)]                             # absent class: any row


def _pass1(h, y, k, squares: bool = False, shifted: bool = True, ref=None):
  """First read pass, in the shifted frame (or, ``shifted=False``, on ``h`` itself: one
  scatter at read speed, for small offsets, see _small_offset; not with ``squares``).

  Returns counts (K,) int32, references ``c`` (K, d) (the first row of each class: an exact
  data point, so ``h - c_y`` is of the order of the within-class spread whatever the offset
  and the distances between classes; ``ref`` if given, the caller's ``_first_rows``),
  ``m`` (K, d) = class means minus ``c``, ``ok`` (every label in range, no class empty, the
  sums finite) and, with ``squares``, the class sums of ``||(h - c_y) t||^2`` (K,) and the
  exact power of two ``t`` they were scaled by (else None, None).  Out-of-range labels are
  dropped from the sums, detected from the counts.
  """
  assert shifted or not squares, "squares are taken about the shift only"
  n, d = h.shape
  dt = _compute_dtype(h.dtype)
  counts = _add_rows(jnp.zeros((k,), jnp.int32), y, jnp.ones((n,), jnp.int32))
  if ref is None:
    ref = _first_rows(h, y, k).astype(dt)
  t = _inv_pow2_scale(ref) if squares else None                    # from data rows

  def body(acc, hb, yb):
    x = hb.astype(dt) - ref[yb] if shifted else hb.astype(dt)
    if squares:
      return _add_rows(acc[0], yb, x), _add_rows(acc[1], yb, jnp.sum(jnp.square(x * t), 1))
    return (_add_rows(acc[0], yb, x),)

  init = (jnp.zeros((k, d), dt),) + ((jnp.zeros((k,), dt),) if squares else ())
  acc = _fold_rows(body, init, _row_block(n, d) if shifted else n, h, y)
  m = acc[0] / jnp.maximum(counts, 1).astype(dt)[:, None]
  if not shifted:
    m = m - ref
  ok = jnp.all(counts > 0) & (jnp.sum(counts) == n)
  for a in acc:
    ok = ok & jnp.all(jnp.isfinite(a))
  return counts, ref, m, ok, (acc[1] if squares else None), t


def _small_offset(ref):
  """Whether the features' common offset is small next to their spread (traced bool).

  ``ref`` (K, d) holds one data row per class (see _pass1).  True when every such row is no
  longer than twice the typical distance between them: then the rounding of sums and
  products taken on ``h`` itself is of the order of that of the shifted frame, and the
  faster unshifted passes of :func:`nc1` are as exact (centred features, post-ReLU features
  of unit-order means).  False for a large common offset, non-finite rows and coinciding
  rows, which keep the shifted frame.
  """
  r = ref * _inv_pow2_scale(ref)                                   # O(1), exact
  size = jnp.max(jnp.sum(r * r, axis=1))
  spread = jnp.sum(jnp.square(r - r[0])) / (r.shape[0] - 1)        # mean over k >= 1
  return (size <= 4.0 * spread) & (spread > 0)


def _relative_means(ref, m):
  """``mu_k - ref_0`` (K, d) from ``mu_k = ref_k + m_k``, without ever forming ``mu_k``."""
  return (ref - ref[0]) + m


def _centred_means(ref, m):
  """``mu_k - mu_G`` (K, d), free of the offset (see _relative_means)."""
  rel = _relative_means(ref, m)
  return rel - jnp.mean(rel, axis=0)


def _inv_pow2_scale(x):
  """``1/s`` with ``s`` a power of two near ``max|x|`` (1 if x is 0 or not finite).

  Dividing by it is exact and brings the data to O(1) before anything is squared.  The
  exponent is clipped well inside the dtype's range so that 1/s stays a normal number.
  """
  amax = jnp.max(jnp.abs(x))
  lim = jnp.finfo(x.dtype).maxexp * 3 // 4
  e = jnp.clip(jnp.frexp(amax)[1] - 1, -lim, lim)
  inv = jnp.ldexp(jnp.ones((), x.dtype), -e)
  return jnp.where((amax > 0) & jnp.isfinite(amax), inv, jnp.ones((), x.dtype))


def _lowrank(centred, dtype):
  """Directions V (d, r) and weights 1/s_j^2 (0 beyond the cutoff) of centred means (K, d).

  From the eigendecomposition of the K x K Gram ``M M^T = U S^2 U^T``: ``V = M^T U S^-1``.
  The eigenvalues ``s_j^2`` carry absolute rounding errors ~ eps * s_max^2, the same as
  those of the d x d ``Sigma_B`` that :func:`nc1_pinv` decomposes, and directions below
  the cutoff ``10 d eps s_max^2`` are dropped.  (LAPACK's thin SVD of the K x d matrix was
  measured at 70 ms for K=10, d=2048 on the 2-core CPU, against 0.05 ms for this.)
  ``centred`` should be O(1) (see _inv_pow2_scale) so that the Gram cannot overflow.
  """
  k, d = centred.shape
  r = min(k - 1, d)
  gram = jnp.dot(centred, centred.T, precision=_HI)                # (K, K)
  w, u = jnp.linalg.eigh(gram)                                     # ascending
  s2, u = w[::-1][:r], u[:, ::-1][:, :r]
  rtol = 10.0 * d * jnp.finfo(dtype).eps          # == jnp.linalg.pinv default for d x d
  keep = s2 > rtol * s2[0]
  safe = jnp.where(keep, s2, 1.0)
  v = jnp.dot(centred.T, u, precision=_HI) / jnp.sqrt(safe)        # (d, r) orthonormal
  inv_s2 = jnp.where(keep, 1.0 / safe, 0.0)
  return v, inv_s2


def _nan_unless(ok, value):
  return jnp.where(ok, value, jnp.nan)


def _spread_rtol(d: int, dtype):
  """The zero-spread tolerance ``10 d eps``: the pseudo-inverse's cutoff, applied to sizes."""
  return 10.0 * d * jnp.finfo(dtype).eps


def _zero_spread(val, ok, between, within, within_all, d: int):
  """NC1 under the zero-spread rule (module docstring): (value, ok, dead).

  All three spreads are squared sizes in the same (rescaled) units: ``between`` =
  tr(Sigma_B); ``within`` = tr(P Sigma_W), the within-class spread in the directions the
  pseudo-inverse keeps (P the projector on them, the part of Sigma_W that NC1 weighs);
  ``within_all`` = tr(Sigma_W), used where Sigma_B is exactly 0 and keeps no direction.
  The between-class spread is zero when ``between <= rtol^2 within``: then NC1 is +inf,
  or NaN with ``dead`` set when both are exactly zero (0/0).  Otherwise a non-finite
  value means invalid input or overflow (``ok`` False).
  """
  rtol = _spread_rtol(d, val.dtype)
  within = jnp.where(between == 0, within_all, within)
  dead = (between == 0) & (within == 0)
  inf = between <= rtol * rtol * within
  ok = ok & (inf | jnp.isfinite(val))
  val = jnp.where(dead, jnp.nan, jnp.where(inf, jnp.inf, val))
  return _nan_unless(ok, val), ok, ok & dead


def _scaled_frame(h, y, k):
  """Pass 1 plus the common exact rescaling: (counts, ref, m, centred/s, 1/s, ok)."""
  counts, ref, m, ok, _, _ = _pass1(h, y, k)
  centred = _centred_means(ref, m)
  inv = _inv_pow2_scale(centred)
  return counts, ref, m, centred * inv, inv, ok


def _residuals(h, y, ref, m, inv):
  """Within-class residuals ``(h - mu_y)/s`` (N, d), formed as ``((h - c_y) - m_y)/s``."""
  return ((h.astype(ref.dtype) - ref[y]) - m[y]) * inv


# ----------------------------------------------------------------------------- NC1
# XLA:CPU's YNNPACK dot fusion compiles ``(h - c) @ v`` into one kernel that reads h once
# (measured at the speed of the plain ``h @ v``; without it XLA first writes h - c to fresh
# memory, 5-10x slower).  Only the projection of nc1 is compiled with it: the same option
# makes the row-blocked scatter of the first pass and the sum-of-products form slower.
_FUSED_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.lru_cache(maxsize=None)
def _fused_dot_options() -> dict | None:
  """`_FUSED_DOT_OPTIONS` where this jaxlib knows the option, else None."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_FUSED_DOT_OPTIONS).lower(
        jnp.zeros(2)).compile()
    return _FUSED_DOT_OPTIONS
  except Exception:  # noqa: BLE001 - a jaxlib without the option
    return None


# The fused dot pays off for many directions (measured at K = 100, d = 512: 0.72x the
# sum-of-products time under load); at K = 10 it was no faster (1.02-1.03x) and its
# summation order gave a 3x larger float32 error at offset 0 (1.2e-7 against 4e-8,
# `benchmarks/nc1.py --accuracy`), so fewer directions keep the sum of products.
_FUSED_DOT_MIN_DIRECTIONS = 64


def _use_fused_dot(h, directions: int) -> bool:
  """Concrete CPU arrays, many directions, the option available (a caller's jit ignores ours)."""
  if (_is_traced(h) or not isinstance(h, jax.Array)
          or directions < _FUSED_DOT_MIN_DIRECTIONS):
    return False
  return (all(dev.platform == "cpu" for dev in h.devices())
          and _fused_dot_options() is not None)


def _nc1_directions(k: int, d: int) -> int:
  """r' = min(K-1, d) padded to a multiple of 8: the columns of the second pass (static)."""
  r = min(k - 1, d)
  return r + (-r % 8)


def _branch(pred, if_true, if_false):
  """``lax.cond`` for a traced ``pred``; a Python bool picks its branch at trace time (the
  compiled code is then that branch alone, as XLA compiles it outside a conditional)."""
  if isinstance(pred, bool):
    return if_true() if pred else if_false()
  return lax.cond(pred, if_true, if_false)


@functools.partial(jax.jit, static_argnums=(2,))
def _offset_is_small(h, y, k):
  return _small_offset(_first_rows(h, y, k).astype(_compute_dtype(h.dtype)))


def _nc1_frame(h, y, k, raw=None):
  """Pass 1 and the K x K algebra of nc1: everything but the projection of the residuals.

  ``raw``: whether the offset is small (see _small_offset: both passes then read ``h``
  itself), a Python bool where the caller knows it, else None (decided here, traced).
  Returns ``raw``, ``c`` (d,) the common point of the second pass, ``v`` (d, r') the
  directions divided by the scale s (r' = r padded to a multiple of 8 with zero columns),
  ``mv`` (K, r') ``(mu_k - c) . v``, ``inv_s2`` (r',), tr(Sigma_B) and -- only where
  Sigma_B is exactly 0, else 0 -- tr(Sigma_W), both in units of s^2, and ``ok``.
  """
  n, d = h.shape
  dt = _compute_dtype(h.dtype)
  first = _first_rows(h, y, k).astype(dt)
  if raw is None:
    raw = _small_offset(first)
  counts, ref, m, ok = _branch(raw, lambda: _pass1(h, y, k, shifted=False, ref=first)[:4],
                               lambda: _pass1(h, y, k, ref=first)[:4])
  centred = _centred_means(ref, m)
  inv = _inv_pow2_scale(centred)
  centred = centred * inv
  v, inv_s2 = _lowrank(centred, dt)                                # (d, r), (r,)
  # Zero columns up to a multiple of 8: XLA:CPU's kernels for the skinny (N, d) @ (d, r)
  # are faster at r = 8k (measured at N=50,000, d=2048: r=16 beat r=9, 10 and 12).
  pad = -v.shape[1] % 8
  v, inv_s2 = jnp.pad(v, ((0, 0), (0, pad))), jnp.pad(inv_s2, (0, pad))
  v = v * inv                                  # projections come out divided by s
  # The second pass works about one common point c, the mean of the class means rounded
  # to the dtype (a per-class shift would need a gather that no CPU kernel fuses).
  rel = _relative_means(ref, m)                                    # mu_k - c_0
  c = ref[0] + jnp.mean(rel, axis=0)
  mv = jnp.dot(rel - (c - ref[0]), v, precision=_HI)               # (mu_k - c) . v / s
  between = jnp.sum(centred * centred) / k
  # Only with coinciding means (no direction kept) does the zero-spread rule need all of
  # tr(Sigma_W): a third pass, run only then (inv = 1 there).
  def within_all():
    cnt, _, m2, _, sq, t = _pass1(h, y, k, squares=True)
    nk = jnp.maximum(cnt, 1).astype(dt)
    return jnp.sum(jnp.maximum(sq - nk * jnp.sum(jnp.square(m2 * t), 1), 0.0)) / (n * t * t)
  within_all = lax.cond(between == 0, within_all, lambda: jnp.zeros((), dt))
  return raw, c, v, mv, inv_s2, between, within_all, ok


def _nc1_finish(hv, y, mv, inv_s2, between, within_all, ok, d):
  """NC1 from the projections ``hv = (h - c) v`` (N, r'), with the zero-spread rule."""
  n = hv.shape[0]
  rv = hv - mv[y]                                                  # residuals projected
  proj = jnp.sum(rv * rv, axis=0) / n                              # v_j^T Sigma_W v_j
  val = jnp.maximum(jnp.sum(proj * inv_s2), 0.0)
  within = jnp.sum(jnp.where(inv_s2 > 0, proj, 0.0))               # tr(P Sigma_W)
  return _zero_spread(val, ok, between, within, within_all, d)


def _unshifted_projection(h, c, v):
  """``(h - c) v`` as ``h v - c v``: the plain matmul, at read speed (small offsets only)."""
  return jnp.dot(h.astype(v.dtype), v, precision=_HI) - jnp.dot(c, v, precision=_HI)


def _nc1_pass2_sum(h, y, raw, c, v, mv, inv_s2, between, within_all, ok):
  # A sum of products, which XLA compiles into one kernel together with the shift on every
  # backend (jnp.dot(h - c, v) would first write h - c to memory where nothing fuses it).
  hv = _branch(raw, lambda: _unshifted_projection(h, c, v),
               lambda: jnp.sum((h.astype(v.dtype) - c)[:, :, None] * v[None], axis=1))
  return _nc1_finish(hv, y, mv, inv_s2, between, within_all, ok, h.shape[1])


def _nc1_pass2_dot(h, y, c, v, mv, inv_s2, between, within_all, ok, *, raw):
  hv = _branch(raw, lambda: _unshifted_projection(h, c, v),
               lambda: jnp.dot(h.astype(v.dtype) - c, v, precision=_HI))  # one fused kernel
  return _nc1_finish(hv, y, mv, inv_s2, between, within_all, ok, h.shape[1])


# One jit for both passes where the projection is the sum of products (one dispatch, as
# before the fused dot existed); the fused dot needs its own compiler options, so there the
# frame and the projection are two jits.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _nc1_plain(h, y, k, raw):
  return _nc1_pass2_sum(h, y, *_nc1_frame(h, y, k, raw))


_nc1_frame_jit = jax.jit(_nc1_frame, static_argnums=(2, 3))


@functools.lru_cache(maxsize=None)
def _nc1_pass2_fused(raw: bool):
  return jax.jit(functools.partial(_nc1_pass2_dot, raw=raw),
                 compiler_options=_fused_dot_options())


def _nc1_impl(h, y, k):
  """(NC1, ok, dead): two read passes, on ``h`` itself where its offset is small (decided
  on the host for concrete arrays, so that each case compiles without a conditional); the
  projection fused where the CPU allows it."""
  concrete = not (_is_traced(h) or _is_traced(y))
  raw = bool(_offset_is_small(h, y, k)) if concrete else None
  if concrete and _use_fused_dot(h, _nc1_directions(k, h.shape[1])):
    frame = _nc1_frame_jit(h, y, k, raw)
    return _nc1_pass2_fused(raw)(h, y, *frame[1:])
  return _nc1_plain(h, y, k, raw)


def nc1(features, labels, num_classes: int | None = None):
  """Exact NC1 = tr(Sigma_W Sigma_B^+)/K through the <= K-1 directions of the centred means.

  No d x d matrix is formed or inverted: two read passes over ``features`` plus a K x d SVD,
  in the shifted frame where the features' offset calls for it (exact at any offset and
  scale, see the module docstring).  Two passes are the minimum for this exactness: the
  directions Sigma_W is weighed in are those of the class means, known only after a pass.
  Agrees with :func:`nc1_pinv` (same pseudo-inverse cutoff) and is never negative.

  Args:
    features: (N, d) float or integer array (any units; the result is dimensionless).
    labels: (N,) integer array in ``[0, K)``.
    num_classes: K; inferred as ``max(labels) + 1`` when omitted (labels must be concrete).
  Returns:
    A scalar jax array (dtype float32, or float64 for 64-bit inputs with x64 enabled).
  """
  h, y, k, concrete = _prepare(features, labels, num_classes, "nc1")
  val, ok, dead = _nc1_impl(h, y, k)
  return _finish(val, ok, features, concrete, "nc1", dead, _DEAD.format(metric="NC1"))


@functools.partial(jax.jit, static_argnums=(2,))
def _nc1_pinv_impl(h, y, k):
  n = h.shape[0]
  _, ref, m, centred, inv, ok = _scaled_frame(h, y, k)
  r = _residuals(h, y, ref, m, inv)                                # (N, d), scaled
  sigma_w = jnp.dot(r.T, r, precision=_HI) / n
  sigma_b = jnp.dot(centred.T, centred, precision=_HI) / k
  pinv = jnp.linalg.pinv(sigma_b, hermitian=True)
  val = jnp.trace(jnp.dot(sigma_w, pinv, precision=_HI)) / k
  kept = jnp.dot(pinv, sigma_b, precision=_HI)                     # projector P
  return _zero_spread(val, ok, jnp.trace(sigma_b),
                      jnp.trace(jnp.dot(sigma_w, kept, precision=_HI)), jnp.trace(sigma_w),
                      h.shape[1])


def nc1_pinv(features, labels, num_classes: int | None = None):
  """NC1 by the literal eq. (4): d x d Sigma_W and Sigma_B, ``jnp.linalg.pinv(Sigma_B)``.

  The reference path described in the paper; O(N d^2 + d^3), in the same shifted and
  rescaled frame as :func:`nc1`.  Same conventions and arguments as :func:`nc1`.
  """
  h, y, k, concrete = _prepare(features, labels, num_classes, "nc1_pinv")
  val, ok, dead = _nc1_pinv_impl(h, y, k)
  return _finish(val, ok, features, concrete, "nc1_pinv", dead, _DEAD.format(metric="NC1"))


# ----------------------------------------------------------------------------- CDNV
_CDNV_DEAD = ("two classes have zero within-class variance and the same mean (both spreads "
              "zero, e.g. a dead layer or constant features): their CDNV term is 0/0")


def _cdnv_from(var, centred):
  """(CDNV, dead) from class variances (K,) and centred means (K, d), same units.

  The zero-spread rule per pair: ``2 ||mu_i - mu_j||^2 <= rtol^2 (Var_i + Var_j)`` (the
  pair's distance at most rtol times its spread) gives +inf; distance and variances all
  exactly zero (0/0) gives NaN with ``dead`` set.
  """
  k, d = centred.shape
  diff = centred[:, None, :] - centred[None, :, :]
  dist2 = jnp.sum(diff * diff, axis=-1)                            # (K, K)
  iu = np.triu_indices(k, 1)
  spread, dist2 = (var[:, None] + var[None, :])[iu], 2.0 * dist2[iu]
  rtol = _spread_rtol(d, centred.dtype)
  zero = dist2 <= rtol * rtol * spread
  dead_pair = (dist2 == 0) & (spread == 0)
  pair = jnp.where(zero, jnp.inf, spread / jnp.where(zero, 1.0, dist2))
  dead = jnp.any(dead_pair)
  return jnp.where(dead, jnp.nan, jnp.mean(pair)), dead


@functools.partial(jax.jit, static_argnums=(2,))
def _cdnv_impl(h, y, k):
  # One pass: Var_k = mean ||h - c_k||^2 - ||m_k||^2 about the class's first row c_k.  As
  # c_k is a sample of class k, ||m_k||^2 is about Var_k and the subtraction costs ~1 bit
  # (an outlier first row at t standard deviations costs log2(t^2) bits), whatever the
  # offset; a second pass over h - mu_y would cost a gather XLA:CPU writes out as N x d.
  counts, ref, m, ok, sq, t = _pass1(h, y, k, squares=True)
  n = jnp.maximum(counts, 1).astype(ref.dtype)
  centred = _centred_means(ref, m)
  inv = _inv_pow2_scale(centred)
  var = jnp.maximum(sq / n - jnp.sum(jnp.square(m * t), axis=1), 0.0) * jnp.square(inv / t)
  ok = ok & jnp.all(jnp.isfinite(var))
  val, dead = _cdnv_from(var, centred * inv)
  return _nan_unless(ok, val), ok, ok & dead


def cdnv(features, labels, num_classes: int | None = None):
  """Class-distance normalised variance (Galanti et al.), averaged over class pairs i < j.

  ``(Var_i + Var_j) / (2 ||mu_i - mu_j||^2)`` with ``Var_k = mean_{i in k} ||h_i - mu_k||^2``,
  dimensionless.  One read pass in the shifted frame (variances about each class's first
  row, see _cdnv_impl), rescaled exactly.  Returns ``inf`` if two class means coincide.
  Arguments as :func:`nc1`.
  """
  h, y, k, concrete = _prepare(features, labels, num_classes, "cdnv")
  val, ok, dead = _cdnv_impl(h, y, k)
  return _finish(val, ok, features, concrete, "cdnv", dead, _CDNV_DEAD)


# ----------------------------------------------------------------------------- numerical rank
def _class_top_eigs(h, y, counts, k, window, inv):
  """``||H_k / s||_2^2`` for every class (K,), exactly (``eigvalsh``), H_k uncentred.

  Rows are visited class by class through the argsort of the labels, so forming the K
  Grams costs O(N d^2) in total (masking all N rows for every class cost K N d^2).  Each
  class gets the d x d Gram ``H_k^T H_k``, summed over blocks of its rows, or -- when the
  largest class (``window`` rows) is small against d -- the window x window Gram
  ``H_k H_k^T`` of its rows (same nonzero spectrum), whichever costs fewer flops.
  """
  n, d = h.shape
  dt = inv.dtype
  order = jnp.argsort(y).astype(jnp.int32)                         # classes contiguous
  starts = jnp.cumsum(counts) - counts
  blk = int(min(256, max(8, 1 << max(0, (n // (2 * k)).bit_length() - 1))))
  if (n + k * blk) * d * d + k * d ** 3 <= k * (window * window * d + window ** 3):
    order = jnp.concatenate([order, jnp.zeros((blk,), jnp.int32)])   # slices stay in range

    def top(start, cnt):
      def add_block(j, g):
        rows = h[lax.dynamic_slice_in_dim(order, start + j * blk, blk)]
        x = jnp.where((j * blk + jnp.arange(blk) < cnt)[:, None], rows.astype(dt) * inv, 0)
        return g + jnp.dot(x.T, x, precision=_HI)
      g = lax.fori_loop(0, (cnt + blk - 1) // blk, add_block, jnp.zeros((d, d), dt))
      return jnp.linalg.eigvalsh(g)[-1]
  else:
    order = jnp.concatenate([order, jnp.zeros((window,), jnp.int32)])

    def top(start, cnt):
      rows = h[lax.dynamic_slice_in_dim(order, start, window)]
      x = jnp.where((jnp.arange(window) < cnt)[:, None], rows.astype(dt) * inv, 0)
      return jnp.linalg.eigvalsh(jnp.dot(x, x.T, precision=_HI))[-1]
  return lax.map(lambda sc: top(*sc), (starts, counts))


def _mean_rank(fro2, spec2):
  """``mean_k ||H_k||_F^2 / ||H_k||_2^2`` where a class that is all zeros has rank 0."""
  return jnp.mean(jnp.where(fro2 > 0, fro2 / jnp.where(fro2 > 0, spec2, 1.0), 0.0))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _numrank_impl(h, y, k, exact, window, num_iters):
  n, d = h.shape
  counts, ref, m, ok, _, _ = _pass1(h, y, k)
  dt = ref.dtype
  means = ref + m                    # rounded absolute means: only a scale and start vectors
  inv = _inv_pow2_scale(jnp.concatenate([ref, means]))             # data rows and means
  x = h.astype(dt)
  fro2 = _add_rows(jnp.zeros((k,), dt), y, jnp.sum(jnp.square(x * inv), axis=1))
  if exact:
    spec2 = _class_top_eigs(h, y, counts, k, window, inv)
  else:
    # Batched power iteration on H_k^T H_k, one K x d block of vectors; class masking via
    # the one-hot matrix keeps every shape static.  Start: class mean + fixed perturbation.
    onehot = jax.nn.one_hot(y, k, dtype=dt)                      # (N, K) masks
    g = jax.random.normal(jax.random.PRNGKey(0), (k, d), dt)
    g = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    mn = jnp.linalg.norm(means * inv, axis=1, keepdims=True)
    u = means * inv / jnp.where(mn > 0, mn, 1.0) + 0.1 * g
    u = u / jnp.linalg.norm(u, axis=1, keepdims=True)

    def project(u):                                              # (N, K): h_i . u_{y_i} / s
      return jnp.dot(x, u.T, precision=_HI) * onehot * inv

    def add_scaled(acc, xb, pb, yb):                             # acc[y_i] += p_i x_i
      return (_add_rows(acc[0], yb, xb.astype(dt) * pb[:, None]),)

    def step(carry):
      i, p, rq, gain, done = carry
      # w_k = sum_{i in k} p_i x_i: a row-blocked scatter reads x once (p^T x as a GEMM cost
      # 1.2-1.8x that at K = 10, and grows with K); p has one nonzero per row.
      w = _fold_rows(add_scaled, (jnp.zeros((k, d), dt),), _row_block(n, d), h,
                     jnp.sum(p, axis=1), y)[0] * inv
      wn = jnp.linalg.norm(w, axis=1, keepdims=True)
      p = project(w / jnp.where(wn > 0, wn, 1.0))
      new = jnp.sum(jnp.square(p), axis=0)                       # ||H_k u_k||^2 (Rayleigh)
      # A class has converged once its quotient rose by at most 4 eps of itself (its float32
      # rounding at N = 50,000 measured +-1.6 eps) and either by at most half its previous
      # rise (a geometric tail adds at most that much again) or after a step that did not
      # rise at all (impossible in exact arithmetic: that step was already at the rounding
      # floor); it stays so, as later rises are rounding noise of either sign.
      rise = new - rq
      tail = ((gain > 0) & (rise <= 0.5 * gain)) | ((gain <= 0) & (i > 0))
      done = done | ((rise <= 4.0 * eps * new) & tail) | (new == 0)
      return i + 1, p, new, rise, done

    eps = jnp.finfo(dt).eps
    p = project(u)
    rq = jnp.sum(jnp.square(p), axis=0)
    carry = (jnp.zeros((), jnp.int32), p, rq, jnp.zeros_like(rq), jnp.zeros((k,), bool))
    spec2 = lax.while_loop(lambda c: (c[0] < num_iters) & ~jnp.all(c[4]), step, carry)[2]
  val = _mean_rank(fro2, spec2)
  ok = ok & jnp.isfinite(val)
  return _nan_unless(ok, val), ok


def numerical_rank(features, labels, num_classes: int | None = None, exact: bool = False,
                   num_iters: int = 20):
  """Numerical (stable) rank ``(1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2``, H_k uncentred.

  Dimensionless, in ``[1, min(n_k, d)]`` per class.  ``exact=False`` (default, as in the
  paper): ``||H_k||_2^2`` by at most ``num_iters`` steps of power iteration on
  ``H_k^T H_k``, all classes batched (2 read passes of the features per step), started
  deterministically from the class mean plus a fixed pseudo-random perturbation
  (PRNGKey(0)).  The estimate is the Rayleigh quotient ``||H_k u||^2``, a lower bound on
  ``||H_k||_2^2``, so the rank estimate is an upper bound that decreases monotonically to the
  exact value; its relative error is at most about ``tan^2(theta_0) (sigma_2/sigma_1)^(4 t)``
  after t steps (theta_0 the start angle).  The iteration stops before ``num_iters`` once
  every class's quotient rose by at most 4 eps (the dtype's) of itself in a step and by at
  most half its previous rise -- converged to within a few roundings, so more steps would
  not change the value beyond rounding.  For uncentred features the top direction is close
  to the class mean, so convergence is fast (2-3 steps where the class means dominate, as
  post-ReLU features' do) unless the two largest singular values of H_k are nearly equal
  (then the error is still small in the value, as both candidates give nearly the same
  norm).
  ``exact=True``: largest eigenvalue of each class Gram (``eigvalsh``); forming the Grams
  costs O(N d^2) in total, the eigendecompositions ``K min(d, n_max)^3`` (n_max the largest
  class when labels are concrete, N under jit).  The metric is not translation invariant,
  so it is computed on the features as given, rescaled by an exact power of two.
  """
  fn = "numerical_rank"
  num_iters = _as_int(num_iters, "num_iters", fn, 1)
  h, y, k, concrete = _prepare(features, labels, num_classes, fn, translate=False)
  window = h.shape[0]
  if exact and not _is_traced(labels):
    window = int(np.bincount(np.asarray(labels).astype(np.int64), minlength=k).max())
  val, ok = _numrank_impl(h, y, k, bool(exact), window, jnp.asarray(num_iters, jnp.int32))
  return _finish(val, ok, features, concrete, fn)


# ----------------------------------------------------------------------------- NC2 / NC3
def _unit_fro(a):
  a = a * _inv_pow2_scale(a)                   # exact; keeps ||a||^2 in range
  return a / jnp.linalg.norm(a)


@functools.partial(jax.jit, static_argnums=(2,))
def _nc2_impl(h, y, k):
  *_, centred, _, ok = _scaled_frame(h, y, k)
  unit = centred / jnp.linalg.norm(centred, axis=1, keepdims=True)
  gram = jnp.dot(unit, unit.T, precision=_HI)
  etf = (k / (k - 1.0)) * (jnp.eye(k, dtype=gram.dtype) - 1.0 / k)
  val = jnp.linalg.norm(_unit_fro(gram) - _unit_fro(etf))
  return _nan_unless(ok, val), ok


def nc2_etf(features, labels, num_classes: int | None = None):
  """NC2: ``|| G/||G||_F - E/||E||_F ||_F``, distance of the centred class means from a simplex ETF.

  ``G`` is the Gram matrix of the centred class means, each normalised to unit length;
  ``E = K/(K-1) (I - 11^T/K)``.  0 for a simplex ETF (any scale, rotation, translation).
  """
  h, y, k, concrete = _prepare(features, labels, num_classes, "nc2_etf")
  val, ok = _nc2_impl(h, y, k)
  return _finish(val, ok, features, concrete, "nc2_etf")


@functools.partial(jax.jit, static_argnums=(3,))
def _nc3_impl(h, y, w, k):
  *_, centred, _, ok = _scaled_frame(h, y, k)
  ok = ok & jnp.all(jnp.isfinite(w))
  val = jnp.linalg.norm(_unit_fro(w) - _unit_fro(centred))
  return _nan_unless(ok, val), ok


def nc3_duality(features, labels, classifier, num_classes: int | None = None, *,
                flax_kernel: bool = False):
  """NC3 self-duality ``|| W/||W||_F - M/||M||_F ||_F``, M the centred class means (K x d).

  ``classifier`` is W with shape (K, d) (one row per class, as in ``logits = h @ W.T``).
  A Flax ``Dense`` kernel has shape (d, K); pass it with ``flax_kernel=True`` (it is
  transposed).  The bias is not used.
  """
  fn = "nc3_duality"
  h, y, k, concrete = _prepare(features, labels, num_classes, fn)
  w = classifier if hasattr(classifier, "shape") else np.asarray(classifier)
  if w.ndim != 2:
    raise ValueError(f"{fn}: classifier must be 2-D, got shape {tuple(w.shape)}")
  if flax_kernel:
    w = w.T
  d = h.shape[1]
  if tuple(w.shape) != (k, d):
    hint = (" (a Flax Dense kernel is (d, K): pass flax_kernel=True)"
            if tuple(w.shape) == (d, k) and not flax_kernel else "")
    raise ValueError(f"{fn}: classifier shape {tuple(w.shape)} does not match "
                     f"(K, d) = ({k}, {d}){hint}")
  w = jnp.asarray(w).astype(_compute_dtype(h.dtype))
  if concrete and not _is_traced(w) and not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError(f"{fn}: classifier contains NaN or Inf")
  val, ok = _nc3_impl(h, y, w, k)
  return _finish(val, ok, features, concrete, fn)
# ----------------------------------------------------------------------------- streaming
def _check_mask(mask, n: int, fn: str):
  """None, or an (N,) bool / 0-1 numeric row mask (values checked when concrete)."""
  if mask is None:
    return None
  if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
    mask = np.asarray(mask)
  dt = np.dtype(mask.dtype)
  if not (dt == np.bool_ or np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)
          or dt == jnp.bfloat16):
    raise ValueError(f"{fn}: mask must be boolean or 0/1 weights, got dtype {dt}")
  if tuple(mask.shape) != (n,):
    raise ValueError(f"{fn}: mask must have shape ({n},) (one entry per row), got "
                     f"{tuple(mask.shape)}")
  if not _is_traced(mask):
    m = np.asarray(mask)
    if dt != np.bool_:
      odd = np.flatnonzero((m != 0) & (m != 1))
      if odd.size:
        raise ValueError(f"{fn}: mask must be boolean or 0/1 weights, got "
                         f"{m[odd[0]]} at row {int(odd[0])}")
  return mask


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["counts", "shift", "sums", "sqnorms", "scatter", "class_scatter"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class CollapseStats:
  """Streaming, mergeable sufficient statistics for NC1, CDNV and numerical rank (a pytree).

  Fields (K classes, dimension d, in the features' units; every moment is about the
  per-class shift ``c_k``, the first row of class k that an update saw):
    counts (K,) int32; shift (K, d) = c_k; sums (K, d) = sum (h - c_k);
    sqnorms (K,) = sum ||h - c_k||^2; scatter (d, d) = sum (h - c_y)(h - c_y)^T;
    class_scatter (K, d, d) per-class version of scatter, or None.
  Memory O(K d + d^2) (+ K d^2 with ``per_class_second_moment``), independent of N.

  Usage::

      stats = CollapseStats.create(K, d)
      for h, y, valid in batches: stats = stats.update(h, y, mask=valid)   # jittable
      stats.nc1(), stats.cdnv()

  ``update`` and ``merge`` are pure; ``merge`` is associative (up to rounding) and
  commutative in value; ``psum(axis_name)`` merges across a mapped/mesh axis.
  """
  counts: Any
  shift: Any
  sums: Any
  sqnorms: Any
  scatter: Any
  class_scatter: Any = None

  # -- construction
  @classmethod
  def create(cls, num_classes: int, dim: int, dtype=jnp.float32,
             per_class_second_moment: bool = False) -> "CollapseStats":
    """Empty statistics for ``num_classes`` (int >= 2) classes of ``dim``-dim features.

    ``dtype`` follows the module's rule: float64 only with x64 enabled (a float64 request
    without x64 warns once and gives float32).
    """
    fn = "CollapseStats.create"
    k = _as_int(num_classes, "num_classes", fn, 2)
    d = _as_int(dim, "dim", fn, 1)
    if _wide(dtype) and np.dtype(dtype).kind == "f" and not jax.config.jax_enable_x64:
      _warn_float32(fn)
    dtype = _compute_dtype(dtype)
    z = functools.partial(jnp.zeros, dtype=dtype)
    return cls(counts=jnp.zeros((k,), jnp.int32), shift=z((k, d)), sums=z((k, d)),
               sqnorms=z((k,)), scatter=z((d, d)),
               class_scatter=z((k, d, d)) if per_class_second_moment else None)

  @property
  def num_classes(self) -> int:
    return self.counts.shape[0]

  @property
  def dim(self) -> int:
    return self.shift.shape[1]

  # -- accumulation
  def update(self, features, labels, mask=None) -> "CollapseStats":
    """Adds a batch and returns new statistics (pure; jittable).  Classes may be absent.

    Args:
      features: (N, d) float or integer array, d = ``self.dim``.
      labels: (N,) integers in ``[0, K)``.
      mask: optional (N,) row mask, boolean or 0/1 weights (int or float).  A row with
        mask False/0 contributes nothing -- not to the counts, the sums, the scatters or
        the shifts -- whatever its features (NaN included) and its label (-1 padding is
        fine).  ``None``: every row counts.  Use it for a padded last batch, so that the
        batch can stay on the device.
    Rows that count must have labels in ``[0, K)`` and finite features whose squares fit
    the dtype (see the module docstring), and mask values must be 0 or 1.  With concrete
    inputs a violation raises ``ValueError``; inside ``jit`` it makes the returned
    statistics NaN (sums, squared norms and scatters), so every metric computed from them
    is NaN (and raises when computed eagerly) rather than a number about a subset.
    """
    fn = "CollapseStats.update"
    features = _check_features(features, fn)
    n = features.shape[0]
    labels = _check_labels(labels, n, fn)
    if features.shape[1] != self.dim:
      raise ValueError(f"{fn}: feature dimension {features.shape[1]} != stats dim {self.dim}")
    mask = _check_mask(mask, n, fn)
    concrete = not any(_is_traced(a) for a in (features, labels, mask))
    keep = None
    if concrete:
      keep = np.ones(n, bool) if mask is None else np.asarray(mask) != 0
      if keep.any():
        _resolve_classes(np.asarray(labels)[keep], self.num_classes, fn,
                         require_all=False)
    host = (not _on_device(features) and _wide(np.dtype(features.dtype))
            and not jax.config.jax_enable_x64)
    if host and np.dtype(features.dtype).kind == "f":
      _warn_float32(fn)
    if host and concrete:                  # 64-bit NumPy without x64: shift on the host
      new, tiny = _stats_accumulate(self, *_host_shift_residuals(self, features, labels,
                                                                keep))
    else:
      w = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask)
      h = features if _on_device(features) else jnp.asarray(np.asarray(features))
      new, tiny = _stats_update(self, h, _labels_int32(labels), w)
    if concrete and not _is_traced(new.counts) and not _finite(new):
      if bool(tiny):
        raise ValueError(f"{fn}: features too small: a row differs from its class shift "
                         f"by less than {np.sqrt(np.finfo(self.shift.dtype).tiny):.0e} "
                         f"in every component, so its square underflows "
                         f"{np.dtype(self.shift.dtype).name}; rescale the features")
      if not _finite(self):
        raise ValueError(f"{fn}: the statistics were already NaN/Inf before this "
                         "update" + _NAN_CAUSES)
      _raise_nonfinite(np.where(keep[:, None], np.asarray(features), 0), fn,
                       self.shift.dtype)
    return new

  def reshift(self, new_shift) -> "CollapseStats":
    """The same statistics expressed about another per-class shift (K, d); exact algebra."""
    return _reshift(self, new_shift)

  def merge(self, other: "CollapseStats") -> "CollapseStats":
    """Statistics of the union of both data sets (keeps self's shift where self has data)."""
    if (other.counts.shape != self.counts.shape or other.shift.shape != self.shift.shape
            or (other.class_scatter is None) != (self.class_scatter is None)):
      raise ValueError("CollapseStats.merge: statistics have different num_classes, dim "
                       "or per_class_second_moment")
    target = jnp.where((self.counts > 0)[:, None], self.shift, other.shift)
    a, b = _reshift(self, target), _reshift(other, target)
    return jax.tree_util.tree_map(jnp.add, dataclasses.replace(a, shift=jnp.zeros_like(target)),
                                  dataclasses.replace(b, shift=target))

  def psum(self, axis_name) -> "CollapseStats":
    """Merges the statistics held along a mapped/mesh axis (inside jit/shard_map/pmap).

    All members move to the common shift ``sum_p n_k^p c_k^p / sum_p n_k^p`` and the
    additive fields are summed; the result is replicated along the axis.
    """
    n = self.counts.astype(self.shift.dtype)[:, None]
    num = lax.psum(n * self.shift, axis_name)
    den = lax.psum(n, axis_name)
    target = num / jnp.maximum(den, 1.0)
    moved = _reshift(self, target)
    summed = lax.psum(dataclasses.replace(moved, shift=jnp.zeros_like(target)), axis_name)
    return dataclasses.replace(summed, shift=target)

  # -- metrics
  def _check_usable(self, fn):
    if _is_traced(self.counts):
      return
    empty = np.flatnonzero(np.asarray(self.counts) == 0)
    if empty.size:
      raise ValueError(f"CollapseStats.{fn}: class {int(empty[0])} has no samples")
    if not _finite(self):
      raise ValueError(f"CollapseStats.{fn}: the statistics contain NaN or Inf"
                       + _NAN_CAUSES)

  def nc1(self):
    """NC1 = tr(Sigma_W Sigma_B^+)/K, same conventions and cutoff as :func:`nc1`."""
    self._check_usable("nc1")
    val, dead = _stats_nc1(self)
    return self._unless_dead(val, dead, "nc1", _DEAD.format(metric="NC1"))

  def cdnv(self):
    """CDNV, same definition as :func:`cdnv`."""
    self._check_usable("cdnv")
    val, dead = _stats_cdnv(self)
    return self._unless_dead(val, dead, "cdnv", _CDNV_DEAD)

  def _unless_dead(self, val, dead, fn, what):
    """The zero-spread rule's 0/0 case: ValueError when concrete, NaN under jit."""
    if not _is_traced(dead) and bool(dead):
      raise ZeroSpreadError(f"CollapseStats.{fn}: {what}")
    return val

  def numerical_rank(self):
    """Exact numerical rank (eigvalsh of each class's uncentred second moment).

    Needs ``per_class_second_moment=True``; equals ``numerical_rank(..., exact=True)``.
    """
    if self.class_scatter is None:
      raise ValueError("CollapseStats.numerical_rank: needs per_class_second_moment=True "
                       "in CollapseStats.create")
    self._check_usable("numerical_rank")
    return _stats_numrank(self)


_NAN_CAUSES = (": an update inside jit saw a label outside [0, K), a mask value other than 0/1 "
               "or non-finite features, or the squared features overflowed or underflowed the "
               "dtype")


def _moments(s: CollapseStats):
  return [x for x in (s.sums, s.sqnorms, s.scatter, s.class_scatter) if x is not None]


def _finite(s: CollapseStats) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in _moments(s))


def _stats_ok(s: CollapseStats):
  """Traceable: every class seen and every moment finite."""
  ok = jnp.all(s.counts > 0)
  for x in _moments(s):
    ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def _reshift(s: CollapseStats, new_shift) -> CollapseStats:
  # h - new = (h - old) + delta, delta = old - new.
  delta = s.shift - new_shift
  n = s.counts.astype(s.shift.dtype)
  sums = s.sums + n[:, None] * delta
  sq = s.sqnorms + 2.0 * jnp.sum(s.sums * delta, axis=1) + n * jnp.sum(delta * delta, axis=1)
  cross = jnp.dot(s.sums.T, delta, precision=_HI)
  scatter = s.scatter + cross + cross.T + jnp.dot(delta.T * n, delta, precision=_HI)
  cs = s.class_scatter
  if cs is not None:
    c = jnp.einsum("kd,ke->kde", s.sums, delta, precision=_HI)
    cs = cs + c + jnp.swapaxes(c, 1, 2) + jnp.einsum("k,kd,ke->kde", n, delta, delta,
                                                      precision=_HI)
  return CollapseStats(s.counts, new_shift, sums, sq, scatter, cs)


def _shift_residuals(s: CollapseStats, h, y, w):
  """A batch in the statistics' frame: (new shifts, residuals h - c_y, labels, bad).

  Rows count where ``w != 0``.  A class seen for the first time takes its first counted
  row as shift.  Residuals of rows that do not count are 0 and their labels become K
  (dropped by every scatter below); ``bad`` flags counted rows with a label outside
  ``[0, K)`` or a weight other than 0/1.
  """
  k, dt = s.num_classes, s.shift.dtype
  n = h.shape[0]
  counted = w != 0
  valid = counted & (y >= 0) & (y < k)
  bad = jnp.any(counted & ~valid) | jnp.any(counted & (w != 1))
  yv = jnp.where(valid, y, k)
  first = jax.ops.segment_min(jnp.arange(n, dtype=jnp.int32), yv, num_segments=k)
  new = (s.counts == 0) & (first < n)
  shift = jnp.where(new[:, None], h[jnp.minimum(first, n - 1)].astype(dt), s.shift)
  hc = jnp.where(valid[:, None], h.astype(dt) - shift[jnp.minimum(yv, k - 1)], 0.0)
  return shift, hc, yv, bad


def _host_shift_residuals(s: CollapseStats, features, labels, keep):
  """_shift_residuals in float64 on the host, for 64-bit NumPy features without x64.

  The residuals are rounded to float32 only after the subtraction, so a large offset costs
  no precision; the inputs were validated, so ``bad`` is False.
  """
  k = s.num_classes
  a = np.asarray(features).astype(np.float64)
  y = np.asarray(labels).astype(np.int64)
  shift = np.array(s.shift)
  rows = np.flatnonzero(keep)
  cls, first = np.unique(y[rows], return_index=True)
  new = np.asarray(s.counts)[cls] == 0
  with np.errstate(over="ignore", invalid="ignore"):
    shift[cls[new]] = a[rows[first[new]]]
    hc = np.zeros(a.shape, shift.dtype)
    hc[rows] = a[rows] - shift[y[rows]].astype(np.float64)
  yv = np.where(keep, y, k).astype(np.int32)
  return jnp.asarray(shift), jnp.asarray(hc), jnp.asarray(yv), jnp.asarray(False)


def _accumulate(s: CollapseStats, shift, hc, yv, bad):
  """Adds shifted rows; returns (statistics, tiny).

  ``tiny`` flags a counted row whose residual is nonzero but below sqrt(smallest normal)
  (1e-19 in float32) in every component: its square would underflow to 0 and the
  statistics would silently lose that row's spread.  Bad rows (``bad``) or tiny ones make
  the statistics NaN, never a number about a subset.
  """
  k = s.num_classes
  n = hc.shape[0]
  onehot = jax.nn.one_hot(yv, k, dtype=hc.dtype)                   # label K: zero row
  nb = _add_rows(jnp.zeros((k,), jnp.int32), yv, jnp.ones((n,), jnp.int32))
  rowmax = jnp.max(jnp.abs(hc), axis=1)
  tiny = jnp.any((rowmax > 0) & (rowmax < np.sqrt(jnp.finfo(hc.dtype).tiny)))
  sums = lax.dot_general(onehot, hc, (((0,), (0,)), ((), ())), precision=_HI)
  sq = jnp.dot(jnp.sum(hc * hc, axis=1), onehot, precision=_HI)
  scatter = jnp.dot(hc.T, hc, precision=_HI)
  cs = s.class_scatter
  if cs is not None:
    cs = cs + jnp.einsum("nk,nd,ne->kde", onehot, hc, hc, precision=_HI)
  poison = jnp.where(bad | tiny, jnp.nan, 0.0).astype(hc.dtype)
  new = CollapseStats(s.counts + nb, shift, s.sums + sums + poison, s.sqnorms + sq + poison,
                      s.scatter + scatter + poison, None if cs is None else cs + poison)
  return new, tiny


_stats_accumulate = jax.jit(_accumulate)


@jax.jit
def _stats_update(s: CollapseStats, h, y, w):
  return _accumulate(s, *_shift_residuals(s, h, y, w))


def _stats_frame(s: CollapseStats):
  """(n, m, centred/scale, 1/scale): means about the shifts and the rescaled centred means."""
  n = s.counts.astype(s.shift.dtype)
  m = s.sums / jnp.maximum(n, 1)[:, None]                         # mu_k - c_k
  centred = _centred_means(s.shift, m)
  inv = _inv_pow2_scale(centred)
  return n, m, centred * inv, inv


@jax.jit
def _stats_nc1(s: CollapseStats):
  n, m, centred, inv = _stats_frame(s)
  v, inv_s2 = _lowrank(centred, s.shift.dtype)
  v = v * inv
  # N Sigma_W = scatter - sum_k n_k m_k m_k^T  (small terms: m_k is the mean about c_k)
  mv = jnp.dot(m, v, precision=_HI)
  proj = (jnp.sum(v * jnp.dot(s.scatter, v, precision=_HI), axis=0)
          - jnp.sum(n[:, None] * mv * mv, axis=0)) / jnp.sum(n)
  proj = jnp.maximum(proj, 0.0)
  val = jnp.maximum(jnp.sum(proj * inv_s2), 0.0)
  within_all = jnp.sum(n * _stats_var(s, n, m)) * (inv * inv) / jnp.sum(n)
  val, _, dead = _zero_spread(val, _stats_ok(s), jnp.sum(centred * centred) / s.num_classes,
                              jnp.sum(jnp.where(inv_s2 > 0, proj, 0.0)), within_all, s.dim)
  return val, dead


def _stats_var(s: CollapseStats, n, m):
  """Var_k (K,) = mean ||h - mu_k||^2, in the features' units squared."""
  return jnp.maximum(s.sqnorms / jnp.maximum(n, 1) - jnp.sum(m * m, axis=1), 0.0)


@jax.jit
def _stats_cdnv(s: CollapseStats):
  n, m, centred, inv = _stats_frame(s)
  val, dead = _cdnv_from(_stats_var(s, n, m) * (inv * inv), centred)
  ok = _stats_ok(s)
  return jnp.where(ok, val, jnp.nan), ok & dead


@jax.jit
def _stats_numrank(s: CollapseStats):
  n = s.counts.astype(s.shift.dtype)
  c = s.shift
  fro2 = s.sqnorms + 2.0 * jnp.sum(c * s.sums, axis=1) + n * jnp.sum(c * c, axis=1)
  cross = jnp.einsum("kd,ke->kde", s.sums, c, precision=_HI)
  second = (s.class_scatter + cross + jnp.swapaxes(cross, 1, 2)
            + jnp.einsum("k,kd,ke->kde", n, c, c, precision=_HI))
  spec2 = jnp.linalg.eigvalsh(second)[:, -1]
  return jnp.where(_stats_ok(s), _mean_rank(fro2, spec2), jnp.nan)


# ----------------------------------------------------------------------------- layer-wise
_LAYER_METRICS = {
    "nc1": lambda h, y, k: nc1(h, y, k),
    "nc1_pinv": lambda h, y, k: nc1_pinv(h, y, k),
    "cdnv": lambda h, y, k: cdnv(h, y, k),
    "numerical_rank": lambda h, y, k: numerical_rank(h, y, k),
    "nc2_etf": lambda h, y, k: nc2_etf(h, y, k),
}


def _pool(x, name, token_index):
  """(N, C) features of one layer; pooling keeps the precision the metrics will use."""
  fn = f"layerwise[{name!r}]"
  x = _check_features(x, fn, ndims=(2, 3, 4))
  if x.ndim == 3 and token_index is not None:                     # (N, T, C): one token
    t = x.shape[1]
    if not -t <= token_index < t:
      raise ValueError(f"{fn}: token_index {token_index} out of range for {t} tokens")
    return x[:, token_index]
  if x.ndim == 2:
    return x
  axes = (1, 2) if x.ndim == 4 else (1,)                           # (N, H, W, C) / (N, T, C)
  if not _on_device(x) and _wide(np.dtype(x.dtype)) and not jax.config.jax_enable_x64:
    return np.mean(np.asarray(x), axis=axes, dtype=np.float64)  # the metric converts it
  x = jnp.asarray(x)
  return jnp.mean(x.astype(_compute_dtype(x.dtype)), axis=axes)


def layerwise(features_by_layer: Mapping[str, Any], labels, num_classes: int | None = None,
              token_index: int | None = None,
              metrics: Sequence[str] = ("nc1", "cdnv", "numerical_rank")) -> dict:
  """Metrics for every layer: ``{layer: {metric: float}}`` in the input dict's order.

  4-D (N, H, W, C) features are average-pooled over H, W; 3-D (N, T, C) are mean-pooled over
  tokens, or the token ``token_index`` is taken (e.g. 0 for a ViT class token); 2-D are used
  as is.  ``metrics`` are names from: nc1, nc1_pinv, cdnv, numerical_rank, nc2_etf.
  """
  if isinstance(metrics, str):
    metrics = (metrics,)
  unknown = [m for m in metrics if m not in _LAYER_METRICS]
  if unknown:
    raise ValueError(f"layerwise: unknown metric(s) {unknown}; choose from "
                     f"{sorted(_LAYER_METRICS)}")
  if not isinstance(features_by_layer, Mapping) or not features_by_layer:
    raise ValueError("layerwise: features_by_layer must be a non-empty dict name -> array")
  if token_index is not None:
    token_index = _as_int(token_index, "token_index", "layerwise")
  out = {}
  for name, x in features_by_layer.items():
    h = _pool(x, name, token_index)
    try:
      out[name] = {m: float(_LAYER_METRICS[m](h, labels, num_classes)) for m in metrics}
    except ValueError as e:                # e.g. a dead layer: say which layer it is
      raise type(e)(f"layerwise[{name!r}]: {e}") from e
  return out
