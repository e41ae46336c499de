"""Forward / train-step timings of ncjax models vs independent PyTorch references (the torch
reference runs on CUDA when torch sees a GPU, else on the CPU).

    python benchmarks/models.py --batch 32 --reps 3 [--models resnet18,vit_b32]

Reports the median wall time of `--reps` runs after one warm-up (jit compile excluded),
for a jitted forward pass (eval mode) and a jitted full-fine-tuning SGD step (train mode,
softmax cross-entropy, BatchNorm statistics updated) against the torch reference
(`tests/torch_ref.py`: torchvision-layout ResNet, minimal pre-LN ViT).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))

from ncjax import models  # noqa: E402

LR = 0.01


def _median_time(fn, reps):
  fn()  # warm-up (compile)
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _random_variables(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return jnp.ones(s.shape, s.dtype)
    if len(s.shape) >= 2:
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return jnp.asarray(0.01 * rng.normal(size=s.shape) + ('scale' in name), s.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


def bench_jax(name, batch, size, reps, num_classes=1000):
  model = models.get(name, num_classes)
  v = _random_variables(models.param_shapes(name, num_classes, size))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  y = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
  has_bs = 'batch_stats' in v

  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def loss_fn(params, bs, x, y):
    vv = {'params': params, **({'batch_stats': bs} if has_bs else {})}
    if has_bs:
      logits, new = model.apply(vv, x, train=True, mutable=['batch_stats'])
      bs = new['batch_stats']
    else:
      logits = model.apply(vv, x, train=True)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), bs

  @jax.jit
  def step(params, bs, x, y):
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params, bs, x, y)
    params = jax.tree_util.tree_map(lambda p, gg: p - LR * gg, params, g)
    return params, bs, loss

  state = {'p': v['params'], 'bs': v.get('batch_stats', {})}

  def run_step():
    state['p'], state['bs'], loss = step(state['p'], state['bs'], x, y)
    jax.block_until_ready(loss)

  t_fwd = _median_time(lambda: jax.block_until_ready(fwd(v, x)), reps)
  t_step = _median_time(run_step, reps)
  return t_fwd, t_step


def bench_torch(name, batch, size, reps, num_classes=1000):
  import torch
  from torch_ref import TorchResNet, TorchViT, randomize_
  torch.manual_seed(0)
  if name.startswith('resnet'):
    m = randomize_(TorchResNet(name, num_classes))
  elif name == 'vit_b32':
    m = TorchViT(size, 32, 768, 12, 12, 3072, num_classes)
  else:
    raise ValueError(f'no torch reference for {name}')
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  m = m.to(dev)
  x = torch.randn(batch, 3, size, size, device=dev)
  y = torch.arange(batch, device=dev) % num_classes
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  opt = torch.optim.SGD(m.parameters(), lr=LR)

  def fwd():
    m.eval()
    with torch.no_grad():
      m(x)
    sync()

  def step():
    m.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    sync()

  return _median_time(fwd, reps), _median_time(step, reps)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--models', default='resnet18,vit_b32')
  ap.add_argument('--no-torch', action='store_true', help='time ncjax only')
  args = ap.parse_args(argv)
  try:
    import torch
    torch_threads = torch.get_num_threads()
  except ImportError:
    torch, torch_threads = None, 0
  print(f'# jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {torch_threads}, '
        f'batch {args.batch}, {args.size}x{args.size}, median of {args.reps} after warm-up')
  rows = []
  for name in args.models.split(','):
    jf, js = bench_jax(name, args.batch, args.size, args.reps)
    tf = ts = float('nan')
    if torch is not None and not args.no_torch:
      tf, ts = bench_torch(name, args.batch, args.size, args.reps)
    rows.append((name, jf, tf, js, ts))
    print(f'  done {name}', flush=True)
  print()
  print('| model | ncjax fwd (ms) | torch fwd (ms) | fwd ratio ncjax/torch | '
        'ncjax train step (ms) | torch train step (ms) | step ratio ncjax/torch |')
  print('|---|---|---|---|---|---|---|')
  for name, jf, tf, js, ts in rows:
    print(f'| {name} | {jf * 1e3:.2f} | {tf * 1e3:.2f} | {jf / tf:.2f} | {js * 1e3:.2f} | '
          f'{ts * 1e3:.2f} | {js / ts:.2f} |')


if __name__ == '__main__':
  main()
