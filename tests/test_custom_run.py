"""A custom run that fits and that warns (issue 22): configs/custom.py's batches sized for a
laptop CPU, one WARNING line before any work for a schedule that cannot learn (fewer than 20
optimizer steps, or a batch larger than the training data, which is capped at its size),
``--config.strict=True`` making it an error, and the progress line of a long run (the run,
step / total, the loss, the time left) before its first log window ends."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import custom  # noqa: E402
from ncjax import telemetry, train  # noqa: E402
from ncjax.errors import ConfigError  # noqa: E402
from ncjax.experiment import runner, spec as spec_lib  # noqa: E402
from ncjax.train import loop  # noqa: E402

RUNS = "resnet18-custom-linear ... resnet18-custom-full (4 runs)"


def _folder(root, train=4, test=2) -> str:
  """``<root>/{train,test}/<class>/*.png``: 3 classes of small grayscale PNGs."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", train), ("test", test)):
    for k in range(3):
      os.makedirs(os.path.join(root, split, f"c{k}"))
      for i in range(n):
        pixels = (rng.random((12, 12)) * 60 + 80 * k).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(root, split, f"c{k}", f"{i}.png"))
  return str(root)


def _config(folder, **optim):
  c = custom.get_config()
  c.data, c.weights, c.model = f"folder:{folder}", "", "resnet18"
  for k, v in optim.items():
    c.optim[k] = v
  return c


def test_custom_batches_are_sized_for_a_laptop():
  """Host memory grows with the batches: 16 training examples (the paper's learning rate per
  example), 64 evaluated ones; splits over 256 MiB at 224 x 224 stream from disk."""
  c = custom.get_config()
  assert (c.optim.batch_size, c.optim.lr, c.eval_batch_size, c.data_budget_mb) == (
      16, 0.0125, 64, 256)
  assert c.optim.lr / c.optim.batch_size == pytest.approx(0.1 / 128)
  assert c.strict is False


def test_a_schedule_that_cannot_learn_is_one_line_naming_steps_and_override(tmp_path):
  """12 training images: custom.py's batch of 32 is capped at 12 and said so; one epoch is one
  step, too few; with `optim.steps` the override is `optim.steps`; a schedule of enough full
  batches says nothing."""
  folder = _folder(tmp_path / "img")
  warn = lambda **optim: runner.schedule_warnings(spec_lib.build(_config(folder, **optim)))
  assert warn() == [
      f"{RUNS}: 30 optimizer steps each (30 epochs of 12 training images; "
      "--config.optim.batch_size=16 exceeds them: capped at 12); "
      "--config.optim.batch_size=12 or less says so"]
  assert warn(epochs=1) == [
      f"{RUNS}: 1 optimizer step each (1 epoch of 12 training images; "
      "--config.optim.batch_size=16 exceeds them: capped at 12), too few to learn: "
      "--config.optim.epochs=20 gives 20 steps (or set --config.optim.steps)"]
  assert warn(epochs=2, batch_size=4) == [
      f"{RUNS}: 6 optimizer steps each (2 epochs of 12 training images), too few to learn: "
      "--config.optim.epochs=7 gives 21 steps (or set --config.optim.steps)"]
  assert warn(steps=5, batch_size=4) == [
      f"{RUNS}: 5 optimizer steps each (--config.optim.steps=5), too few to learn: "
      "--config.optim.steps=20 or more"]
  assert warn(epochs=7, batch_size=4) == []


def test_strict_makes_it_an_error_before_any_work(tmp_path, capsys):
  folder = _folder(tmp_path / "img")
  c = _config(folder, epochs=1)
  runner.run(c, str(tmp_path / "dry"), dry_run=True)  # the warning, before the dry run ends
  err = capsys.readouterr().err
  assert (f"WARNING: {RUNS}: 1 optimizer step each (1 epoch of 12 training images; "
          "--config.optim.batch_size=16 exceeds them: capped at 12), too few") in err
  c.strict = True
  with pytest.raises(ConfigError) as e:
    runner.run(c, str(tmp_path / "w"))
  assert str(e.value).splitlines() == [
      "runs that cannot learn (--config.strict=True):",
      f"  {RUNS}: 1 optimizer step each (1 epoch of 12 training images; "
      "--config.optim.batch_size=16 exceeds them: capped at 12), too few to learn: "
      "--config.optim.epochs=20 gives 20 steps (or set --config.optim.steps)"]
  assert not (tmp_path / "w").exists()


def test_the_warning_is_one_line_on_the_command_line(tmp_path):
  """Before any work (here --dry_run, which stops after the checks): one stderr line."""
  folder = _folder(tmp_path / "img")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "ncjax.main", "--config=configs/custom.py",
       f"--workdir={tmp_path / 'w'}", f"--config.data=folder:{folder}", "--config.weights=",
       "--config.model=resnet18", "--config.optim.epochs=1", "--dry_run"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.splitlines() == [
      f"WARNING: {RUNS}: 1 optimizer step each (1 epoch of 12 training images; "
      "--config.optim.batch_size=16 exceeds them: capped at 12), too few to learn: "
      "--config.optim.epochs=20 gives 20 steps (or set --config.optim.steps)"]
  assert proc.stdout.splitlines()[-1] == "assets: all present and readable"


class _Clock:
  """Advances 31 s per call: every progress update prints a line."""

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    self.t += 31.0
    return self.t


def test_progress_line_names_run_step_loss_and_time_left(capsys, monkeypatch):
  """Off a terminal (capsys), a run's lines carry its loss before its first log window ends
  (log_every=50 > the 6 steps), then the window's mean."""
  monkeypatch.setattr(telemetry, "_clock", _Clock())
  monkeypatch.setattr(loop, "LOSS_EVERY_S", 0.0)
  rng = np.random.default_rng(0)
  feats, labels = rng.normal(size=(24, 8)).astype(np.float32), rng.integers(0, 3, 24)
  params = {"head": {"kernel": np.zeros((8, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  train.train(train.head_forward(3), params, {}, None, train.OptimConfig(lr=0.1), feats,
              labels.astype(np.int32), batch_size=8, steps=6, seed=0,
              desc="resnet18-custom-full")
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("I resnet18-custom-full: step 1/6, loss ")
  for line in lines[:-1]:
    head, _, tail = line.partition(", loss ")
    assert head.startswith("I resnet18-custom-full: step ") and tail.endswith(" s left"), line
    float(tail.split(",")[0])
  assert lines[-1].startswith("I resnet18-custom-full: step 6/6, loss ")
  assert "done in" in lines[-1]
