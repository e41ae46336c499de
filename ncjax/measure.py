"""Measurements of a trained model, each one streaming pass over a split: BatchNorm
recalibration (train-mode forwards that update only the running statistics), pooled features
of every unit (`extract`, for probes) and the neural-collapse statistics of every unit
(`collapse`, accumulated on the device with padded rows masked out). Every pass shows its
progress (`ncjax.telemetry`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import data, metrics, models, telemetry, train


def recalibrate_batch_stats(forward, params, batch_stats, prepare, images, batch_size, mesh,
                            seed, steps: int = 0, desc: str = "recalibrate"):
  """Forward passes over `images` in train mode that update the BatchNorm running statistics
  only (every method updates them on the downstream data; used before caching features).

  `steps` batches (at least one epoch): the running statistics are an exponential moving
  average (momentum 0.9), so ~50 batches forget the pre-training statistics (0.9^50 < 0.01),
  as they would be forgotten during a linear probe that runs BatchNorm in train mode."""
  if not batch_stats:
    return batch_stats
  update = _jit_recalibrate(forward, mesh)
  params, prepare = train.put_replicated(mesh, (params, prepare))
  batch_stats = train.put_replicated(mesh, batch_stats, copy=True)  # donated below
  rows = train.local_rows(batch_size)
  total = max(steps, len(images) // batch_size)
  batches = data.prefetch(train.batch_iterator(images, np.zeros(len(images), np.int32),
                                               batch_size, seed=seed, start_step=0,
                                               total_steps=total))
  for x, _ in telemetry.progress(batches, total=total, desc=f"{desc}: BatchNorm statistics"):
    batch_stats = update(params, batch_stats, prepare, train.to_global(mesh, x[rows]))
  return batch_stats


@functools.lru_cache(maxsize=None)
def _jit_recalibrate(forward, mesh):
  rep, dat = train.replicated(mesh), train.batch_sharded(mesh)

  def update(params, stats, prepare, x):
    return forward(params, stats, prepare(None, x, False), True)[1]
  return jax.jit(update, in_shardings=(rep, rep, rep, dat), out_shardings=rep,
                 donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def features_fn(model, names: tuple[str, ...] | None = None):
  """``fn(variables, prepare, x) -> {name: (N, C) float32}``: pooled features (eval mode) of
  the units and 'penultimate' (or only `names`); one per model, so `train.predict` compiles
  it once per model and input shape."""
  def fn(variables, prepare, x):
    f = models.features(model, variables, prepare(None, x, False))
    return {k: v.astype(jnp.float32) for k, v in f.items() if names is None or k in names}
  return fn


def extract(model, variables, prepare, images, batch_size, mesh, names=None,
            desc: str = "measure"):
  """Pooled features (eval mode) of `images`: dict name -> (N, C) numpy float32, for the
  units and 'penultimate' (or only `names`)."""
  out: dict[str, list] = {}
  fn = features_fn(model, None if names is None else tuple(names))
  for f, _ in train.predict(fn, images, batch_size, args=(variables, prepare), mesh=mesh,
                            desc=f"{desc}: features"):
    for k, v in f.items():
      out.setdefault(k, []).append(np.asarray(v, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


def collapse(model, variables, prepare, ds: data.ArrayDataset, batch_size, mesh,
             rank_limit: int = 1 << 26, desc: str = "measure") -> tuple[dict, dict]:
  """Streams the downstream training features through `metrics.CollapseStats`, one per unit
  and one for the penultimate feature. Returns ``(penultimate metrics, {unit: nc1})``.

  Features never leave the device: each padded batch goes through one jitted function
  (features + a masked statistics update), compiled once per model and batch shape. Memory is
  independent of N: d x d per layer (and K x d x d for the penultimate numerical rank,
  computed only when K*d*d <= `rank_limit`)."""
  k = ds.num_classes
  shapes = jax.eval_shape(features_fn(model), variables, prepare,
                          jax.ShapeDtypeStruct((1,) + ds.images.shape[1:], jnp.uint8))
  stats = {n: metrics.CollapseStats.create(
               k, v.shape[1], per_class_second_moment=n == "penultimate"
               and k * v.shape[1] ** 2 <= rank_limit) for n, v in shapes.items()}
  update = _jit_collapse_update(model, mesh)
  variables, prepare, stats = train.put_replicated(mesh, (variables, prepare, stats))
  rows = train.local_rows(batch_size)
  batches = data.prefetch((ds.images[idx][rows], ds.labels[idx][rows],
                           (np.arange(batch_size) < valid)[rows])
                          for idx, valid in train.padded_batches(len(ds), batch_size))
  for x, y, mask in telemetry.progress(batches, total=-(-len(ds) // batch_size),
                                       desc=f"{desc}: collapse"):
    stats = update(stats, variables, prepare, *(train.to_global(mesh, a) for a in (x, y, mask)))
  pen = stats.pop("penultimate")
  where = f"{desc}: penultimate features"
  result = {"nc1": telemetry.defined(pen.nc1, where),
            "cdnv": telemetry.defined(pen.cdnv, where)}
  result["numerical_rank"] = (float(pen.numerical_rank()) if pen.class_scatter is not None
                              else float("nan"))
  # jit returns dicts with sorted keys ('layer10' < 'layer2'): restore the model's unit order.
  layerwise = {n: telemetry.defined(stats[n].nc1, f"{desc}: {n} features")
               for n in models.units(model) if n in stats}
  return result, layerwise


@functools.lru_cache(maxsize=None)
def _jit_collapse_update(model, mesh):
  """``update(stats, variables, prepare, x, y, mask) -> stats``: the features of a padded
  batch, added to every layer's statistics with the padding rows masked out."""
  rep, dat = train.replicated(mesh), train.batch_sharded(mesh)
  features = features_fn(model)

  def update(stats, variables, prepare, x, y, mask):
    f = features(variables, prepare, x)
    return {n: stats[n].update(f[n], y, mask) for n in stats}
  return jax.jit(update, in_shardings=(rep, rep, rep, dat, dat, dat), out_shardings=rep,
                 donate_argnums=(0,))


def tensor_rgn(params, grads, units) -> dict[str, float]:
  """Surgical fine-tuning's relative gradient norm (Lee et al., ICLR 2023) per unit: the mean
  over the unit's parameter tensors of ``|g| / |theta|`` (Frobenius norms, float64 on the
  host). Tensors with ``|theta| = 0`` (e.g. zero-initialised biases) have no relative norm
  and are left out; a unit with none of another kind is NaN."""
  out = {}
  for u in units:
    ratios = []
    for p, g in zip(jax.tree.leaves(params[u]), jax.tree.leaves(grads[u])):
      norm = float(np.linalg.norm(np.asarray(p, np.float64).ravel()))
      if norm > 0:
        ratios.append(float(np.linalg.norm(np.asarray(g, np.float64).ravel())) / norm)
    out[u] = float(np.mean(ratios)) if ratios else float("nan")
  return out


@functools.lru_cache(maxsize=None)
def _jit_grad(forward):
  def grads(params, batch_stats, prepare, x, y, rng):
    def loss(p):
      return train.cross_entropy(forward(p, batch_stats, prepare(rng, x, True), True)[0], y)
    return jax.grad(loss)(params)
  return jax.jit(grads)


def relative_gradient_norms(forward, params, batch_stats, prepare, images, labels,
                            batch_size: int, seed: int, units, batches: int = 5,
                            desc: str = "rgn") -> tuple[dict[str, float], float]:
  """Auto-RGN's score of every unit: `tensor_rgn` of the cross-entropy gradient (every
  parameter, train mode, from the starting `params`) on each of the run's first `batches`
  batches (`train.batch_iterator` with its seed; augmentation keyed as the train step keys
  step i), averaged over the batches. Returns ``({unit: score}, flops)``: XLA's flop
  estimate of the `batches` gradient evaluations. Nothing is updated."""
  fn = _jit_grad(forward)
  key = jax.random.PRNGKey(seed)
  sums, flops = {u: 0.0 for u in units}, 0.0
  it = train.batch_iterator(images, labels, batch_size, seed=seed, start_step=0,
                            total_steps=batches)
  for i, (x, y) in enumerate(telemetry.progress(it, total=batches, desc=f"{desc}: RGN")):
    rng = jax.random.fold_in(key, i)  # the train step's key of step i
    if i == 0:
      flops = batches * float(fn.lower(params, batch_stats, prepare, x, y, rng)
                              .cost_analysis()["flops"])
    g = fn(params, batch_stats, prepare, x, y, rng)
    for u, v in tensor_rgn(params, g, units).items():
      sums[u] += v / batches
  return sums, flops
