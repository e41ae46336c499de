"""ncjax.weights against timm and Hugging Face transformers themselves: each model is built by
the library (CPU torch, random weights, 32x32 images), saved the way the library saves it
(timm: a state dict by torch.save / safetensors, or a hub directory by `save_for_hf`;
transformers: `save_pretrained`), loaded by `ncjax.weights.load`, and its logits or features
compared with the library's own forward pass.

ViTs: timm and transformers compute GELU exactly (erf), ncjax's ViT (as vit_jax) with the tanh
approximation. The mapping tests build the library's model with its tanh GELU (timm
`act_layer="gelu_tanh"`, transformers `hidden_act="gelu_pytorch_tanh"`) and compare to 1e-4;
`test_*_exact_gelu` measures the library's default model, whose logits differ by a few
1e-4, from the GELU (transformers' LayerNorm eps 1e-12 against ncjax's 1e-6 moves them by
about 2e-5, within the 1e-4 of the mapping tests). Skipped with the reason when timm / transformers is not installed (both are in
the `test` extra)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import models, weights
from ncjax.weights import CheckpointError

torch = pytest.importorskip("torch")

IMAGE = 32
CLASSES = 10


def _library(name):
  """timm / transformers, importable beside the CPU torch (their vision code imports
  torchvision); the test skips, saying why, when it is not installed."""
  from torch_ref import import_torchvision
  try:
    import_torchvision()
  except ImportError as e:
    pytest.skip(f"{name} needs torchvision: {e}")
  return pytest.importorskip(name)


def _randomize_(model, seed=0):
  """Every parameter and BatchNorm statistic of a torch model perturbed, so that a bias, a
  LayerNorm or a class token loaded into the wrong place shows in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "position_embeddings")):
        p.add_(0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


def _torch_in(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


@functools.lru_cache(maxsize=None)
def _ncjax(name, classes=CLASSES, **options):
  """(fresh variables (zeros), jit of variables, x -> (logits, penultimate)) for model `name`."""
  model = models.get(name, classes, **options)
  shapes = models.param_shapes(name, classes, IMAGE, **options)
  fresh = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @jax.jit
  def run(variables, x):
    logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    return logits, state["intermediates"]["penultimate"][0]
  return fresh, run


def _check(ncjax_out, torch_out, tol=1e-4):
  """max |ncjax - library| <= tol; returns it (printed with -s, for the note)."""
  diff = float(np.max(np.abs(np.asarray(ncjax_out, np.float64)
                             - np.asarray(torch_out.detach().numpy(), np.float64))))
  print(f"max abs diff {diff:.3g} (scale {float(np.max(np.abs(np.asarray(ncjax_out)))):.3g})")
  assert diff <= tol, diff
  return diff


def _state_dict(model):
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save(sd, path):
  """A state dict as the libraries' users save one: safetensors or torch.save."""
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(sd, str(path))
  else:
    torch.save(sd, path)
  return path


# ============================================================================ timm


def _timm_vit(act="gelu_tanh", **kwargs):
  timm = _library("timm")
  torch.manual_seed(0)
  kwargs = dict(dict(img_size=IMAGE, num_classes=CLASSES, act_layer=act), **kwargs)
  return _randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_vit_state_dict(tmp_path, suffix):
  """timm's vit_tiny_patch16 (timm names: fused qkv, patch_embed.proj, cls_token, pos_embed)
  as vit_ti16: logits and the classifier input."""
  tm = _timm_vit()
  path = _save(_state_dict(tm), tmp_path / f"vit_tiny{suffix}")
  fresh, run = _ncjax("vit_ti16")
  v = weights.load(path, "vit_ti16", fresh, keep_head=True)
  x = _images()
  logits, pen = run(v, jnp.asarray(x))
  with torch.no_grad():
    feats = tm.forward_features(_torch_in(x))
    _check(logits, tm.forward_head(feats))
    _check(pen, feats[:, 0])  # forward_features ends with the final norm
  assert weights.preprocessing(path) is None  # a bare state dict carries none


def test_timm_vit_hub_directory(tmp_path):
  """A timm hub directory (config.json + model.safetensors, by timm's save_for_hf): loads,
  and its pretrained_cfg gives the preprocessing."""
  timm = _library("timm")
  from timm.models import save_for_hf
  tm = _timm_vit()
  save_for_hf(tm, str(tmp_path / "vit"), safe_serialization=True)
  fresh, run = _ncjax("vit_ti16")
  x = _images(1)
  logits, _ = run(weights.load(tmp_path / "vit", "vit_ti16", fresh, keep_head=True),
                  jnp.asarray(x))
  with torch.no_grad():
    _check(logits, tm(_torch_in(x)))
  cfg = tm.pretrained_cfg
  assert weights.preprocessing(tmp_path / "vit") == {
      "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "image_size": (IMAGE, IMAGE),
      "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"],
      "source": str(tmp_path / "vit" / "config.json")}
  assert weights.head_classes(tmp_path / "vit", "vit_ti16") == CLASSES
  del timm


def test_timm_vit_exact_gelu(tmp_path):
  """timm's default ViT (exact GELU): ncjax's tanh GELU moves the logits by a few 1e-4."""
  tm = _timm_vit(act="gelu")
  path = _save(_state_dict(tm), tmp_path / "vit_tiny.safetensors")
  fresh, run = _ncjax("vit_ti16")
  x = _images()
  logits, _ = run(weights.load(path, "vit_ti16", fresh, keep_head=True), jnp.asarray(x))
  with torch.no_grad():
    _check(logits, tm(_torch_in(x)), tol=2e-3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_resnet_state_dict(tmp_path, suffix):
  """timm's resnet18 (torchvision's key names): logits and pooled features."""
  timm = _library("timm")
  tm = _randomize_(timm.create_model("resnet18", pretrained=False, num_classes=CLASSES))
  path = _save(_state_dict(tm), tmp_path / f"resnet18{suffix}")
  fresh, run = _ncjax("resnet18")
  x = _images()
  logits, pen = run(weights.load(path, "resnet18", fresh, keep_head=True), jnp.asarray(x))
  with torch.no_grad():
    feats = tm.forward_head(tm.forward_features(_torch_in(x)), pre_logits=True)
    _check(logits, tm(_torch_in(x)))
    _check(pen, feats)


def test_timm_models_ncjax_lacks_are_named(tmp_path):
  """A timm ConvNeXt, a ViT with register tokens, and a hub directory of another model."""
  timm = _library("timm")
  from timm.models import save_for_hf
  convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES)
  path = _save(_state_dict(convnext), tmp_path / "convnext.safetensors")
  with pytest.raises(CheckpointError, match=r"this looks like a ConvNeXt \(timm\); ncjax has "
                     "no such model"):
    weights.load(path, "resnet18", _ncjax("resnet18")[0])
  save_for_hf(convnext, str(tmp_path / "hub"), safe_serialization=True)
  with pytest.raises(CheckpointError, match=r"is a timm convnext_atto model; ncjax reads "
                     "timm's ViTs"):
    weights.load(tmp_path / "hub", "resnet18", _ncjax("resnet18")[0])
  reg = _timm_vit(reg_tokens=4)
  path = _save(_state_dict(reg), tmp_path / "vit_reg.safetensors")
  with pytest.raises(CheckpointError, match=r"this looks like vit_ti16 \(patch 16, hidden 192, "
                     r"12 layers\), with register tokens \(reg_token\); ncjax's ViT has none"):
    weights.load(path, "vit_ti16", _ncjax("vit_ti16")[0])
  small = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=IMAGE)
  path = _save(_state_dict(small), tmp_path / "vit_small.pth")
  with pytest.raises(CheckpointError, match=r"into vit_ti16 .*: this looks like vit_s16 .*"
                     r"the file is a timm ViT state dict"):
    weights.load(path, "vit_ti16", _ncjax("vit_ti16")[0])


# ============================================================================ Hugging Face


def _hf_vit_config(transformers, **kwargs):
  """A transformers ViTConfig of vit_ti16's size at 32x32 (patch 16, hidden 192, 12 layers,
  3 heads, MLP 768), tanh GELU unless `hidden_act` says otherwise."""
  kwargs = dict(dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                     intermediate_size=768, image_size=IMAGE, patch_size=16,
                     hidden_act="gelu_pytorch_tanh", num_labels=CLASSES), **kwargs)
  return transformers.ViTConfig(**kwargs)


def _hf_save(model, directory, processor=None):
  model.save_pretrained(str(directory))
  if processor is not None:
    processor.save_pretrained(str(directory))
  return directory


def test_hf_vit_for_image_classification_directory(tmp_path):
  """A ViTForImageClassification directory (config.json, model.safetensors,
  preprocessor_config.json): logits, the classifier input, the preprocessing."""
  transformers = _library("transformers")
  torch.manual_seed(0)
  hf = _randomize_(transformers.ViTForImageClassification(_hf_vit_config(transformers)))
  processor = transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE})
  d = _hf_save(hf, tmp_path / "vit", processor)
  fresh, run = _ncjax("vit_ti16")
  x = _images()
  logits, pen = run(weights.load(d, "vit_ti16", fresh, keep_head=True), jnp.asarray(x))
  with torch.no_grad():
    out = hf(pixel_values=_torch_in(x), output_hidden_states=True)
    _check(logits, out.logits)
    _check(pen, hf.vit.layernorm(out.hidden_states[-1])[:, 0])
  assert weights.preprocessing(d) == {
      "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "image_size": (IMAGE, IMAGE),
      "crop_pct": None, "interpolation": "bilinear",
      "source": str(d / "preprocessor_config.json")}
  assert weights.head_classes(d, "vit_ti16") == CLASSES


def test_hf_vit_model_safetensors_file(tmp_path):
  """A ViTModel's model.safetensors named directly (its config.json beside it): the class
  token after the final LayerNorm; its pooler is dropped (reported), or loaded as the
  `pre_logits` of a model with `representation_size`, where it is the pooler's output."""
  transformers = _library("transformers")
  torch.manual_seed(1)
  hf = _randomize_(transformers.ViTModel(_hf_vit_config(transformers)), seed=1)
  d = _hf_save(hf, tmp_path / "vit")
  path = d / "model.safetensors"
  fresh, run = _ncjax("vit_ti16")
  x = _images(2)
  v, skipped = weights.load_partial(path, "vit_ti16", fresh)
  assert sorted(skipped) == ["pooler.dense.bias (the model has no pre_logits)",
                             "pooler.dense.weight (the model has no pre_logits)"]
  _, pen = run(v, jnp.asarray(x))
  fresh_p, run_p = _ncjax("vit_ti16", representation_size=192)
  _, pooled = run_p(weights.load(path, "vit_ti16", fresh_p), jnp.asarray(x))
  with torch.no_grad():
    out = hf(pixel_values=_torch_in(x))
    _check(pen, out.last_hidden_state[:, 0])
    _check(pooled, out.pooler_output)
  assert weights.preprocessing(path) is None  # save_pretrained of a model writes no processor


def test_hf_vit_exact_gelu(tmp_path):
  """transformers' default ViT (exact GELU, LayerNorm eps 1e-12)."""
  transformers = _library("transformers")
  torch.manual_seed(2)
  hf = _randomize_(transformers.ViTForImageClassification(
      _hf_vit_config(transformers, hidden_act="gelu")), seed=2)
  d = _hf_save(hf, tmp_path / "vit")
  fresh, run = _ncjax("vit_ti16")
  x = _images()
  logits, _ = run(weights.load(d, "vit_ti16", fresh, keep_head=True), jnp.asarray(x))
  with torch.no_grad():
    _check(logits, hf(pixel_values=_torch_in(x)).logits, tol=2e-3)


def _hf_resnet_config(transformers, name):
  if name == "resnet18":
    return transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                     depths=[2, 2, 2, 2], layer_type="basic",
                                     num_labels=CLASSES)
  return transformers.ResNetConfig(num_labels=CLASSES)  # its defaults are ResNet-50's


def test_hf_resnet_model_directory(tmp_path):
  """A ResNetModel (resnet18's config) directory: the pooled features."""
  transformers = _library("transformers")
  hf = _randomize_(transformers.ResNetModel(_hf_resnet_config(transformers, "resnet18")))
  d = _hf_save(hf, tmp_path / "resnet18")
  fresh, run = _ncjax("resnet18")
  x = _images()
  _, pen = run(weights.load(d, "resnet18", fresh), jnp.asarray(x))
  with torch.no_grad():
    _check(pen, hf(pixel_values=_torch_in(x)).pooler_output.flatten(1))


def test_hf_resnet_for_image_classification_directory(tmp_path):
  """A ResNetForImageClassification (ResNet-50, bottleneck blocks) directory with the
  ConvNeXt image processor microsoft/resnet-50 ships: logits and the preprocessing."""
  transformers = _library("transformers")
  hf = _randomize_(transformers.ResNetForImageClassification(
      _hf_resnet_config(transformers, "resnet50")))
  processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
  d = _hf_save(hf, tmp_path / "resnet50", processor)
  fresh, run = _ncjax("resnet50")
  x = _images()
  logits, _ = run(weights.load(d, "resnet50", fresh, keep_head=True), jnp.asarray(x))
  with torch.no_grad():
    _check(logits, hf(pixel_values=_torch_in(x)).logits)
  assert weights.preprocessing(d) == {
      "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
      "image_size": (224, 224),
      "crop_pct": 0.875, "interpolation": "bicubic",
      "source": str(d / "preprocessor_config.json")}


def test_hf_models_ncjax_lacks_are_refused(tmp_path):
  """Another family (ConvNeXt), a ResNet v1 (stride on the 1x1 conv) and a ViT of other
  heads are refused before the weights are read, saying what they are."""
  transformers = _library("transformers")
  convnext = transformers.ConvNextModel(transformers.ConvNextConfig(
      hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
  d = _hf_save(convnext, tmp_path / "convnext")
  with pytest.raises(CheckpointError, match=r"is a Hugging Face convnext model \(ConvNextModel\);"
                     r" ncjax reads Hugging Face vit \(ViTModel"):
    weights.load(d, "resnet18", _ncjax("resnet18")[0])
  v1 = transformers.ResNetModel(transformers.ResNetConfig(downsample_in_bottleneck=True))
  d = _hf_save(v1, tmp_path / "resnet50-v1")
  with pytest.raises(CheckpointError, match="downsample_in_bottleneck=True"):
    weights.load(d, "resnet50", _ncjax("resnet50")[0])
  vit = transformers.ViTModel(_hf_vit_config(transformers, num_attention_heads=4))
  d = _hf_save(vit, tmp_path / "vit4")
  with pytest.raises(CheckpointError, match="a Hugging Face ViT of 4 heads, the model has 3"):
    weights.load(d, "vit_ti16", _ncjax("vit_ti16")[0])
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "vit"}))
  with pytest.raises(CheckpointError, match="has a config.json but no weights"):
    weights.load(tmp_path / "empty", "vit_ti16", _ncjax("vit_ti16")[0])
  assert os.path.isdir(tmp_path / "empty")
