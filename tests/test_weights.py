"""Tests for ncjax.weights: torchvision ResNet and vit_jax ViT import, against independent
references (a torch ResNet written for the tests; a numpy ViT), the error paths, what a
checkpoint of the wrong architecture looks like, and ncjax's own runs as weights."""
import functools
import logging
import math
import os
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
  torch = pytest.importorskip("torch")
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
  paths["pth"] = tmp_path / f"{name}.pth"
  torch.save(sd, paths["pth"])
  paths["safetensors"] = tmp_path / f"{name}.safetensors"
  save_file(sd, str(paths["safetensors"]))
  paths["npz"] = tmp_path / f"{name}.npz"
  np.savez(paths["npz"], **{k: v.numpy() for k, v in sd.items()})
  return paths


def _random_like(shapes, seed=0):
  """Random variables of the given abstract shapes (numpy; much faster than compiling
  `model.init` on CPU). Kernels ~ N(0, 1/fan_in), other leaves small noise; BatchNorm
  running variances its absolute value (`weights.load` refuses negative ones)."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    if len(s.shape) >= 2:
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)
    noise = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(np.abs(noise) if getattr(path[-1], "key", None) == "var" else noise,
                       s.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


@functools.lru_cache(maxsize=None)
def _fresh(name, num_classes=1000, **options):
  model = models.get(name, num_classes, **options)
  return model, _random_like(models.param_shapes(name, num_classes, 32, **options))


def _both_modes(model):
  """jit of variables, x -> (eval logits, eval pooled units, train logits, {'features': train
  pooled units, 'batch_stats': updated running statistics})."""
  @jax.jit
  def run(v, x):
    # Each unit's raw output (capture_intermediates), pooled as `models.features` pools it.
    capture = models.unit_filter(model)
    logits, ev = model.apply(v, x, train=False, capture_intermediates=capture,
                             mutable=["intermediates"])
    logits_tr, tr = model.apply(v, x, train=True, capture_intermediates=capture,
                                mutable=["intermediates", "batch_stats"])
    return (logits, models.pool_units(model, ev["intermediates"]), logits_tr,
            {"features": models.pool_units(model, tr["intermediates"]),
             "batch_stats": tr["batch_stats"]})
  return run


@functools.lru_cache(maxsize=None)
def _jitted(name, num_classes=1000):
  return _both_modes(_fresh(name, num_classes)[0])


def _torch_run(tm, x_nhwc, train):
  import torch
  tm.train(train)
  with torch.no_grad():
    logits, feats, pen = tm(torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2))),
                            return_features=True)
  return logits.numpy(), [f.numpy() for f in feats], pen.numpy()


def _check_against_torch(name, run, units, variables, x, tm, torch_run=_torch_run, tol=1e-4):
  """ncjax (`run` of `_both_modes`) against the torch model `tm` (`torch_run(tm, x, train)`
  -> logits, pooled unit outputs in unit order, penultimate), both modes, and the running
  statistics after the train-mode step (mapped by `name`'s torchvision key map)."""
  import copy
  logits, inter, logits_tr, tr = run(variables, jnp.asarray(x))
  tm = copy.deepcopy(tm)
  # eval mode: running statistics
  t_logits, t_feats, t_pen = torch_run(tm, x, train=False)
  assert len(t_feats) == len(units)
  assert _rel(logits, t_logits) < tol
  for u, f in zip(units, t_feats):
    assert _rel(inter[u], f) < tol, u
  assert _rel(inter["penultimate"], t_pen) < tol
  # train mode: batch statistics, and the updated running statistics
  t_logits, t_feats, _ = torch_run(tm, x, train=True)
  assert _rel(logits_tr, t_logits) < tol
  for u, f in zip(units, t_feats):
    assert _rel(tr["features"][u], f) < tol, u
  sd = tm.state_dict()
  from flax import traverse_util
  flat = traverse_util.flatten_dict({"batch_stats": tr["batch_stats"]})
  assert len(flat) == sum(k.endswith("running_var") for k in sd) * 2
  for path, (key, _) in weights.torchvision_key_map(name, flat).items():
    assert _rel(flat[path], sd[key].numpy()) < tol, key


def _check_resnet(name, variables, x, tol=1e-4):
  _check_against_torch(name, _jitted(name), models.units(name), variables, x,
                       _torch_resnet(name), tol=tol)


@pytest.fixture(scope="module")
def r18_paths(tmp_path_factory):
  pytest.importorskip("torch")
  return _save_all(tmp_path_factory.mktemp("r18"), "resnet18")


def test_formats_load_identically(r18_paths):
  _, fresh = _fresh("resnet18")
  loaded = {fmt: weights.load(p, "resnet18", fresh) for fmt, p in r18_paths.items()}
  ref = jax.tree_util.tree_leaves(loaded["pth"])
  for fmt in ("safetensors", "npz"):
    for a, b in zip(ref, jax.tree_util.tree_leaves(loaded[fmt])):
      np.testing.assert_array_equal(a, b)
  sd = _torch_resnet("resnet18").state_dict()
  v = loaded["pth"]
  np.testing.assert_array_equal(v["params"]["stem"]["conv"]["kernel"],
                                np.transpose(sd["conv1.weight"].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(v["params"]["block3"]["downsample_conv"]["kernel"],
                                np.transpose(sd["layer2.0.downsample.0.weight"].numpy(),
                                             (2, 3, 1, 0)))
  np.testing.assert_array_equal(v["batch_stats"]["block8"]["bn2"]["var"],
                                sd["layer4.1.bn2.running_var"].numpy())
  # Without keep_head the fresh head is kept.
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])


@pytest.mark.parametrize("size", [224, 97])
def test_resnet18_matches_torch(r18_paths, size):
  _, fresh = _fresh("resnet18")
  v = weights.load(r18_paths["safetensors"], "resnet18", fresh, keep_head=True)
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  _check_resnet("resnet18", v, x)


def test_resnet50_matches_torch(tmp_path):
  pytest.importorskip("torch")
  paths = _save_all(tmp_path, "resnet50")
  _, fresh = _fresh("resnet50")
  v = weights.load(paths["pth"], "resnet50", fresh, keep_head=True)
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  _check_resnet("resnet50", v, x)


def test_head_handling(r18_paths, caplog):
  _, fresh10 = _fresh("resnet18", 10)
  with caplog.at_level(logging.WARNING, logger="absl"):
    v = weights.load(r18_paths["npz"], "resnet18", fresh10, keep_head=True)
  assert any("fresh head" in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records), caplog.records
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], fresh10["params"]["head"]["kernel"])
  v, skipped = weights.load_partial(r18_paths["npz"], "resnet18", fresh10)
  assert skipped == []
  _, fresh = _fresh("resnet18")
  v = weights.load(r18_paths["npz"], "resnet18", fresh, keep_head=True)
  sd = _torch_resnet("resnet18").state_dict()
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd["fc.weight"].numpy().T)


# ============================================================================ DenseNet, MobileNetV2
# Against torchvision itself (its own model code, random weights and BN statistics).

PARAMS = {"densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
          "densenet201": 20_013_928, "mobilenet_v2": 3_504_872}  # torchvision's docs


def _torchvision():
  pytest.importorskip("torch")
  from torch_ref import import_torchvision
  try:
    return import_torchvision()
  except ImportError:
    pytest.skip("torchvision is not installed (pip install .[test])")


@functools.lru_cache(maxsize=None)
def _tv_model(name, **kwargs):
  """torchvision's `name` (a builder, or 'DenseNet' with its arguments), random weights and
  BatchNorm statistics (so eval mode is a non-trivial test)."""
  from torch_ref import randomize_
  return randomize_(getattr(_torchvision().models, name)(**kwargs), seed=1)


def _tv_run(tm, x_nhwc, train):
  """torchvision DenseNet / MobileNetV2 -> (logits, pooled output of each ncjax unit, the
  classifier input), from forward hooks on the modules that end the units."""
  import torch
  f = tm.features
  if hasattr(f, "norm5"):  # a unit ends with its transition, the last one with norm5 + ReLU
    ends = [getattr(f, f"transition{i}") for i in range(1, 4)] + [f.norm5]
    linear = tm.classifier
  else:  # block{i} is features[i]
    ends, linear = list(f)[1:], tm.classifier[1]
  outs, pen = [], []
  # Clone: DenseNet's forward applies its last ReLU in place on norm5's output.
  hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for m in ends]
  hooks.append(linear.register_forward_pre_hook(lambda m, i: pen.append(i[0].clone())))
  tm.train(train)
  if linear is not tm.classifier:
    tm.classifier[0].eval()  # MobileNetV2's Dropout(0.2): ncjax has none (identity in eval)
  try:
    with torch.no_grad():
      logits = tm(torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2))))
  finally:
    for h in hooks:
      h.remove()
  if hasattr(f, "norm5"):
    outs[-1] = torch.relu(outs[-1])
  return logits.numpy(), [o.mean(dim=(2, 3)).numpy() for o in outs], pen[0].numpy()


def _tv_state_dict(name, legacy=False, **kwargs):
  sd = {k: v.detach().clone().contiguous() for k, v in _tv_model(name, **kwargs).state_dict().items()}
  if legacy:  # the key names of torchvision's own DenseNet files: norm1 -> norm.1, ...
    import re
    sd = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()}
  return sd


@pytest.mark.parametrize("name", ["densenet121", "mobilenet_v2"])
def test_torchvision_state_dicts_load_strictly(tmp_path, name):
  """torchvision's own architecture, every key and shape: its parameter count is ncjax's and
  its state dict loads in strict mode (no missing, unexpected or misshapen key). (densenet161/
  169/201 are the same code with other numbers; test_models checks their parameter counts.)"""
  tm = _tv_model(name)
  assert sum(p.numel() for p in tm.parameters()) == PARAMS[name]
  shapes = models.param_shapes(name, 1000, 32)
  assert models.count_params(shapes) == PARAMS[name]
  sd = _tv_state_dict(name)
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in sd.items()})
  v = weights.load(tmp_path / "w.npz", name, shapes, keep_head=True)
  head = "classifier.1" if name == "mobilenet_v2" else "classifier"
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd[f"{head}.weight"].numpy().T)
  assert weights.describe_checkpoint(sd) == weights.describe_variables(name, shapes)


def test_densenet_legacy_keys_and_formats(tmp_path):
  """torchvision's DenseNet files name `denselayer1.norm.1.weight` what the model calls
  `denselayer1.norm1.weight`; both load, identically, from .pth, .safetensors and .npz."""
  import torch
  from safetensors.torch import save_file
  shapes = models.param_shapes("densenet121", 10, 32)
  new, old = _tv_state_dict("densenet121"), _tv_state_dict("densenet121", legacy=True)
  assert "features.denseblock1.denselayer1.norm.1.weight" in old
  torch.save(old, tmp_path / "old.pth")
  save_file(old, str(tmp_path / "old.safetensors"))
  np.savez(tmp_path / "new.npz", **{k: v.numpy() for k, v in new.items()})
  ref = jax.tree_util.tree_leaves(weights.load(tmp_path / "new.npz", "densenet121", shapes))
  for f in ("old.pth", "old.safetensors"):
    for a, b in zip(ref, jax.tree_util.tree_leaves(weights.load(tmp_path / f, "densenet121", shapes))):
      np.testing.assert_array_equal(a, b)
  assert weights.describe_checkpoint(old) == "densenet121 (growth rate 32, 64 initial features)"


# A DenseNet small enough to compile in seconds, built by torchvision's own DenseNet class
# (densenet121 is the same code with growth 32, (6, 12, 24, 16), 64; its jit takes ~20 s here).
SMALL_DENSENET = dict(growth_rate=8, block_config=(2, 3, 2, 2), num_init_features=16)


def test_densenet_matches_torchvision(tmp_path):
  tm = _tv_model("DenseNet", num_classes=10, **SMALL_DENSENET)
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in tm.state_dict().items()})
  model = models.DenseNet(num_classes=10, **SMALL_DENSENET)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 32, 32, 3)))
  v = weights.load(tmp_path / "w.npz", "densenet121", shapes, keep_head=True)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  _check_against_torch("densenet121", _both_modes(model), model.units, v, x, tm, _tv_run,
                       tol=2e-5)


def test_mobilenet_v2_matches_torchvision(tmp_path):
  tm = _tv_model("mobilenet_v2")
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in tm.state_dict().items()})
  v = weights.load(tmp_path / "w.npz", "mobilenet_v2", models.param_shapes("mobilenet_v2", 1000),
                   keep_head=True)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  # 2e-4: in train mode the last blocks normalise 2 x 2 maps of 2 images, batch statistics of 8
  # values, which amplify float32 rounding (eval mode agrees to 1e-5).
  _check_against_torch("mobilenet_v2", _jitted("mobilenet_v2"), models.units("mobilenet_v2"), v,
                       x, tm, _tv_run, tol=2e-4)


# ----------------------------------------------------------------------------- bad checkpoints


def _modified(tmp_path, fn, suffix="safetensors"):
  sd = dict(_torch_resnet("resnet18").state_dict())
  fn(sd)
  return _save_all(tmp_path, "resnet18", sd)[suffix]


def test_missing_key(tmp_path):
  pytest.importorskip("torch")
  p = _modified(tmp_path, lambda sd: sd.pop("layer1.0.conv1.weight"))
  _, fresh = _fresh("resnet18")
  with pytest.raises(CheckpointError, match=r"missing key 'layer1\.0\.conv1\.weight'"):
    weights.load(p, "resnet18", fresh)
  v, skipped = weights.load_partial(p, "resnet18", fresh)
  assert skipped == ["layer1.0.conv1.weight (missing)"]
  np.testing.assert_array_equal(v["params"]["block1"]["conv1"]["kernel"],
                                fresh["params"]["block1"]["conv1"]["kernel"])


def test_unexpected_key(tmp_path):
  torch = pytest.importorskip("torch")
  p = _modified(tmp_path, lambda sd: sd.update({"extra.weight": torch.ones(3, 4)}), "pth")
  _, fresh = _fresh("resnet18")
  with pytest.raises(CheckpointError, match=r"unexpected key 'extra\.weight'"):
    weights.load(p, "resnet18", fresh)
  _, skipped = weights.load_partial(p, "resnet18", fresh)
  assert skipped == ["extra.weight (unexpected)"]


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  torch = pytest.importorskip("torch")
  p = _modified(tmp_path, lambda sd: sd.update({"layer2.0.conv1.weight": torch.ones(128, 64, 5, 5)}),
                "npz")
  _, fresh = _fresh("resnet18")
  with pytest.raises(CheckpointError) as e:
    weights.load(p, "resnet18", fresh)
  msg = str(e.value)
  assert "layer2.0.conv1.weight" in msg and "(128, 64, 5, 5)" in msg and "(128, 64, 3, 3)" in msg
  _, skipped = weights.load_partial(p, "resnet18", fresh)
  assert skipped == ["layer2.0.conv1.weight (shape (128, 64, 5, 5) != (128, 64, 3, 3))"]


def test_cifar_stem_against_imagenet_checkpoint(r18_paths):
  _, fresh = _fresh("resnet18", 10, stem="cifar")
  with pytest.raises(CheckpointError, match=r"conv1\.weight.*\(64, 3, 7, 7\).*\(64, 3, 3, 3\)"):
    weights.load(r18_paths["safetensors"], "resnet18", fresh)
  v, skipped = weights.load_partial(r18_paths["safetensors"], "resnet18", fresh)
  assert skipped == ["conv1.weight (shape (64, 3, 7, 7) != (64, 3, 3, 3))"]


@pytest.mark.parametrize("suffix", ["pth", "safetensors", "npz"])
def test_not_a_checkpoint(tmp_path, suffix):
  if suffix == "pth":
    pytest.importorskip("torch")
  p = tmp_path / f"notes.{suffix}"
  p.write_text("this is not a checkpoint\n" * 10)
  _, fresh = _fresh("resnet18")
  with pytest.raises(CheckpointError, match="notes.*not a readable checkpoint"):
    weights.load(p, "resnet18", fresh)


@pytest.mark.parametrize("suffix", ["pth", "npz"])
def test_truncated_zip(r18_paths, tmp_path, suffix):
  data = open(r18_paths[suffix], "rb").read()
  p = tmp_path / f"trunc.{suffix}"
  p.write_bytes(data[: len(data) // 2])
  _, fresh = _fresh("resnet18")
  with pytest.raises(CheckpointError, match="trunc"):
    weights.load(p, "resnet18", fresh)


def test_missing_file(tmp_path):
  _, fresh = _fresh("resnet18")
  with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
    weights.load(tmp_path / "resnet18.pth", "resnet18", fresh)
  with pytest.raises(FileNotFoundError, match="ViT-B_32.npz"):
    weights.load(tmp_path / "ViT-B_32.npz", "vit_b32", {"params": {}})


def test_pth_without_torch(r18_paths, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  _, fresh = _fresh("resnet18")
  with pytest.raises(ImportError, match="needs PyTorch"):
    weights.load(r18_paths["pth"], "resnet18", fresh)


# ============================================================================ ViT


def _vit_jax_checkpoint(d=192, layers=12, heads=3, mlp=768, patch=16, grid=14, classes=21843,
                        pre_logits=False, seed=0):
  """A random checkpoint in vit_jax's flat .npz layout (ViT-Ti/16 shape by default)."""
  rng = np.random.default_rng(seed)
  r = lambda *s, scale=0.05: (rng.normal(size=s) * scale).astype(np.float32)
  hd = d // heads
  ck = {"embedding/kernel": r(patch, patch, 3, d), "embedding/bias": r(d),
        "cls": r(1, 1, d, scale=0.5),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, d, scale=0.5),
        "Transformer/encoder_norm/scale": 1 + r(d, scale=0.1),
        "Transformer/encoder_norm/bias": r(d),
        "head/kernel": np.zeros((d, classes), np.float32),
        "head/bias": np.zeros((classes,), np.float32)}
  for i in range(layers):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      ck[b + ln + "/scale"] = 1 + r(d, scale=0.1)
      ck[b + ln + "/bias"] = r(d)
    a = b + "MultiHeadDotProductAttention_1/"
    for q in ("query", "key", "value"):
      ck[a + q + "/kernel"] = r(d, heads, hd, scale=1 / math.sqrt(d))
      ck[a + q + "/bias"] = r(heads, hd)
    ck[a + "out/kernel"] = r(heads, hd, d, scale=1 / math.sqrt(d))
    ck[a + "out/bias"] = r(d)
    ck[b + "MlpBlock_3/Dense_0/kernel"] = r(d, mlp, scale=1 / math.sqrt(d))
    ck[b + "MlpBlock_3/Dense_0/bias"] = r(mlp)
    ck[b + "MlpBlock_3/Dense_1/kernel"] = r(mlp, d, scale=1 / math.sqrt(mlp))
    ck[b + "MlpBlock_3/Dense_1/bias"] = r(d)
  if pre_logits:
    ck["pre_logits/kernel"] = r(d, d, scale=1 / math.sqrt(d))
    ck["pre_logits/bias"] = r(d)
  return ck


def _np_vit(ck, x, pos, layers=12, head=None):
  """Independent float64 numpy ViT forward (vit_jax semantics). Returns (logits, cls per
  layer, penultimate)."""
  f = lambda k: np.asarray(ck[k], np.float64)
  kern = f("embedding/kernel")
  p, d = kern.shape[0], kern.shape[-1]
  n, h, w, c = x.shape
  g = h // p
  patches = x.astype(np.float64).reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
  t = patches.reshape(n, g * g, p * p * c) @ kern.reshape(p * p * c, d) + f("embedding/bias")
  t = np.concatenate([np.broadcast_to(f("cls"), (n, 1, d)), t], axis=1) + pos

  def ln(z, pre):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * f(pre + "/scale") + f(pre + "/bias")

  def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

  cls_tokens = []
  for i in range(layers):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_1/"
    y = ln(t, b + "LayerNorm_0")
    q, k, v = (np.einsum("ntd,dhk->nthk", y, f(a + s + "/kernel")) + f(a + s + "/bias")
               for s in ("query", "key", "value"))
    logit = np.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(q.shape[-1])
    logit -= logit.max(-1, keepdims=True)
    att = np.exp(logit)
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("nhqs,nshk->nqhk", att, v)
    t = t + np.einsum("nqhk,hkd->nqd", o, f(a + "out/kernel")) + f(a + "out/bias")
    y = ln(t, b + "LayerNorm_2")
    y = gelu(y @ f(b + "MlpBlock_3/Dense_0/kernel") + f(b + "MlpBlock_3/Dense_0/bias"))
    t = t + y @ f(b + "MlpBlock_3/Dense_1/kernel") + f(b + "MlpBlock_3/Dense_1/bias")
    cls_tokens.append(t[:, 0])
  pen = ln(t, "Transformer/encoder_norm")[:, 0]
  logits = None if head is None else pen @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  return logits, cls_tokens, pen


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
  ck = _vit_jax_checkpoint()
  p = tmp_path_factory.mktemp("vit") / "ViT-Ti_16.npz"
  np.savez(p, **ck)
  return ck, p


def _vit_fresh(size, num_classes=10, **opts):
  model = models.get("vit_ti16", num_classes, **opts)
  return model, _random_like(models.param_shapes("vit_ti16", num_classes, size, **opts))


def _zoom_reference(pe, g):
  """Reference position-embedding resize (vit_jax: scipy.ndimage.zoom, order=1)."""
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  g0 = int(math.isqrt(pe.shape[1] - 1))
  grid = pe[0, 1:].reshape(g0, g0, -1).astype(np.float64)
  grid = scipy_ndimage.zoom(grid, (g / g0, g / g0, 1), order=1)
  return np.concatenate([pe[:, :1].astype(np.float64), grid.reshape(1, g * g, -1)], axis=1)


@pytest.mark.parametrize("size", [224, 384])
def test_vit_matches_numpy_reference(vit_ckpt, size):
  ck, path = vit_ckpt
  model, fresh = _vit_fresh(size)
  v = weights.load(path, "vit_ti16", fresh)
  # fresh head (the raw head has 21843 classes, the model 10)
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
  head = {"kernel": np.asarray(jax.random.normal(jax.random.key(5), (192, 10))) * 0.1,
          "bias": np.linspace(-1, 1, 10).astype(np.float32)}
  v["params"]["head"] = jax.tree_util.tree_map(jnp.asarray, head)
  pe_src = ck["Transformer/posembed_input/pos_embedding"]
  pe = v["params"]["pos_embedding"]
  g = size // 16
  assert pe.shape == (1, 1 + g * g, 192)
  np.testing.assert_array_equal(pe[:, 0], pe_src[:, 0])  # class slot kept
  pos = pe_src.astype(np.float64) if size == 224 else _zoom_reference(pe_src, g)
  np.testing.assert_allclose(pe, pos, rtol=1e-5, atol=1e-6)
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  logits, cls_tokens, pen = _np_vit(ck, x, pos, head=head)

  @jax.jit
  def run(v, x):
    return model.apply(v, x, train=False), models.features(model, v, x)
  out, inter = run(v, jnp.asarray(x))
  assert _rel(out, logits) < 1e-4
  assert _rel(inter["penultimate"], pen) < 1e-4
  for i, c in enumerate(cls_tokens):
    assert _rel(inter[f"layer{i + 1}"], c) < 1e-4, i


def test_vit_pre_logits_and_errors(tmp_path, vit_ckpt):
  ck, path = vit_ckpt
  ck2 = dict(ck, **{"pre_logits/kernel": np.ones((192, 192), np.float32),
                    "pre_logits/bias": np.ones((192,), np.float32)})
  p2 = tmp_path / "with_pre_logits.npz"
  np.savez(p2, **ck2)
  _, fresh = _vit_fresh(32)
  weights.load(p2, "vit_ti16", fresh)  # strict: dropping pre_logits is not an error
  _, skipped = weights.load_partial(p2, "vit_ti16", fresh)
  assert sorted(skipped) == ["pre_logits/bias (the model has no pre_logits)",
                             "pre_logits/kernel (the model has no pre_logits)"]
  _, fresh_rep = _vit_fresh(32, representation_size=192)
  v = weights.load(p2, "vit_ti16", fresh_rep)
  np.testing.assert_array_equal(v["params"]["pre_logits"]["kernel"], ck2["pre_logits/kernel"])
  with pytest.raises(CheckpointError, match=r"missing key 'pre_logits/kernel'"):
    weights.load(path, "vit_ti16", fresh_rep)
  # keep_head with a matching head
  _, fresh_21k = _vit_fresh(32, num_classes=21843)
  v = weights.load(path, "vit_ti16", fresh_21k, keep_head=True)
  assert not np.any(np.asarray(v["params"]["head"]["kernel"]))
  # wrong shape and missing key
  bad = dict(ck)
  k = "Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel"
  bad[k] = np.zeros((192, 700), np.float32)
  del bad["Transformer/encoderblock_5/LayerNorm_2/scale"]
  p3 = tmp_path / "bad.npz"
  np.savez(p3, **bad)
  with pytest.raises(CheckpointError) as e:
    weights.load(p3, "vit_ti16", fresh)
  msg = str(e.value)
  assert k in msg and "(192, 700)" in msg and "(192, 768)" in msg
  assert "missing key 'Transformer/encoderblock_5/LayerNorm_2/scale'" in msg
  _, skipped = weights.load_partial(p3, "vit_ti16", fresh)
  assert sorted(skipped) == sorted([f"{k} (shape (192, 700) != (192, 768))",
                                    "Transformer/encoderblock_5/LayerNorm_2/scale (missing)"])
  (tmp_path / "x.ckpt").write_text("x")
  with pytest.raises(CheckpointError, match=r"unsupported suffix '\.ckpt'"):
    weights.load(tmp_path / "x.ckpt", "vit_ti16", fresh)
  (tmp_path / "notes.npz").write_text("not a checkpoint")
  with pytest.raises(CheckpointError, match="not a readable checkpoint"):
    weights.load(tmp_path / "notes.npz", "vit_ti16", fresh)
  with pytest.raises(CheckpointError, match="no weight importer"):
    weights.load(path, "mlp", fresh)


def test_resize_pos_embedding_matches_scipy_zoom():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 5)).astype(np.float32)
  for g in (12, 4, 7):
    np.testing.assert_allclose(weights.resize_pos_embedding(pe, 1 + g * g), _zoom_reference(pe, g),
                               rtol=1e-5, atol=1e-6)


# ============================================================================ what a checkpoint is


def torchvision_state_dict(name, *, shapes_only=False, seed=0, num_classes=1000, **options):
  """A state dict in torchvision's layout (torch key names and layouts, numpy) for ncjax's
  `name` built with `options` (e.g. ``width=8``, ``stem='cifar'``), made without torch by
  mapping ncjax's shapes back through `weights.torchvision_key_map`. `shapes_only`: arrays
  that take no memory (enough for `describe_checkpoint`). Also returns the ncjax variables
  whose values it holds (None with `shapes_only`)."""
  from flax import traverse_util
  shapes = models.param_shapes(name, num_classes, 32, **options)
  flat = traverse_util.flatten_dict(dict(shapes))
  values = None if shapes_only else traverse_util.flatten_dict(dict(_random_like(shapes, seed)))
  sd = {}
  for path, (key, fn) in weights.torchvision_key_map(name, flat).items():
    if shapes_only:
      sd[key] = np.broadcast_to(np.float32(0), weights._torch_shape(flat[path].shape, fn))
      continue
    a = np.asarray(values[path], np.float32)
    if key.endswith("running_var"):
      a = np.abs(a) + 0.5
      values[path] = jnp.asarray(a)
    sd[key] = (np.transpose(a, (3, 2, 0, 1)) if fn is weights._oihw_to_hwio else
               a.T if fn is weights._transpose2 else a)
  return sd, None if shapes_only else traverse_util.unflatten_dict(values)


def _vit_shapes(patch, hidden, layers, heads, mlp):
  """A vit_jax layout of these dimensions whose arrays take no memory."""
  z = lambda *s: np.broadcast_to(np.float32(0), s)
  hd = hidden // heads
  ck = {"embedding/kernel": z(patch, patch, 3, hidden), "embedding/bias": z(hidden),
        "cls": z(1, 1, hidden), "Transformer/posembed_input/pos_embedding": z(1, 50, hidden)}
  for i in range(layers):
    b = f"Transformer/encoderblock_{i}/"
    ck[b + "MultiHeadDotProductAttention_1/query/kernel"] = z(hidden, heads, hd)
    ck[b + "MlpBlock_3/Dense_0/kernel"] = z(hidden, mlp)
  return ck


def _grown(sd, stage, blocks):
  """`sd` with stage `stage` grown to `blocks` blocks (copies of its second block)."""
  out = dict(sd)
  for k, v in sd.items():
    if k.startswith(f"layer{stage}.1."):
      for i in range(2, blocks):
        out[k.replace(f"layer{stage}.1.", f"layer{stage}.{i}.")] = v
  return out


def test_describe_checkpoint_names_the_architecture():
  """What a checkpoint looks like, read from its keys and shapes alone (no values)."""
  d = lambda name, **o: weights.describe_checkpoint(
      torchvision_state_dict(name, shapes_only=True, **o)[0])
  assert d("resnet18") == "resnet18 (ImageNet stem, width 64)"
  assert d("resnet34") == "resnet34 (ImageNet stem, width 64)"
  assert d("resnet50") == "resnet50 (ImageNet stem, width 64)"
  assert d("resnet50", width=8) == "resnet50 (ImageNet stem, width 8)"
  assert d("resnet18", stem="cifar", width=16) == "resnet18 (CIFAR stem, width 16)"
  r50 = torchvision_state_dict("resnet50", shapes_only=True)[0]
  assert weights.describe_checkpoint({f"module.{k}": v for k, v in r50.items()}) == (
      "resnet50 (ImageNet stem, width 64)")  # DataParallel's prefix
  one_channel = dict(r50, **{"conv1.weight": np.broadcast_to(np.float32(0), (64, 1, 7, 7))})
  assert weights.describe_checkpoint(one_channel) == (
      "resnet50 (ImageNet stem, width 64, 1 input channel)")
  assert weights.describe_checkpoint(_grown(r50, 3, 23)) == "resnet101 (ImageNet stem, width 64)"
  odd = weights.describe_checkpoint(_grown(r50, 3, 10))
  assert odd.startswith("a ResNet of 3-4-10-3 bottleneck blocks per stage (ImageNet stem")
  assert "ncjax has no such model" in odd
  wide = dict(r50)
  for k in [k for k in r50 if k.startswith("layer1.0.conv1.")]:
    wide[k] = np.broadcast_to(np.float32(0), (128, 64, 1, 1))
  assert weights.describe_checkpoint(wide).startswith("wide resnet50 (ImageNet stem, width 64)")
  for name, dims in (("vit_b32", (32, 768, 12, 12, 3072)), ("vit_b16", (16, 768, 12, 12, 3072)),
                     ("vit_s16", (16, 384, 12, 6, 1536)), ("vit_ti16", (16, 192, 12, 3, 768))):
    assert weights.describe_checkpoint(_vit_shapes(*dims)) == (
        f"{name} (patch {dims[0]}, hidden {dims[1]}, 12 layers)")
  large = {f"params/{k}": v for k, v in _vit_shapes(16, 1024, 24, 16, 4096).items()}
  assert weights.describe_checkpoint(large).startswith(
      "ViT-L/16 (patch 16, hidden 1024, 24 layers); ncjax has no such model")
  assert weights.describe_checkpoint({"w": np.zeros(3)}) is None


def test_describe_variables_of_ncjax_models():
  assert weights.describe_variables("resnet18", models.param_shapes(
      "resnet18", 10, 32, 1, stem="cifar", width=16)) == (
      "resnet18 (CIFAR stem, width 16, 1 input channel)")
  assert weights.describe_variables("resnet50", models.param_shapes("resnet50", 10, 32)) == (
      "resnet50 (ImageNet stem, width 64)")
  assert weights.describe_variables("vit_b32", models.param_shapes("vit_b32", 10, 64)) == (
      "vit_b32 (patch 32, hidden 768, 12 layers)")
  assert weights.describe_variables("mlp", models.param_shapes(
      "mlp", 10, 8, 1, depth=3, width=32)) == "mlp (3 layers, width 32, 64 input features)"
  assert weights.describe_variables("convnet4", models.param_shapes(
      "convnet4", 10, 32)) == "convnet4"


def test_wrong_architecture_is_named_as_what_it_looks_like(tmp_path, vit_ckpt):
  """A checkpoint of another architecture: what it looks like first, then a few mismatches
  (not hundreds of shape lines)."""
  sd, _ = torchvision_state_dict("resnet50", width=8)
  p = tmp_path / "resnet50-w8.npz"
  np.savez(p, **sd)
  fresh18 = models.param_shapes("resnet18", 10, 32, width=8)
  with pytest.raises(CheckpointError) as e:
    weights.load(p, "resnet18", fresh18)
  msg = str(e.value)
  assert msg.startswith(f"cannot load {p} into resnet18 (ImageNet stem, width 8): this looks "
                        "like resnet50 (ImageNet stem, width 8); ")
  assert msg.count("shape mismatch") + msg.count("missing key") + msg.count("unexpected") == 3
  assert "more" in msg and len(msg) < 1000
  with pytest.raises(CheckpointError, match=r"into vit_ti16 \(patch 16, hidden 192, 12 layers\)"
                     r": this looks like resnet50 \(ImageNet stem, width 8\)"):
    weights.load(p, "vit_ti16", models.param_shapes("vit_ti16", 10, 32))
  _, vit_path = vit_ckpt
  with pytest.raises(CheckpointError, match=r"into vit_s16 .*: this looks like vit_ti16 "
                     r"\(patch 16, hidden 192, 12 layers\)"):
    weights.load(vit_path, "vit_s16", models.param_shapes("vit_s16", 10, 32))
  with pytest.raises(CheckpointError, match=r"this looks like vit_ti16"):
    weights.load(vit_path, "resnet18", fresh18)
  # The grayscale / RGB stem mismatch names the input channels.
  with pytest.raises(CheckpointError, match=r"into resnet18 \(ImageNet stem, width 8, 1 input "
                     r"channel\): this looks like resnet18 \(ImageNet stem, width 8\)"):
    weights.load(_save_npz(tmp_path, torchvision_state_dict("resnet18", width=8)[0]),
                 "resnet18", models.param_shapes("resnet18", 10, 32, 1, width=8))


def _save_npz(tmp_path, sd, name="ckpt.npz"):
  np.savez(tmp_path / name, **sd)
  return tmp_path / name


def test_torchvision_layout_round_trip(tmp_path):
  """The state dicts the tests fabricate without torch load back to their own values."""
  sd, variables = torchvision_state_dict("resnet18", width=8, stem="cifar", num_classes=10)
  v = weights.load(_save_npz(tmp_path, sd), "resnet18", models.param_shapes(
      "resnet18", 10, 32, width=8, stem="cifar"), keep_head=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, v, variables)


def test_vit_pth_says_what_it_looks_like(tmp_path):
  torch = pytest.importorskip("torch")
  sd, _ = torchvision_state_dict("resnet18", width=8)
  torch.save({k: torch.from_numpy(np.array(a)) for k, a in sd.items()},
             tmp_path / "r18.pth")
  with pytest.raises(CheckpointError, match=r"into vit_ti16: this looks like resnet18 "
                     r"\(ImageNet stem, width 8\); "):
    weights.load(tmp_path / "r18.pth", "vit_ti16", {"params": {}})


# ============================================================================ ncjax runs as weights


def _ncjax_run(workdir, run_id, variables, steps=(2, 4), fingerprint=None, projection=False,
               method="layer", unit="block5"):
  """A run directory as `ncjax.train.fit` leaves it: checkpoints/<step>/ of a `TrainState`
  (a masked optimizer's state included) and its history, and fingerprint.json. The
  parameters of step s are `variables`' plus s. Returns (run dir, {step: TrainState})."""
  from ncjax import methods, train
  from ncjax.experiment import records
  from ncjax.train import checkpoint as train_checkpoint
  run_dir = records.run_dir(str(workdir), run_id)
  mngr = train_checkpoint._checkpoint_manager(records.checkpoint_dir(str(workdir), run_id))
  states = {}
  for s in steps:
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a) + s, variables["params"])
    if projection:
      params = {"backbone": params, "projection": {"dense": {"kernel": jnp.ones((4, 3))}}}
    mask = (jax.tree_util.tree_map(lambda _: True, params) if projection
            else methods.trainable_mask(params, method, unit))
    tx = train.make_optimizer(train.OptimConfig(), 10, mask)
    state = train.init_state(params, variables.get("batch_stats", {}), tx).replace(
        step=jnp.asarray(s, jnp.int32))
    train_checkpoint._save_checkpoint(mngr, s, state, [{"step": s, "loss": 1.0, "accuracy": 0.5}])
    states[s] = state
  mngr.close()
  records.write_fingerprint(str(workdir), run_id, fingerprint or {})
  return run_dir, states


def _tree_equal(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)


@functools.lru_cache(maxsize=None)
def _r18w8(num_classes, width=8):
  return _random_like(models.param_shapes("resnet18", num_classes, 32, stem="cifar",
                                          width=width), seed=num_classes)


def test_ncjax_run_as_weights(tmp_path):
  """A run directory (its newest step), its checkpoints/ or one step: the backbone is
  transplanted, the 5-class head replaced by the fresh 3-class one; the state read is the one
  `train.restore_latest` resumes from; nothing in the run directory changes."""
  from flax import traverse_util
  from ncjax import train
  src = _r18w8(5)
  fp = {"model": "resnet18", "backbone.resnet18.options.stem": "cifar",
        "backbone.resnet18.options.width": 8, "backbone.resnet18.channels": 0}
  run_dir, states = _ncjax_run(tmp_path / "w", "resnet18-x-layer-block5", src, fingerprint=fp)
  before = {p: os.path.getmtime(p) for p in map(str, (tmp_path / "w").rglob("*"))}
  fresh = _r18w8(3)
  ckdir = os.path.join(run_dir, "checkpoints")
  for path, step in ((run_dir, 4), (ckdir, 4), (os.path.join(ckdir, "2"), 2)):
    v = weights.load(path, "resnet18", fresh)
    want = states[step]
    assert set(v) == {"params", "batch_stats"}
    _tree_equal(v["params"]["head"], fresh["params"]["head"])
    _tree_equal({k: x for k, x in v["params"].items() if k != "head"},
                {k: x for k, x in want.params.items() if k != "head"})
    _tree_equal(v["batch_stats"], want.batch_stats)
  restored, _ = train.restore_latest(ckdir, states[4])
  _tree_equal(weights.read_ncjax(weights.ncjax_step_dir(run_dir))["params"], restored.params)
  # keep_head with a head of the same shape
  v = weights.load(run_dir, "resnet18", src, keep_head=True)
  _tree_equal(v["params"]["head"], states[4].params["head"])
  v, skipped = weights.load_partial(run_dir, "resnet18", fresh)
  assert skipped == []
  assert before == {p: os.path.getmtime(p) for p in map(str, (tmp_path / "w").rglob("*"))}
  # Pre-training with a projection head: the backbone is used, the projection dropped.
  run_dir, states = _ncjax_run(tmp_path / "w", "pretrain-resnet18-src", src, steps=(3,),
                               projection=True)
  v = weights.load(run_dir, "resnet18", fresh)
  flat = traverse_util.flatten_dict(v["params"])
  assert not any("projection" in p for p in flat)
  _tree_equal(v["params"]["block8"], states[3].params["backbone"]["block8"])


def test_ncjax_run_of_another_architecture_is_named(tmp_path):
  src = _r18w8(5)
  fp = {"model": "resnet18", "backbone.resnet18.options.stem": "cifar",
        "backbone.resnet18.options.width": 8, "backbone.resnet18.channels": 0,
        "backbone.resnet18.image_size": 0, "optim.lr": 0.1}
  run_dir, _ = _ncjax_run(tmp_path / "w", "r18", src, steps=(1,), fingerprint=fp)
  with pytest.raises(CheckpointError) as e:
    weights.load(run_dir, "resnet18", _r18w8(3, width=16))
  msg = str(e.value)
  assert msg.startswith(
      f"cannot load {run_dir}/checkpoints/1 into resnet18 (CIFAR stem, width 16): it holds an "
      "ncjax checkpoint of resnet18 (CIFAR stem, width 8) (run r18: model resnet18, channels=0, "
      "image_size=0, options.stem=cifar, options.width=8); ")
  assert "shape mismatch for params/" in msg and "optim.lr" not in msg
  with pytest.raises(CheckpointError, match=r"into vit_ti16 .*: it holds an ncjax checkpoint "
                     r"of resnet18 \(CIFAR stem, width 8\)"):
    weights.load(run_dir, "vit_ti16", models.param_shapes("vit_ti16", 3, 32))
  _, skipped = weights.load_partial(run_dir, "resnet18", _r18w8(3, width=16))
  assert "params/stem/conv/kernel (shape (3, 3, 3, 8) != (3, 3, 3, 16))" in skipped


def test_ncjax_paths_that_are_not_one_run(tmp_path):
  src = _r18w8(5)
  _ncjax_run(tmp_path / "w", "a", src, steps=(1,))
  _ncjax_run(tmp_path / "w", "tag/b", src, steps=(1,))
  fresh = _r18w8(3)
  # A workdir's own config.json (the resolved config) does not make it a Hugging Face folder.
  (tmp_path / "w" / "config.json").write_text('{"model": "resnet18", "version": "0.1.0"}')
  for where in ("w", "w/runs"):
    with pytest.raises(CheckpointError, match=r"holds ncjax runs, not one run: pass one of them "
                       r"as the weights, e\.g\. .*/a \(runs: .*a, .*tag/b\)"):
      weights.load(tmp_path / where, "resnet18", fresh)
  (tmp_path / "w/runs/c/checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="has no checkpoint yet"):
    weights.load(tmp_path / "w/runs/c", "resnet18", fresh)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="is a directory but not an ncjax checkpoint"):
    weights.load(tmp_path / "empty", "resnet18", fresh)
  step = tmp_path / "w/runs/a/checkpoints/1"
  for f in (step / "state").rglob("*"):
    if f.is_file() and "manifest" in f.name:
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match=r"checkpoints/1 is not a readable ncjax checkpoint"):
    weights.load(tmp_path / "w/runs/a", "resnet18", fresh)
