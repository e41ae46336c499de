"""Pre-training losses of the paper's Table 1 / Fig. 3: cross-entropy, square loss, SupCon.

All functions are pure and jittable and return a scalar of the input's floating dtype
(integer inputs are promoted to the default float).  Notation: ``N`` examples, ``K``
classes, ``V`` views per example, ``D`` embedding dimension; labels are integers in
``[0, K)``.

* :func:`cross_entropy` -- mean softmax cross-entropy, optionally with label smoothing
  (PyTorch's convention: target ``(1 - eps) onehot + eps / K``).
* :func:`mse` -- the square loss of Hui & Belkin (2021, the paper's ref. [26]) on raw
  logits (no softmax), with their rescaling parameters ``M`` (``scale``) and ``k``
  (``positive_weight``).  Normalisation: **sum over classes, mean over examples** (see the
  function; Hui & Belkin's per-sample loss has a further ``1/K``).
* :func:`supcon` -- the supervised contrastive loss of Khosla et al. (2020), variant
  ``L_out`` (the mean over positives taken outside the log), for ``V >= 1`` views.

Input checking: ranks, matching ``N``, integer labels and floating embeddings/logits are
checked always, also at trace time inside ``jax.jit``; the label range ``[0, K)`` of
:func:`cross_entropy` / :func:`mse` is checked only for concrete (non-traced) labels.
Violations raise ``ValueError`` naming the function and the problem.  Inside a caller's
``jit`` out-of-range labels are the caller's responsibility (they would give a wrong
number, not an exception).

Only ``jax`` and ``numpy`` are imported.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cross_entropy", "mse", "supcon", "get", "LOSSES"]


# ----------------------------------------------------------------------------- validation
def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _float_array(x, fn: str, what: str):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating) or x.dtype == jnp.bool_:
    raise ValueError(f"{fn}: {what} must be real numbers, got dtype {x.dtype}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def _check_logits_labels(logits, labels, fn: str):
  logits = _float_array(logits, fn, "logits")
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"{fn}: logits must be 2-D (N, K), got shape {tuple(logits.shape)}")
  if labels.ndim != 1:
    raise ValueError(f"{fn}: labels must be 1-D (N,), got shape {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: labels must be integers, got dtype {labels.dtype}")
  n, k = logits.shape
  if labels.shape[0] != n:
    raise ValueError(f"{fn}: length mismatch: {n} rows of logits but "
                     f"{labels.shape[0]} labels")
  if n == 0:
    raise ValueError(f"{fn}: need at least one example, got N=0")
  if k == 0:
    raise ValueError(f"{fn}: need at least one class, got K=0")
  if not _is_traced(labels):
    lab = np.asarray(labels)
    if lab.min() < 0 or lab.max() >= k:
      raise ValueError(f"{fn}: labels must lie in [0, {k}) for K={k} logits, got "
                       f"range [{lab.min()}, {lab.max()}]")
  return logits, labels


def _check_concrete_scalar(value, fn: str, name: str, lo=None, hi=None, lo_open=False):
  """Range check of a hyper-parameter; skipped when it is traced."""
  if _is_traced(value):
    return
  v = np.asarray(value)
  if v.ndim != 0:
    raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}")
  v = float(v)
  if not np.isfinite(v):
    raise ValueError(f"{fn}: {name} must be finite, got {v}")
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ValueError(f"{fn}: {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
  if hi is not None and v > hi:
    raise ValueError(f"{fn}: {name} must be <= {hi}, got {v}")


# ----------------------------------------------------------------------------- losses
def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy.

  Args:
    logits: ``(N, K)`` unnormalised class scores.
    labels: ``(N,)`` integer class indices in ``[0, K)``.
    label_smoothing: ``eps`` in ``[0, 1]``; the target distribution is
      ``(1 - eps) * onehot(y) + eps / K`` (PyTorch ``F.cross_entropy`` and
      ``optax.smooth_labels`` convention).

  Returns:
    Scalar ``(1/N) sum_i -sum_k t_ik log softmax(logits_i)_k`` in nats.
  """
  fn = "cross_entropy"
  logits, labels = _check_logits_labels(logits, labels, fn)
  _check_concrete_scalar(label_smoothing, fn, "label_smoothing", lo=0.0, hi=1.0)
  k = logits.shape[1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  eps = jnp.asarray(label_smoothing, logp.dtype)
  per_example = (1.0 - eps) * nll - (eps / k) * jnp.sum(logp, axis=-1)
  return jnp.mean(per_example)


def mse(logits, labels, scale: float = 1.0, positive_weight: float = 1.0):
  """Square loss on raw logits (no softmax), Hui & Belkin (2021) with rescaling.

  For an example with label ``c`` and outputs ``f`` (``K`` classes)::

      l(f, c) = k * (f_c - M)^2 + sum_{j != c} f_j^2,      M = scale, k = positive_weight

  i.e. the squared error to the target ``M * onehot(c)`` with the true-class term weighted
  by ``k``.  The loss returned is ``(1/N) sum_i l(f_i, c_i)``: **summed over the K
  classes, averaged over the N examples**.  Hui & Belkin write the per-sample loss with an
  extra ``1/K`` (mean over classes); their value is this one divided by ``K`` (the two
  differ only by a constant factor, i.e. in the effective learning rate).  With
  ``scale = positive_weight = 1`` this is ``K`` times the plain element-wise mean
  ``mean((f - onehot)^2)`` over all ``N*K`` entries.

  Args:
    logits: ``(N, K)`` network outputs.
    labels: ``(N,)`` integer class indices in ``[0, K)``.
    scale: ``M`` > 0, the value of the target at the true class (their ``M``).
    positive_weight: ``k`` > 0, weight of the true-class term (their ``k``).

  Returns:
    Scalar, in squared logit units.
  """
  fn = "mse"
  logits, labels = _check_logits_labels(logits, labels, fn)
  _check_concrete_scalar(scale, fn, "scale", lo=0.0, lo_open=True)
  _check_concrete_scalar(positive_weight, fn, "positive_weight", lo=0.0, lo_open=True)
  onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
  target = jnp.asarray(scale, logits.dtype) * onehot
  weight = 1.0 + (jnp.asarray(positive_weight, logits.dtype) - 1.0) * onehot
  return jnp.mean(jnp.sum(weight * (logits - target) ** 2, axis=-1))


def supcon(embeddings, labels, temperature: float = 0.1, base_temperature=None):
  """Supervised contrastive loss ``L_out`` of Khosla et al. (2020, eq. 2).

  The ``N * V`` views are L2-normalised (``z = x / max(||x||, 1e-12)``) and every one of
  them is an anchor ``i``.  With ``A(i)`` all other views and ``P(i)`` the views in
  ``A(i)`` with the same label (the other views of the same example included)::

      L_i = -(tau / tau_base) / |P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau)
                                                / sum_{a in A(i)} exp(z_i.z_a / tau) )

  The loss is the mean of ``L_i`` over the anchors with ``|P(i)| > 0``; anchors without
  a positive (a class seen once, with ``V = 1``) are left out, and if no anchor has a
  positive the loss is ``0``.  Numerics: the row maximum is subtracted before
  exponentiating and the self-similarity is masked with a large finite negative number,
  so the value and its gradient stay finite also for collapsed features and small ``tau``.

  Args:
    embeddings: ``(N, V, D)`` features, ``V >= 1`` views per example (any scale: they
      are normalised here).
    labels: ``(N,)`` integer labels (any integer values; only equality matters).
    temperature: ``tau`` > 0.
    base_temperature: ``tau_base`` > 0; ``None`` means ``tau`` (factor 1).

  Returns:
    Scalar loss in nats (scaled by ``tau / tau_base``).
  """
  fn = "supcon"
  x = _float_array(embeddings, fn, "embeddings")
  labels = jnp.asarray(labels)
  if x.ndim != 3:
    raise ValueError(f"{fn}: embeddings must be 3-D (N, V, D), got shape "
                     f"{tuple(x.shape)}; add a view axis with x[:, None] for V=1")
  if labels.ndim != 1:
    raise ValueError(f"{fn}: labels must be 1-D (N,), got shape {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: labels must be integers, got dtype {labels.dtype}")
  n, v, d = x.shape
  if labels.shape[0] != n:
    raise ValueError(f"{fn}: length mismatch: {n} examples of embeddings but "
                     f"{labels.shape[0]} labels")
  if n == 0 or v == 0 or d == 0:
    raise ValueError(f"{fn}: need N, V, D >= 1, got shape {tuple(x.shape)}")
  _check_concrete_scalar(temperature, fn, "temperature", lo=0.0, lo_open=True)
  if base_temperature is None:
    base_temperature = temperature
  _check_concrete_scalar(base_temperature, fn, "base_temperature", lo=0.0, lo_open=True)

  dtype = x.dtype
  z = x.reshape(n * v, d)
  sq = jnp.sum(z * z, axis=-1, keepdims=True)
  z = z / jnp.sqrt(jnp.maximum(sq, jnp.asarray(1e-24, dtype)))   # F.normalize, eps 1e-12
  lab = jnp.repeat(labels, v)                                    # example-major order
  m = n * v
  self_mask = jnp.eye(m, dtype=bool)
  pos = (lab[:, None] == lab[None, :]) & ~self_mask

  tau = jnp.asarray(temperature, dtype)
  sim = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / tau
  # Large finite negative for the self term (never -inf: -inf * 0 would be NaN).
  big_neg = jnp.asarray(jnp.finfo(dtype).min / 4, dtype)
  logits = jnp.where(self_mask, big_neg, sim)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  # exp of the masked entry underflows to exactly 0, so it drops out of the sum.
  log_denom = jnp.log(jnp.sum(jnp.exp(logits), axis=1, keepdims=True))
  log_prob = logits - log_denom

  n_pos = jnp.sum(pos, axis=1)
  sum_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1)
  has_pos = n_pos > 0
  mean_log_prob_pos = sum_pos / jnp.maximum(n_pos, 1).astype(dtype)
  factor = tau / jnp.asarray(base_temperature, dtype)
  per_anchor = -factor * mean_log_prob_pos
  n_anchor = jnp.sum(has_pos)
  total = jnp.sum(jnp.where(has_pos, per_anchor, 0.0))
  return jnp.where(n_anchor > 0, total / jnp.maximum(n_anchor, 1).astype(dtype),
                   jnp.zeros((), dtype))


# ----------------------------------------------------------------------------- registry
LOSSES: dict[str, Callable] = {"ce": cross_entropy, "mse": mse, "supcon": supcon}


def get(name: str) -> Callable:
  """The loss function registered as ``name``: ``'ce'``, ``'mse'`` or ``'supcon'``."""
  try:
    return LOSSES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown loss {name!r}; valid names: "
                     f"{', '.join(sorted(LOSSES))}") from None
