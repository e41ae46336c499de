"""Training throughput and MFU of ncjax's real train step, against a compiled AMP PyTorch peer.

Rows: ResNet-50 and ViT-B/32 at 224x224, full FT and Layer FT (ResNet-50 `block8`, ViT-B/32
`layer8`: the unit + the head train), float32 and bfloat16 compute (`models.get(name, 1000,
dtype=...)`; parameters, optimizer state and BatchNorm statistics stay float32), on
`jax.devices()[0]`. The step is the one users run: `train.make_train_step(model_forward(model),
tx, mask)` jitted by `train.jit_train_step` over `train.data_mesh()` (state donated), with
`tx = make_optimizer(OptimConfig(), steps, mask)`, `mask = methods.trainable_mask(...)`. No
`prepare`: the input is an N(0, 1) "normalised image" batch already on device, in the compute
dtype (what a bf16 prepare would emit), labels `arange(batch) % 1000`.

    python benchmarks/throughput.py                      # GPU/TPU: batch 256, both frameworks
    python benchmarks/throughput.py --quick              # CPU smoke run: batch 2, 1 rep
    python benchmarks/throughput.py --models vit_b32 --dtypes bfloat16 --methods full --no-torch
    python benchmarks/throughput.py --json $OUT/throughput.json

Per row: step ms = median over `--reps` windows of the seconds per step, each window a run of
back-to-back steps (sized to ~`--window` s from one warm step, at least 3 steps unless
`--window 0`) closed by one `block_until_ready` (no host sync inside a window), after compile +
2 warm-up steps;
images/s = batch / step s.

FLOPs per step: XLA's cost analysis of the compiled step (`compiled.cost_analysis()`: a dict
in jax 0.10/0.11, a one-element list of dicts in older jax; both handled). XLA's GPU backend
turns convolutions and matmuls into cuDNN/cuBLAS custom calls that its cost analysis counts
as 0 FLOPs, so a compiled count below half the analytic one is rejected in favour of the cost
analysis of the lowered, pre-optimisation HLO (same counting rules, plain `convolution`/`dot`
ops), and that in favour of the analytic count: 2 x MACs of every `dot_general` and
`conv_general_dilated` in the step's jaxpr (convolutions with input dilation -- the
input-gradient of strided convolutions -- divided by the dilation, i.e. the zero rows are not
counted; padding is counted, so it is a few % above XLA's). The `FLOPs from` column says which.

MFU = FLOPs per step / step s / peak dense FLOP/s of the device (`device_kind`, table
`PEAKS`). bfloat16 rows use the bf16 tensor-core peak. float32 rows: XLA on Ampere/Hopper runs
f32 dots and convolutions at DEFAULT precision as TF32 on tensor cores (JAX's documented
default); the script checks it on the device (relative error of an f32 matmul and conv against
Precision.HIGHEST: ~1e-7 is true f32, ~5e-4 TF32, ~3e-3 one bf16 pass) and uses the TF32 peak
when TF32 is seen, else the plain FP32 (CUDA-core) peak. TPUs run f32 dots at DEFAULT
precision as one bf16 MXU pass, so their f32 rows use the bf16 peak. The CPU gets no MFU.

PyTorch peer (`benchmarks/torch_peers.py`, a subprocess): one per (model, method), the
`torch.compile` (default mode) + AMP bf16 + channels_last (ResNet) + SGD(momentum 0.9, wd 1e-4,
fused) step with frozen parameters `requires_grad=False`; each ncjax row (fp32 and bf16) is
compared with it: ratio = ncjax images/s / torch images/s. By default one torch subprocess per
model builds and compiles its peers while JAX compiles its steps (`--serial`: torch first, no
overlap); nothing else runs on the device while a row is timed. On the CPU torch runs eager unless `--torch-compile`.

Needs jax, flax, optax, numpy, tqdm (ncjax.train), torch for the peer; not ml_collections or
tensorflow_datasets. Prints per-phase wall time and a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

# The torch peer runs in another process on the same GPU: JAX's default preallocation of 75% of
# the GPU memory would starve it. (Set before the JAX backend starts.)
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

from ncjax import methods, models, train  # noqa: E402

UNITS = {'resnet50': 'block8', 'vit_b32': 'layer8'}
NUM_CLASSES = 1000

# Peak dense (no sparsity) TFLOP/s per chip, vendor datasheets:
#   (match in device_kind, name, bf16, fp32 via TF32 tensor cores, fp32 on CUDA cores / VPU).
# TPUs have no TF32: an f32 dot at DEFAULT precision is one bf16 MXU pass (bf16 peak).
PEAKS = (
    ('H200', 'H200 SXM', 989.4, 494.7, 66.9),
    ('H100 PCIe', 'H100 PCIe', 756.5, 378.0, 51.2),
    ('H100', 'H100 SXM', 989.4, 494.7, 66.9),
    ('A100', 'A100', 312.0, 156.0, 19.5),
    ('TPU v4', 'TPU v4', 275.0, None, 275.0),
    ('TPU v5 lite', 'TPU v5e', 197.0, None, 197.0),
    ('TPU v5e', 'TPU v5e', 197.0, None, 197.0),
    ('TPU v5', 'TPU v5p', 459.0, None, 459.0),
    ('TPU v6', 'TPU v6e', 918.0, None, 918.0),
)


def peak_for(device_kind):
  """(name, bf16, tf32, fp32) TFLOP/s for a `device_kind` string, or None (CPU, unknown)."""
  for key, name, bf16, tf32, fp32 in PEAKS:
    if key.lower() in device_kind.lower():
      return name, bf16, tf32, fp32
  return None


def f32_matmul_mode():
  """How the device runs f32 dots/convs at DEFAULT precision: 'fp32' | 'tf32' | 'bf16', with
  the measured relative errors against Precision.HIGHEST (Frobenius norm)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(k1, (512, 512), jnp.float32)
  b = jax.random.normal(k2, (512, 512), jnp.float32)
  x = jax.random.normal(k3, (16, 16, 16, 64), jnp.float32)
  w = jax.random.normal(k4, (3, 3, 64, 64), jnp.float32)

  def conv(x, w, p):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', precision=p,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  errs = {}
  for what, fn, args in (('dot', lambda u, v, p: jnp.dot(u, v, precision=p), (a, b)),
                         ('conv', conv, (x, w))):
    lo = jax.jit(lambda u, v: fn(u, v, None))(*args)
    hi = jax.jit(lambda u, v: fn(u, v, jax.lax.Precision.HIGHEST))(*args)
    errs[what] = float(jnp.linalg.norm(lo - hi) / jnp.linalg.norm(hi))
  worst = max(errs.values())
  mode = 'fp32' if worst < 1e-5 else 'tf32' if worst < 1.5e-3 else 'bf16'
  return mode, errs


# ----------------------------------------------------------------------------- FLOPs

def _sub_jaxprs(params):
  for v in params.values():
    for s in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(s, 'eqns'):  # Jaxpr
        yield s
      elif hasattr(s, 'jaxpr') and hasattr(s.jaxpr, 'eqns'):  # ClosedJaxpr
        yield s.jaxpr


def jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general / conv_general_dilated in `jaxpr` (recursively)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      total += 2.0 * np.prod(out.shape) * np.prod([lhs.shape[d] for d in lhs_contract])
    elif name == 'conv_general_dilated':
      rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
      o = eqn.params['dimension_numbers'].rhs_spec[0]  # output-feature axis of the kernel
      per_out = np.prod(rhs.shape) / rhs.shape[o]      # (C_in / groups) x window
      # Input dilation (input-gradient of a strided conv) multiplies zeros: not counted.
      total += 2.0 * np.prod(out.shape) * per_out / np.prod(eqn.params['lhs_dilation'])
    for sub in _sub_jaxprs(eqn.params):
      total += jaxpr_flops(sub)
  return float(total)


def _cost_flops(cost):
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  try:
    return float(cost['flops']) if cost else float('nan')
  except (KeyError, TypeError):
    return float('nan')


def pick_flops(compiled, lowered, analytic):
  """(flops, source): XLA's count of the compiled step unless implausibly low (GPU library
  calls count 0), then XLA's count of the pre-optimisation HLO, then the analytic count."""
  for src, f in (('xla', compiled), ('xla-hlo', lowered)):
    if np.isfinite(f) and (not np.isfinite(analytic) or f >= 0.5 * analytic):
      return f, src
  return analytic, 'analytic'


# ----------------------------------------------------------------------------- ncjax rows

def init_params(name, size):
  """float32 variables of `name` as host numpy arrays (shared by its dtype variants: params
  stay float32), drawn from the abstract shapes: no `model.init` compile (seconds of a GPU
  run's budget), and each row's `device_put` makes fresh buffers for its donated state.
  Kernels N(0, 1/fan_in), LayerNorm/BatchNorm scales 1, biases 0.01 N(0, 1), BN stats (0, 1)."""
  rng = np.random.default_rng(0)

  def draw(path, s):
    key = jax.tree_util.keystr(path)
    if 'batch_stats' in key:
      return np.full(s.shape, 1.0 if 'var' in key else 0.0, s.dtype)
    if len(s.shape) >= 2:
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    return (0.01 * rng.normal(size=s.shape) + ('scale' in key)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(name, NUM_CLASSES, size))


def build_row(name, method, dtype, variables, batch, size, mesh):
  """Compiles one train step. Returns the row dict and the (compiled, state, x, y, rng) run."""
  t0 = time.perf_counter()
  model = models.get(name, NUM_CLASSES, dtype=dtype)
  unit = UNITS[name] if method == 'layer' else None
  mask = methods.trainable_mask(variables['params'], method, unit)
  tx = train.make_optimizer(train.OptimConfig(), 10_000, mask)
  # Fresh device buffers from the host copy: the step donates its state.
  params, stats = train.put_replicated(
      mesh, (variables['params'], variables.get('batch_stats', {})))
  state = train.put_replicated(mesh, train.init_state(params, stats, tx))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, size, size, 3), dtype),
                     train.batch_sharded(mesh))
  y = jax.device_put(jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES, train.batch_sharded(mesh))
  rng = jax.device_put(jax.random.PRNGKey(0), train.replicated(mesh))
  step_fn = train.make_train_step(train.model_forward(model), tx, mask)
  step = train.jit_train_step(step_fn, mesh)
  if hasattr(step, 'trace'):  # one trace for the jaxpr and the lowering
    traced = step.trace(state, x, y, rng)
    closed, lowered = traced.jaxpr, traced.lower()
  else:
    closed, lowered = jax.make_jaxpr(step_fn)(state, x, y, rng), step.lower(state, x, y, rng)
  analytic = jaxpr_flops(closed.jaxpr)
  compiled = lowered.compile()
  hlo_flops = xla_flops = float('nan')
  try:  # cost analyses are best effort: the analytic count remains
    hlo_flops = _cost_flops(lowered.cost_analysis())
  except Exception as e:  # noqa: BLE001
    print(f'  (no cost analysis of the lowered HLO: {type(e).__name__}: {e})')
  try:
    xla_flops = _cost_flops(compiled.cost_analysis())
  except Exception as e:  # noqa: BLE001
    print(f'  (no cost analysis of the compiled step: {type(e).__name__}: {e})')
  flops, src = pick_flops(xla_flops, hlo_flops, analytic)
  row = dict(model=name, method=method, unit=unit, dtype=dtype, batch=batch, size=size,
             trainable_pct=methods.percent_trainable(variables['params'], mask),
             flops=flops, flops_src=src, flops_xla=xla_flops, flops_xla_hlo=hlo_flops,
             flops_analytic=analytic, compile_s=time.perf_counter() - t0)
  return row, [compiled, state, x, y, rng]


def time_row(run, reps, window_s):
  """Median seconds per step (see module docstring); consumes and frees the run's state."""
  compiled, state, x, y, rng = run
  for _ in range(2):  # warm-up: first executions (allocations, lazy loading)
    state, m = compiled(state, x, y, rng)
  jax.block_until_ready(m)
  t = time.perf_counter()
  state, m = compiled(state, x, y, rng)
  jax.block_until_ready(m)
  n = max(3 if window_s else 1, min(50, round(window_s / (time.perf_counter() - t))))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(n):
      state, m = compiled(state, x, y, rng)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / n)
  loss = float(m['loss'])
  run.clear()  # drop the state, input and executable before the next row
  return statistics.median(times), n, loss


# ----------------------------------------------------------------------------- torch peer

class TorchPeers:
  """`benchmarks/torch_peers.py --serve` in a subprocess (see its docstring)."""

  def __init__(self, args, compile_, models):
    cmd = [sys.executable, os.path.join(HERE, 'torch_peers.py'), '--serve',
           '--models', models, '--methods', args.methods, '--batch', str(args.batch),
           '--size', str(args.size), '--reps', str(args.reps), '--window', str(args.window),
           '--compile' if compile_ else '--no-compile']
    self.t0, self.wall0 = time.perf_counter(), time.time()
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.ready, self.ready_s, self.rows = None, float('nan'), []

  def _read(self, event):
    for line in self.proc.stdout:
      if line.startswith('@@'):
        msg = json.loads(line[2:])
        if msg['event'] == event:
          return msg
        if msg['event'] == 'row':
          self.rows.append(msg)
        elif msg['event'] == 'error':
          print(f"# torch peer {msg['model']} {msg['method']} FAILED: {msg['error']}", flush=True)
      else:
        print('[torch]', line.rstrip(), flush=True)
    return None

  def wait_ready(self):
    t = time.perf_counter()
    self.ready = self._read('ready')
    if self.ready is not None:  # subprocess start -> its peers compiled (its own clock)
      self.ready_s = self.ready['wall'] - self.wall0
    return time.perf_counter() - t  # how long JAX had to wait for it

  def run(self):
    self.rows = []
    if self.ready is None:
      return [], float('nan')
    t = time.perf_counter()
    self.proc.stdin.write('go\n')
    self.proc.stdin.flush()
    done = self._read('done')
    self.proc.wait()
    if done is None:
      print(f'# torch peer exited with {self.proc.returncode} before finishing', flush=True)
    return self.rows, time.perf_counter() - t

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()


# ----------------------------------------------------------------------------- report

def _f(v, fmt):
  return '-' if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def report(rows, torch_rows, peak, phases):
  key = {(r['model'], r['method']): r for r in torch_rows}
  for r in rows:
    full = next((q for q in rows if q['model'] == r['model'] and q['dtype'] == r['dtype']
                 and q['method'] == 'full'), None)
    t = key.get((r['model'], r['method']))
    r['torch_images_s'] = t['images_s'] if t else None
    r['vs_torch'] = r['images_s'] / t['images_s'] if t else None
    r['layer_over_full_time'] = r['step_ms'] / full['step_ms'] if full else None
    r['layer_over_full_flops'] = r['flops'] / full['flops'] if full else None
  for t in torch_rows:  # the peer does the bf16 row's math
    same = [r for r in rows if (r['model'], r['method']) == (t['model'], t['method'])]
    same.sort(key=lambda r: r['dtype'] != 'bfloat16')
    t['flops'] = same[0]['flops_analytic'] if same else None
    t['mfu'] = (t['flops'] / (t['step_ms'] / 1e3) / (peak[1] * 1e12)
                if peak and t['flops'] else None)

  print('\n| model | method | dtype | batch | step ms | images/s | GFLOP/step | FLOPs from '
        '| TFLOP/s | MFU % | torch images/s | ncjax/torch | layer/full time | '
        'layer/full FLOPs | compile s |')
  print('|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    unit = f"{r['method']} ({r['unit']})" if r['unit'] else r['method']
    tf = r['flops'] / (r['step_ms'] / 1e3) / 1e12
    print(f"| {r['model']} | {unit} | {r['dtype']} | {r['batch']} | {r['step_ms']:.2f} | "
          f"{r['images_s']:.1f} | {r['flops'] / 1e9:.1f} | {r['flops_src']} | {tf:.2f} | "
          f"{_f(r['mfu'] and 100 * r['mfu'], '.1f')} | {_f(r['torch_images_s'], '.1f')} | "
          f"{_f(r['vs_torch'], '.2f')} | {_f(r['layer_over_full_time'], '.3f')} | "
          f"{_f(r['layer_over_full_flops'], '.3f')} | {r['compile_s']:.1f} |")
  if torch_rows:
    print('\n| torch peer | method | step ms | images/s | MFU % (bf16 peak) | first call s '
          '(compile) | config |')
    print('|---|---|---:|---:|---:|---:|---|')
    for t in torch_rows:
      cfg = (f"{'compile' if t['compiled'] else 'eager'}, AMP {t['amp']}"
             f"{', channels_last' if t['channels_last'] else ''}, SGD {t['sgd']}")
      print(f"| {t['model']} | {t['method']} | {t['step_ms']:.2f} | {t['images_s']:.1f} | "
            f"{_f(t['mfu'] and 100 * t['mfu'], '.1f')} | {t['first_call_s']:.1f} | {cfg} |")
  print('\n| phase | wall s |')
  print('|---|---:|')
  for k, v in phases.items():
    print(f'| {k} | {v:.1f} |')


def check_targets(rows):
  """The acceptance targets (GPU): ViT-B/32 bf16 full FT >= 40% MFU; ncjax >= 1.0x the
  compiled AMP torch step on every row; Layer FT step <= 0.45x full FT."""
  out = []
  for r in rows:
    if r['model'] == 'vit_b32' and r['dtype'] == 'bfloat16' and r['method'] == 'full' \
        and r['mfu'] is not None:
      out.append(('vit_b32 bf16 full MFU >= 40%', f"{100 * r['mfu']:.1f}%", r['mfu'] >= 0.40))
    if r['vs_torch'] is not None:
      out.append((f"{r['model']} {r['method']} {r['dtype']} ncjax/torch >= 1.0",
                  f"{r['vs_torch']:.2f}", r['vs_torch'] >= 1.0))
    if r['method'] == 'layer' and r['layer_over_full_time'] is not None:
      out.append((f"{r['model']} {r['dtype']} layer/full <= 0.45",
                  f"{r['layer_over_full_time']:.3f}", r['layer_over_full_time'] <= 0.45))
  if out:
    print('\n| target | value | met |')
    print('|---|---:|---|')
    for what, val, ok in out:
      print(f"| {what} | {val} | {'yes' if ok else 'NO'} |")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=None, help='default 256 on GPU/TPU, 8 on CPU')
  ap.add_argument('--size', type=int, default=224)
  ap.add_argument('--reps', type=int, default=5, help='timed windows per row (median)')
  ap.add_argument('--window', type=float, default=0.4, help='seconds per timed window')
  ap.add_argument('--models', default='resnet50,vit_b32')
  ap.add_argument('--dtypes', default='float32,bfloat16')
  ap.add_argument('--methods', default='full,layer')
  ap.add_argument('--no-torch', action='store_true', help='time ncjax only')
  ap.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=None,
                  help='torch.compile the peer (default: on GPU yes, on CPU no)')
  ap.add_argument('--serial', action='store_true',
                  help='run the torch peer before JAX compiles (no overlap of compiles)')
  ap.add_argument('--peak-kind', default=None,
                  help='look the peak up under this name instead of device_kind (e.g. H100)')
  ap.add_argument('--json', default=None, help='write all rows and phases to this path')
  ap.add_argument('--quick', action='store_true', help='CPU smoke run: batch 2, 1 rep')
  a = ap.parse_args(argv)
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  on_cpu = dev.platform == 'cpu'
  if a.quick:
    a.batch, a.reps, a.window = a.batch or 2, 1, 0.0
  a.batch = a.batch or (8 if on_cpu else 256)
  mesh = train.data_mesh()
  train.check_batch_size(a.batch, mesh)
  peak = peak_for(a.peak_kind) if a.peak_kind else None if on_cpu else peak_for(dev.device_kind)
  mode, errs = f32_matmul_mode()
  peak_f32 = None
  if peak:
    peak_f32 = {'fp32': peak[3], 'tf32': peak[2] or peak[3], 'bf16': peak[1]}[mode]
  print(f'# device {dev.device_kind} ({dev.platform}) x{len(mesh.devices.flat)}, jax '
        f'{jax.__version__}, batch {a.batch}, {a.size}x{a.size}, median of {a.reps} windows '
        f'of ~{a.window:g} s after compile + 2 warm-up steps; input N(0,1) in the compute dtype')
  if peak:
    print(f'# peak (dense TFLOP/s, {peak[0]}): bf16 {peak[1]}, f32 rows {peak_f32} '
          f"(f32 dot/conv at DEFAULT precision run as {mode}: rel. err. vs HIGHEST "
          + ', '.join(f'{k} {v:.1e}' for k, v in errs.items()) + ')')
  else:
    print(('# CPU: no MFU' if on_cpu else '# no MFU: peak unknown for this device') +
          f'; f32 dot/conv at DEFAULT precision: {mode} (rel. err. vs HIGHEST '
          + ', '.join(f'{k} {v:.1e}' for k, v in errs.items()) + ')')
  phases = {'start-up (imports, device, precision check)': time.perf_counter() - t_start}

  torch_ok = not a.no_torch and importlib.util.find_spec('torch') is not None
  peers, torch_rows = [], []
  if torch_ok:
    compile_ = a.torch_compile if a.torch_compile is not None else not on_cpu
    # One process per model: their torch.compile runs (Dynamo + AOTAutograd tracing is serial
    # Python) proceed side by side, and beside JAX's compiles.
    peers = [TorchPeers(a, compile_, name) for name in a.models.split(',')]
    if a.serial:
      t = time.perf_counter()
      for p in peers:  # all compiled before any times
        p.wait_ready()
      for p in peers:
        torch_rows += p.run()[0]
      phases['torch: start + compile + timing (serial)'] = time.perf_counter() - t
      peers = []
  elif not a.no_torch:
    print('# torch is not installed: no peer')

  t = time.perf_counter()
  rows, runs, failed = [], [], []
  try:
    for name in a.models.split(','):
      variables = init_params(name, a.size)
      for dtype in a.dtypes.split(','):
        for method in a.methods.split(','):
          try:  # one failed row (e.g. out of memory) must not cost the whole run
            row, run = build_row(name, method, dtype, variables, a.batch, a.size, mesh)
          except Exception as e:  # noqa: BLE001
            failed.append(f'{name} {method} {dtype}: compile: {type(e).__name__}: {e}'[:400])
            print('  FAILED', failed[-1], flush=True)
            continue
          rows.append(row)
          runs.append(run)
          print(f"  compiled {name} {method} {dtype} in {row['compile_s']:.1f} s", flush=True)
      del variables
    phases[f'jax: init + trace + compile ({len(rows)} steps)'] = time.perf_counter() - t
    if peers:
      phases['wait for torch compile (overlapped)'] = sum(p.wait_ready() for p in peers)
      phases['torch: start -> compiled (overlapped with jax)'] = max(p.ready_s for p in peers)
    t = time.perf_counter()
    for row, run in zip(list(rows), runs):
      try:
        dt, n, loss = time_row(run, a.reps, a.window)
      except Exception as e:  # noqa: BLE001
        run.clear()
        rows.remove(row)
        failed.append(f"{row['model']} {row['method']} {row['dtype']}: run: "
                      f"{type(e).__name__}: {e}"[:400])
        print('  FAILED', failed[-1], flush=True)
        continue
      row.update(step_ms=dt * 1e3, images_s=a.batch / dt, steps_per_window=n, loss=loss)
      peak_row = None
      if peak:
        peak_row = peak[1] if row['dtype'] == 'bfloat16' else peak_f32
      row['peak_tflops'] = peak_row
      row['mfu'] = row['flops'] / dt / (peak_row * 1e12) if peak_row else None
      print(f"  timed {row['model']} {row['method']} {row['dtype']}: {dt * 1e3:.2f} ms/step "
            f"({n} steps/window)", flush=True)
    phases['jax: timing'] = time.perf_counter() - t
    if peers:
      t = time.perf_counter()
      for p in peers:  # one at a time: never two frameworks timing on the device at once
        torch_rows += p.run()[0]
      phases['torch: timing'] = time.perf_counter() - t
  finally:
    for p in peers:
      p.kill()
  phases['total'] = time.perf_counter() - t_start
  report(rows, torch_rows, peak, phases)
  for f in failed:
    print(f'\n# FAILED {f}')
  targets = check_targets(rows) if peak else []
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'device': dev.device_kind, 'platform': dev.platform, 'jax': jax.__version__,
                 'peak': peak, 'f32_mode': mode, 'f32_rel_err': errs, 'args': vars(a),
                 'rows': rows, 'torch_rows': torch_rows, 'phases': phases, 'failed': failed,
                 'targets': [dict(target=w, value=v, met=ok) for w, v, ok in targets]},
                f, indent=1, default=float)
    print(f'\n# wrote {a.json}')


if __name__ == '__main__':
  main()
