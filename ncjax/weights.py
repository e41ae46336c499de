"""Import pre-trained weights into ncjax models.

`load(path, name, variables, *, keep_head=False, strict=True)`:

* ResNets (`resnet18/34/50`): a torchvision state dict in `.safetensors`, `.npz` (flat,
  torch key names, torch layouts) or `.pth`/`.pt` (needs torch, imported lazily).
  Conv kernels OIHW -> HWIO; BatchNorm `weight, bias, running_mean, running_var` ->
  params `scale, bias` and batch_stats `mean, var` (`num_batches_tracked` ignored);
  `fc` -> `head` only with `keep_head=True` and a matching shape (else the fresh head of
  `variables` is kept, with a warning when `keep_head=True`). A `module.` prefix
  (DataParallel) is stripped; `{'state_dict': ...}` / `{'model': ...}` wrappers are opened.
* ViTs (`vit_*`): a vit_jax `.npz` (flat, '/'-joined Flax paths). `Transformer/
  encoderblock_{i-1}` -> `layer{i}`, `Transformer/posembed_input/pos_embedding` ->
  `pos_embedding`, `Transformer/encoder_norm` -> `encoder_norm`. The position embedding is
  resized to the grid of `variables` (class slot kept; the g0 x g0 grid resized linearly
  with corner alignment, i.e. the same values as vit_jax's `scipy.ndimage.zoom(order=1)`,
  implemented in numpy). The head is replaced by the fresh one unless `keep_head=True`
  and the shapes match. `pre_logits` is loaded when the model has it (representation_size
  set); when the model has none, a checkpoint's `pre_logits` is dropped and reported in
  `skipped` -- also under `strict=True`, where it is *not* an error (the standard
  fine-tuning recipe drops it).

Strict mode (default): a missing key, an unexpected key or a shape mismatch raises
`CheckpointError` (a ValueError) naming the key and both shapes; a file that is not a
readable checkpoint raises `CheckpointError` naming the file and the expected format.
`strict=False` keeps the fresh values for whatever could not be loaded and returns
`(variables, skipped)`, `skipped` a list of `'<checkpoint key> (<reason>)'` strings.
A missing file raises FileNotFoundError saying where such weights come from.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from ncjax.models.resnet import CONFIGS as RESNET_CONFIGS

__all__ = ['CheckpointError', 'load', 'read_checkpoint', 'resize_pos_embedding',
           'torchvision_key_map', 'vit_key_map']

log = logging.getLogger(__name__)

_SOURCES = {
    'resnet': ('torchvision ResNet state dicts come from the torchvision model zoo, e.g. '
               'https://download.pytorch.org/models/resnet18-f37072fd.pth (resnet34-b627a593.pth, '
               'resnet50-11ad3fa6.pth / resnet50-0676ba61.pth); expected a .pth, .safetensors or '
               '.npz file holding a flat state dict (conv1.weight, bn1.*, layer1.0.conv1.weight, '
               '..., fc.weight).'),
    'vit': ('vit_jax checkpoints come from google-research/vision_transformer, e.g. '
            'gs://vit_models/imagenet21k/ViT-B_32.npz; expected a flat .npz whose keys are '
            "'/'-joined Flax paths (embedding/kernel, cls, Transformer/posembed_input/"
            'pos_embedding, Transformer/encoderblock_0/..., head/kernel).'),
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded into the target variables."""


# ----------------------------------------------------------------------------- reading


def _family(name: str) -> str:
  if name in RESNET_CONFIGS:
    return 'resnet'
  if name.startswith('vit_'):
    return 'vit'
  raise ValueError(f'no weight importer for model {name!r}; supported: '
                   f'{", ".join(RESNET_CONFIGS)}, vit_* (vit_b32, vit_b16, vit_s16, vit_ti16)')


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise CheckpointError(f'{path}: a single .npy array, not an .npz archive')
    return {k: np.asarray(f[k]) for k in f.files}


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return dict(load_file(path))


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch, which is not an ncjax dependency; install torch, '
        'or convert the state dict to .safetensors / .npz first') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path}: expected a state dict, got {type(obj).__name__}')
  out = {}
  for k, v in obj.items():
    if not torch.is_tensor(v):
      raise CheckpointError(f'{path}: entry {k!r} is a {type(v).__name__}, not a tensor')
    v = v.detach().cpu()
    if v.dtype in (torch.bfloat16, torch.float16):
      v = v.float()
    out[k] = v.numpy()
  return out


def read_checkpoint(path, family: str) -> Dict[str, np.ndarray]:
  """Reads a flat checkpoint into `{key: numpy array}`, dispatching on the suffix."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path!r}. {_SOURCES[family]}')
  suffix = os.path.splitext(path)[1].lower()
  readers = {'.npz': _read_npz, '.safetensors': _read_safetensors,
             '.pth': _read_torch, '.pt': _read_torch, '.bin': _read_torch}
  if family == 'vit' and suffix != '.npz':
    raise CheckpointError(f'{path}: unsupported suffix {suffix!r} for a ViT. {_SOURCES[family]}')
  if suffix not in readers:
    raise CheckpointError(f'{path}: unsupported suffix {suffix!r}. {_SOURCES[family]}')
  try:
    flat = readers[suffix](path)
  except (CheckpointError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except  # BadZipFile, EOFError, pickle errors, ...
    raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}). '
                          f'{_SOURCES[family]}') from e
  if not flat:
    raise CheckpointError(f'{path}: the checkpoint is empty. {_SOURCES[family]}')
  return flat


# ----------------------------------------------------------------------------- key maps

_BN_PARAM = {'scale': 'weight', 'bias': 'bias'}
_BN_STAT = {'mean': 'running_mean', 'var': 'running_var'}


def _oihw_to_hwio(a):
  return np.transpose(a, (2, 3, 1, 0))


def _transpose2(a):
  return np.transpose(a, (1, 0))


def _torch_module(name: str, top: str, mod: str) -> str:
  """ncjax (top-level, module) -> torchvision module path."""
  if top == 'stem':
    return {'conv': 'conv1', 'bn': 'bn1'}[mod]
  stages, _ = RESNET_CONFIGS[name]
  i = int(top[len('block'):]) - 1
  s = 0
  while i >= stages[s]:
    i -= stages[s]
    s += 1
  prefix = f'layer{s + 1}.{i}'
  sub = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(mod, mod)
  return f'{prefix}.{sub}'


def torchvision_key_map(name: str, flat_vars: Dict[Tuple[str, ...], Any]):
  """{ncjax flat path: (torch key, transform)} for every leaf of the target variables."""
  out = {}
  for path in flat_vars:
    col, top = path[0], path[1]
    leaf = path[-1]
    if top == 'head':
      out[path] = ('fc.weight', _transpose2) if leaf == 'kernel' else ('fc.bias', None)
      continue
    mod = _torch_module(name, top, path[2])
    if col == 'params':
      if leaf == 'kernel':
        out[path] = (f'{mod}.weight', _oihw_to_hwio)
      else:
        out[path] = (f'{mod}.{_BN_PARAM[leaf]}', None)
    elif col == 'batch_stats':
      out[path] = (f'{mod}.{_BN_STAT[leaf]}', None)
    else:
      raise CheckpointError(f'unexpected variable collection {col!r} in the target variables')
  return out


def vit_key_map(flat_vars: Dict[Tuple[str, ...], Any]):
  """{ncjax flat path: vit_jax key} for every leaf of the target params."""
  out = {}
  for path in flat_vars:
    col, top, rest = path[0], path[1], list(path[2:])
    if col != 'params':
      raise CheckpointError(f'unexpected variable collection {col!r} for a ViT')
    if top.startswith('layer'):
      key = ['Transformer', f'encoderblock_{int(top[5:]) - 1}'] + rest
    elif top == 'pos_embedding':
      key = ['Transformer', 'posembed_input', 'pos_embedding']
    elif top == 'encoder_norm':
      key = ['Transformer', 'encoder_norm'] + rest
    else:
      key = [top] + rest
    out[path] = '/'.join(key)
  return out


# ----------------------------------------------------------------------------- resize


def _linear_resize_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  """Linear interpolation along `axis`, corners aligned (scipy.ndimage.zoom order=1)."""
  n_in = a.shape[axis]
  if n_in == n_out:
    return a
  if n_out == 1 or n_in == 1:
    idx = np.zeros(n_out, np.int64)
    return np.take(a, idx, axis=axis)
  pos = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
  frac = (pos - lo)
  shape = [1] * a.ndim
  shape[axis] = n_out
  frac = frac.reshape(shape)
  a64 = a.astype(np.float64)
  return (np.take(a64, lo, axis=axis) * (1 - frac) + np.take(a64, lo + 1, axis=axis) * frac)


def resize_pos_embedding(pe: np.ndarray, num_tokens: int) -> np.ndarray:
  """(1, 1 + g0*g0, D) -> (1, num_tokens, D): class slot kept, grid resized linearly."""
  pe = np.asarray(pe)
  if pe.shape[1] == num_tokens:
    return pe
  g0 = math.isqrt(pe.shape[1] - 1)
  g = math.isqrt(num_tokens - 1)
  if g0 * g0 != pe.shape[1] - 1 or g * g != num_tokens - 1:
    raise CheckpointError(
        f'cannot resize a position embedding of {pe.shape[1]} tokens to {num_tokens} tokens: '
        'both must be 1 + a square grid')
  cls, grid = pe[:, :1], pe[0, 1:].reshape(g0, g0, -1)
  grid = _linear_resize_axis(_linear_resize_axis(grid, g, 0), g, 1)
  return np.concatenate([cls, grid.reshape(1, g * g, -1).astype(pe.dtype)], axis=1)


# ----------------------------------------------------------------------------- load


def load(path, name: str, variables, *, keep_head: bool = False, strict: bool = True):
  """Loads a checkpoint into (a copy of) `variables`; see the module docstring."""
  family = _family(name)
  ckpt = read_checkpoint(path, family)
  variables = unfreeze(variables)
  flat_vars = traverse_util.flatten_dict(
      {k: v for k, v in variables.items() if k in ('params', 'batch_stats')})
  skipped: List[str] = []
  errors: List[str] = []
  new_flat = dict(flat_vars)
  used = set()

  if family == 'resnet':
    ckpt = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in ckpt.items()}
    for k in list(ckpt):
      if k.endswith('num_batches_tracked'):
        used.add(k)
    keymap = {p: kt for p, kt in torchvision_key_map(name, flat_vars).items()}
    head_keys = {'fc.weight', 'fc.bias'}
  else:
    ckpt = {(k[len('params/'):] if k.startswith('params/') else k): v for k, v in ckpt.items()}
    keymap = {p: (k, None) for p, k in vit_key_map(flat_vars).items()}
    head_keys = {'head/kernel', 'head/bias'}

  # The head: kept only on request and when every head leaf fits.
  head_paths = [p for p in flat_vars if p[1] == 'head']
  use_head = keep_head
  if keep_head:
    for p in head_paths:
      k, fn = keymap[p]
      arr = ckpt.get(k)
      want = flat_vars[p].shape
      got = None if arr is None else (fn(arr) if fn else arr).shape
      if got != tuple(want):
        use_head = False
        msg = (f'keep_head=True but the checkpoint head {k!r} has shape {got}, the model '
               f'expects {tuple(want)}; keeping the fresh head')
        warnings.warn(msg)
        skipped.append(f'{k} (head shape {got} != {tuple(want)})')
  used.update(k for k in head_keys if k in ckpt)

  def mismatch(k, got, want_model, want_ckpt, p):
    if strict:
      extra = '' if want_ckpt == want_model else f' (= {want_model} in the ncjax layout)'
      errors.append(f'shape mismatch for {k!r}: checkpoint has {tuple(got)}, the model '
                    f'expects {want_ckpt}{extra} (target {"/".join(p)})')
    skipped.append(f'{k} (shape {tuple(got)} != {want_ckpt})')

  for p, (k, fn) in keymap.items():
    if p[1] == 'head' and not use_head:
      continue
    want = tuple(flat_vars[p].shape)
    want_ckpt = want
    if fn is _oihw_to_hwio:
      want_ckpt = (want[3], want[2], want[0], want[1])
    elif fn is _transpose2:
      want_ckpt = (want[1], want[0])
    if k not in ckpt:
      if strict:
        errors.append(f'missing key {k!r} (model expects shape {want_ckpt}, target '
                      f'{"/".join(p)})')
      skipped.append(f'{k} (missing)')
      continue
    used.add(k)
    arr = ckpt[k]
    if family == 'vit' and p[1] == 'pos_embedding' and arr.shape != want:
      if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] == want[2]:
        try:
          arr = resize_pos_embedding(arr, want[1])
        except CheckpointError as e:
          if strict:
            errors.append(f'{k!r}: {e}')
          skipped.append(f'{k} ({e})')
          continue
    if tuple(arr.shape) != want_ckpt:
      mismatch(k, arr.shape, want, want_ckpt, p)
      continue
    if fn is not None:
      arr = fn(arr)
    new_flat[p] = jnp.asarray(arr, dtype=flat_vars[p].dtype)

  for k in sorted(set(ckpt) - used):
    if family == 'vit' and k.startswith('pre_logits/'):
      skipped.append(f'{k} (the model has no pre_logits)')
      log.info('dropping %s: the model has no pre_logits', k)
      continue
    if strict:
      errors.append(f'unexpected key {k!r} (shape {tuple(ckpt[k].shape)}) in {os.fspath(path)}')
    skipped.append(f'{k} (unexpected)')
  if errors:
    shown = errors[:20] + ([f'... and {len(errors) - 20} more'] if len(errors) > 20 else [])
    raise CheckpointError(f'cannot load {os.fspath(path)} into {name}: ' + '; '.join(shown))

  out = dict(variables)
  loaded = traverse_util.unflatten_dict(new_flat)
  for col in loaded:
    out[col] = loaded[col]
  return out if strict else (out, skipped)
