"""Cost of `ncjax.models.features` under `jax.jit`: compile time, steady-state time per batch and
the compiled executable's memory, next to the plain jitted forward pass (logits only).

    python benchmarks/features.py [--models resnet18,vit_b32] [--batch 64] [--size 224]
        [--reps 3] [--ref DIR] [--rounds 2]

Float32, random weights, on the default backend (CPU here). For each model it reports
* compile: seconds for `jax.jit(f).lower(v, x).compile()` (a fresh jit object each time),
* ms/batch: median wall time of `--reps` calls of the compiled executable after one warm-up,
* temp MiB: `compiled.memory_analysis().temp_size_in_bytes` (XLA's scratch buffers; the
  arguments and outputs are listed apart), out MiB: its output bytes,
* HLO: a digest of the optimized HLO module with source locations dropped and names
  renumbered in order of appearance: two programs with the same digest run the same ops,
for `features` (`jax.jit(functools.partial(models.features, model))`) and for `forward`
(`jax.jit(lambda v, x: model.apply(v, x, train=False))`).

`--ref DIR` compares with another version of the code: DIR holds an `ncjax` package, e.g.
`git archive <rev> ncjax | tar -x -C DIR`. Each round measures the reference and this tree in
fresh subprocesses (alternating, so a shared CPU's load hits both alike); the table gives the
medians over rounds, the ratios this tree / reference, and whether the optimized programs are
the same (then any time difference is the machine's noise).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..')


def hlo_digest(text: str) -> str:
  """md5 of an HLO module's text with metadata, source tables and names normalised away."""
  text = re.sub(r', metadata=\{[^}]*\}', '', text)
  text = re.sub(r',? ?stack_frame_id=\d+', '', text)
  # The header's FileNames / FunctionNames / FileLocations / StackFrames tables: numbered lines.
  lines = [l for l in text.splitlines() if not re.match(r'^(\d+ |[A-Z][A-Za-z]+$)', l)]
  names: dict = {}
  # Instruction and computation names (`%fusion.3`, `region_8.14`, `param_0.1`) carry
  # trace-order numbers; renumber them by first appearance.
  text = re.sub(r'[A-Za-z_][\w\-]*(?:\.\d+)+',
                lambda m: names.setdefault(m.group(0), f'n{len(names)}'), '\n'.join(lines))
  text = re.sub(r'HloModule \S+', 'HloModule', text)
  return hashlib.md5(text.encode()).hexdigest()[:12]


def measure(name: str, batch: int, size: int, reps: int) -> dict:
  """One model, in this process: {'features': {...}, 'forward': {...}} (see module doc)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ncjax import models
  model = models.get(name, 1000)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from models import _random_variables  # benchmarks/models.py: numpy-drawn, no init compile
  v = _random_variables(models.param_shapes(name, 1000, size))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  fns = {'features': functools.partial(models.features, model),
         'forward': lambda v, x: model.apply(v, x, train=False)}
  out = {}
  for what, fn in fns.items():
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(v, x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(v, x))  # warm-up
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(v, x))
      ts.append(time.perf_counter() - t)
    mem = compiled.memory_analysis()
    out[what] = {'compile_s': compile_s, 'ms': 1e3 * statistics.median(ts),
                 'temp_mib': mem.temp_size_in_bytes / 2**20,
                 'out_mib': mem.output_size_in_bytes / 2**20, 'hlo': hlo_digest(compiled.as_text())}
  return out


def _run_child(src: str, args) -> dict:
  """`measure` for every model in a fresh interpreter with `src` first on sys.path."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.abspath(src)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
                                if p]))
  cmd = [sys.executable, os.path.abspath(__file__), '--child', '--models', args.models,
         '--batch', str(args.batch), '--size', str(args.size), '--reps', str(args.reps)]
  res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def _median_over(runs):
  """Element-wise median of a list of {model: {what: {field: float}}}."""
  first = runs[0]

  def med(vals):
    vals = list(vals)
    if isinstance(vals[0], str):  # the HLO digest: the same in every round
      return vals[0] if len(set(vals)) == 1 else 'varies'
    return statistics.median(vals)
  return {m: {w: {f: med(r[m][w][f] for r in runs) for f in first[m][w]}
              for w in first[m]} for m in first}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='resnet18,vit_b32')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--ref', default=None, help='directory holding a reference `ncjax` package')
  p.add_argument('--rounds', type=int, default=2, help='alternating rounds with --ref')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  names = args.models.split(',')
  if args.child:
    print(json.dumps({n: measure(n, args.batch, args.size, args.reps) for n in names}))
    return
  import jax
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch}, '
        f'{args.size}x{args.size}, float32, {args.reps} reps')
  if args.ref is None:
    now = _run_child(ROOT, args)
    ref = None
  else:
    now_runs, ref_runs = [], []
    for r in range(args.rounds):
      ref_runs.append(_run_child(args.ref, args))
      now_runs.append(_run_child(ROOT, args))
      print(f'round {r + 1}: ref {json.dumps(ref_runs[-1])}\n         now '
            f'{json.dumps(now_runs[-1])}', flush=True)
    now, ref = _median_over(now_runs), _median_over(ref_runs)
  fields = (('compile_s', 'compile s', '.2f'), ('ms', 'ms/batch', '.0f'),
            ('temp_mib', 'temp MiB', '.1f'), ('out_mib', 'out MiB', '.3f'))
  head = ['model', 'fn'] + [f for _, t, _ in fields for f in
                            ((f'{t} ref', f'{t} now', 'now/ref') if ref else (t,))]
  head.append('same HLO' if ref else 'HLO')
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * 2 + '---:|' * (len(head) - 3) + '---|')
  for n in names:
    for w in ('features', 'forward'):
      cells = [n, w]
      for key, _, fmt in fields:
        b = now[n][w][key]
        if ref:
          a = ref[n][w][key]
          cells += [format(a, fmt), format(b, fmt), f'{b / a:.2f}' if a else 'n/a']
        else:
          cells.append(format(b, fmt))
      h = now[n][w]['hlo']
      cells.append(('yes' if h == ref[n][w]['hlo'] and h != 'varies' else 'no') if ref else h)
      print('| ' + ' | '.join(cells) + ' |')
  # Pooling inside the jit vs the bare forward pass, this tree.
  for n in names:
    f, g = now[n]['features'], now[n]['forward']
    print(f'{n}: features/forward this tree: time {f["ms"] / g["ms"]:.2f}, '
          f'temp {f["temp_mib"] / max(g["temp_mib"], 1e-9):.2f}')


if __name__ == '__main__':
  main()
