"""Few-shot evaluation on frozen embeddings (paper Table 2; RFS, Tian et al., ECCV 2020).

RFS protocol: pre-train a feature extractor with cross-entropy on the merged meta-train
classes, freeze it, embed every meta-test image once, then for each N-way K-shot episode fit a
multinomial logistic regression on the L2-normalised support embeddings and score it on the
L2-normalised query embeddings. Report the mean query accuracy over >= 600 episodes with a 95%
confidence interval (:func:`ci95`), and the NC1 of the meta-test embeddings.

* :func:`sample_episodes` draws episodes as index arrays into the split (numpy, seeded).
* :func:`logistic_regression` fits the classifier of many episodes: ``solver='sklearn'`` is
  RFS's own call (scikit-learn ``LogisticRegression(C=1.0, solver='lbfgs', max_iter=1000)``,
  multinomial), ``solver='jax'`` a batched damped Newton method on the same objective
  (below), all episodes of a chunk in one jitted program.
* :func:`evaluate` runs the protocol on an (N, d) embedding array computed by the caller.
* Class splits: :data:`CIFAR_FS_CLASSES` (Bertinetto et al., ICLR 2019) with
  :func:`cifar_fs_class_ids`; :func:`load_mini_imagenet` reads the Ravi & Larochelle split
  CSVs of miniImageNet.

The objective (scikit-learn's, for ``C`` > 0; intercept not penalised)::

    min_{W (d, K), b (K,)}  sum_i CE(softmax(W^T x_i + b), y_i) + ||W||_F^2 / (2 C)

scikit-learn divides the whole objective by the number of samples, which moves no minimiser.
By the representer theorem the minimiser has ``W = X^T A`` with ``A`` (n, K) (X: the n
support embeddings), so the JAX solver works on ``A`` and the support Gram matrix
``G = X X^T`` (n x n): an episode has ``n K + K`` unknowns (130 for 5-way 5-shot) instead of
``d K + K`` (3205 at d = 640), and its exact Newton system is small enough to solve directly
(:func:`_newton_direction`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import metrics, telemetry

__all__ = ["Episodes", "sample_episodes", "l2_normalize", "logistic_regression", "predict",
           "evaluate", "ci95", "embedding_nc1"]


# ----------------------------------------------------------------------------- episodes

class Episodes(NamedTuple):
  """E episodes of a `ways`-way `shots`-shot task with `queries` queries per class.

  support (E, ways*shots), query (E, ways*queries): int64 indices into the labels (and
  embeddings) the episodes were drawn from, class-major (the first `shots` support entries
  are class 0's). support_labels (E, ways*shots), query_labels (E, ways*queries): the episode
  labels in 0..ways-1 (episode class j is `classes[:, j]`). classes (E, ways): the original
  labels of each episode's classes.
  """
  support: np.ndarray
  query: np.ndarray
  support_labels: np.ndarray
  query_labels: np.ndarray
  classes: np.ndarray


def sample_episodes(labels, *, ways: int, shots: int, queries: int, episodes: int,
                    seed: int) -> Episodes:
  """Draws `episodes` few-shot episodes from the images with these `labels`.

  labels: (N,) integer class of each image (any ids; the classes are those present).
  Each episode draws `ways` distinct classes uniformly without replacement, then for each
  class `shots + queries` distinct images without replacement: the first `shots` are its
  support, the rest its queries, so support and query never share an image. Reproducible
  from `seed` (a numpy `Generator`); episodes are independent of each other (an image may
  appear in several). Raises ValueError when fewer than `ways` classes are present or when
  any class has fewer than `shots + queries` images (naming it).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  for name, v, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0),
                       ("episodes", episodes, 0)):
    if int(v) != v or v < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < ways:
    raise ValueError(f"{ways}-way episodes need {ways} classes; labels have {len(classes)}")
  per_class = shots + queries
  short = classes[counts < per_class]
  if len(short):
    c = short[0]
    raise ValueError(f"class {c.item()!r} has {counts[classes == c][0]} images, fewer than "
                     f"shots + queries = {shots} + {queries}"
                     + (f" ({len(short)} classes are short)" if len(short) > 1 else ""))
  # Stable sort: members of each class in their original order, so draws do not depend on
  # the sort algorithm.
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rng = np.random.default_rng(seed)
  picked_classes = np.empty((episodes, ways), np.int64)
  chosen = np.empty((episodes, ways, per_class), np.int64)
  for e in range(episodes):
    cls = rng.choice(len(classes), size=ways, replace=False)
    picked_classes[e] = cls
    for j, c in enumerate(cls):
      chosen[e, j] = order[starts[c] + rng.choice(counts[c], size=per_class, replace=False)]
  support = chosen[:, :, :shots].reshape(episodes, ways * shots)
  query = chosen[:, :, shots:].reshape(episodes, ways * queries)
  support_labels = np.broadcast_to(np.repeat(np.arange(ways), shots), support.shape).copy()
  query_labels = np.broadcast_to(np.repeat(np.arange(ways), queries), query.shape).copy()
  return Episodes(support, query, support_labels, query_labels, classes[picked_classes])


# ----------------------------------------------------------------------------- classifier

def l2_normalize(x, eps: float = 1e-12):
  """Rows of x (..., d) divided by their Euclidean norm (RFS's `normalize`); an all-zero row
  stays zero (its norm is clamped at `eps`) instead of becoming NaN."""
  xp = jnp if isinstance(x, jax.Array) else np
  norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
  return x / xp.maximum(norm, eps)


def _objective(gram, onehot, a, b, inv_c):
  """Objective at W = X^T a: sum CE + tr(a^T G a) / (2C). gram (n, n), onehot (n, K),
  a (n, K), b (K,) -> scalar."""
  ga = gram @ a
  z = ga + b
  ce = jax.nn.logsumexp(z, axis=-1) - jnp.sum(onehot * z, axis=-1)
  return jnp.sum(ce) + 0.5 * inv_c * jnp.sum(a * ga)


def _newton_direction(gram, onehot, a, b, inv_c):
  """Exact Newton direction of the objective restricted to W = X^T A, and the squared norm
  of the gradient in (W, b).

  With Z = G A + 1 b^T, P = softmax(Z), R = P - Y and S_i = diag(p_i) - p_i p_i^T, the primal
  Newton system for (dW, db) is satisfied by dW = X^T dA whenever
      S(G dA + 1 db^T) + dA / C = -(R + A / C)                       (n K equations)
      sum_i S_i (G dA + 1 db^T)_i + 1 1^T db = -sum_i R_i             (K equations)
  (the primal W equations are X^T times the first block, the b equations the second; no
  G^-1 is needed, so a singular G -- repeated images, n > d -- is fine). The 1 1^T db term
  removes the intercept's shift invariance: since 1^T S_i = 0 and 1^T sum_i R_i = 0 it forces
  1^T db = 0 and makes the (nK + K) system nonsingular (for C > 0 and p_i > 0).
  Returns (da (n, K), db (K,), ||grad_W||^2 + ||grad_b||^2) where grad_W = X^T (R + A/C), so
  ||grad_W||^2 = <R + A/C, G (R + A/C)>.
  """
  n, k = onehot.shape
  z = gram @ a + b
  p = jax.nn.softmax(z, axis=-1)
  r_a = p - onehot + inv_c * a                                          # (n, K)
  r_b = jnp.sum(p - onehot, axis=0)                                     # (K,)
  s = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]             # (n, K, K)
  # Block rows/columns ordered (i, k) row-major, then the K intercept entries.
  m_aa = jnp.einsum("ikl,ij->ikjl", s, gram).reshape(n * k, n * k)
  m_aa = m_aa + inv_c * jnp.eye(n * k, dtype=gram.dtype)
  m_ab = s.reshape(n * k, k)
  m_ba = jnp.einsum("ikl,ij->kjl", s, gram).reshape(k, n * k)
  m_bb = jnp.sum(s, axis=0) + 1.0
  m = jnp.block([[m_aa, m_ab], [m_ba, m_bb]])
  rhs = -jnp.concatenate([r_a.reshape(-1), r_b])
  step = jnp.linalg.solve(m, rhs)
  grad2 = jnp.sum(r_a * (gram @ r_a)) + jnp.sum(r_b * r_b)
  return step[:n * k].reshape(n, k), step[n * k:], grad2


# Step sizes tried along each Newton direction, largest first.
_STEPS = tuple(2.0 ** -i for i in range(12))


def _newton_update(gram, onehot, a, b, inv_c):
  """One damped Newton step for one episode -> (a, b, squared gradient norm before it).

  Backtracking (Armijo, sigma = 1e-4) over `_STEPS`, all evaluated at once, with a float32
  allowance: near the optimum the decrease of a Newton step (~ half the Newton decrement,
  <= 1e-6 here) is below the rounding error of the summed objective (~1e-5 at f ~ 30), and a
  strict test would reject every step and stall at a gradient norm ~1e-3. Accepting rises
  below that rounding level keeps the full step there (where it converges quadratically);
  far from the optimum real changes of f dwarf it. No acceptable step -> the best one.
  """
  da, db, grad2 = _newton_direction(gram, onehot, a, b, inv_c)
  steps = jnp.asarray(_STEPS, gram.dtype)
  f0 = _objective(gram, onehot, a, b, inv_c)
  f = jax.vmap(lambda t: _objective(gram, onehot, a + t * da, b + t * db, inv_c))(steps)
  # Directional derivative <grad, d> = <R + A/C, G dA> + <sum_i R_i, db> (<= 0).
  p = jax.nn.softmax(gram @ a + b, axis=-1)
  slope = (jnp.sum((p - onehot + inv_c * a) * (gram @ da))
           + jnp.sum(jnp.sum(p - onehot, axis=0) * db))
  noise = 32 * jnp.finfo(gram.dtype).eps * (jnp.abs(f0) + 1.0)
  ok = f <= f0 + 1e-4 * steps * jnp.minimum(slope, 0.0) + noise
  best = jnp.where(jnp.min(f) < f0, steps[jnp.argmin(f)], 0.0)
  t = jnp.where(jnp.any(ok), steps[jnp.argmax(ok)], best)  # argmax: the first (largest) ok
  return a + t * da, b + t * db, grad2


@functools.partial(jax.jit, static_argnames=("ways", "max_iter"))
def _fit_jax(support, support_labels, inv_c, tol, *, ways: int, max_iter: int):
  """support (E, n, d) float32, support_labels (E, n) -> (W (E, d, ways), b (E, ways),
  iterations, max over episodes of the final gradient norm)."""
  gram = jnp.einsum("eid,ejd->eij", support, support, precision=jax.lax.Precision.HIGHEST)
  onehot = jax.nn.one_hot(support_labels, ways, dtype=support.dtype)
  e, n = support_labels.shape
  update = jax.vmap(_newton_update, in_axes=(0, 0, 0, 0, None))

  def cond(state):
    _, _, it, gmax = state
    return (it < max_iter) & (gmax > tol)

  def body(state):
    a, b, it, _ = state
    a, b, grad2 = update(gram, onehot, a, b, inv_c)
    # The norm is the one before this step: stopping on it costs at most one extra step.
    return a, b, it + 1, jnp.sqrt(jnp.max(grad2))

  a0 = jnp.zeros((e, n, ways), support.dtype)
  b0 = jnp.zeros((e, ways), support.dtype)
  a, b, it, _ = jax.lax.while_loop(cond, body, (a0, b0, 0, jnp.asarray(jnp.inf, support.dtype)))
  _, _, grad2 = jax.vmap(_newton_direction, in_axes=(0, 0, 0, 0, None))(gram, onehot, a, b,
                                                                        inv_c)
  w = jnp.einsum("eid,eik->edk", support, a, precision=jax.lax.Precision.HIGHEST)
  return w, b, it, jnp.sqrt(jnp.max(grad2))


def _sklearn_lr(c: float, max_iter: int):
  """RFS's classifier: LogisticRegression(random_state=0, solver='lbfgs', max_iter=1000,
  multi_class='multinomial') with the default L2 penalty and C=1.0. Recent scikit-learn (1.9
  here) has no `multi_class` (lbfgs is multinomial for >= 3 classes); it is passed where it
  exists."""
  from sklearn.linear_model import LogisticRegression
  kw = dict(C=c, solver="lbfgs", max_iter=max_iter, random_state=0)
  if "multi_class" in inspect.signature(LogisticRegression).parameters:
    kw["multi_class"] = "multinomial"
  return LogisticRegression(**kw)


def logistic_regression(support, support_labels, *, ways: int, C: float = 1.0,
                        solver: str = "jax", max_iter: int | None = None,
                        tol: float | None = None) -> tuple[Any, Any]:
  """Fits the L2-regularised multinomial logistic regression of each episode.

  support: (E, n, d) features (used as given: :func:`evaluate` L2-normalises them first, as
  RFS does); support_labels: (E, n) ints in 0..ways-1, every class present in every episode.
  Returns weights (E, d, ways) and intercepts (E, ways): float32 jax arrays (jax) or float64
  numpy arrays (sklearn); logits of x (d,) are x @ W + b.

  solver='sklearn': one scikit-learn `LogisticRegression(C, solver='lbfgs',
  max_iter=max_iter or 1000)` per episode on the host (RFS's settings; lbfgs stops at its
  default `tol` 1e-4 unless `tol` is given). solver='jax': damped Newton on all episodes at
  once (module docstring), float32, until the gradient norm in (W, b) of every episode is
  <= `tol` (default 1e-4, in units of the summed loss) or `max_iter` (default 50) steps;
  3-5 steps at C=1 on unit-norm features. Both minimise the same objective, multinomial for
  any `ways`, except that recent scikit-learn fits 2-class problems as one binomial model
  (returned as class 1's column, class 0's zero): the multinomial one equals a binomial
  model at 2C, so `ways=2` is where the two solvers differ.
  """
  if not C > 0:
    raise ValueError(f"C must be > 0, got {C}")
  if solver == "sklearn":
    support = np.asarray(support, np.float64)
    labels = np.asarray(support_labels)
    e, _, d = support.shape
    w = np.zeros((e, d, ways))
    b = np.zeros((e, ways))
    for i in range(e):
      clf = _sklearn_lr(C, max_iter or 1000)
      if tol is not None:
        clf.set_params(tol=tol)
      clf.fit(support[i], labels[i])
      if clf.coef_.shape[0] == 1:  # binomial fit (2 classes): logit of class 1 = x.w + b
        w[i, :, 1], b[i, 1] = clf.coef_[0], clf.intercept_[0]
      else:
        w[i][:, clf.classes_], b[i][clf.classes_] = clf.coef_.T, clf.intercept_
    return w, b
  if solver == "jax":
    w, b, _, _ = _fit_jax(jnp.asarray(support, jnp.float32), jnp.asarray(support_labels),
                          jnp.float32(1.0 / C), jnp.float32(1e-4 if tol is None else tol),
                          ways=ways, max_iter=max_iter or 50)
    return w, b
  raise ValueError(f"solver must be 'jax' or 'sklearn', got {solver!r}")


def predict(weights, bias, query):
  """Predicted class (argmax of the logits; the first on ties, like scikit-learn) of each
  query: weights (E, d, K), bias (E, K), query (E, m, d) -> (E, m) ints."""
  xp = jnp if isinstance(weights, jax.Array) else np
  return xp.argmax(xp.einsum("emd,edk->emk", query, weights) + bias[:, None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("ways", "max_iter"))
def _episode_accuracy(emb, support, query, support_labels, query_labels, inv_c, tol, *,
                      ways: int, max_iter: int):
  """emb (N, d) L2-normalised, on device; support/query (E, .) indices -> accuracy (E,)
  fraction, iterations, worst gradient norm."""
  w, b, it, gmax = _fit_jax(emb[support], support_labels, inv_c, tol, ways=ways,
                            max_iter=max_iter)
  logits = jnp.einsum("emd,edk->emk", emb[query], w,
                      precision=jax.lax.Precision.HIGHEST) + b[:, None, :]
  hit = jnp.argmax(logits, axis=-1) == query_labels
  return jnp.mean(hit.astype(jnp.float32), axis=-1), it, gmax


def ci95(accuracies, confidence: float = 0.95) -> float:
  """Half-width of the confidence interval of the mean, as RFS's `mean_confidence_interval`
  (WangYueFt/rfs eval/meta_eval.py): t_{(1+confidence)/2, E-1} * s / sqrt(E), with s the
  sample standard deviation (ddof=1; `scipy.stats.sem` is s / sqrt(E)) and t Student's t
  quantile -- 1.9639 at E = 600, so 0.2% wider than the textbook 1.96 * s / sqrt(E). Same
  units as `accuracies` (E,); NaN for E < 2.
  """
  from scipy import stats
  a = np.asarray(accuracies, np.float64).reshape(-1)
  if a.size < 2:
    return float("nan")
  return float(stats.t.ppf((1.0 + confidence) / 2.0, a.size - 1) * np.std(a, ddof=1)
               / np.sqrt(a.size))


def embedding_nc1(embeddings, labels) -> float:
  """NC1 (`ncjax.metrics.nc1`) of (N, d) embeddings with (N,) labels of any ids (relabelled
  to 0..K-1): Table 2's NC1 of the meta-test split's penultimate features, not normalised."""
  _, y = np.unique(np.asarray(labels), return_inverse=True)
  return float(metrics.nc1(embeddings, y.astype(np.int32), int(y.max()) + 1))


def evaluate(embeddings, labels, *, ways: int = 5, shots: int = 1, queries: int = 15,
             episodes: int = 600, seed: int = 0, solver: str = "jax", C: float = 1.0,
             chunk: int = 200, nc1: bool = False) -> dict[str, object]:
  """RFS few-shot evaluation of frozen embeddings.

  embeddings: (N, d), one row per image of the split, computed once by the caller (a jax
  array stays on its device for solver='jax'); labels: (N,) class ids. Draws
  `sample_episodes(labels, ways=, shots=, queries=, episodes=, seed=)`, L2-normalises the
  embeddings, fits :func:`logistic_regression` on each episode's support set and scores its
  queries. The JAX path runs `chunk` episodes per jitted call (the last chunk padded, so one
  compilation serves all); solver='sklearn' is RFS's loop.

  Returns dict(accuracy=mean query accuracy in percent, ci95=:func:`ci95` half-width in
  percent, episodes=E, accuracies=(E,) float64 per-episode accuracies in percent), plus
  nc1=:func:`embedding_nc1` of all the embeddings when `nc1`.
  """
  eps = sample_episodes(labels, ways=ways, shots=shots, queries=queries, episodes=episodes,
                        seed=seed)
  if solver == "sklearn":
    emb = l2_normalize(np.asarray(embeddings, np.float64))
    w, b = logistic_regression(emb[eps.support], eps.support_labels, ways=ways, C=C,
                               solver="sklearn")
    hit = predict(w, b, emb[eps.query]) == eps.query_labels
    acc = np.mean(hit, axis=-1)
  elif solver == "jax":
    emb = l2_normalize(jnp.asarray(embeddings, jnp.float32))
    chunk = max(1, min(chunk, episodes))
    acc = []
    worst = 0.0
    for start in range(0, episodes, chunk):
      idx = np.arange(start, start + chunk) % max(episodes, 1)  # pad by wrapping around
      a, _, gmax = _episode_accuracy(emb, eps.support[idx], eps.query[idx],
                                     eps.support_labels[idx], eps.query_labels[idx],
                                     jnp.float32(1.0 / C), jnp.float32(1e-4), ways=ways,
                                     max_iter=50)
      acc.append(np.asarray(a)[:min(chunk, episodes - start)])
      worst = max(worst, float(gmax))
    if worst > 1e-2:  # 50 Newton steps not enough: a degenerate problem (e.g. C huge)
      telemetry.warn(f"few-shot logistic regression did not converge: gradient norm {worst:.3g}"
                    f" after 50 Newton steps (C={C})")
    acc = np.concatenate(acc) if acc else np.zeros((0,))
  else:
    raise ValueError(f"solver must be 'jax' or 'sklearn', got {solver!r}")
  acc = 100.0 * np.asarray(acc, np.float64)
  out = dict(accuracy=float(np.mean(acc)) if acc.size else float("nan"), ci95=ci95(acc),
             episodes=int(acc.size), accuracies=acc)
  if nc1:
    out["nc1"] = telemetry.defined(lambda: embedding_nc1(embeddings, labels),
                                   "few-shot embeddings")
  return out
