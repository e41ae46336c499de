"""configs/custom.py: fine-tuning your own checkpoint on your own image folder with three
overrides (data, weights, model). The spec it gives every model family, grayscale images into
RGB models, a checkpoint of the wrong architecture reported before any work, and two real
runs of the command line: a torchvision-layout checkpoint written by the tests, then the
first run's own checkpoint as weights (about 2 minutes on 2 CPU cores, compilation mostly)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import custom  # noqa: E402
from ncjax import data  # noqa: E402
from ncjax.experiment import assemble, assets, spec as spec_lib
from test_weights import torchvision_state_dict  # noqa: E402

CLASSES = ("cat", "dog", "owl")
METHODS = ("linear", "layer", "scl", "full")

# A config of your own, kept outside the repository: configs/custom.py with a shorter run at
# 32 x 32 (the run's length only; every choice of the fine-tuning is custom.py's).
SHORT_CUSTOM = '''"""configs/custom.py, two steps at 32 x 32."""
from configs import custom


def get_config():
  c = custom.get_config()
  c.optim.steps = 2
  c.optim.batch_size = 6
  c.eval_batch_size = 32
  for name in custom.RESNETS:
    c.backbone[name].image_size = 32
  c.plots = False
  return c
'''


def _image_folder(root, train=4, test=2) -> str:
  """``<root>/{train,test}/<class>/*.png``: grayscale PNGs of two sizes, each class its own
  brightness."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", train), ("test", test)):
    for k, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        shape = (40, 48) if i % 2 else (36, 36)
        pixels = (rng.random(shape) * 60 + 80 * k).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(root, split, name, f"{i}.png"))
  return str(root)


def _cli(cwd, *args, timeout=600):
  """The command line, run from `cwd` (this checkout's ncjax and configs on the path)."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ncjax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _three(data_dir, weights, model) -> list[str]:
  """The overrides a user of configs/custom.py writes: the whole point is that there are 3."""
  return [f"--config.data=folder:{data_dir}", f"--config.weights={weights}",
          f"--config.model={model}"]


def _custom(**fields):
  """configs/custom.py with `fields` set as the command line sets them (locked config)."""
  c = custom.get_config()
  c.lock()
  for k, v in fields.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("model, unit, normalization", [
    ("resnet18", "block5", "imagenet"), ("resnet34", "block8", "imagenet"),
    ("resnet50", "block8", "imagenet"), ("vit_b32", "layer8", "inception"),
    ("vit_b16", "layer8", "inception"), ("vit_s16", "layer8", "inception"),
    ("vit_ti16", "layer8", "inception")])
def test_three_fields_give_every_model_family_its_grid(model, unit, normalization):
  """Each family gets its ImageNet settings and a mid-network unit; all four methods, all
  classes, no pre-training; `data` is the dataset's source and `weights` the backbone's."""
  (spec,) = spec_lib.build(_custom(data="folder:/data/flowers", weights="/w/ckpt.npz",
                                   model=model))
  (bb,) = spec.backbones
  assert (bb.model, bb.units, bb.image_size, bb.channels, bb.normalization, bb.weights) == (
      model, (unit,), 224, 3, normalization, "/w/ckpt.npz")
  assert spec.methods == METHODS and spec.downstream_classes is None
  assert spec.datasets == ("custom",) and spec.source("custom") == "folder:/data/flowers"
  assert not spec.uses_pretraining(bb)
  assert [r.id for r in spec.runs()] == [f"{model}-custom-linear", f"{model}-custom-layer-{unit}",
                                         f"{model}-custom-scl-{unit}", f"{model}-custom-full"]
  assert spec.resolved["models"] == model and spec.resolved["weights"] == "/w/ckpt.npz"


def test_grayscale_images_feed_rgb_models(tmp_path):
  """An image folder decodes grayscale files as RGB; one-channel data (the digits) is tiled
  to the 3 channels of an ImageNet model on the device, with ImageNet statistics."""
  folder = _image_folder(tmp_path / "img", train=2, test=1)
  ds = data.load(f"folder:{folder}", "train", decode_size=32)
  images = np.asarray(ds.images[:])
  assert images.shape[-1] == 3 and (images[..., :1] == images).all()
  (spec,) = spec_lib.build(_custom(data="digits", weights="", model="resnet18"))
  (bb,) = spec.backbones
  digits = data.load("digits", "train")
  assert digits.images.shape[-1] == 1
  prepare = assemble.prepare_for(bb, digits, aug_level=1)
  assert prepare.channels == 3 and assemble.input_shape(bb, digits) == (1, 224, 224, 3)
  x = np.asarray(prepare(None, digits.images[:4], False))
  assert x.shape == (4, 224, 224, 3)
  pixels = x * np.asarray(prepare.std) + np.asarray(prepare.mean)  # back to [0, 1]
  np.testing.assert_allclose(pixels[..., 1], pixels[..., 0], atol=1e-5)
  np.testing.assert_allclose(pixels[..., 2], pixels[..., 0], atol=1e-5)
  np.testing.assert_allclose(prepare.mean, data.stats_for("imagenet")[0], rtol=1e-6)


def test_wrong_checkpoint_and_missing_data_are_named_before_any_work(tmp_path):
  """Three overrides, a resnet50 checkpoint for resnet18: one line under --config.weights
  saying what the checkpoint looks like, before anything is written; a missing image folder
  is reported under --config.data."""
  folder = _image_folder(tmp_path / "img", train=2, test=1)
  sd, _ = torchvision_state_dict("resnet50", width=8)
  np.savez(tmp_path / "resnet50-w8.npz", **sd)
  wrong = str(tmp_path / "resnet50-w8.npz")
  proc = _cli(tmp_path, "--config=configs/custom.py", f"--workdir={tmp_path / 'w'}",
              *_three(folder, wrong, "resnet18"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert lines[0] == "ncjax: missing or unusable assets:" and len(lines) == 2
  assert lines[1].startswith(
      f"  --config.weights={wrong}: cannot load {wrong} into resnet18 (ImageNet stem, width 64): "
      "this looks like resnet50 (ImageNet stem, width 8); ")
  assert len(lines[1]) < 1000  # a few mismatches, not a list of 265 shapes
  assert not (tmp_path / "w").exists()
  # Every problem at once, each under the field that was set.
  proc = _cli(tmp_path, "--config=configs/custom.py", f"--workdir={tmp_path / 'w'}",
              *_three(tmp_path / "nowhere", wrong, "resnet50"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 3
  assert lines[1].startswith(f"  --config.data=folder:{tmp_path / 'nowhere'}: custom:train: "
                             "image folder split")
  assert lines[2].startswith(f"  --config.weights={wrong}: cannot load {wrong} into resnet50 "
                             "(ImageNet stem, width 64): this looks like resnet50 (ImageNet "
                             "stem, width 8); ")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_own_folder_and_checkpoint_in_three_overrides_then_reuse_the_run(tmp_path):
  """From a directory of your own: grayscale PNGs of 3 classes, a torchvision ResNet-18
  state dict, a config of your own importing configs/custom.py, three overrides. Then the
  first run's full fine-tuning run directory is the weights of a second run."""
  folder = _image_folder(tmp_path / "img")
  sd, _ = torchvision_state_dict("resnet18")
  np.savez(tmp_path / "resnet18.npz", **sd)
  (tmp_path / "short_custom.py").write_text(SHORT_CUSTOM)
  first = str(tmp_path / "first")
  overrides = _three(folder, tmp_path / "resnet18.npz", "resnet18")
  assert len(overrides) == 3
  proc = _cli(tmp_path, "--config=short_custom.py", f"--workdir={first}", *overrides)
  assert proc.returncode == 0, proc.stderr[-4000:]
  records = _results(first)
  assert [(r["method"], r["unit"]) for r in records] == [
      ("linear", ""), ("layer", "block5"), ("scl", "block5"), ("full", "")]
  for r in records:
    assert (r["model"], r["dataset"], r["num_classes"], r["num_train"], r["num_test"]) == (
        "resnet18", "custom", 3, 12, 6)
    assert r["weights"] == str(tmp_path / "resnet18.npz") and 0 <= r["accuracy"] <= 100
  run = os.path.join(first, "runs", "resnet18-custom-full")
  assert os.path.isdir(os.path.join(run, "checkpoints", "2"))

  second = str(tmp_path / "second")
  proc = _cli(tmp_path, "--config=short_custom.py", f"--workdir={second}",
              *_three(folder, run, "resnet18"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert [(r["method"], r["weights"]) for r in _results(second)] == [
      (m, run) for m in METHODS]


def test_weights_are_checked_for_the_input_the_model_will_see(tmp_path):
  """The asset check builds the model for its data's input when the backbone leaves it to
  the data (image_size / channels 0): an ncjax run on the 8 x 8 grayscale digits fits the
  same model on the digits, and is named when it does not fit."""
  import tiny_config
  from test_weights import _ncjax_run, _random_like
  from ncjax import models
  src = _random_like(models.param_shapes("mlp", 5, 8, 1, depth=3, width=32))
  run_dir, _ = _ncjax_run(tmp_path, "pretrain-mlp-digits", src, steps=(4,),
                          fingerprint={"model": "mlp"}, method="linear")
  c = tiny_config.tiny_mlp_config("transfer")
  c.pretrain.enabled = False
  c.backbone.default.weights = run_dir
  assets.check_assets(spec_lib.build(c), progress=lambda _: None)
  c.backbone.default.options = {"depth": 4, "width": 32}
  with pytest.raises(spec_lib.ConfigError) as e:
    assets.check_assets(spec_lib.build(c), progress=lambda _: None)
  assert (f"--config.backbone.default.weights={run_dir}: cannot load {run_dir}/checkpoints/4 "
          "into mlp (4 layers, width 32, 64 input features): it holds an ncjax checkpoint of "
          "mlp (3 layers, width 32, 64 input features)") in str(e.value)


def test_normalization_checkpoint_takes_the_mean_and_std_of_the_weights_files(tmp_path, capsys):
  """``normalization=checkpoint`` reads the mean / std of the weights' preprocessing config
  (here a Hugging Face ``preprocessor_config.json``), records where they came from, and is an
  error before any work where there is none; weights that have one and a run that normalises
  with other statistics get one warning line naming both and the override."""
  d = tmp_path / "vit-hf"
  d.mkdir()
  (d / "preprocessor_config.json").write_text(json.dumps(
      {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
       "size": {"height": 224, "width": 224}}))
  c = custom.get_config()
  c.model, c.weights = "vit_b16", str(d)
  c.backbone.vit_b16.normalization = "checkpoint"
  (bb,) = spec_lib.build(c)[0].backbones
  ds = data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.arange(2), 2)
  assert assemble.normalization("checkpoint", ds, 3, bb.weights_path) == ((0.5,) * 3,) * 2
  assert assemble.normalization_used(bb) == f"checkpoint:{d / 'preprocessor_config.json'}"

  p = spec_lib.Problems()
  assets._check_normalization(p, str(d), bb)
  bare = tmp_path / "vit.pth"
  assets._check_normalization(p, str(bare), bb)
  assert p.lines == [f"--config.backbone.vit_b16.normalization=checkpoint: {bare} has no "
                     "preprocessing config giving a mean and std (a Hugging Face "
                     "preprocessor_config.json, or timm's pretrained_cfg): choose one of "
                     "imagenet, inception, dataset"]

  capsys.readouterr()
  for norm in ("inception", "imagenet"):
    c.backbone.vit_b16.normalization = norm
    (bb,) = spec_lib.build(c)[0].backbones
    assets._check_normalization(spec_lib.Problems(), str(d), bb)
  assert capsys.readouterr().err == (
      f"WARNING: {d} was trained with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5) "
      f"({d / 'preprocessor_config.json'}); backbone.vit_b16.normalization=imagenet normalises "
      "otherwise: --config.backbone.vit_b16.normalization=checkpoint uses the checkpoint's\n")

  c.weights = ""
  c.backbone.vit_b16.normalization = "checkpoint"
  with pytest.raises(spec_lib.ConfigError) as e:
    spec_lib.build(c)
  assert ("--config.backbone.vit_b16.normalization=checkpoint: needs a weights file "
          "(backbone.<model>.weights)") in str(e.value)
