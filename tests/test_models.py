"""Tests for ncjax.models: structure, parameter accounting, features, SCL, BatchNorm."""
import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import models
from ncjax.models.common import BatchNorm
from ncjax.models.resnet import max_pool_torch


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032),
    ('resnet101', 44_549_160), ('resnet152', 60_192_808), ('densenet121', 7_978_856),
    ('densenet161', 28_681_000), ('densenet169', 14_149_480),
    ('densenet201', 20_013_928), ('mobilenet_v2', 3_504_872)])
def test_param_counts_match_torchvision(name, expected):
  params = models.param_shapes(name, 1000)['params']
  assert models.count_params(params) == expected


def test_vit_b32_backbone_param_count():
  params = models.param_shapes('vit_b32', 1000, 224)['params']
  backbone = {k: v for k, v in params.items() if k not in ('head', 'pre_logits')}
  assert models.count_params(backbone) == 87_455_232
  assert params['pos_embedding'].shape == (1, 50, 768)
  p384 = models.param_shapes('vit_b32', 10, 384)['params']
  assert p384['pos_embedding'].shape == (1, 145, 768)
  qkv = params['layer1']['MultiHeadDotProductAttention_1']
  assert qkv['query']['kernel'].shape == (768, 12, 64)
  assert qkv['query']['bias'].shape == (12, 64)
  assert qkv['out']['kernel'].shape == (12, 64, 768)
  rep = models.param_shapes('vit_b32', 10, 224, representation_size=768)['params']
  assert rep['pre_logits']['kernel'].shape == (768, 768)


@pytest.mark.parametrize('name,n,prefix', [
    ('resnet18', 8, 'block'), ('resnet34', 16, 'block'), ('resnet50', 16, 'block'),
    ('vit_b32', 12, 'layer'), ('vit_b16', 12, 'layer'), ('vit_s16', 12, 'layer'),
    ('vit_ti16', 12, 'layer'), ('mlp', 9, 'layer'), ('convnet4', 4, 'block'),
    ('resnet12', 4, 'block'), ('densenet121', 4, 'denseblock'), ('mobilenet_v2', 18, 'block')])
def test_units_are_top_level(name, n, prefix):
  us = models.units(name)
  assert us == tuple(f'{prefix}{i}' for i in range(1, n + 1))
  size = 28 if name == 'mlp' else 32
  params = models.param_shapes(name, 5, size)['params']
  assert set(us) <= set(params) and 'head' in params
  assert params['head']['kernel'].shape[-1] == 5


def test_mlp_options():
  assert models.units('mlp', depth=3) == ('layer1', 'layer2', 'layer3')
  p = models.param_shapes('mlp', 10, 28, channels=1, depth=3, width=32, batch_norm=True)
  assert p['params']['layer1']['dense']['kernel'].shape == (784, 32)
  assert 'bn' in p['batch_stats']['layer2']


# Table 3 of the paper (REFERENCE §3): percentage of parameters fine-tuned.
TABLE3 = [
    ('resnet18', 'layer', 'block5', 10, 224, 8.27), ('resnet18', 'layer', 'block5', 100, 224, 8.64),
    ('resnet18', 'layer', 'block5', 47, 224, 8.42), ('resnet18', 'layer', 'block5', 37, 224, 8.38),
    ('resnet18', 'linear', None, 10, 224, 0.05), ('resnet18', 'linear', None, 100, 224, 0.46),
    ('resnet18', 'linear', None, 47, 224, 0.22), ('resnet18', 'linear', None, 37, 224, 0.17),
    ('resnet50', 'layer', 'block8', 10, 224, 6.52), ('resnet50', 'layer', 'block8', 100, 224, 7.24),
    ('resnet50', 'layer', 'block8', 47, 224, 6.82), ('resnet50', 'layer', 'block8', 37, 224, 6.73),
    ('resnet50', 'linear', None, 10, 224, 0.09), ('resnet50', 'linear', None, 100, 224, 0.86),
    ('resnet50', 'linear', None, 47, 224, 0.41), ('resnet50', 'linear', None, 37, 224, 0.32),
    ('vit_b32', 'layer', 'layer8', 100, 384, 8.18), ('vit_b32', 'layer', 'layer8', 47, 384, 8.14),
    ('vit_b32', 'layer', 'layer8', 37, 384, 8.13), ('vit_b32', 'linear', None, 100, 384, 0.09),
    ('vit_b32', 'linear', None, 47, 384, 0.04), ('vit_b32', 'linear', None, 37, 384, 0.03),
    ('vit_b32', 'scl', 'layer8', 100, 384, 8.18), ('resnet18', 'scl', 'block5', 10, 224, 8.27),
]


@pytest.mark.parametrize('name,method,unit,k,size,expected', TABLE3)
def test_finetune_percent_table3(name, method, unit, k, size, expected):
  assert round(models.finetune_percent(name, method, unit, k, image_size=size), 2) == expected


def test_finetune_percent_full_and_errors():
  assert models.finetune_percent('resnet18', 'full', None, 10) == 100.0
  # ViT-B/32 at 224 has 95 fewer position embeddings (REFERENCE §3).
  assert round(models.finetune_percent('vit_b32', 'layer', 'layer8', 100, 224), 2) == 8.19
  with pytest.raises(ValueError, match='unknown fine-tuning method'):
    models.finetune_percent('resnet18', 'partial', 'block5', 10)
  with pytest.raises(ValueError, match='block8'):
    models.finetune_percent('resnet18', 'layer', 'block9', 10)


def test_registry_errors():
  with pytest.raises(ValueError, match='resnet18'):
    models.get('resnet19', 10)
  with pytest.raises(ValueError, match='block1, block2'):
    models.get('resnet18', 10, scl_unit='layer3')
  with pytest.raises(ValueError, match='layer12'):
    models.get('vit_b32', 10, scl_unit='block1')
  with pytest.raises(ValueError, match='unknown option'):
    models.get('resnet18', 10, pool='cls')
  with pytest.raises(ValueError, match='unknown option'):
    models.get('densenet121', 10, stem='cifar')  # torchvision's ImageNet stem only
  with pytest.raises(ValueError, match='denseblock1, denseblock2'):
    models.get('densenet121', 10, scl_unit='block1')
  with pytest.raises(ValueError, match='block18'):
    models.get('mobilenet_v2', 10, scl_unit='block19')


# ----------------------------------------------------------------------------- features / SCL

def random_variables(shapes, seed=0):
  """Random variables of the given abstract shapes, drawn with numpy (compiling
  `model.init` takes ~10 s for a ResNet on this CPU)."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return jnp.asarray(0.5 + rng.random(s.shape), s.dtype)
    if len(s.shape) >= 2:
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return jnp.asarray(0.1 * rng.normal(size=s.shape) + ('scale' in name), s.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope='module')
def small_resnet():
  model = models.get('resnet18', 7, stem='cifar')
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  v = random_variables(models.param_shapes('resnet18', 7, 16, stem='cifar'))
  return model, v, x


def test_features_all_units_under_jit(small_resnet):
  model, v, x = small_resnet
  feats = jax.jit(functools.partial(models.features, model))(v, x)
  assert list(feats) == list(models.units('resnet18')) + ['penultimate']
  widths = [64, 64, 128, 128, 256, 256, 512, 512]
  for u, w in zip(models.units('resnet18'), widths):
    assert feats[u].shape == (2, w)
  assert feats['penultimate'].shape == (2, 512)
  np.testing.assert_allclose(feats['penultimate'], feats['block8'], rtol=1e-6)
  # The apply contract of docs/design.md: a plain apply sows the penultimate feature only
  # (what `pretrain.projected_forward` reads); unit outputs need capture_intermediates.
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(v, x)
  assert set(state['intermediates']) == {'penultimate'}
  np.testing.assert_allclose(state['intermediates']['penultimate'][0], feats['penultimate'],
                             rtol=1e-6)
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                              mutable=['intermediates']))(v, x)
  np.testing.assert_allclose(np.mean(state['intermediates']['block3']['__call__'][0], (1, 2)),
                             feats['block3'], rtol=1e-6)


# ----------------------------------------------------------------------------- unit outputs

SMALL_DENSENET = dict(num_classes=3, growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8)


def _family_cases():
  """(id, model, input (N, H, W, C), raw output shape of each unit) for every model family,
  small enough to compile in seconds."""
  from ncjax.models import ViT
  vit = dict(num_classes=3, patch_size=8, hidden_size=16, num_layers=11, num_heads=2, mlp_dim=32)
  rn = [(4, 8, 8, 4)] * 2 + [(4, 4, 4, 8)] * 2 + [(4, 2, 2, 16)] * 2 + [(4, 1, 1, 32)] * 2
  return [
      ('resnet18', models.get('resnet18', 3, stem='cifar', width=4), (4, 8, 8, 3), rn),
      ('resnet50', models.get('resnet50', 3, width=2), (4, 32, 32, 3),
       [(4, 8, 8, 8)] * 3 + [(4, 4, 4, 16)] * 4 + [(4, 2, 2, 32)] * 6 + [(4, 1, 1, 64)] * 3),
      ('vit_cls', ViT(pool='cls', **vit), (4, 16, 24, 3), [(4, 7, 16)] * 11),
      ('vit_mean', ViT(pool='mean', representation_size=24, **vit), (4, 16, 24, 3),
       [(4, 7, 16)] * 11),
      ('mlp', models.get('mlp', 3, depth=3, width=8, batch_norm=True), (4, 5, 5, 1),
       [(4, 8)] * 3),
      ('convnet4', models.get('convnet4', 3, width=4, flatten=True), (4, 16, 16, 3),
       [(4, 8, 8, 4), (4, 4, 4, 4), (4, 2, 2, 4), (4, 1, 1, 4)]),
      ('resnet12', models.get('resnet12', 3, widths=(2, 3, 4, 5)), (4, 16, 16, 3),
       [(4, 8, 8, 2), (4, 4, 4, 3), (4, 2, 2, 4), (4, 1, 1, 5)]),
      # Dense blocks of 2 layers growing by 4; transitions halve the channels and the map.
      ('densenet', models.DenseNet(**SMALL_DENSENET), (4, 32, 32, 3),
       [(4, 4, 4, 8), (4, 2, 2, 8), (4, 1, 1, 8), (4, 1, 1, 16)]),
      ('mobilenet_v2', models.MobileNetV2(3, width_mult=0.25), (4, 32, 32, 3),
       [(4, 16, 16, 8)] + [(4, 8, 8, 8)] * 2 + [(4, 4, 4, 8)] * 3 + [(4, 2, 2, 16)] * 4
       + [(4, 2, 2, 24)] * 3 + [(4, 1, 1, 40)] * 3 + [(4, 1, 1, 80), (4, 1, 1, 1280)]),
  ]


FAMILIES = _family_cases()


def _setup(model, shape, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
  return random_variables(jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x), seed), x


def _old_way(model, v, x):
  """Reference for `features`: what the models sowed before capture_intermediates (each
  unit's output pooled inside the forward pass: conv maps by the mean over H, W, ViT tokens by
  the class token or the token mean per `pool`, MLP outputs as they are), written here from
  that rule and the unit outputs seen by a method interceptor, not from `ncjax.models`."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.path in {(u,) for u in model.units}:
      seen[context.module.path[0]] = y
    return y
  with flax.linen.intercept_methods(record):
    _, st = model.apply(v, x, train=False, mutable=['intermediates'])
  pool = getattr(model, 'pool', None)
  out = {}
  for u in model.units:
    y = seen[u].astype(jnp.float32)
    if y.ndim == 4:
      out[u] = jnp.mean(y, axis=(1, 2))
    elif y.ndim == 3:
      out[u] = y[:, 0] if pool == 'cls' else jnp.mean(y, axis=1)
    else:
      out[u] = y
  out['penultimate'] = st['intermediates']['penultimate'][0]
  return out, seen


@pytest.mark.parametrize('case', FAMILIES, ids=[c[0] for c in FAMILIES])
def test_capture_intermediates_gives_unit_outputs(case):
  """Issue 9 §2: `capture_intermediates=True` puts each unit's own output (not a pooled vector
  mixed into the unit's scope) under `intermediates/<unit>/__call__`."""
  _, model, shape, unit_shapes = case
  v, x = _setup(model, shape)
  _, st = model.apply(v, x, train=False, capture_intermediates=True, mutable=['intermediates'])
  inter = st['intermediates']
  _, seen = _old_way(model, v, x)
  assert len(model.units) == len(unit_shapes)
  for u, s in zip(model.units, unit_shapes):
    out = inter[u]['__call__']
    assert isinstance(out, tuple) and len(out) == 1, u
    assert out[0].shape == s, u
    np.testing.assert_array_equal(out[0], seen[u])
  # The unit filter keeps only the units' outputs (and the sown penultimate feature).
  _, st = model.apply(v, x, train=False, capture_intermediates=models.unit_filter(model),
                      mutable=['intermediates'])
  assert list(st['intermediates']) == list(model.units) + ['penultimate']
  for u in model.units:
    assert list(st['intermediates'][u]) == ['__call__'], u
    np.testing.assert_array_equal(st['intermediates'][u]['__call__'][0], seen[u])


@pytest.mark.parametrize('case', FAMILIES, ids=[c[0] for c in FAMILIES])
def test_features_equal_pooled_unit_outputs(case):
  """`features` (eager and jitted) equals the old in-model pooling of each unit's output, in
  unit order ('layer10' after 'layer9'), and `pool_units` does the same in train mode."""
  _, model, shape, _ = case
  v, x = _setup(model, shape)
  ref, seen = _old_way(model, v, x)
  order = list(model.units) + ['penultimate']
  eager = models.features(model, v, x)
  assert list(eager) == order
  jitted = jax.jit(functools.partial(models.features, model))(v, x)
  for name in order:
    assert eager[name].dtype == jnp.float32 and eager[name].ndim == 2, name
    np.testing.assert_allclose(eager[name], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # jit fuses the convolutions differently from eager op-by-op execution: float32 rounding.
    np.testing.assert_allclose(jitted[name], ref[name], rtol=2e-5, atol=1e-6, err_msg=name)
  if hasattr(model, 'pool'):
    assert eager['layer1'].shape == (shape[0], 16)
  else:
    assert [eager[u].shape[1] for u in model.units] == [seen[u].shape[-1] for u in model.units]
  # Train mode: batch statistics, updated running statistics; pooled the same way.
  mutable = ['intermediates'] + (['batch_stats'] if 'batch_stats' in v else [])
  _, st = model.apply(v, x, train=True, capture_intermediates=models.unit_filter(model),
                      mutable=mutable)
  tr = models.pool_units(model, st['intermediates'])
  assert list(tr) == order
  for u in model.units:
    np.testing.assert_array_equal(tr[u], model.unit_feature(st['intermediates'][u]['__call__'][0]))


def test_pool_units_needs_captured_outputs(small_resnet):
  model, v, x = small_resnet
  _, st = model.apply(v, x, train=False, mutable=['intermediates'])
  with pytest.raises(KeyError, match='unit_filter'):
    models.pool_units(model, st['intermediates'])


def test_vit_rejects_unknown_pool():
  from ncjax.models import ViT
  m = ViT(num_classes=2, patch_size=8, hidden_size=8, num_layers=1, num_heads=1, mlp_dim=8,
          pool='max')
  with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
    jax.eval_shape(lambda x: m.init(jax.random.key(0), x), jnp.zeros((1, 8, 8, 3)))


def _pad(u, d):
  return np.pad(np.asarray(u), ((0, 0), (0, d - u.shape[1])))


@pytest.mark.parametrize('unit', ['block2', 'block5', 'block8'])
def test_scl_adds_zero_padded_unit(small_resnet, unit):
  model, v, x = small_resnet
  scl = models.get('resnet18', 7, stem='cifar', scl_unit=unit)
  plain = models.features(model, v, x)
  f = models.features(scl, v, x)
  np.testing.assert_allclose(f['penultimate'], plain['penultimate'] + _pad(plain[unit], 512),
                             rtol=1e-5, atol=1e-6)
  logits = scl.apply(v, x, train=False)
  head = v['params']['head']
  np.testing.assert_allclose(logits, f['penultimate'] @ head['kernel'] + head['bias'],
                             rtol=1e-5, atol=1e-5)


def test_scl_vit_and_mlp():
  from ncjax.models import ViT
  kw = dict(num_classes=3, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  for pool in ('cls', 'mean'):
    plain = ViT(pool=pool, **kw)
    v = random_variables(jax.eval_shape(plain.init, jax.random.key(0), x))
    fp = models.features(plain, v, x)
    fs = models.features(ViT(pool=pool, scl_unit='layer2', **kw), v, x)
    np.testing.assert_allclose(fs['penultimate'], fp['penultimate'] + fp['layer2'], rtol=1e-5,
                               atol=1e-6)
    assert fp['layer1'].shape == (2, 32)
  m = models.get('mlp', 4, depth=3, width=16)
  v = random_variables(jax.eval_shape(m.init, jax.random.key(0), x))
  fp = models.features(m, v, x)
  fs = models.features(models.get('mlp', 4, depth=3, width=16, scl_unit='layer1'), v, x)
  np.testing.assert_allclose(fs['penultimate'], fp['layer3'] + fp['layer1'], rtol=1e-6)


@pytest.mark.parametrize('name,size,c', [('mlp', 8, 1), ('convnet4', 32, 3), ('resnet12', 32, 3)])
def test_small_models_train_and_scl(name, size, c):
  opts = {'depth': 3, 'width': 16, 'batch_norm': True} if name == 'mlp' else {}
  m = models.get(name, 5, **opts)
  x = jax.random.normal(jax.random.key(0), (2, size, size, c))
  v = random_variables(models.param_shapes(name, 5, size, channels=c, **opts))
  logits, st = m.apply(v, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 5)
  assert not np.allclose(jax.tree_util.tree_leaves(st)[0], jax.tree_util.tree_leaves(
      v['batch_stats'])[0])
  us = models.units(name, **({'depth': 3} if name == 'mlp' else {}))
  fp = models.features(m, v, x)
  fs = models.features(models.get(name, 5, scl_unit=us[0], **opts), v, x)
  d = fp['penultimate'].shape[1]
  np.testing.assert_allclose(fs['penultimate'], fp['penultimate'] + _pad(fp[us[0]], d),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', FAMILIES[-2:], ids=[c[0] for c in FAMILIES[-2:]])
def test_scl_densenet_mobilenet(case):
  """SCL on the torchvision DenseNet / MobileNetV2 layouts: the penultimate feature plus the
  zero-padded pooled output of an early unit; bfloat16 compute gives float32 logits close to
  float32's."""
  _, model, shape, _ = case
  v, x = _setup(model, shape)
  plain = models.features(model, v, x)
  unit = model.units[1]
  f = models.features(model.clone(scl_unit=unit), v, x)
  d = plain['penultimate'].shape[1]
  np.testing.assert_allclose(f['penultimate'], plain['penultimate'] + _pad(plain[unit], d),
                             rtol=1e-5, atol=1e-6)
  logits = model.apply(v, x)
  bf16 = jax.jit(model.clone(dtype='bfloat16').apply)(v, x)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, logits, atol=0.1 * float(np.max(np.abs(logits))))


def test_densenet_mobilenet_finetune_percent():
  # Linear probe: the new head over all parameters (torchvision's count less its 1000-way head).
  for name, total, d in (('densenet121', 7_978_856, 1024), ('mobilenet_v2', 3_504_872, 1280)):
    head = d * 10 + 10
    expected = 100 * head / (total - (d * 1000 + 1000) + head)
    assert models.finetune_percent(name, 'linear', None, 10) == pytest.approx(expected)
  # The last MobileNetV2 unit is features.18, 320 * 1280 weights and a BatchNorm of 1280.
  p = models.param_shapes('mobilenet_v2', 10)['params']
  assert models.count_params(p['block18']) == 320 * 1280 + 2 * 1280
  assert models.finetune_percent('mobilenet_v2', 'layer', 'block18', 10) == pytest.approx(
      100 * (320 * 1280 + 2 * 1280 + 12810) / models.count_params(p))


@pytest.mark.parametrize('name,size', [('resnet18', 33), ('vit_ti16', 32)])
def test_gradients_flow_to_every_unit(name, size):
  m = models.get(name, 3)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  v = random_variables(models.param_shapes(name, 3, size))

  def loss(params):
    out = m.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])[0]
    return jnp.sum(out ** 2)
  g = jax.jit(jax.grad(loss))(v['params'])
  for u in models.units(name):
    assert any(np.any(np.asarray(l) != 0) for l in jax.tree_util.tree_leaves(g[u])), u


def test_bfloat16_compute():
  m = models.get('resnet18', 3, stem='cifar', dtype='bfloat16')
  x = jnp.ones((2, 8, 8, 3))
  v = random_variables(models.param_shapes('resnet18', 3, 8, stem='cifar', dtype='bfloat16'))
  assert jax.tree_util.tree_leaves(v['params'])[0].dtype == jnp.float32
  out = jax.jit(m.apply)(v, x)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------- torch semantics

def test_batchnorm_running_stats_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32) * 2 + 1
  bn = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(rng.normal(size=6), dtype=torch.float32))
    bn.bias.copy_(torch.tensor(rng.normal(size=6), dtype=torch.float32))
  bn.train()
  y_t = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  m = BatchNorm()
  v = m.init(jax.random.key(0), x, train=False)
  v = {'params': {'scale': jnp.asarray(bn.weight.detach().numpy()),
                  'bias': jnp.asarray(bn.bias.detach().numpy())},
       'batch_stats': v['batch_stats']}
  y, st = m.apply(v, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st['batch_stats']['mean'], bn.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(st['batch_stats']['var'], bn.running_var.numpy(), rtol=1e-6)
  # Flax's rule (biased variance in the running average) differs, as documented.
  _, st_b = BatchNorm(unbiased_running_var=False).apply(v, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(st_b['batch_stats']['var'], bn.running_var.numpy(), rtol=1e-4)
  # Eval mode uses the running statistics.
  bn.eval()
  v2 = {'params': v['params'], 'batch_stats': st['batch_stats']}
  y_e = m.apply(v2, x, train=False)
  y_te = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(y_e, y_te, rtol=1e-5, atol=1e-5)


def test_max_pool_pads_with_neg_inf():
  torch = pytest.importorskip('torch')
  x = -np.abs(np.random.default_rng(0).normal(size=(1, 7, 9, 2))).astype(np.float32) - 1
  ref = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(max_pool_torch(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy())


def test_layerwise_metrics_take_model_features_directly():
  """Issue contract: `metrics.layerwise` consumes `models.features` output as is, and its
  numbers equal the one-shot metrics on each pooled feature."""
  from ncjax import metrics
  model = models.get('resnet18', 3, stem='cifar', width=4)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(24, 8, 8, 3)), jnp.float32)
  y = np.arange(24) % 3
  v = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  feats = jax.jit(functools.partial(models.features, model))(v, x)
  out = metrics.layerwise(feats, y, 3, metrics=('nc1',))
  assert set(out) == set(models.units(model)) | {'penultimate'}
  for name in ('block1', 'block8', 'penultimate'):
    assert out[name]['nc1'] == pytest.approx(float(metrics.nc1(feats[name], y, 3)), rel=1e-6)
