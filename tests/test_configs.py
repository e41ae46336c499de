"""Every config loads, names real models/units/methods/jobs, and the CLI runs end to end."""
import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main uses)

from ncjax import measure, models
from ncjax.experiment import assemble, assets, runner, spec
from ncjax.errors import ConfigError
from tiny_config import tiny_mlp_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _load(path, arg=None):
  import importlib.util
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def test_paper_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {"default", "table1", "table3", "table5", "table6", "table7", "fig2", "fig3", "fig4",
          "fig5", "fig9", "fig11", "metrics_digits"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_is_consistent(path):
  """spec.build validates models, methods, units per model, variants, ranges: a config
  that builds names only real things."""
  c = _load(path)
  assert c.job in spec.JOBS
  if c.job == "metrics":
    return
  specs = spec.build(c)
  runs = [r for s in specs for r in s.runs()]
  assert runs and len({r.id for r in runs}) == len(runs)
  for r in runs:
    if r.unit and r.unit != spec.AUTO_UNIT:
      assert r.unit in models.units(r.backbone.model, **{
          k: v for k, v in r.backbone.options.items() if k in ("depth", "widths")})


def test_table_unit_sweeps_match_the_paper():
  units = lambda name: spec.build(_load(os.path.join(ROOT, "configs", name)))[0].backbones[0].units
  assert units("table5.py") == ("block1", "block3", "block5", "block7")
  assert units("table6.py") == ("block1", "block4", "block8", "block14")
  assert units("table7.py") == ("layer2", "layer5", "layer8", "layer11")
  (s,) = spec.build(_load(os.path.join(ROOT, "configs", "fig11.py")))
  assert s.train_sizes == (10, 24, 59, 142, 344, 835, 2022, 4898)
  # Table 5: Layer FT and SCL FT per unit, linear probe and full FT once per dataset.
  (s,) = spec.build(_load(os.path.join(ROOT, "configs", "table5.py")))
  cifar = [r.id for r in s.runs() if r.dataset == "cifar10"]
  assert cifar[:3] == ["resnet18-cifar10-linear", "resnet18-cifar10-layer-block1",
                       "resnet18-cifar10-layer-block3"] and len(cifar) == 10


def test_parse_classes():
  assert spec.parse_classes("5-9") == (5, 6, 7, 8, 9)
  assert spec.parse_classes("0,2, 4") == (0, 2, 4)
  assert spec.parse_classes((0, 2)) == (0, 2)
  assert spec.parse_classes("") is None
  for bad in ("9-5", "-1", "a", "1,1"):
    with pytest.raises(ValueError):
      spec.parse_classes(bad)


def test_missing_assets_are_reported_together_saying_where_they_come_from(tmp_path):
  c = _load(os.path.join(ROOT, "configs", "table3.py"))
  c.backbone.resnet18.weights = str(tmp_path / "nope.pth")
  c.data_dir = str(tmp_path)
  with pytest.raises(ConfigError) as e:
    assets.check_assets(spec.build(c))
  msg = str(e.value)
  assert f"--config.backbone.resnet18.weights={tmp_path}/nope.pth" in msg
  assert "download.pytorch.org" in msg and "ViT-B_32.npz" in msg  # every weights file
  for name in ("cifar10:train", "cifar100:train", "aircraft:train", "dtd:train",
               "oxford_iiit_pet:train"):  # and every dataset (once, not per split)
    assert name in msg, name


def _run_cli(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ncjax.main", f"--workdir={workdir}", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def test_default_config_end_to_end(tmp_path):
  """The default job (pre-train on digits 0-4, four methods on digits 5-9) with a tiny step
  count, through the real command line."""
  stdout = _run_cli(["--config.optim.steps=2", "--config.pretrain.optim.steps=3"], tmp_path)
  assert "| Linear Probe |" in stdout and "| SCL FT |" in stdout
  records = json.load(open(tmp_path / "results.json"))
  assert [r["method"] for r in records] == ["linear", "layer", "scl", "full"]
  for r in records:
    assert r["model"] == "resnet18" and r["dataset"] == "digits" and r["num_classes"] == 5
    assert 0.0 <= r["accuracy"] <= 100.0 and r["nc1"] > 0
    assert list(r["layerwise_nc1"]) == [f"block{i}" for i in range(1, 9)]
    assert r["num_train"] == 1438 - 718 or r["num_train"] > 0
  pct = {r["method"]: r["percent_params"] for r in records}
  assert pct["full"] == 100.0 and pct["layer"] == pct["scl"] and pct["linear"] < pct["layer"]
  for f in ("results.csv", "results.md", "layerwise_nc1.png", "records.jsonl", "config.json",
            "metrics.jsonl"):
    assert (tmp_path / f).exists(), f
  assert (tmp_path / "runs" / "resnet18-digits-scl-block5" / "checkpoints").is_dir()
  assert (tmp_path / "tensorboard" / "pretrain-resnet18-digits").is_dir()
  from ncjax import telemetry
  evals = [m for m in telemetry.read_metrics(str(tmp_path / "metrics.jsonl"))
           if "test_accuracy" in m]
  assert [m["run"] for m in evals] == ["pretrain-resnet18-digits"] + [r["run"] for r in records]
  assert [m["test_accuracy"] for m in evals[1:]] == [r["accuracy"] for r in records]
  assert [m["step"] for m in evals[1:]] == [2, 2, 2, 2] and evals[1]["nc1"] == records[0]["nc1"]
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["config"]["optim"]["steps"] == 2 and saved["ncjax_version"]


def test_a_wrong_weights_file_is_rejected_before_any_work(tmp_path):
  """A weights file of another architecture is refused by the asset check, naming the
  field, before pre-training or any run starts."""
  import numpy as np
  from test_weights import _vit_jax_checkpoint
  ck = _vit_jax_checkpoint()
  ck["embedding/kernel"] = ck["embedding/kernel"][..., :100]  # not ViT-Ti/16's width
  np.savez(tmp_path / "bad.npz", **ck)
  c = _tiny_mlp_config("transfer")
  c.models = ("vit_ti16",)
  c.backbone.default.update(dict(weights=str(tmp_path / "bad.npz"), unit=("layer1",),
                                 image_size=32, channels=3))
  c.backbone.default.options = {"pool": "cls"}
  with pytest.raises(ConfigError, match="--config.backbone.default.weights=.*bad.npz: .*shape"):
    runner.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "runs").exists()


def test_metrics_job(tmp_path):
  stdout = _run_cli([f"--config={ROOT}/configs/metrics_digits.py"], tmp_path)
  rows = json.load(open(tmp_path / "metrics.json"))
  assert [r["features"] for r in rows][0] == "pixels"
  for r in rows:
    assert abs(r["nc1"] - r["nc1_pinv"]) <= 1e-3 * r["nc1_pinv"]
  assert "| pixels |" in stdout


def _tiny_mlp_config(job):
  return tiny_mlp_config(job, depth=3)


def test_layer_probe_job_records_every_unit(tmp_path):
  records = runner.run(_tiny_mlp_config("layer_probe"), str(tmp_path))
  (r,) = records
  assert list(r["layerwise_accuracy"]) == ["layer1", "layer2", "layer3"]
  assert list(r["layerwise_nc1"]) == ["layer1", "layer2", "layer3"]
  assert all(0 <= a <= 100 for a in r["layerwise_accuracy"].values())
  assert all(v > 0 for v in r["layerwise_nc1"].values()) and r["nc1"] > 0
  assert r["weights"] == "pretrain" and r["num_classes"] == 5
  assert (tmp_path / "nc1_vs_accuracy.png").exists()


def test_pretrain_job_measures_source_collapse(tmp_path):
  records = runner.run(_tiny_mlp_config("pretrain"), str(tmp_path))
  (r,) = records
  assert r["stage"] == "pretrain" and r["dataset"] == "digits" and r["num_classes"] == 5
  assert list(r["layerwise_nc1"]) == ["layer1", "layer2", "layer3"]
  assert (tmp_path / "results.md").exists()


def test_unknown_job_is_named(tmp_path):
  c = _tiny_mlp_config("finetune")
  with pytest.raises(ConfigError, match="--config.job=finetune: must be one of"):
    runner.run(c, str(tmp_path))


def test_vit_transfer_with_scl_and_on_device_resize(tmp_path):
  """A ViT through the whole pipeline: digits resized on device 8 -> 32, grayscale tiled to
  RGB, SCL on layer3, from scratch."""
  c = _tiny_mlp_config("transfer")
  c.models = ("vit_ti16",)
  c.pretrain.enabled = False
  c.methods = ("linear", "scl")
  c.backbone.default.options = {"pool": "cls"}
  c.backbone.default.unit = ("layer3",)
  c.backbone.default.image_size = 32
  c.backbone.default.channels = 3
  c.optim.steps = 2
  records = runner.run(c, str(tmp_path))
  assert [r["method"] for r in records] == ["linear", "scl"]
  assert all(r["weights"] == "scratch" for r in records)
  assert list(records[1]["layerwise_nc1"]) == [f"layer{i}" for i in range(1, 13)]
  assert records[1]["unit"] == "layer3" and records[0]["unit"] == ""
  assert records[0]["percent_params"] < records[1]["percent_params"] < 100


def test_data_scarcity_grid_writes_accuracy_vs_size(tmp_path):
  """Fig. 11's loop: class-balanced subsets (10 images: batch shrinks to fit)."""
  c = _tiny_mlp_config("transfer")
  c.train_sizes = (10, 40)
  c.methods = ("linear", "full")
  c.collapse = False
  records = runner.run(c, str(tmp_path))
  assert [(r["method"], r["num_train"]) for r in records] == \
      [("linear", 10), ("full", 10), ("linear", 40), ("full", 40)]
  assert records[0]["batch_size"] == 10
  assert (tmp_path / "accuracy_vs_size.png").exists()


def test_pretrained_vit_checkpoint_through_the_pipeline(tmp_path):
  """A vit_jax-layout checkpoint (ViT-Ti/16 at 224, i.e. a 14x14 grid) fine-tuned at 32x32:
  the position embedding is resized to 2x2 on import, the frozen weights stay the file's."""
  import numpy as np
  from test_weights import _vit_jax_checkpoint
  ck = _vit_jax_checkpoint()
  path = tmp_path / "ViT-Ti_16.npz"
  np.savez(path, **ck)
  c = _tiny_mlp_config("transfer")
  c.models = ("vit_ti16",)
  c.pretrain.enabled = False
  c.methods = ("layer",)
  c.backbone.default.update(dict(weights=str(path), unit=("layer12",), image_size=32,
                                 channels=3, normalization="inception"))
  c.backbone.default.options = {"pool": "cls"}
  (s,) = spec.build(c)
  assets.check_assets([s])  # the file fits the architecture
  bb = s.backbones[0]
  ds = assemble.load_split(s, "digits", "train", bb, (5, 6, 7, 8, 9))
  model = assemble.build_model(s, bb, ds.num_classes)
  loaded, origin = assemble.initial_variables(s, bb, model, ds, None)
  assert origin == str(path)
  np.testing.assert_array_equal(loaded["params"]["embedding"]["kernel"], ck["embedding/kernel"])
  assert loaded["params"]["pos_embedding"].shape == (1, 5, 192)
  np.testing.assert_allclose(loaded["params"]["pos_embedding"][0, 0],
                             ck["Transformer/posembed_input/pos_embedding"][0, 0])
  (r,) = runner.run(c, str(tmp_path / "run"))
  assert r["weights"] == str(path) and r["unit"] == "layer12"
  assert 0 <= r["accuracy"] <= 100 and r["nc1"] > 0


def test_cli_on_8_simulated_devices(tmp_path):
  """The whole job (training, padded evaluation, streamed NC metrics) on an 8-device mesh,
  with a batch size the devices do not divide (rounded down to 56)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-m", "ncjax.main", f"--workdir={tmp_path}",
                        f"--config={ROOT}/configs/fig2.py:digits", "--config.optim.batch_size=60",
                        "--config.pretrain.optim.steps=5"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "devices 8 x cpu" in out.stdout
  records = json.load(open(tmp_path / "results.json"))
  assert [r["loss"] for r in records] == ["ce", "mse", "supcon"]  # SupCon: 2 views per example
  for r in records:
    assert r["batch_size"] == 56 and r["steps"] == 5
    assert list(r["layerwise_nc1"]) == [f"layer{i}" for i in range(1, 10)]


def test_bfloat16_default_config_matches_float32_accuracy(tmp_path):
  """The default job in bfloat16 compute (float32 parameters, optimizer state, BatchNorm
  statistics and loss) loses at most 1 point of the float32 run's accuracy (the mean over its
  four methods) and at most 3 points (5 of the test split's 179 images) on any one method.

  The bound is one-sided because what bfloat16 can cost is accuracy; a gain is the 30-epoch
  pre-training diverging in rounding, which moves the float32 run alone by more than a point:
  switching XLA:CPU's convolutions from YNNPACK to Eigen took its linear probe from 88.27 to
  86.03, and under jax 0.10.2 the float32 linear probe reads 84.36 while bfloat16's reads 91.06
  (layer 97.21 / 95.53, scl 95.53 / 96.65, full 98.32 / 96.65; means 93.85 / 94.97)."""
  from configs import default
  acc = {}
  for dtype in ("float32", "bfloat16"):
    c = default.get_config()
    c.dtype, c.collapse, c.plots, c.compile_cache_dir = dtype, False, False, ""
    acc[dtype] = {r["method"]: r["accuracy"] for r in runner.run(c, str(tmp_path / dtype))}
  assert list(acc["bfloat16"]) == ["linear", "layer", "scl", "full"]
  print(acc)
  for method, a32 in acc["float32"].items():
    assert a32 > 80.0, acc  # a real transfer, not two equal failures
    assert acc["bfloat16"][method] >= a32 - 3.0, acc
  mean = {d: sum(a.values()) / len(a) for d, a in acc.items()}
  assert mean["bfloat16"] >= mean["float32"] - 1.0, acc


def test_unknown_dtype_is_an_error_naming_the_field(tmp_path):
  c = tiny_mlp_config("transfer")
  c.dtype = "float16"
  with pytest.raises(ConfigError, match="--config.dtype=float16: must be one of"):
    runner.run(c, str(tmp_path))


def _tiny_mlp_collapse_case():
  """37 random 6x6 images in 3 classes (a padded last batch of 16) and an MLP: x, y, ds, model,
  variables."""
  import numpy as np
  from ncjax import data
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (37, 6, 6, 1), dtype=np.uint8)
  y = np.arange(37) % 3
  ds = data.ArrayDataset(x, y, 3)
  model = models.get("mlp", 3, depth=3, width=8)
  v = assemble.init_variables(model, (1, 6, 6, 1), 0)
  return x, y, ds, model, v


def test_collapse_streams_exact_nc1_with_a_padded_last_batch():
  """`transfer.collapse` (features + masked statistics on the device, 37 rows in batches of
  16) equals NC1 computed in float64 numpy from the same features."""
  import numpy as np
  from ncjax import train
  x, y, ds, model, v = _tiny_mlp_collapse_case()
  prep = assemble.make_prepare((0.5,), (0.25,), None, 1, 1)
  mesh = train.data_mesh()
  pen, layerwise = measure.collapse(model, v, prep, ds, 16, mesh)
  feats = measure.extract(model, v, prep, x, 16, mesh)

  def nc1_ref(h):
    h = h.astype(np.float64)
    mus = np.stack([h[y == c].mean(0) for c in range(3)])
    sw = sum((h[y == c] - mus[c]).T @ (h[y == c] - mus[c]) for c in range(3)) / len(h)
    m = mus - mus.mean(0)
    return np.trace(sw @ np.linalg.pinv(m.T @ m / 3)) / 3

  np.testing.assert_allclose(pen["nc1"], nc1_ref(feats["penultimate"]), rtol=1e-4)
  assert list(layerwise) == list(models.units(model))
  for unit, value in layerwise.items():
    np.testing.assert_allclose(value, nc1_ref(feats[unit]), rtol=1e-4)


def test_collapse_of_a_dead_layer_is_nan_with_a_warning_naming_it(capsys):
  """A layer whose features are all one vector (here layer2's weights zeroed, so it and every
  layer after it output a constant) has NC1 = 0/0 (metrics.ZeroSpreadError); the run records
  NaN for those layers, names each in a warning, and keeps layer1's exact value."""
  import numpy as np
  from ncjax import train
  import jax
  x, y, ds, model, v = _tiny_mlp_collapse_case()
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 0 if "layer2" in jax.tree_util.keystr(path) else a, v["params"])
  v = {**v, "params": params}
  prep = assemble.make_prepare((0.5,), (0.25,), None, 1, 1)
  pen, layerwise = measure.collapse(model, v, prep, ds, 16, train.data_mesh(), desc="dead")
  assert np.isfinite(layerwise["layer1"]) and layerwise["layer1"] > 0
  assert [u for u, val in layerwise.items() if np.isnan(val)] == ["layer2", "layer3"]
  assert np.isnan(pen["nc1"]) and np.isnan(pen["cdnv"])
  err = capsys.readouterr().err
  for where in ("dead: layer2 features", "dead: layer3 features", "dead: penultimate features"):
    assert f"WARNING: {where}: CollapseStats." in err, err
  assert "recorded as NaN (null)" in err


def test_coercions_are_errors_reported_together_before_any_work(tmp_path):
  """batch 0, epochs 0 and a reversed class range were silently read as batch 1, 1 step and
  all classes; now the CLI rejects them together, in command-line terms, with no traceback
  and before any training."""
  import time
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "ncjax.main", f"--workdir={tmp_path}", "--config.optim.batch_size=0",
       "--config.optim.epochs=0", "--config.downstream_classes=9-5", "--config.methods=linear,nope",
       "--config.data_budget_mb=-1", f"--config.compile_cache_dir={ROOT}/README.md/cache"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  err = proc.stderr
  assert "--config.optim.batch_size=0: must be an integer >= 1" in err
  assert "--config.optim.epochs=0: must be an integer >= 1" in err
  assert "--config.downstream_classes=9-5: reversed class range '9-5' (write 5-9)" in err
  assert "unknown method 'nope'" in err and "Traceback" not in err
  assert "--config.data_budget_mb=-1: must be >= 0" in err
  assert f"README.md/cache: {ROOT}/README.md is not a directory" in err
  assert not (tmp_path / "runs").exists() and time.time() - t0 < 30


def test_step_schedule_is_typed_validated_and_fingerprinted_only_when_used():
  """optim.schedule='step': decay epochs become steps with the run's steps per epoch; bad
  values are reported together, each under its field; the new fields enter run fingerprints
  only when the step schedule is used, so workdirs made before them stay resumable."""
  c = tiny_mlp_config("transfer")
  c.pretrain.optim = dict(epochs=5, steps=0, schedule="step", decay_epochs=(2, 4),
                          decay_factor=0.5)
  s, = spec.build(c)
  po = s.pretrain.optim
  assert (po.schedule, po.decay_epochs, po.decay_factor) == ("step", (2, 4), 0.5)
  # 719 images in batches of 64: 11 steps an epoch, decays from steps 22 and 44 of 55.
  recipe = assemble.optimizer(po, 719, 64)
  assert recipe.decay_steps == (22, 44) and assemble.total_steps(po, 719, 64) == 55
  pre, fine = (dict(r.fingerprint) for r in s.runs()[:2])
  assert pre["pretrain.optim.schedule"] == "step" and pre["pretrain.optim.decay_epochs"] == [2, 4]
  assert not {"optim.schedule", "optim.decay_epochs", "optim.decay_factor"} & set(fine)
  assert fine["pretrain.optim.decay_factor"] == 0.5  # what the fine-tuning starts from
  # The default config's fingerprints name none of the new fields.
  default_fp = [k for r in spec.build(tiny_mlp_config("fewshot"))[0].runs()
                for k, _ in r.fingerprint]
  assert not [k for k in default_fp if "schedule" in k or "decay_e" in k or "decay_f" in k
              or k == "fewshot.split"]
  c.pretrain.optim.update(decay_epochs=(4, 2), decay_factor=1.5, schedule="linear")
  c.optim.decay_epochs = (1, 30)
  with pytest.raises(ConfigError) as e:
    spec.build(c)
  msg = str(e.value)
  for line in ("--config.pretrain.optim.decay_epochs=4,2: must increase",
               "--config.pretrain.optim.decay_factor=1.5: must be in (0, 1]",
               "--config.pretrain.optim.schedule=linear: must be one of cosine, step"):
    assert line in msg, msg
  c.pretrain.optim.update(decay_epochs=(2, 5), decay_factor=0.1, schedule="step")
  with pytest.raises(ConfigError, match=r"decay_epochs=2,5: must be < epochs \(5\)"):
    spec.build(c)
  c.pretrain.optim.decay_epochs = ("2,x",)  # as the command line's comma list arrives
  with pytest.raises(ConfigError, match="decay_epochs=2,x: must be positive integers"):
    spec.build(c)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.parametrize("arg", ["fashion_mnist", "quick", "mnist", "digits"])
def test_fig2_pretrains_the_9_layer_mlp_with_ce_mse_and_supcon(arg):
  """Fig. 2's three panels: one pre-training run per loss, each its own fingerprint; SupCon
  embeds layer 9 through a linear projection, as CE and MSE classify it."""
  specs = spec.build(_load(os.path.join(ROOT, "configs", "fig2.py"), arg))
  assert [s.tag for s in specs] == [s.pretrain.loss for s in specs] == ["ce", "mse", "supcon"]
  runs = [r for s in specs for r in s.runs()]
  assert [r.kind for r in runs] == ["pretrain"] * 3
  assert len({r.fingerprint for r in runs}) == 3
  for s in specs:
    (bb,) = s.backbones
    assert bb.model == "mlp" and bb.options["depth"] == 9
    assert s.pretrain.dataset == ("fashion_mnist" if arg == "quick" else arg)
    assert s.pretrain.optim.aug_level == 1  # an MLP cannot fit shifted views (configs/fig2.py)
    assert s.pretrain.projection_layers == (1 if s.pretrain.loss == "supcon" else 0)


def test_fig2_quick_is_a_shorter_schedule_of_the_same_study():
  full, quick = (spec.build(_load(os.path.join(ROOT, "configs", "fig2.py"), a))
                 for a in ("fashion_mnist", "quick"))
  for f, q in zip(full, quick):
    assert q.pretrain.train_size * q.pretrain.optim.epochs < (
        (f.pretrain.train_size or 60_000) * f.pretrain.optim.epochs)
    assert (q.pretrain.loss, q.backbones) == (f.pretrain.loss, f.backbones)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install it)")
def test_fig2_quick_dry_run_lists_three_runs_on_real_fashion_mnist(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ncjax.main", "--config=configs/fig2.py:quick",
                        f"--workdir={tmp_path}", "--dry_run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "job pretrain: 3 run(s)" in out.stdout
  for tag in ("ce", "mse", "supcon"):
    assert f"{tag}/pretrain-mlp-fashion_mnist  [new]" in out.stdout
  assert "assets: all present and readable" in out.stdout
  assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install it)")
def test_fig2_quick_trains_ce_and_supcon_on_real_fashion_mnist(tmp_path):
  """A few steps of CE and SupCon (its own input and head; MSE differs from CE only in the
  loss) on 200 real images: the subset is class-balanced and NC1 is measured on it at every
  layer."""
  c = _load(os.path.join(ROOT, "configs", "fig2.py"), "quick")
  c.variants = tuple(v for v in c.variants if v["tag"] != "mse")
  c.pretrain.train_size, c.pretrain.optim.steps = 200, 2
  c.plots, c.compile_cache_dir = False, ""
  records = runner.run(c, str(tmp_path))
  assert [r["loss"] for r in records] == ["ce", "supcon"]
  for r in records:
    assert r["dataset"] == "fashion_mnist" and r["num_train"] == 200 and r["num_classes"] == 10
    assert list(r["layerwise_nc1"]) == [f"layer{i}" for i in range(1, 10)]
    assert all(v > 0 for v in r["layerwise_nc1"].values())


def test_step_decays_past_a_steps_long_run_are_named_before_any_work(tmp_path):
  """With `steps` setting a run's length, its steps per epoch come from the data: decays past
  the end are found from the split's size before any run starts, not when that run starts."""
  c = tiny_mlp_config("transfer")
  c.optim.update(dict(steps=0, epochs=4, schedule="step", decay_epochs=(2, 3)))
  with pytest.raises(ConfigError) as e:
    runner.run(c, str(tmp_path))
  assert str(e.value).splitlines()[1:] == [
      "  --config.pretrain.optim.decay_epochs=2,3: decay_steps (10, 15) must increase within "
      "(0, 4) (pretrain-mlp-digits: --config.pretrain.optim.steps=4, 5 steps per epoch)"]
  assert not (tmp_path / "runs").exists()
  c.pretrain.optim.schedule = "cosine"
  c.optim.update(dict(steps=12, decay_epochs=(1, 2)))  # 5 steps per epoch: 5, 10 < 12
  assert spec.build(c) and runner._schedule_problems(spec.build(c)) == []
