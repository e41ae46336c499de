"""The CPU fine-tuning step of a ResNet against torch's eager CPU step, under XLA:CPU variants.

    python benchmarks/cpu_conv.py                              # ResNet-18 step, default variants
    python benchmarks/cpu_conv.py --variants base,ynn_off --batch 32 --rounds 5
    python benchmarks/cpu_conv.py --what convs --variants base,ynn_off --layout NCHW

`--what step` (default): ResNet-18 (`--model`) at 224x224 (`--size`), batch `--batch`,
float32: the ncjax forward (eval mode) and the full-FT train step that users run
(`train.make_train_step` + `train.jit_train_step`: SGD momentum 0.9, wd 1e-4, BatchNorm in
train mode, state donated) against torch's eager forward and step (`tests/torch_ref.TorchResNet`,
NCHW, or channels_last with `--torch-channels-last`; the same SGD).
`--what convs`: each distinct ResNet-18 3x3 / 7x7 convolution alone (batch `--batch`): forward,
input gradient (dgrad) and weight gradient (wgrad), NHWC or NCHW (`--layout`, through
`lax.conv_general_dilated` dimension numbers), against `aten.convolution_backward`.

Every variant is compiled in this one process: XLA:CPU debug options go to
`lowered.compile(compiler_options=...)` (the same options as `XLA_FLAGS=--name=value`, per
executable), BatchNorm variants swap the class the ResNet builds while tracing (ncjax itself is
untouched). Each round times torch once and then every variant once, so all see the same load
from other jobs on the machine; a ratio is the median over rounds of (variant time / torch time
in that round): < 1 means ncjax is faster. The first call of each function is a warm-up.

Threads: XLA's CPU client and torch both use every core the process may run on; run the script
under `taskset -c 0` to compare them on one core (`eigen_1thread` keeps only XLA's own Eigen ops
on one thread).

Findings (jaxlib 0.10.2, torch 2.13 CPU, 2-core Sapphire Rapids shared with other jobs: torch's
OpenMP step time swings 2x with the machine's load, so compare rows of one run). XLA:CPU's
default YNNPACK list holds dots, reductions and convolutions; YNNPACK's weight-gradient
convolutions are 2-4x slower than XLA's own (Eigen) ones (`--what convs`: wgrad 3.6x torch vs
1.2x). `ynn_no_conv` (YNNPACK for dots and reductions only) cut the ResNet-18 full-FT step by
25-43% (batch 32: 5.87 -> 3.39 s, 1.64x -> 0.95x torch, 2026-11-26; re-measured on a quiet
machine at cc4889e: 1.75x -> 1.36x, so the 0.95x did not hold) and left ViT-B/32 unchanged;
`ynn_off` also loses YNNPACK's fast BatchNorm reductions (XLA's reduce-window trees) and gains
less. The XLA_FLAGS spelling is `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`.
No other flag, NCHW, a one-pass BatchNorm or the 9-slice max-pool moved the step beyond noise;
oneDNN fusions abort the process.

On a 2-core AMD EPYC (2026-12-08, quiet): ResNet-18 batch 32 step 1.65x torch (base) ->
1.28-1.30x (`ynn_no_conv`), forward 0.85-1.01x; on top of `ynn_no_conv`, the one-pass
BatchNorm 1.26x, the 9-slice max-pool 1.32x, no BatchNorm at all 1.19x, oneDNN options no
change (`--what convs`); the rest is the Eigen convolutions' backward (`--what convs`: dgrad
1.23-1.26x, wgrad 1.24-1.31x torch). ViT-B/32 batch 16: 1.04x (base), 1.01x (`ynn_no_conv`).
Each variant's XLA options go to `jax.jit` (`train.jit_train_step(..., compiler_options)`):
options set on `jax.jit` stay in force under `compile(compiler_options=None)`, which had made
`base` time the adopted options (before 2026-12-08).
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
import flax.linen as nn
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
sys.path.insert(0, os.path.join(HERE, '..', 'tests'))

from ncjax import methods, models, train  # noqa: E402
from ncjax.models import common, resnet  # noqa: E402
from torch_ref import TorchResNet, TorchViT, randomize_  # noqa: E402

# name -> (XLA:CPU debug options, BatchNorm kind). Options found with `strings` on jaxlib
# 0.10.2's libjax_common.so (`xla_cpu_*`); by default its convolutions already run in YNNPACK
# (`__ynn_fusion` in the compiled HLO), which `ynn_off` turns back into XLA/Eigen convolutions.
_T = 'LIBRARY_FUSION_TYPE_'  # enum values as compiler_options takes them (XLA_FLAGS: 'dot', ...)
VARIANTS = {
    'base': ({}, ()),
    'ynn_off': ({'xla_cpu_experimental_ynn_fusion_type': ''}, ()),
    # YNNPACK for dots and reductions (BatchNorm statistics), XLA/Eigen for convolutions.
    'ynn_no_conv': ({'xla_cpu_experimental_ynn_fusion_type': ','.join(
        _T + t for t in ('INDIVIDUAL_DOT', 'REDUCE'))}, ()),
    'ynn_all': ({'xla_cpu_experimental_ynn_fusion_type': ','.join(
        _T + t for t in ('INDIVIDUAL_DOT', 'INDIVIDUAL_CONVOLUTION', 'ELTWISE', 'REDUCE'))},
                ()),
    'xnn_graph': ({'xla_cpu_experimental_xnn_graph_fusion_mode': 'XNN_GRAPH_FUSION_MODE_GREEDY'},
                  ()),
    'xnn_fuse': ({'xla_cpu_experimental_xnn_fusion_type': ','.join(
        _T + t for t in ('DOT', 'ELTWISE', 'REDUCE'))}, ()),
    # oneDNN: its fusions ('onednn_fuse') abort the process ('partition compile failed',
    # SIGILL) on this Sapphire Rapids CPU with jaxlib 0.10.2.
    'onednn': ({'xla_cpu_use_onednn': True}, ()),
    'onednn_cc': ({'xla_cpu_experimental_onednn_custom_call': True}, ()),
    'onednn_fuse': ({'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_fusion_type':
                     ','.join(_T + t for t in ('DOT', 'ELTWISE', 'REDUCE'))}, ()),
    'fast_math': ({'xla_cpu_enable_fast_math': True}, ()),
    'eigen_1thread': ({'xla_cpu_multi_thread_eigen': False}, ()),
    'vec512': ({'xla_cpu_prefer_vector_width': 512}, ()),
    'no_fusion_emitters': ({'xla_cpu_use_fusion_emitters': False}, ()),
    # Model-side variants (patched while tracing; ncjax itself is untouched).
    'bn_onepass': ({}, ('bn_onepass',)),
    'bn_none': ({}, ('bn_none',)),
    'pool_slices': ({}, ('pool_slices',)),
}
# Names joined by '+' compose: 'ynn_no_conv+bn_onepass' is the adopted options with the
# one-pass BatchNorm (options merged left to right, patches in order).
DEFAULT_STEP = 'base,ynn_off,ynn_no_conv,pool_slices,ynn_no_conv+pool_slices,bn_onepass,bn_none'
DEFAULT_CONVS = 'base,ynn_off,ynn_no_conv,onednn,xnn_graph'


def variant(name):
  """(XLA options, patches) of a variant name, '+'-joined names composed."""
  opts, patches = {}, ()
  for part in name.split('+'):
    if part not in VARIANTS:
      raise SystemExit(f'unknown variant {part!r} in {name!r}; known: {", ".join(VARIANTS)}')
    opts, patches = {**opts, **VARIANTS[part][0]}, patches + VARIANTS[part][1]
  return opts, patches


def _bn_variables(bn, c):
  """ncjax BatchNorm's variables (same names, shapes, inits): scale, bias, mean, var."""
  return (bn.param('scale', bn.scale_init, (c,), jnp.float32),
          bn.param('bias', bn.bias_init, (c,), jnp.float32),
          bn.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)),
          bn.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)))


class OnePassBatchNorm(common.BatchNorm):
  """ncjax's BatchNorm with the train-mode batch statistics from one reduction (E[x], E[x^2])
  and the normalisation folded into one multiply-add: the same variables and outputs
  (up to rounding)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale, bias, ra_mean, ra_var = _bn_variables(self, c)
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (xf * mul + (bias - mean * mul)).astype(self.dtype)


class NoBatchNorm(common.BatchNorm):
  """Identity with BatchNorm's variables: bounds what BatchNorm costs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    _bn_variables(self, x.shape[-1])
    return x


def max_pool_slices(x, window: int = 3, stride: int = 2, pad: int = 1):
  """`resnet.max_pool_torch` as the maximum of window**2 strided slices of the -inf-padded
  input: its gradient is a chain of elementwise selects instead of XLA's reduce-window
  argmax (4 int32 index tensors the size of the padded input) + scatter. Ties split the
  gradient (torch routes it to one element); they only occur among the ReLU's zeros, whose
  gradient the ReLU zeroes anyway."""
  n, h, w, c = x.shape
  ho, wo = (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(window):
    for j in range(window):
      s = jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1,
                                           j + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
      out = s if out is None else jnp.maximum(out, s)
  return out


def _apply_patches(patches):
  """Swap ResNet building blocks as the model is traced; returns an undo function."""
  saved = (resnet.BatchNorm, resnet.max_pool_torch)
  for p in patches:
    if p == 'bn_onepass':
      resnet.BatchNorm = OnePassBatchNorm
    elif p == 'bn_none':
      resnet.BatchNorm = NoBatchNorm
    elif p == 'pool_slices':
      resnet.max_pool_torch = max_pool_slices
    else:
      raise ValueError(p)

  def undo():
    resnet.BatchNorm, resnet.max_pool_torch = saved
  return undo


def flags_of(opts):
  return ' '.join(f'--{k}={str(v).lower() if isinstance(v, bool) else v}'
                  for k, v in opts.items())


def rounds_table(torch_fns, jax_fns, rounds):
  """torch_fns: {what: fn}; jax_fns: {variant: {what: fn}}. One warm-up call each, then per
  round torch's fns and every variant's. Returns {variant: {what: (median s, median ratio)}},
  with torch under the key None."""
  for fns in [torch_fns, *jax_fns.values()]:
    for fn in fns.values():
      fn()
  times = {None: {w: [] for w in torch_fns}}
  times.update({v: {w: [] for w in fns} for v, fns in jax_fns.items()})
  for _ in range(rounds):
    for v, fns in [(None, torch_fns), *jax_fns.items()]:
      for w, fn in fns.items():
        t = time.perf_counter()
        fn()
        times[v][w].append(time.perf_counter() - t)
  out = {}
  for v, per in times.items():
    out[v] = {w: (statistics.median(ts), statistics.median(
        a / b for a, b in zip(ts, times[None][w]))) for w, ts in per.items()}
  return out


def step_fns(a, names):
  b, s, k = a.batch, a.size, 1000
  xn = np.random.default_rng(0).normal(size=(b, s, s, 3)).astype(np.float32)
  x, y = jnp.asarray(xn), jnp.asarray(np.arange(b) % k, jnp.int32)
  model = models.get(a.model, k)
  v = jax.jit(lambda r: model.init(r, x[:1], train=False))(jax.random.key(0))
  mask = methods.trainable_mask(v['params'], 'full')
  tx = train.make_optimizer(train.OptimConfig(lr=0.01), 1000, mask)
  mesh, rng = train.data_mesh(), jax.random.PRNGKey(0)
  jax_fns = {}
  for name in names:
    opts, patches = variant(name)
    undo = _apply_patches(patches)  # the ResNet looks these names up when traced
    try:
      fwd_model = model.clone()  # a fresh module: no trace cached from another variant

      def forward(p, bs, xx, tr, m=fwd_model):
        return train.model_forward(m)(p, bs, xx, tr)
      # The variant's options go to jax.jit: options set there (ncjax's CPU default) would
      # stay in force under compile(compiler_options=None), making `base` the adopted one.
      step = train.jit_train_step(train.make_train_step(forward, tx, mask), mesh, opts)
      # The step donates its state: give it its own buffers (the forward keeps `v`).
      st = train.init_state(*jax.tree.map(jnp.copy, (v['params'], v.get('batch_stats', {}))), tx)
      c_step = step.lower(st, x, y, rng).compile()
      c_fwd = jax.jit(lambda vv, xx, m=fwd_model: m.apply(vv, xx, train=False)).lower(
          v, x).compile(compiler_options=opts or None)
    finally:
      undo()
    box = {'s': st}

    def run_step(c=c_step, box=box):
      box['s'], m = c(box['s'], x, y, rng)
      jax.block_until_ready(m)
    jax_fns[name] = {'fwd': lambda c=c_fwd: jax.block_until_ready(c(v, x)), 'step': run_step}
    print(f'  compiled {name}', flush=True)

  torch.manual_seed(0)
  tm = (TorchViT(s, 32, 768, 12, 12, 3072, k) if a.model == 'vit_b32' else
        randomize_(TorchResNet(a.model, k)))
  tx_ = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())
  if a.torch_channels_last:
    tm = tm.to(memory_format=torch.channels_last)
    tx_ = tx_.contiguous(memory_format=torch.channels_last)
  ty = torch.arange(b) % k
  opt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

  def t_step():
    tm.train()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(tm(tx_), ty).backward()
    opt.step()

  def t_fwd():
    tm.eval()
    with torch.no_grad():
      tm(tx_)
  return {'fwd': t_fwd, 'step': t_step}, jax_fns


# (name, spatial size, C_in, C_out, kernel, stride): every distinct ResNet-18 conv at 224x224.
CONVS = [('stem 7x7/2', 224, 3, 64, 7, 2), ('l1 3x3', 56, 64, 64, 3, 1),
         ('l2 3x3/2', 56, 64, 128, 3, 2), ('l2 3x3', 28, 128, 128, 3, 1),
         ('l3 3x3/2', 28, 128, 256, 3, 2), ('l3 3x3', 14, 256, 256, 3, 1),
         ('l4 3x3/2', 14, 256, 512, 3, 2), ('l4 3x3', 7, 512, 512, 3, 1)]


def conv_fns(a, names):
  """Per conv shape: torch fns and per-variant jax fns, keys '<conv> fwd|dgrad|wgrad'.
  With `--layout both`, every variant runs in NHWC and (as '<variant>/NCHW') in NCHW."""
  layouts = ('NHWC', 'NCHW') if a.layout == 'both' else (a.layout,)
  torch_fns, jax_fns = {}, {}
  for cname, h, ci, co, k, s in CONVS:
    for layout in layouts:
      _conv_layout_fns(a, names, cname, h, ci, co, k, s, layout, torch_fns, jax_fns)
  return torch_fns, jax_fns


def _conv_layout_fns(a, names, cname, h, ci, co, k, s, layout, torch_fns, jax_fns):
  """One conv shape in one layout: adds its torch fns and each variant's jax fns."""
  p = k // 2
  rng = np.random.default_rng(0)
  xn = rng.normal(size=(a.batch, ci, h, h)).astype(np.float32)
  wn = (rng.normal(size=(co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
  if layout == 'NHWC':
    xj, wj, dn = xn.transpose(0, 2, 3, 1), wn.transpose(2, 3, 1, 0), ('NHWC', 'HWIO', 'NHWC')
  else:
    xj, wj, dn = xn, wn, ('NCHW', 'OIHW', 'NCHW')
  xj, wj = jnp.asarray(xj), jnp.asarray(wj)

  def conv(x, w, s=s, p=p, dn=dn):
    return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=dn)
  g = jnp.ones(jax.eval_shape(conv, xj, wj).shape, jnp.float32)
  fns = {'fwd': (conv, (xj, wj)),
         'dgrad': (lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                   (xj, wj, g)),
         'wgrad': (lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                   (xj, wj, g))}
  ho = (h + 2 * p - k) // s + 1
  tx, tw, tg = torch.from_numpy(xn), torch.from_numpy(wn), torch.ones(a.batch, co, ho, ho)

  def tbwd(mask, tx=tx, tw=tw, tg=tg, s=s, p=p):
    with torch.no_grad():
      torch.ops.aten.convolution_backward(tg, tx, tw, None, [s, s], [p, p], [1, 1], False,
                                          [0, 0], 1, mask)
  tf = {'fwd': lambda tx=tx, tw=tw, s=s, p=p: F.conv2d(tx, tw, stride=s, padding=p),
        'dgrad': lambda: tbwd([True, False, False]),
        'wgrad': lambda: tbwd([False, True, False])}
  for what in ('fwd', 'dgrad', 'wgrad'):
    if what == 'dgrad' and ci == 3:  # the stem's input gradient is never computed
      continue
    torch_fns[f'{cname} {what}'] = tf[what]
    fn, args = fns[what]
    for n in names:
      c = jax.jit(fn).lower(*args).compile(compiler_options=variant(n)[0] or None)
      key = n if layout == 'NHWC' or a.layout != 'both' else f'{n}/NCHW'
      jax_fns.setdefault(key, {})[f'{cname} {what}'] = (
          lambda c=c, args=args: c(*args).block_until_ready())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--what', choices=('step', 'convs'), default='step')
  ap.add_argument('--variants', default=None, help=f'default: step {DEFAULT_STEP}; '
                  f'convs {DEFAULT_CONVS}; all: {",".join(VARIANTS)}')
  ap.add_argument('--model', default='resnet18', help='resnet18|34|50 or vit_b32 (step)')
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--layout', choices=('NHWC', 'NCHW', 'both'), default='NHWC')
  ap.add_argument('--torch-channels-last', action='store_true')
  a = ap.parse_args(argv)
  names = (a.variants or (DEFAULT_STEP if a.what == 'step' else DEFAULT_CONVS)).split(',')
  if a.what == 'convs' and any(variant(n)[1] for n in names):
    raise SystemExit('model variants (BatchNorm, pooling) apply to --what step only')
  t0 = time.perf_counter()
  torch_fns, jax_fns = (step_fns if a.what == 'step' else conv_fns)(a, names)
  res = rounds_table(torch_fns, jax_fns, a.rounds)
  names = list(jax_fns)  # with --layout both: also '<variant>/NCHW'
  print(f'# {a.what}: {a.model if a.what == "step" else "ResNet-18 convs"}, batch {a.batch}, '
        f'{a.size}x{a.size}, {a.layout if a.what == "convs" else "NHWC"} (torch '
        f'{"channels_last" if a.torch_channels_last else "NCHW"}), {a.rounds} rounds, jax '
        f'{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, {time.perf_counter() - t0:.0f} s')
  whats = list(torch_fns)
  if a.what == 'convs':  # one column per gradient kind, summed over the conv shapes
    cols = ('fwd', 'dgrad', 'wgrad')
    tsum = {c: sum(res[None][w][0] for w in whats if w.endswith(c)) for c in cols}
    print('| variant | XLA options | ' + ' | '.join(f'{c} ms | {c} / torch' for c in cols) + ' |')
    print('|---|---|' + '---:|---:|' * len(cols))
    print('| torch | | ' + ' | '.join(f'{tsum[c] * 1e3:.0f} | 1.00' for c in cols) + ' |')
    for n in names:
      js = {c: sum(res[n][w][0] for w in whats if w.endswith(c)) for c in cols}
      # summed medians: the per-shape rows (below) carry the per-round ratios
      print(f'| {n} | `{flags_of(variant(n.split("/")[0])[0])}` | ' + ' | '.join(
          f'{js[c] * 1e3:.0f} | {js[c] / tsum[c]:.2f}' for c in cols) + ' |')
    print('\n| conv | torch ms | ' + ' | '.join(f'{n} / torch' for n in names) + ' |')
    print('|---|---:|' + '---:|' * len(names))
    for w in whats:
      print(f'| {w} | {res[None][w][0] * 1e3:.1f} | ' +
            ' | '.join(f'{res[n][w][1]:.2f}' for n in names) + ' |')
    return
  print('| variant | XLA options / BatchNorm | fwd ms | fwd / torch | step ms | step / torch |')
  print('|---|---|---:|---:|---:|---:|')
  print(f"| torch eager | | {res[None]['fwd'][0] * 1e3:.0f} | 1.00 | "
        f"{res[None]['step'][0] * 1e3:.0f} | 1.00 |")
  for n in names:
    opts, patches = variant(n)
    desc = ' '.join(filter(None, [flags_of(opts), *(f'model: {p}' for p in patches)]))
    print(f"| {n} | `{desc}` | {res[n]['fwd'][0] * 1e3:.0f} | {res[n]['fwd'][1]:.2f} | "
          f"{res[n]['step'][0] * 1e3:.0f} | {res[n]['step'][1]:.2f} |")


if __name__ == '__main__':
  main()
