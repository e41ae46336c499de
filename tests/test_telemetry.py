"""Tests for ncjax.telemetry: progress lines off a terminal, metrics.jsonl, TensorBoard events."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from ncjax import telemetry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  """Advances `step_s` seconds per call, so rates and times left are exact."""

  def __init__(self, step_s):
    self.t, self.step_s = 0.0, step_s

  def __call__(self):
    self.t += self.step_s
    return self.t


# ----------------------------------------------------------------------------- progress

def test_format_line():
  line = telemetry.format_line("train", 450, 750, {"loss": 0.41234, "lr": "1e-3", "epoch": 3},
                               steps=450, elapsed=30.0)
  assert line == "I train: step 450/750, loss 0.4123, lr 1e-3, epoch 3, 15 steps/s, ~20 s left"
  done = telemetry.format_line("eval", 10, 10, {}, steps=10, elapsed=4.0)
  assert done == "I eval: step 10/10, 2.5 steps/s, done in 4 s"


def test_progress_off_a_terminal_prints_lines(capsys, monkeypatch):
  # capsys's stdout is not a terminal, so this is the nohup/Slurm path.
  monkeypatch.setattr(telemetry, "_clock", FakeClock(0.5))  # one clock call per step
  bar = telemetry.progress(range(8), total=10, initial=2, desc="train", every_s=1.0)
  seen = []
  for i in bar:
    seen.append(i)
    bar.set_postfix(loss=1.0 / (i + 1))
  bar.close()
  assert seen == list(range(8))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "I train: step 4/10, loss 0.5, 2 steps/s, ~3 s left"
  assert lines[-1].startswith("I train: step 10/10, loss 0.125, ")
  assert lines[-1].endswith(" steps/s, done in 4 s")
  assert all(line.startswith("I train: step ") for line in lines)
  assert len(lines) == 4  # steps 4, 6, 8 (10 is the done line), once although closed twice


def test_progress_is_quiet_for_a_short_phase(capsys):
  for _ in telemetry.progress(range(3), total=3, desc="eval"):
    pass
  assert capsys.readouterr().out == ""


def test_phase_counts_updates(capsys, monkeypatch):
  monkeypatch.setattr(telemetry, "_clock", FakeClock(1.0))
  with telemetry.phase("collapse", total=6, every_s=0.0) as p:
    p.update(2)
    p.set_postfix(nc1=1.5)
    p.update(2)
  lines = capsys.readouterr().out.splitlines()
  assert lines == ["I collapse: step 2/6, 2 steps/s, ~2 s left",
                   "I collapse: step 4/6, nc1 1.5, 2 steps/s, ~1 s left",
                   "I collapse: step 4/6, nc1 1.5, 1.33 steps/s, ~2 s left"]


def test_progress_on_a_terminal_is_tqdm(monkeypatch):
  monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
  bar = telemetry.progress(range(3), total=3, desc="x")
  assert type(bar).__name__ != "_LogProgress"
  assert list(bar) == [0, 1, 2]
  bar.set_postfix(loss=0.1)
  bar.close()


# ----------------------------------------------------------------------------- metrics.jsonl

def test_metrics_roundtrip_with_nonfinite(tmp_path):
  with telemetry.RunLog(tmp_path) as log:
    log.log("pretrain", 1, loss=0.5, accuracy=10)
    log.log("pretrain", 2, loss=math.nan, accuracy=math.inf)
    log.log("layer", 1, nc1=-math.inf)
  records = telemetry.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["run"], r["step"]) for r in records] == [("pretrain", 1), ("pretrain", 2),
                                                     ("layer", 1)]
  assert records[0]["loss"] == 0.5 and records[0]["accuracy"] == 10.0
  # NaN and +-inf alike are null on disk (`ncjax.io`'s one rule) and read back as NaN.
  assert math.isnan(records[1]["loss"]) and math.isnan(records[1]["accuracy"])
  assert math.isnan(records[2]["nc1"])
  assert all(isinstance(r["time"], float) for r in records)
  # Strict JSON on disk: non-finite values are null.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[1], parse_constant=pytest.fail)["loss"] is None
  assert telemetry.read_metrics(tmp_path) == records  # the workdir works too


def test_metrics_skip_a_torn_line_and_resume_after_it(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with telemetry.RunLog(tmp_path) as log:
    log.log("a", 1, loss=1.0)
    log.log("a", 2, loss=2.0)
  whole = path.read_bytes()
  path.write_bytes(whole[:-7])  # a kill in the middle of the second line's write
  assert [r["step"] for r in telemetry.read_metrics(path)] == [1]
  with telemetry.RunLog(tmp_path) as log:  # the resumed run appends after the fragment
    log.log("a", 2, loss=2.0)
  assert [(r["step"], r["loss"]) for r in telemetry.read_metrics(path)] == [(1, 1.0), (2, 2.0)]


def test_log_rejects_a_time_scalar(tmp_path):
  with telemetry.RunLog(tmp_path) as log, pytest.raises(ValueError, match="time"):
    log.log("a", 1, time=3.0)


# ----------------------------------------------------------------------------- TensorBoard

_READ_BACK = textwrap.dedent("""
  import json, math, sys
  sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
  from ncjax import telemetry
  with telemetry.RunLog(sys.argv[1]) as log:
    for step in range(1, 6):
      log.log("pretrain", step, loss=1.0 / step, accuracy=10.0 * step)
    log.log("pretrain", 6, loss=math.nan, accuracy=60.0)
    log.log("scl", 100, loss=0.25)
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for run in ("pretrain", "scl"):
    acc = event_accumulator.EventAccumulator(f"{sys.argv[1]}/tensorboard/{run}")
    acc.Reload()
    out[run] = {tag: [[e.step, e.value] for e in acc.Scalars(tag)]
                for tag in acc.Tags()["scalars"]}
  try:
    import tensorflow
  except ImportError:
    out["tensorflow"] = None
  print(json.dumps(out))
""")


def test_tensorboard_events_read_back_without_tensorflow(tmp_path):
  pytest.importorskip("tensorboard")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _READ_BACK, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout.splitlines()[-1])
  assert "tensorflow" in got  # TensorFlow was absent for both the writer and the loader
  loss = got["pretrain"]["loss"]
  assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
  assert [v for _, v in loss[:5]] == pytest.approx([1.0 / s for s in range(1, 6)])
  assert math.isnan(loss[5][1])
  assert got["pretrain"]["accuracy"] == [[s, 10.0 * s] for s in range(1, 7)]
  assert got["scl"] == {"loss": [[100, 0.25]]}
  # The same records went to metrics.jsonl.
  records = telemetry.read_metrics(tmp_path)
  assert [(r["run"], r["step"]) for r in records] == [("pretrain", s) for s in range(1, 7)] + [
      ("scl", 100)]
