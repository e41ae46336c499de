"""PyTorch peers of ncjax's fine-tuning train step, in torch's best single-device configuration.

One peer per (model, method): ResNet-50 / ViT-B/32 (`tests/torch_ref.py`, the same
computation as ncjax's models), full FT or Layer FT (the unit + the classifier train, every
other parameter has ``requires_grad=False``, so autograd runs no backward through the frozen
prefix; every BatchNorm stays in train mode and updates its running statistics, as in ncjax).
The step: `torch.compile` (default mode) of model + cross-entropy, AMP bf16 autocast,
channels_last for ResNets, SGD momentum 0.9 + weight decay 1e-4 (`fused=True` where torch
has it), ``zero_grad(set_to_none=True)``, float32 parameters. Input: N(0, 1) float32 NCHW
(channels_last for ResNets), 1000 classes.

    python benchmarks/torch_peers.py --models resnet50,vit_b32 --methods full,layer --batch 256

Run standalone it prints one JSON line per peer. `benchmarks/throughput.py` runs it as a
subprocess with ``--serve``: the peers are built and compiled at once (overlapping the JAX
compiles), ``@@ready`` is printed, and timing waits for a ``go`` line on stdin, so the two
frameworks never time on the GPU at the same time. Protocol lines start with ``@@``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from torch_ref import TorchResNet, TorchViT  # noqa: E402

UNITS = {'resnet50': 'block8', 'vit_b32': 'layer8'}  # ncjax's Layer FT unit per model
NUM_CLASSES = 1000


def build(name, size):
  """The torch model and its ordered fine-tuning units (ncjax's `block{i}` / `layer{i}`)."""
  if name.startswith('resnet'):
    m = TorchResNet(name, NUM_CLASSES)
    units = [b for s in range(1, 5) for b in getattr(m, f'layer{s}')]
    return m, units, m.fc
  if name == 'vit_b32':
    m = TorchViT(size, 32, 768, 12, 12, 3072, NUM_CLASSES)
    return m, list(m.blocks), m.head
  raise ValueError(f'no torch peer for {name!r}')


class Peer:
  """One compiled train step. `step()` enqueues one step and returns without a sync."""

  def __init__(self, name, method, batch, size, device, compile_):
    torch.manual_seed(0)
    m, units, head = build(name, size)
    if method == 'layer':
      unit = UNITS[name]
      idx = int(''.join(c for c in unit if c.isdigit())) - 1  # 'block8' / 'layer8' -> 7
      m.requires_grad_(False)
      units[idx].requires_grad_(True)
      head.requires_grad_(True)
    elif method != 'full':
      raise ValueError(f'unknown method {method!r}')
    self.channels_last = name.startswith('resnet')
    fmt = torch.channels_last if self.channels_last else torch.contiguous_format
    m = m.to(device, memory_format=fmt).train()
    self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    self.y = torch.arange(batch, device=device) % NUM_CLASSES
    params = [p for p in m.parameters() if p.requires_grad]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    try:  # one multi-tensor kernel per update; not every build has it on every device
      self.opt = torch.optim.SGD(params, fused=True, **kw)
      self.opt_kind = 'fused'
    except (RuntimeError, TypeError, ValueError):
      self.opt = torch.optim.SGD(params, foreach=True, **kw)
      self.opt_kind = 'foreach'

    def loss_fn(x, y):
      return F.cross_entropy(m(x), y)
    self.loss_fn = torch.compile(loss_fn) if compile_ else loss_fn
    self.device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    self.sync = torch.cuda.synchronize if self.device_type == 'cuda' else (lambda: None)
    self.model = m
    self.n_trainable = sum(p.numel() for p in params)

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device_type, dtype=torch.bfloat16):
      loss = self.loss_fn(self.x, self.y)
    loss.backward()
    self.opt.step()
    return loss


def warm_up(peer):
  """First call (compile) + 2 steps; returns the seconds of the first call."""
  t = time.perf_counter()
  peer.step()
  peer.sync()
  first = time.perf_counter() - t
  for _ in range(2):
    peer.step()
  peer.sync()
  return first


def time_peer(peer, reps, window_s):
  """Median seconds per step over `reps` windows of back-to-back steps (one sync per window)."""
  t = time.perf_counter()
  peer.step()
  peer.sync()
  one = time.perf_counter() - t
  n = max(3 if window_s else 1, min(50, round(window_s / max(one, 1e-6))))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
      peer.step()
    peer.sync()
    times.append((time.perf_counter() - t) / n)
  return statistics.median(times), n


def emit(obj):
  print('@@' + json.dumps(obj), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--models', default='resnet50,vit_b32')
  ap.add_argument('--methods', default='full,layer')
  ap.add_argument('--batch', type=int, default=256)
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--window', type=float, default=0.4, help='seconds per timed window')
  ap.add_argument('--compile', action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument('--serve', action='store_true', help='wait for "go" on stdin before timing')
  a = ap.parse_args(argv)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  # Best config: the few f32 matmuls left outside autocast may use TF32 (cuDNN convs already do).
  torch.set_float32_matmul_precision('high')
  torch.backends.cudnn.benchmark = True
  t0 = time.perf_counter()
  peers = []
  for name in a.models.split(','):
    for method in a.methods.split(','):
      try:  # a failed peer (e.g. a compile error) must not cost the others
        p = Peer(name, method, a.batch, a.size, device, a.compile)
        first = warm_up(p)
      except Exception as e:  # noqa: BLE001
        emit({'event': 'error', 'model': name, 'method': method,
              'error': f'{type(e).__name__}: {e}'[:400]})
        continue
      peers.append((name, method, p, first))
  info = {'event': 'ready', 'torch': torch.__version__, 'device': (
      torch.cuda.get_device_name() if device == 'cuda' else 'cpu'),
      'threads': torch.get_num_threads(), 'build_compile_s': time.perf_counter() - t0,
      'wall': time.time()}
  emit(info)
  if a.serve and sys.stdin.readline().strip() != 'go':
    return
  t0 = time.perf_counter()
  for name, method, p, first in peers:
    dt, n = time_peer(p, a.reps, a.window)
    emit({'event': 'row', 'model': name, 'method': method, 'batch': a.batch,
          'step_ms': dt * 1e3, 'images_s': a.batch / dt, 'steps_per_window': n,
          'first_call_s': first, 'compiled': a.compile, 'amp': 'bf16',
          'channels_last': p.channels_last, 'sgd': p.opt_kind, 'trainable': p.n_trainable})
  emit({'event': 'done', 'timing_s': time.perf_counter() - t0})


if __name__ == '__main__':
  main()
