"""Tests for ncjax.weights: torchvision ResNet and vit_jax ViT import, against independent
references (a torch ResNet written for the tests; a numpy ViT), and the error paths."""
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import models, weights
from ncjax.weights import CheckpointError


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


# ============================================================================ ResNet


@functools.lru_cache(maxsize=None)
def _torch_resnet(name):
  torch = pytest.importorskip('torch')
  from torch_ref import TorchResNet, randomize_
  torch.manual_seed(0)
  return randomize_(TorchResNet(name, num_classes=1000), seed=1)


def _save_all(tmp_path, name, sd=None):
  """Saves the torch reference's state dict as .pth, .safetensors and .npz."""
  import torch
  from safetensors.torch import save_file
  if sd is None:
    sd = _torch_resnet(name).state_dict()
  sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
  paths = {}
  paths['pth'] = tmp_path / f'{name}.pth'
  torch.save(sd, paths['pth'])
  paths['safetensors'] = tmp_path / f'{name}.safetensors'
  save_file(sd, str(paths['safetensors']))
  paths['npz'] = tmp_path / f'{name}.npz'
  np.savez(paths['npz'], **{k: v.numpy() for k, v in sd.items()})
  return paths


def _random_like(shapes, seed=0):
  """Random variables of the given abstract shapes (numpy; much faster than compiling
  `model.init` on CPU). Kernels ~ N(0, 1/fan_in), other leaves small noise."""
  rng = np.random.default_rng(seed)

  def make(s):
    if len(s.shape) >= 2:
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)
    return jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)
  return jax.tree_util.tree_map(make, shapes)


@functools.lru_cache(maxsize=None)
def _fresh(name, num_classes=1000, stem='imagenet'):
  model = models.get(name, num_classes, stem=stem)
  return model, _random_like(models.param_shapes(name, num_classes, 32, stem=stem))


@functools.lru_cache(maxsize=None)
def _jitted(name, num_classes=1000):
  model, _ = _fresh(name, num_classes)

  @jax.jit
  def run(v, x):
    logits, ev = model.apply(v, x, train=False, mutable=['intermediates'])
    logits_tr, tr = model.apply(v, x, train=True, mutable=['intermediates', 'batch_stats'])
    return logits, ev['intermediates'], logits_tr, tr
  return run


def _torch_run(tm, x_nhwc, train):
  import torch
  tm.train(train)
  with torch.no_grad():
    logits, feats, pen = tm(torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2))),
                            return_features=True)
  return logits.numpy(), [f.numpy() for f in feats], pen.numpy()


def _check_resnet(name, variables, x, tol=1e-4):
  import copy
  run = _jitted(name)
  logits, inter, logits_tr, tr = run(variables, jnp.asarray(x))
  tm = copy.deepcopy(_torch_resnet(name))
  units = models.units(name)
  # eval mode: running statistics
  t_logits, t_feats, t_pen = _torch_run(tm, x, train=False)
  assert _rel(logits, t_logits) < tol
  for u, f in zip(units, t_feats):
    assert _rel(inter[u][0], f) < tol, u
  assert _rel(inter['penultimate'][0], t_pen) < tol
  # train mode: batch statistics, and the updated running statistics
  t_logits, t_feats, _ = _torch_run(tm, x, train=True)
  assert _rel(logits_tr, t_logits) < tol
  for u, f in zip(units, t_feats):
    assert _rel(tr['intermediates'][u][0], f) < tol, u
  sd = tm.state_dict()
  from flax import traverse_util
  flat = traverse_util.flatten_dict({'batch_stats': tr['batch_stats']})
  assert len(flat) == sum(k.endswith('running_var') for k in sd) * 2
  for path, (key, _) in weights.torchvision_key_map(name, flat).items():
    assert _rel(flat[path], sd[key].numpy()) < tol, key


@pytest.fixture(scope='module')
def r18_paths(tmp_path_factory):
  pytest.importorskip('torch')
  return _save_all(tmp_path_factory.mktemp('r18'), 'resnet18')


def test_formats_load_identically(r18_paths):
  _, fresh = _fresh('resnet18')
  loaded = {fmt: weights.load(p, 'resnet18', fresh) for fmt, p in r18_paths.items()}
  ref = jax.tree_util.tree_leaves(loaded['pth'])
  for fmt in ('safetensors', 'npz'):
    for a, b in zip(ref, jax.tree_util.tree_leaves(loaded[fmt])):
      np.testing.assert_array_equal(a, b)
  sd = _torch_resnet('resnet18').state_dict()
  v = loaded['pth']
  np.testing.assert_array_equal(v['params']['stem']['conv']['kernel'],
                                np.transpose(sd['conv1.weight'].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(v['params']['block3']['downsample_conv']['kernel'],
                                np.transpose(sd['layer2.0.downsample.0.weight'].numpy(),
                                             (2, 3, 1, 0)))
  np.testing.assert_array_equal(v['batch_stats']['block8']['bn2']['var'],
                                sd['layer4.1.bn2.running_var'].numpy())
  # Without keep_head the fresh head is kept.
  np.testing.assert_array_equal(v['params']['head']['kernel'], fresh['params']['head']['kernel'])


@pytest.mark.parametrize('size', [224, 97])
def test_resnet18_matches_torch(r18_paths, size):
  _, fresh = _fresh('resnet18')
  v = weights.load(r18_paths['safetensors'], 'resnet18', fresh, keep_head=True)
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  _check_resnet('resnet18', v, x)


def test_resnet50_matches_torch(tmp_path):
  pytest.importorskip('torch')
  paths = _save_all(tmp_path, 'resnet50')
  _, fresh = _fresh('resnet50')
  v = weights.load(paths['pth'], 'resnet50', fresh, keep_head=True)
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  _check_resnet('resnet50', v, x)


def test_head_handling(r18_paths):
  _, fresh10 = _fresh('resnet18', 10)
  with pytest.warns(UserWarning, match='fresh head'):
    v = weights.load(r18_paths['npz'], 'resnet18', fresh10, keep_head=True)
  np.testing.assert_array_equal(v['params']['head']['kernel'], fresh10['params']['head']['kernel'])
  v, skipped = weights.load(r18_paths['npz'], 'resnet18', fresh10, strict=False)
  assert skipped == []
  _, fresh = _fresh('resnet18')
  v = weights.load(r18_paths['npz'], 'resnet18', fresh, keep_head=True)
  sd = _torch_resnet('resnet18').state_dict()
  np.testing.assert_array_equal(v['params']['head']['kernel'], sd['fc.weight'].numpy().T)


# ----------------------------------------------------------------------------- bad checkpoints


def _modified(tmp_path, fn, suffix='safetensors'):
  sd = dict(_torch_resnet('resnet18').state_dict())
  fn(sd)
  return _save_all(tmp_path, 'resnet18', sd)[suffix]


def test_missing_key(tmp_path):
  pytest.importorskip('torch')
  p = _modified(tmp_path, lambda sd: sd.pop('layer1.0.conv1.weight'))
  _, fresh = _fresh('resnet18')
  with pytest.raises(CheckpointError, match=r"missing key 'layer1\.0\.conv1\.weight'"):
    weights.load(p, 'resnet18', fresh)
  v, skipped = weights.load(p, 'resnet18', fresh, strict=False)
  assert skipped == ['layer1.0.conv1.weight (missing)']
  np.testing.assert_array_equal(v['params']['block1']['conv1']['kernel'],
                                fresh['params']['block1']['conv1']['kernel'])


def test_unexpected_key(tmp_path):
  torch = pytest.importorskip('torch')
  p = _modified(tmp_path, lambda sd: sd.update({'extra.weight': torch.ones(3, 4)}), 'pth')
  _, fresh = _fresh('resnet18')
  with pytest.raises(CheckpointError, match=r"unexpected key 'extra\.weight'"):
    weights.load(p, 'resnet18', fresh)
  _, skipped = weights.load(p, 'resnet18', fresh, strict=False)
  assert skipped == ['extra.weight (unexpected)']


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  torch = pytest.importorskip('torch')
  p = _modified(tmp_path, lambda sd: sd.update({'layer2.0.conv1.weight': torch.ones(128, 64, 5, 5)}),
                'npz')
  _, fresh = _fresh('resnet18')
  with pytest.raises(CheckpointError) as e:
    weights.load(p, 'resnet18', fresh)
  msg = str(e.value)
  assert 'layer2.0.conv1.weight' in msg and '(128, 64, 5, 5)' in msg and '(128, 64, 3, 3)' in msg
  _, skipped = weights.load(p, 'resnet18', fresh, strict=False)
  assert skipped == ['layer2.0.conv1.weight (shape (128, 64, 5, 5) != (128, 64, 3, 3))']


def test_cifar_stem_against_imagenet_checkpoint(r18_paths):
  _, fresh = _fresh('resnet18', 10, 'cifar')
  with pytest.raises(CheckpointError, match=r"conv1\.weight.*\(64, 3, 7, 7\).*\(64, 3, 3, 3\)"):
    weights.load(r18_paths['safetensors'], 'resnet18', fresh)
  v, skipped = weights.load(r18_paths['safetensors'], 'resnet18', fresh, strict=False)
  assert skipped == ['conv1.weight (shape (64, 3, 7, 7) != (64, 3, 3, 3))']


@pytest.mark.parametrize('suffix', ['pth', 'safetensors', 'npz'])
def test_not_a_checkpoint(tmp_path, suffix):
  if suffix == 'pth':
    pytest.importorskip('torch')
  p = tmp_path / f'notes.{suffix}'
  p.write_text('this is not a checkpoint\n' * 10)
  _, fresh = _fresh('resnet18')
  with pytest.raises(CheckpointError, match='notes.*not a readable checkpoint'):
    weights.load(p, 'resnet18', fresh)


@pytest.mark.parametrize('suffix', ['pth', 'npz'])
def test_truncated_zip(r18_paths, tmp_path, suffix):
  data = open(r18_paths[suffix], 'rb').read()
  p = tmp_path / f'trunc.{suffix}'
  p.write_bytes(data[: len(data) // 2])
  _, fresh = _fresh('resnet18')
  with pytest.raises(CheckpointError, match='trunc'):
    weights.load(p, 'resnet18', fresh)


def test_missing_file(tmp_path):
  _, fresh = _fresh('resnet18')
  with pytest.raises(FileNotFoundError, match='resnet18-f37072fd.pth'):
    weights.load(tmp_path / 'resnet18.pth', 'resnet18', fresh)
  with pytest.raises(FileNotFoundError, match='ViT-B_32.npz'):
    weights.load(tmp_path / 'ViT-B_32.npz', 'vit_b32', {'params': {}})


def test_pth_without_torch(r18_paths, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  _, fresh = _fresh('resnet18')
  with pytest.raises(ImportError, match='needs PyTorch'):
    weights.load(r18_paths['pth'], 'resnet18', fresh)


# ============================================================================ ViT


def _vit_jax_checkpoint(d=192, layers=12, heads=3, mlp=768, patch=16, grid=14, classes=21843,
                        pre_logits=False, seed=0):
  """A random checkpoint in vit_jax's flat .npz layout (ViT-Ti/16 shape by default)."""
  rng = np.random.default_rng(seed)
  r = lambda *s, scale=0.05: (rng.normal(size=s) * scale).astype(np.float32)
  hd = d // heads
  ck = {'embedding/kernel': r(patch, patch, 3, d), 'embedding/bias': r(d),
        'cls': r(1, 1, d, scale=0.5),
        'Transformer/posembed_input/pos_embedding': r(1, 1 + grid * grid, d, scale=0.5),
        'Transformer/encoder_norm/scale': 1 + r(d, scale=0.1),
        'Transformer/encoder_norm/bias': r(d),
        'head/kernel': np.zeros((d, classes), np.float32),
        'head/bias': np.zeros((classes,), np.float32)}
  for i in range(layers):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      ck[b + ln + '/scale'] = 1 + r(d, scale=0.1)
      ck[b + ln + '/bias'] = r(d)
    a = b + 'MultiHeadDotProductAttention_1/'
    for q in ('query', 'key', 'value'):
      ck[a + q + '/kernel'] = r(d, heads, hd, scale=1 / math.sqrt(d))
      ck[a + q + '/bias'] = r(heads, hd)
    ck[a + 'out/kernel'] = r(heads, hd, d, scale=1 / math.sqrt(d))
    ck[a + 'out/bias'] = r(d)
    ck[b + 'MlpBlock_3/Dense_0/kernel'] = r(d, mlp, scale=1 / math.sqrt(d))
    ck[b + 'MlpBlock_3/Dense_0/bias'] = r(mlp)
    ck[b + 'MlpBlock_3/Dense_1/kernel'] = r(mlp, d, scale=1 / math.sqrt(mlp))
    ck[b + 'MlpBlock_3/Dense_1/bias'] = r(d)
  if pre_logits:
    ck['pre_logits/kernel'] = r(d, d, scale=1 / math.sqrt(d))
    ck['pre_logits/bias'] = r(d)
  return ck


def _np_vit(ck, x, pos, layers=12, head=None):
  """Independent float64 numpy ViT forward (vit_jax semantics). Returns (logits, cls per
  layer, penultimate)."""
  f = lambda k: np.asarray(ck[k], np.float64)
  kern = f('embedding/kernel')
  p, d = kern.shape[0], kern.shape[-1]
  n, h, w, c = x.shape
  g = h // p
  patches = x.astype(np.float64).reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
  t = patches.reshape(n, g * g, p * p * c) @ kern.reshape(p * p * c, d) + f('embedding/bias')
  t = np.concatenate([np.broadcast_to(f('cls'), (n, 1, d)), t], axis=1) + pos

  def ln(z, pre):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * f(pre + '/scale') + f(pre + '/bias')

  def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

  cls_tokens = []
  for i in range(layers):
    b = f'Transformer/encoderblock_{i}/'
    a = b + 'MultiHeadDotProductAttention_1/'
    y = ln(t, b + 'LayerNorm_0')
    q, k, v = (np.einsum('ntd,dhk->nthk', y, f(a + s + '/kernel')) + f(a + s + '/bias')
               for s in ('query', 'key', 'value'))
    logit = np.einsum('nqhk,nshk->nhqs', q, k) / np.sqrt(q.shape[-1])
    logit -= logit.max(-1, keepdims=True)
    att = np.exp(logit)
    att /= att.sum(-1, keepdims=True)
    o = np.einsum('nhqs,nshk->nqhk', att, v)
    t = t + np.einsum('nqhk,hkd->nqd', o, f(a + 'out/kernel')) + f(a + 'out/bias')
    y = ln(t, b + 'LayerNorm_2')
    y = gelu(y @ f(b + 'MlpBlock_3/Dense_0/kernel') + f(b + 'MlpBlock_3/Dense_0/bias'))
    t = t + y @ f(b + 'MlpBlock_3/Dense_1/kernel') + f(b + 'MlpBlock_3/Dense_1/bias')
    cls_tokens.append(t[:, 0])
  pen = ln(t, 'Transformer/encoder_norm')[:, 0]
  logits = None if head is None else pen @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  return logits, cls_tokens, pen


@pytest.fixture(scope='module')
def vit_ckpt(tmp_path_factory):
  ck = _vit_jax_checkpoint()
  p = tmp_path_factory.mktemp('vit') / 'ViT-Ti_16.npz'
  np.savez(p, **ck)
  return ck, p


def _vit_fresh(size, num_classes=10, **opts):
  model = models.get('vit_ti16', num_classes, **opts)
  return model, _random_like(models.param_shapes('vit_ti16', num_classes, size, **opts))


def _zoom_reference(pe, g):
  """Reference position-embedding resize (vit_jax: scipy.ndimage.zoom, order=1)."""
  scipy_ndimage = pytest.importorskip('scipy.ndimage')
  g0 = int(math.isqrt(pe.shape[1] - 1))
  grid = pe[0, 1:].reshape(g0, g0, -1).astype(np.float64)
  grid = scipy_ndimage.zoom(grid, (g / g0, g / g0, 1), order=1)
  return np.concatenate([pe[:, :1].astype(np.float64), grid.reshape(1, g * g, -1)], axis=1)


@pytest.mark.parametrize('size', [224, 384])
def test_vit_matches_numpy_reference(vit_ckpt, size):
  ck, path = vit_ckpt
  model, fresh = _vit_fresh(size)
  v = weights.load(path, 'vit_ti16', fresh)
  # fresh head (the raw head has 21843 classes, the model 10)
  np.testing.assert_array_equal(v['params']['head']['kernel'], fresh['params']['head']['kernel'])
  head = {'kernel': np.asarray(jax.random.normal(jax.random.key(5), (192, 10))) * 0.1,
          'bias': np.linspace(-1, 1, 10).astype(np.float32)}
  v['params']['head'] = jax.tree_util.tree_map(jnp.asarray, head)
  pe_src = ck['Transformer/posembed_input/pos_embedding']
  pe = v['params']['pos_embedding']
  g = size // 16
  assert pe.shape == (1, 1 + g * g, 192)
  np.testing.assert_array_equal(pe[:, 0], pe_src[:, 0])  # class slot kept
  pos = pe_src.astype(np.float64) if size == 224 else _zoom_reference(pe_src, g)
  np.testing.assert_allclose(pe, pos, rtol=1e-5, atol=1e-6)
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  logits, cls_tokens, pen = _np_vit(ck, x, pos, head=head)

  @jax.jit
  def run(v, x):
    return model.apply(v, x, train=False, mutable=['intermediates'])
  out, st = run(v, jnp.asarray(x))
  inter = st['intermediates']
  assert _rel(out, logits) < 1e-4
  assert _rel(inter['penultimate'][0], pen) < 1e-4
  for i, c in enumerate(cls_tokens):
    assert _rel(inter[f'layer{i + 1}'][0], c) < 1e-4, i


def test_vit_pre_logits_and_errors(tmp_path, vit_ckpt):
  ck, path = vit_ckpt
  ck2 = dict(ck, **{'pre_logits/kernel': np.ones((192, 192), np.float32),
                    'pre_logits/bias': np.ones((192,), np.float32)})
  p2 = tmp_path / 'with_pre_logits.npz'
  np.savez(p2, **ck2)
  _, fresh = _vit_fresh(32)
  weights.load(p2, 'vit_ti16', fresh)  # strict: dropping pre_logits is not an error
  _, skipped = weights.load(p2, 'vit_ti16', fresh, strict=False)
  assert sorted(skipped) == ['pre_logits/bias (the model has no pre_logits)',
                             'pre_logits/kernel (the model has no pre_logits)']
  _, fresh_rep = _vit_fresh(32, representation_size=192)
  v = weights.load(p2, 'vit_ti16', fresh_rep)
  np.testing.assert_array_equal(v['params']['pre_logits']['kernel'], ck2['pre_logits/kernel'])
  with pytest.raises(CheckpointError, match=r"missing key 'pre_logits/kernel'"):
    weights.load(path, 'vit_ti16', fresh_rep)
  # keep_head with a matching head
  _, fresh_21k = _vit_fresh(32, num_classes=21843)
  v = weights.load(path, 'vit_ti16', fresh_21k, keep_head=True)
  assert not np.any(np.asarray(v['params']['head']['kernel']))
  # wrong shape and missing key
  bad = dict(ck)
  k = 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel'
  bad[k] = np.zeros((192, 700), np.float32)
  del bad['Transformer/encoderblock_5/LayerNorm_2/scale']
  p3 = tmp_path / 'bad.npz'
  np.savez(p3, **bad)
  with pytest.raises(CheckpointError) as e:
    weights.load(p3, 'vit_ti16', fresh)
  msg = str(e.value)
  assert k in msg and '(192, 700)' in msg and '(192, 768)' in msg
  assert "missing key 'Transformer/encoderblock_5/LayerNorm_2/scale'" in msg
  _, skipped = weights.load(p3, 'vit_ti16', fresh, strict=False)
  assert sorted(skipped) == sorted([f'{k} (shape (192, 700) != (192, 768))',
                                    'Transformer/encoderblock_5/LayerNorm_2/scale (missing)'])
  (tmp_path / 'x.pth').write_text('x')
  with pytest.raises(CheckpointError, match='suffix'):
    weights.load(tmp_path / 'x.pth', 'vit_ti16', fresh)
  (tmp_path / 'notes.npz').write_text('not a checkpoint')
  with pytest.raises(CheckpointError, match='not a readable checkpoint'):
    weights.load(tmp_path / 'notes.npz', 'vit_ti16', fresh)
  with pytest.raises(ValueError, match='no weight importer'):
    weights.load(path, 'mlp', fresh)


def test_resize_pos_embedding_matches_scipy_zoom():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 5)).astype(np.float32)
  for g in (12, 4, 7):
    np.testing.assert_allclose(weights.resize_pos_embedding(pe, 1 + g * g), _zoom_reference(pe, g),
                               rtol=1e-5, atol=1e-6)
