"""Tests for few-shot evaluation (ncjax.fewshot) and the SEResNet12 model (paper Table 2)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import data, fewshot, metrics, models
from ncjax.models.small import SqueezeExcite


from test_models import random_variables  # noqa: E402  (numpy-drawn, no init compile)


def _setup(model, shape, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return random_variables(shapes, seed), x


# ----------------------------------------------------------------------------- SEResNet12

def _np_conv(x, k):
  """Stride-1 'same' convolution, x (N, H, W, Ci), HWIO kernel k (kh, kw, Ci, Co)."""
  kh, kw = k.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum('nhwc,co->nhwo', xp[:, i:i + h, j:j + w], k[i, j])
             for i in range(kh) for j in range(kw))


def _np_bn(x, p, s):
  return (x - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']


def _np_se_block(x, p, s):
  """SE-ResNet-12 block in eval mode, float64 numpy, from the written rule: residual branch
  3 x (conv3x3, BN[, LeakyReLU 0.1]), SE gate on it, 1x1 conv + BN shortcut added, LeakyReLU,
  2x2 max-pool."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), s)
  lrelu = lambda v: np.where(v > 0, v, 0.1 * v)
  y = lrelu(_np_bn(_np_conv(x, p['conv1']['kernel']), p['bn1'], s['bn1']))
  y = lrelu(_np_bn(_np_conv(y, p['conv2']['kernel']), p['bn2'], s['bn2']))
  y = _np_bn(_np_conv(y, p['conv3']['kernel']), p['bn3'], s['bn3'])
  sq = y.mean(axis=(1, 2))
  hid = np.maximum(sq @ p['se']['fc1']['kernel'] + p['se']['fc1']['bias'], 0)
  gate = 1 / (1 + np.exp(-(hid @ p['se']['fc2']['kernel'] + p['se']['fc2']['bias'])))
  y = y * gate[:, None, None, :]
  sc = _np_bn(_np_conv(x, p['downsample_conv']['kernel']), p['downsample_bn'],
              s['downsample_bn'])
  z = lrelu(y + sc)
  n, h, w, c = z.shape
  return z.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_seresnet12_block_matches_numpy_reference():
  model = models.get('seresnet12', 3, widths=(8, 6, 4, 4), se_reduction=2)
  v, x = _setup(model, (2, 16, 16, 3), seed=3)
  _, st = model.apply(v, x, train=False, capture_intermediates=models.unit_filter(model),
                      mutable=['intermediates'])
  inter = st['intermediates']
  assert v['params']['block1']['se']['fc1']['kernel'].shape == (8, 4)     # 8 // 2
  ref = _np_se_block(np.asarray(x, np.float64), v['params']['block1'], v['batch_stats']['block1'])
  np.testing.assert_allclose(inter['block1']['__call__'][0], ref, rtol=1e-4, atol=1e-5)
  # Block 2 takes block 1's output: the blocks chain.
  ref2 = _np_se_block(np.asarray(inter['block1']['__call__'][0], np.float64),
                      v['params']['block2'], v['batch_stats']['block2'])
  np.testing.assert_allclose(inter['block2']['__call__'][0], ref2, rtol=1e-4, atol=1e-5)


def test_seresnet12_squeeze_excite_by_hand():
  """SqueezeExcite on a 2x2x2 map with 2 channels, reduction 2 (one hidden unit), numbers
  worked by hand."""
  x = np.array([[[[1., 2.], [3., 4.]], [[5., 6.], [7., 8.]]]])         # (1, 2, 2, 2)
  params = {'fc1': {'kernel': np.array([[1.], [-0.5]]), 'bias': np.array([0.5])},
            'fc2': {'kernel': np.array([[0.5, -1.]]), 'bias': np.array([0., 1.])}}
  out = SqueezeExcite(reduction=2).apply({'params': params}, jnp.asarray(x, jnp.float32))
  # squeeze: channel means (1+3+5+7)/4 = 4, (2+4+6+8)/4 = 5; fc1: 4 - 2.5 + 0.5 = 2, ReLU 2;
  # fc2: (1, -2 + 1) = (1, -1); gate sigmoid -> (0.7310586, 0.2689414).
  gate = np.array([1 / (1 + np.exp(-1.)), 1 / (1 + np.exp(1.))])
  np.testing.assert_allclose(out, x * gate, rtol=1e-6)


def test_seresnet12_gate_one_equals_resnet12():
  """With every SE gate forced to 1 (fc2 kernel 0, bias 100: sigmoid is 1.0 in float32),
  SEResNet12 computes exactly ResNet12 with the same remaining variables."""
  se = models.get('seresnet12', 4, widths=(4, 6, 8, 10))
  plain = models.get('resnet12', 4, widths=(4, 6, 8, 10))
  v, x = _setup(se, (3, 32, 32, 3), seed=1)
  params = jax.tree_util.tree_map(lambda a: a, v['params'])
  for u in se.units:
    fc2 = params[u]['se']['fc2']
    params[u]['se']['fc2'] = {'kernel': jnp.zeros_like(fc2['kernel']),
                              'bias': jnp.full_like(fc2['bias'], 100.0)}
  v_se = {'params': params, 'batch_stats': v['batch_stats']}
  v_plain = {'params': {k: ({n: m for n, m in p.items() if n != 'se'} if k in se.units else p)
                        for k, p in params.items()}, 'batch_stats': v['batch_stats']}
  f_se = models.features(se, v_se, x)
  f_plain = models.features(plain, v_plain, x)
  for name in list(se.units) + ['penultimate']:
    np.testing.assert_array_equal(f_se[name], f_plain[name], err_msg=name)
  np.testing.assert_array_equal(se.apply(v_se, x), plain.apply(v_plain, x))
  # A real gate changes the output.
  assert not np.allclose(models.features(se, v, x)['penultimate'], f_plain['penultimate'])


def test_seresnet12_units_features_and_train_mode():
  model = models.get('seresnet12', 3, widths=(2, 3, 4, 5))
  assert models.units('seresnet12') == ('block1', 'block2', 'block3', 'block4')
  assert models.units(model) == models.units('resnet12')
  v, x = _setup(model, (4, 16, 16, 3))
  _, st = model.apply(v, x, train=False, capture_intermediates=models.unit_filter(model),
                      mutable=['intermediates'])
  inter = st['intermediates']
  assert list(inter) == list(model.units) + ['penultimate']
  shapes = [(4, 8, 8, 2), (4, 4, 4, 3), (4, 2, 2, 4), (4, 1, 1, 5)]
  for u, s in zip(model.units, shapes):
    assert list(inter[u]) == ['__call__'] and inter[u]['__call__'][0].shape == s, u
  feats = jax.jit(functools.partial(models.features, model))(v, x)
  for u in model.units:
    np.testing.assert_allclose(feats[u], np.mean(inter[u]['__call__'][0], axis=(1, 2)),
                               rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(feats['penultimate'], feats['block4'], rtol=1e-6)
  # A plain apply sows the penultimate feature only; logits = penultimate @ head.
  logits, st = model.apply(v, x, train=False, mutable=['intermediates'])
  assert set(st['intermediates']) == {'penultimate'}
  head = v['params']['head']
  np.testing.assert_allclose(logits, feats['penultimate'] @ head['kernel'] + head['bias'],
                             rtol=1e-5, atol=1e-6)
  # Train mode: batch statistics move, pool_units reads the captured outputs.
  _, st = model.apply(v, x, train=True, capture_intermediates=models.unit_filter(model),
                      mutable=['intermediates', 'batch_stats'])
  tr = models.pool_units(model, st['intermediates'])
  assert list(tr) == list(model.units) + ['penultimate']
  assert not np.allclose(st['batch_stats']['block1']['bn1']['mean'],
                         v['batch_stats']['block1']['bn1']['mean'])


@pytest.mark.parametrize('unit', ['block1', 'block3'])
def test_seresnet12_scl(unit):
  kw = dict(widths=(2, 3, 4, 5))
  plain = models.get('seresnet12', 3, **kw)
  v, x = _setup(plain, (2, 16, 16, 3))
  fp = models.features(plain, v, x)
  fs = models.features(models.get('seresnet12', 3, scl_unit=unit, **kw), v, x)
  pad = np.pad(np.asarray(fp[unit]), ((0, 0), (0, 5 - fp[unit].shape[1])))
  np.testing.assert_allclose(fs['penultimate'], fp['penultimate'] + pad, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='valid units'):
    models.get('seresnet12', 3, scl_unit='layer1')


def _block_params(cin, c, r=None):
  """Hand count of one (SE-)ResNet-12 block: three 3x3 convs without bias, a 1x1 shortcut
  conv, four BatchNorms (scale, bias), and for SE two dense layers with biases."""
  n = 9 * cin * c + 9 * c * c + 9 * c * c + cin * c + 4 * 2 * c
  if r is not None:
    h = max(1, c // r)
    n += (c * h + h) + (h * c + c)
  return n


def test_seresnet12_param_count_by_hand():
  widths = (64, 160, 320, 640)
  ins = (3,) + widths[:-1]
  head = 640 * 64 + 64
  plain = sum(_block_params(i, c) for i, c in zip(ins, widths)) + head
  assert plain == 12_465_344
  assert models.count_params(models.param_shapes('resnet12', 64, 32)) == plain
  for r, expected in ((16, 12_534_314), (4, 12_737_672)):
    by_hand = sum(_block_params(i, c, r) for i, c in zip(ins, widths)) + head
    assert by_hand == expected
    assert models.count_params(models.param_shapes('seresnet12', 64, 32, se_reduction=r)) \
        == expected
  # SE parameters at r = 16: 580 + 3,370 + 13,140 + 51,880.
  assert 12_534_314 - plain == 68_970
  # Layer FT of block4 (+ the new 64-way head) in Table 3's accounting.
  pct = models.finetune_percent('seresnet12', 'layer', 'block4', 64, image_size=32)
  assert pct == pytest.approx(100 * (_block_params(320, 640, 16) + head) / 12_534_314)


def test_seresnet12_registry_options():
  m = models.get('seresnet12', 5)
  assert isinstance(m, models.SEResNet12) and m.se_reduction == 16
  assert tuple(m.widths) == (64, 160, 320, 640)
  assert models.get('seresnet12', 5, se_reduction=4).se_reduction == 4
  assert 'seresnet12' in models.names()
  with pytest.raises(ValueError, match='unknown option'):
    models.get('resnet12', 5, se_reduction=4)


# ----------------------------------------------------------------------------- episodes

def test_fewshot_sample_episodes_structure():
  rng = np.random.default_rng(0)
  ids = np.array([3, 17, 42, 5, 99, 8, 11])                    # arbitrary, non-contiguous
  labels = rng.permutation(np.repeat(ids, 25))
  ep = fewshot.sample_episodes(labels, ways=5, shots=2, queries=3, episodes=40, seed=7)
  assert ep.support.shape == ep.support_labels.shape == (40, 10)
  assert ep.query.shape == ep.query_labels.shape == (40, 15)
  assert ep.classes.shape == (40, 5)
  np.testing.assert_array_equal(ep.support_labels[0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
  np.testing.assert_array_equal(ep.query_labels[0], np.repeat(np.arange(5), 3))
  for e in range(40):
    assert len(set(ep.classes[e])) == 5 and set(ep.classes[e]) <= set(ids)
    # Each index carries the label of its episode class; no image is used twice.
    np.testing.assert_array_equal(labels[ep.support[e]], ep.classes[e][ep.support_labels[e]])
    np.testing.assert_array_equal(labels[ep.query[e]], ep.classes[e][ep.query_labels[e]])
    assert len(set(ep.support[e]) | set(ep.query[e])) == 25
  # Reproducible from the seed; another seed gives other episodes.
  again = fewshot.sample_episodes(labels, ways=5, shots=2, queries=3, episodes=40, seed=7)
  for a, b in zip(ep, again):
    np.testing.assert_array_equal(a, b)
  other = fewshot.sample_episodes(labels, ways=5, shots=2, queries=3, episodes=40, seed=8)
  assert not np.array_equal(ep.support, other.support)


def test_fewshot_sample_episodes_uniform():
  """Classes and images are drawn uniformly: over 3,000 episodes each of 10 classes is in
  half of them (binomial sd ~27) and each image of a class is a query equally often."""
  labels = np.repeat(np.arange(10), 8)
  ep = fewshot.sample_episodes(labels, ways=5, shots=1, queries=3, episodes=3000, seed=0)
  counts = np.bincount(ep.classes.ravel(), minlength=10)
  assert np.all(np.abs(counts - 1500) < 6 * 27.4), counts
  per_image = np.bincount(ep.query.ravel(), minlength=80)
  # each image: P(query) = 1/2 (class drawn) * 3/8 -> 562.5 of 3000, sd ~ 22
  assert np.all(np.abs(per_image - 562.5) < 6 * 22.0), per_image


def test_fewshot_sample_episodes_errors():
  labels = np.array([0] * 20 + [1] * 20 + [7] * 5 + [2] * 20)
  with pytest.raises(ValueError, match=r"class 7 has 5 images, fewer than shots \+ queries"):
    fewshot.sample_episodes(labels, ways=2, shots=1, queries=15, episodes=3, seed=0)
  with pytest.raises(ValueError, match='5-way episodes need 5 classes'):
    fewshot.sample_episodes(labels, ways=5, shots=1, queries=1, episodes=3, seed=0)
  with pytest.raises(ValueError, match='shots'):
    fewshot.sample_episodes(labels, ways=2, shots=0, queries=1, episodes=3, seed=0)


# ----------------------------------------------------------------------------- CI

def test_fewshot_ci95_by_hand_and_scipy():
  # 50, 70, 90: s = 20 (ddof=1), sem = 20 / sqrt(3) = 11.5470; t_{0.975, 2} = 4.302653
  assert fewshot.ci95([50.0, 70.0, 90.0]) == pytest.approx(4.3026527297 * 20 / np.sqrt(3),
                                                          rel=1e-9)
  stats = pytest.importorskip('scipy.stats')
  a = np.random.default_rng(0).uniform(40, 100, size=600)
  lo, hi = stats.t.interval(0.95, 599, loc=a.mean(), scale=stats.sem(a))
  assert fewshot.ci95(a) == pytest.approx((hi - lo) / 2, rel=1e-12)
  # At 600 episodes RFS's t quantile (1.96394) makes it 0.2% wider than the 1.96 rule.
  ratio = fewshot.ci95(a) / (1.96 * a.std(ddof=1) / np.sqrt(600))
  assert ratio == pytest.approx(1.96394 / 1.96, abs=1e-5)
  assert np.isnan(fewshot.ci95([80.0]))


# ----------------------------------------------------------------------------- classifier

@pytest.fixture(scope='module')
def blobs():
  """(1600, 64) float32 embeddings of 16 classes x 100 images: Gaussian class means (scale
  0.4) plus unit noise; labels 0..15."""
  rng = np.random.default_rng(0)
  means = 0.4 * rng.normal(size=(16, 1, 64))
  x = (means + rng.normal(size=(16, 100, 64))).reshape(-1, 64).astype(np.float32)
  return x, np.repeat(np.arange(16), 100)


def _objective_grad64(x, y, w, b, c):
  """float64 gradient of sum CE + ||W||^2 / (2C) in (W, b), written from the definition."""
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = p - np.eye(w.shape[1])[y]
  return np.concatenate([(x.T @ r + w / c).ravel(), r.sum(0)])


@pytest.mark.parametrize('shots', [1, 5])
def test_fewshot_jax_solver_matches_sklearn(blobs, shots):
  x, y = blobs
  ep = fewshot.sample_episodes(y, ways=5, shots=shots, queries=15, episodes=60, seed=shots)
  xn = fewshot.l2_normalize(x.astype(np.float64))
  s, q = xn[ep.support], xn[ep.query]
  wj, bj = fewshot.logistic_regression(s, ep.support_labels, ways=5, solver='jax')
  wj, bj = np.asarray(wj, np.float64), np.asarray(bj, np.float64)
  assert wj.shape == (60, 64, 5) and bj.shape == (60, 5)
  # Converged: the float64 gradient of the objective at the float32 solution is ~0 ...
  for e in range(0, 60, 7):
    g = _objective_grad64(s[e], ep.support_labels[e], wj[e], bj[e], 1.0)
    assert np.abs(g).max() < 2e-5, (e, np.abs(g).max())
  # ... and it is scikit-learn's minimiser (tight tol), intercepts summing to 0 in both.
  wt, bt = fewshot.logistic_regression(s, ep.support_labels, ways=5, solver='sklearn',
                                       tol=1e-10)
  np.testing.assert_allclose(bt.sum(1), 0, atol=1e-6)
  np.testing.assert_allclose(wj, wt, atol=2e-6 * np.abs(wt).max() + 1e-7)
  np.testing.assert_allclose(bj, bt, atol=1e-5)
  # RFS's settings (default tol): same argmax on >= 99% of queries.
  ws, bs = fewshot.logistic_regression(s, ep.support_labels, ways=5, solver='sklearn')
  same = fewshot.predict(wj, bj, q) == fewshot.predict(ws, bs, q)
  assert same.mean() >= 0.99, same.mean()


def test_fewshot_two_way_closed_form():
  """2-way 1-shot, d = 1, x = +1 (class 0) and -1 (class 1): by symmetry b = 0 and
  W = [[w, -w]], objective 2 log(1 + e^{-2w}) + w^2 / C, optimum w = 2 C sigmoid(-2w).
  scikit-learn (>= 1.7) fits the binomial model instead: coef = 2w at C' = 2C."""
  from scipy.optimize import brentq
  for c in (0.5, 1.0, 4.0):
    w = brentq(lambda t: t - 2 * c / (1 + np.exp(2 * t)), 0, 10, xtol=1e-14)
    s = np.array([[[1.0], [-1.0]]])
    wj, bj = fewshot.logistic_regression(s, np.array([[0, 1]]), ways=2, C=c, solver='jax')
    np.testing.assert_allclose(np.asarray(wj)[0], [[w, -w]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bj)[0], [0, 0], atol=1e-6)
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=2 * c, tol=1e-12).fit(s[0], [0, 1])
    if clf.coef_.shape[0] == 1:
      assert clf.coef_[0, 0] == pytest.approx(-2 * w, rel=1e-5)  # logit of class 1


def test_fewshot_solver_errors(blobs):
  x, y = blobs
  s = x[:10].reshape(2, 5, 64)
  with pytest.raises(ValueError, match='solver'):
    fewshot.logistic_regression(s, np.zeros((2, 5), int), ways=5, solver='lbfgs')
  with pytest.raises(ValueError, match='C must be > 0'):
    fewshot.logistic_regression(s, np.zeros((2, 5), int), ways=5, C=0.0)


# ----------------------------------------------------------------------------- evaluate

def test_fewshot_evaluate_jax_vs_sklearn(blobs):
  x, y = blobs
  kw = dict(ways=5, shots=1, queries=15, episodes=200, seed=3)
  rj = fewshot.evaluate(jnp.asarray(x), y, solver='jax', **kw)
  rs = fewshot.evaluate(x, y, solver='sklearn', **kw)
  for r in (rj, rs):
    assert set(r) == {'accuracy', 'ci95', 'episodes', 'accuracies'}
    assert r['episodes'] == 200 and r['accuracies'].shape == (200,)
    assert r['accuracy'] == pytest.approx(np.mean(r['accuracies']))
    assert r['ci95'] == pytest.approx(fewshot.ci95(r['accuracies']))
    # 75 queries per episode: accuracies are multiples of 100/75 percent.
    np.testing.assert_allclose(r['accuracies'] * 0.75, np.round(r['accuracies'] * 0.75),
                               atol=1e-3)
  assert 20 + 10 < rj['accuracy'] < 100                      # above chance (20%)
  assert abs(rj['accuracy'] - rs['accuracy']) <= 0.5
  assert np.mean(np.abs(rj['accuracies'] - rs['accuracies']) < 1e-3) >= 0.9


def test_fewshot_evaluate_chunks_seed_and_separable():
  rng = np.random.default_rng(1)
  # One direction per class, tiny noise: every episode is solved perfectly.
  y = np.repeat(np.arange(8), 20) + 100
  x = np.eye(16)[y - 100] * 5 + 0.01 * rng.normal(size=(160, 16))
  full = fewshot.evaluate(x, y, shots=1, queries=5, episodes=7, seed=2, chunk=7)
  assert full['accuracy'] == 100.0 and full['ci95'] == 0.0
  # Chunks that do not divide the episodes give the same per-episode results.
  x2 = rng.normal(size=(160, 16)) + np.eye(16)[y - 100]
  a = fewshot.evaluate(x2, y, shots=2, queries=5, episodes=7, seed=2, chunk=7)['accuracies']
  b = fewshot.evaluate(x2, y, shots=2, queries=5, episodes=7, seed=2, chunk=3)['accuracies']
  np.testing.assert_allclose(a, b, atol=1e-4)
  c = fewshot.evaluate(x2, y, shots=2, queries=5, episodes=7, seed=3, chunk=7)['accuracies']
  assert not np.allclose(a, c)


def test_fewshot_embedding_nc1(blobs):
  x, y = blobs
  r = fewshot.evaluate(x, y * 3 + 11, episodes=5, nc1=True)        # ids 11, 14, ...
  assert r['nc1'] == pytest.approx(float(metrics.nc1(x, y, 16)), rel=1e-6)
  # Independent float64 NC1 = tr(Sigma_W Sigma_B^+) / K (REFERENCE.md section 1).
  h = x.astype(np.float64)
  mu = np.stack([h[y == k].mean(0) for k in range(16)])
  sw = sum((h[y == k] - mu[k]).T @ (h[y == k] - mu[k]) for k in range(16)) / len(h)
  m = mu - mu.mean(0)
  ref = np.trace(sw @ np.linalg.pinv(m.T @ m / 16, rcond=1e-10)) / 16
  assert r['nc1'] == pytest.approx(ref, rel=1e-4)


# ----------------------------------------------------------------------------- class splits

def test_fewshot_cifar_fs_split():
  names = data.CIFAR100_LABEL_NAMES
  assert len(names) == 100 == len(set(names)) and list(names) == sorted(names)
  # Label ids seen in independent public CIFAR-100 code (vehicle and tree subsets).
  for name, i in [('bicycle', 8), ('bus', 13), ('lawn_mower', 41), ('maple_tree', 47),
                  ('motorcycle', 48), ('oak_tree', 52), ('palm_tree', 56),
                  ('pickup_truck', 58), ('pine_tree', 59), ('rocket', 69),
                  ('streetcar', 81), ('tank', 85), ('tractor', 89), ('train', 90),
                  ('willow_tree', 96), ('apple', 0), ('worm', 99)]:
    assert names[i] == name
  split = data.CIFAR_FS_CLASSES
  sizes = {k: len(v) for k, v in split.items()}
  assert sizes == {'train': 64, 'val': 16, 'test': 20}
  every = split['train'] + split['val'] + split['test']
  assert len(set(every)) == 100 and set(every) == set(names)
  ids = {k: data.cifar_fs_class_ids(k) for k in split}
  assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(100))
  np.testing.assert_array_equal(
      ids['test'], [2, 5, 8, 21, 34, 42, 46, 58, 60, 62, 69, 70, 77, 83, 84, 86, 94, 95, 98, 99])
  np.testing.assert_array_equal(
      ids['val'], [4, 7, 14, 15, 19, 26, 27, 32, 40, 47, 48, 55, 71, 73, 87, 89])
  # Another dataset's label order is honoured.
  rev = tuple(reversed(names))
  np.testing.assert_array_equal(data.cifar_fs_class_ids('test', rev), np.sort(99 - ids['test']))
  with pytest.raises(ValueError, match='missing'):
    data.cifar_fs_class_ids('val', names[:50])
  with pytest.raises(ValueError, match='split must be one of'):
    data.cifar_fs_class_ids('meta-test')


def _write_mini(root, rows_by_split, header=True):
  from PIL import Image
  (root / 'images').mkdir(parents=True, exist_ok=True)
  for split, rows in rows_by_split.items():
    lines = (['filename,label'] if header else []) + [f'{f},{l}' for f, l in rows]
    (root / f'{split}.csv').write_text('\n'.join(lines) + '\n')
    for i, (f, _) in enumerate(rows):
      Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / 'images' / f)


def test_fewshot_load_mini_imagenet(tmp_path):
  rows = {'train': [('n02000000001.png', 'n02000000'), ('n01000000001.png', 'n01000000'),
                    ('n02000000002.png', 'n02000000')],
          'test': [('n03000000001.png', 'n03000000'), ('n04000000001.png', 'n04000000')]}
  _write_mini(tmp_path, rows)
  out = data.load_mini_imagenet(tmp_path, splits=('train', 'test'))
  tr = out['train']
  assert tr.classes == ('n01000000', 'n02000000')
  np.testing.assert_array_equal(tr.labels, [1, 0, 1])
  assert tr.labels.dtype == np.int32
  assert tr.paths == [str(tmp_path / 'images' / f) for f, _ in rows['train']]
  assert out['test'].classes == ('n03000000', 'n04000000')
  # Without a header row; CSVs in another directory.
  other = tmp_path / 'csv'
  other.mkdir()
  (other / 'val.csv').write_text('n01000000001.png,n01000000\n')
  val = data.load_mini_imagenet(tmp_path, splits=('val',), csv_dir=other)['val']
  assert val.classes == ('n01000000',) and list(val.labels) == [0]


def test_fewshot_load_mini_imagenet_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'train\.csv not found.*miniImageNet.*images'):
    data.load_mini_imagenet(tmp_path)
  (tmp_path / 'train.csv').write_text('filename,label\nmissing.jpg,n01000000\n')
  with pytest.raises(FileNotFoundError, match=r'1 of the 1 train images are missing'):
    data.load_mini_imagenet(tmp_path, splits=('train',))
  got = data.load_mini_imagenet(tmp_path, splits=('train',), check_files=False)
  assert got['train'].paths == [str(tmp_path / 'images' / 'missing.jpg')]


def test_fewshot_job_end_to_end(tmp_path):
  """job 'fewshot' through the pipeline: pre-train on digits 0-4, freeze, 5-way 1- and 5-shot
  episodes on digits 5-9; one record per shots with accuracy +- ci95, the meta-test NC1 (the
  same for both shots: one embedding pass) and the meta-train NC1; a rerun reuses them."""
  from ncjax.experiment import runner
  from tiny_config import tiny_mlp_config
  c = tiny_mlp_config("fewshot")
  c.pretrain.optim.steps = 40
  c.fewshot.episodes = 50
  recs = runner.run(c, str(tmp_path))
  assert [(r["stage"], r["shots"], r["ways"], r["episodes"]) for r in recs] == \
      [("fewshot", 1, 5, 50), ("fewshot", 5, 5, 50)]
  one, five = recs
  assert 20.0 < one["accuracy"] < five["accuracy"] <= 100.0  # above chance; more shots help
  assert 0 < one["ci95"] < 10 and one["nc1"] == five["nc1"] > 0
  assert one["source_nc1"] > 0 and one["num_classes"] == 5 and one["weights"] == "pretrain"
  assert runner.run(c, str(tmp_path)) == recs  # finished runs are reused, not redone


def test_fewshot_job_on_a_tiny_mini_imagenet(tmp_path):
  """miniImageNet end to end from a generated folder + CSVs: pre-training on the `train` part
  of the meta-train classes with RFS's step decays, its source accuracy on the held-out 10%
  (`test`), episodes on `meta_test` (all images of its 5 classes); a missing folder is an
  asset error before any work, saying how to get the data."""
  from ncjax.experiment import assets, records, runner, spec
  from ncjax.errors import ConfigError
  from test_data import _mini_imagenet
  from tiny_config import tiny_mlp_config
  _mini_imagenet(tmp_path / 'mini')
  c = tiny_mlp_config('fewshot')
  c.dataset_sources.mini_imagenet = f'mini_imagenet:{tmp_path / "nope"}'
  c.pretrain.dataset, c.datasets = 'mini_imagenet', ('mini_imagenet',)
  c.pretrain.classes = c.downstream_classes = ''
  c.pretrain.optim.update(dict(steps=0, epochs=6, batch_size=8, schedule='step',
                               decay_epochs=(3, 5)))
  c.fewshot.update(dict(shots=(1,), queries=5, episodes=20, split='meta_test'))
  checked = []
  with pytest.raises(ConfigError) as e:
    assets.check_assets(spec.build(c), progress=checked.append)
  assert '--config.pretrain.dataset=mini_imagenet:train' in str(e.value)
  assert 'Ravi & Larochelle' in str(e.value)
  # Pre-training's two splits, then the one episodes draw from (not train / test_split).
  assert checked == [f'checking mini_imagenet:{s}' for s in ('train', 'test', 'meta_test')]
  c.dataset_sources.mini_imagenet = f'mini_imagenet:{tmp_path / "mini"}'
  rec, = runner.run(c, str(tmp_path / 'w'))
  assert (rec['dataset'], rec['num_classes'], rec['num_train']) == ('mini_imagenet', 5, 50)
  assert 0 <= rec['accuracy'] <= 100 and rec['nc1'] > 0 and rec['source_nc1'] > 0
  pre = records.load_record(str(tmp_path / 'w'), 'pretrain-mlp-mini_imagenet')
  assert (pre.num_train, pre.num_test, pre.num_classes) == (36, 4, 4)
  assert pre.steps == 6 * (36 // 8) and 0 <= pre.accuracy <= 100
