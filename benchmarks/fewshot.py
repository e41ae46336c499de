"""Benchmark few-shot evaluation (RFS protocol): batched JAX Newton solver vs scikit-learn.

    python benchmarks/fewshot.py                     # 600 episodes, 5-way 1- and 5-shot
    python benchmarks/fewshot.py --episodes 200 --rounds 1
    python benchmarks/fewshot.py --cache /tmp/fs_emb.npz   # reuse the embeddings file

Embeddings: 20 classes x 600 images, 640-d (ResNet-12's width), float32, drawn once with a
fixed seed and cached to `--cache`: class means N(0, I) * `--separation` plus N(0, I) noise,
so few-shot accuracy is between chance and 100%. `ncjax.fewshot.evaluate` then runs 600
five-way episodes with 15 queries per class (one `sample_episodes` draw, the same for both
solvers):

  jax      solver='jax': episodes gathered from the device-resident embeddings, all fitted in
           jitted chunks of `--chunk` episodes (first call = compile + run, then the median of
           `--rounds` warm calls)
  sklearn  solver='sklearn': RFS's loop, one LogisticRegression(lbfgs, C=1, max_iter=1000)
           per episode on the host (median of `--rounds` calls)

Prints seconds, episodes/s, the sklearn/jax time ratio, both accuracies with their 95% CI,
and the fraction of query predictions on which the two solvers agree. `--tight` also fits
scikit-learn to tol=1e-10 and prints how far each solver's weights and predictions are from
that converged reference.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ncjax import fewshot  # noqa: E402


def embeddings(path, classes=20, per_class=600, dim=640, separation=0.25, seed=0):
  """(classes * per_class, dim) float32 embeddings and int labels, cached at `path`."""
  if path and os.path.exists(path):
    z = np.load(path)
    return z['x'], z['y']
  rng = np.random.default_rng(seed)
  means = separation * rng.normal(size=(classes, 1, dim))
  x = (means + rng.normal(size=(classes, per_class, dim))).reshape(-1, dim).astype(np.float32)
  y = np.repeat(np.arange(classes), per_class)
  if path:
    np.savez(path, x=x, y=y)
  return x, y


def timed(fn, rounds):
  times, out = [], None
  for _ in range(rounds):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def fits(x, y, shots, episodes, seed, tight=False):
  """{solver: (predictions (E, 75), weights (E, d, 5))} of the same episodes; `tight` adds
  scikit-learn at tol=1e-10 as 'sklearn_tight'."""
  ep = fewshot.sample_episodes(y, ways=5, shots=shots, queries=15, episodes=episodes,
                               seed=seed)
  xn = fewshot.l2_normalize(x.astype(np.float64))
  runs = [('jax', {}), ('sklearn', {})] + ([('sklearn_tight', dict(tol=1e-10))] if tight else [])
  out = {}
  for name, kw in runs:
    w, b = fewshot.logistic_regression(xn[ep.support], ep.support_labels, ways=5,
                                       solver=name.split('_')[0], **kw)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    out[name] = (fewshot.predict(w, b, xn[ep.query]), w)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--episodes', type=int, default=600)
  ap.add_argument('--shots', type=int, nargs='+', default=[1, 5])
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--chunk', type=int, default=200)
  ap.add_argument('--separation', type=float, default=0.25)
  ap.add_argument('--cache', default='/tmp/ncjax_fewshot_emb.npz')
  ap.add_argument('--no-sklearn', action='store_true')
  ap.add_argument('--tight', action='store_true',
                  help='compare both solvers with scikit-learn at tol=1e-10')
  args = ap.parse_args()
  x, y = embeddings(args.cache, separation=args.separation)
  xd = jax.device_put(x)
  print(f'embeddings {x.shape} {x.dtype}, {len(np.unique(y))} classes; jax {jax.__version__} '
        f'on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {args.episodes} episodes, '
        f'5-way, 15 queries')
  print('| shots | solver | first call s | s (median) | episodes/s | accuracy % | ci95 |')
  print('|---:|---|---:|---:|---:|---:|---:|')
  for shots in args.shots:
    kw = dict(ways=5, shots=shots, queries=15, episodes=args.episodes, seed=0)
    t = time.perf_counter()
    fewshot.evaluate(xd, y, solver='jax', chunk=args.chunk, **kw)
    first = time.perf_counter() - t
    tj, rj = timed(lambda: fewshot.evaluate(xd, y, solver='jax', chunk=args.chunk, **kw),
                   args.rounds)
    print(f'| {shots} | jax | {first:.2f} | {tj:.2f} | {args.episodes / tj:.0f} | '
          f'{rj["accuracy"]:.2f} | {rj["ci95"]:.2f} |')
    if args.no_sklearn:
      continue
    ts, rs = timed(lambda: fewshot.evaluate(x, y, solver='sklearn', **kw), args.rounds)
    print(f'| {shots} | sklearn | | {ts:.2f} | {args.episodes / ts:.0f} | '
          f'{rs["accuracy"]:.2f} | {rs["ci95"]:.2f} |')
    f = fits(x, y, shots, args.episodes, 0, args.tight)
    same = np.mean(f['jax'][0] == f['sklearn'][0])
    print(f'  {shots}-shot: sklearn/jax time {ts / tj:.1f}x (first jax call {ts / first:.1f}x);'
          f' predictions agree on {100 * same:.2f}% of queries; accuracy difference '
          f'{rj["accuracy"] - rs["accuracy"]:+.2f} points')
    if args.tight:
      p_ref, w_ref = f['sklearn_tight']
      for name in ('jax', 'sklearn'):
        print(f'  {shots}-shot {name} vs sklearn tol=1e-10: predictions agree on '
              f'{100 * np.mean(f[name][0] == p_ref):.2f}%, max |dW| '
              f'{np.abs(f[name][1] - w_ref).max():.2g} (max |W| {np.abs(w_ref).max():.2g})')


if __name__ == '__main__':
  main()
