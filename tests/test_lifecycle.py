"""A run's lifecycle through the real command line: resume by default, fingerprints that stop a
changed config, --fresh, --dry_run, kill -9 then rerun, and a full disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={ROOT}/tests/tiny_config.py:transfer"
# Long enough to be killed mid-run: 200 + 4 x 400 steps with a checkpoint every 25.
LONG = ["--config.optim.steps=400", "--config.pretrain.optim.steps=200",
        "--config.checkpoint_every=25", "--config.plots=False"]


def _cli(workdir, *args, check=True, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ncjax.main", f"--workdir={workdir}", TINY, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def _results(workdir):
  """results.json without the fields a rerun may change: wall-clock times (the run's, and
  the seconds per train step)."""
  records = json.load(open(os.path.join(workdir, "results.json")))
  return [{k: v for k, v in r.items() if k not in ("wall_s", "step_s")} for r in records]


def test_a_changed_config_stops_before_work_naming_fields_and_fresh_starts_over(tmp_path):
  _cli(tmp_path, "--config.optim.steps=6")
  first = _results(tmp_path)
  before = {p: os.path.getmtime(p) for p in map(str, tmp_path.rglob("*"))}
  out = _cli(tmp_path, "--config.optim.steps=5", "--config.optim.lr=0.05", check=False)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "optim.lr: 0.1 in the workdir, 0.05 now; optim.steps: 6 in the workdir, 5 now" \
      in out.stderr
  assert out.stderr.count("optim.steps: 6 in the workdir") == 4  # the 4 fine-tuning runs
  problems = "\n".join(l for l in out.stderr.splitlines() if not l.startswith("WARNING: "))
  assert "pretrain-mlp-digits" not in problems  # pre-training did not change
  assert "--fresh" in out.stderr
  assert {p: os.path.getmtime(p) for p in map(str, tmp_path.rglob("*"))} == before

  # The same config again: every run is finished, nothing trains, the results are the same.
  again = _cli(tmp_path, "--config.optim.steps=6")
  assert _results(tmp_path) == first and " 0 XLA compilations" not in again.stdout

  out = _cli(tmp_path, "--config.optim.steps=5", "--fresh")
  removed = [line for line in out.stdout.splitlines() if "--fresh: removing" in line]
  assert any(line.endswith("runs/mlp-digits-linear") for line in removed)
  assert any(line.endswith("runs/pretrain-mlp-digits") for line in removed)  # all its runs
  assert removed[-1].endswith("the metrics.jsonl lines of 5 run(s)")
  assert [r["steps"] for r in _results(tmp_path)] == [5, 5, 5, 5]


def test_dry_run_prints_the_grid_and_assets_and_trains_nothing(tmp_path):
  out = _cli(tmp_path, "--dry_run")
  assert "job transfer: 5 run(s)" in out.stdout
  for run in ("pretrain-mlp-digits", "mlp-digits-linear", "mlp-digits-scl-layer2"):
    assert f"{run}  [new]" in out.stdout
  assert "--config.pretrain.dataset: digits:train" in out.stdout
  assert "assets: all present and readable" in out.stdout
  assert not (tmp_path / "runs").exists()


def test_a_missing_dataset_is_named_before_any_work(tmp_path):
  t0 = time.time()
  out = _cli(tmp_path, f"--config.dataset_sources.aircraft=folder:{tmp_path}/none",
             "--config.datasets=digits,aircraft", check=False)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "--config.datasets=aircraft:train:" in out.stderr
  assert not (tmp_path / "runs").exists() and time.time() - t0 < 30


def test_kill_9_then_rerun_gives_the_uninterrupted_results(tmp_path):
  """A run killed with SIGKILL mid fine-tuning (after its first checkpoints) and rerun with
  the same command ends with results.json equal to an uninterrupted run's in every field
  but wall_s: finished runs are not redone, the killed one resumes bit-identically from its
  last checkpoint (history included), orbax's half-written save is cleaned up."""
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  _cli(whole, *LONG)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "ncjax.main", f"--workdir={killed}", TINY, *LONG],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics, deadline = killed / "metrics.jsonl", time.time() + 300
  try:
    while time.time() < deadline:  # kill once the layer FT run has passed a few checkpoints
      if metrics.exists() and '"run": "mlp-digits-layer-layer2", "step": 100' in metrics.read_text():
        break
      assert proc.poll() is None, "finished before it could be killed"
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (killed / "results.json").exists()
  assert (killed / "runs" / "mlp-digits-linear" / "record.json").exists()
  assert not (killed / "runs" / "mlp-digits-layer-layer2" / "record.json").exists()
  out = _cli(killed, *LONG)
  assert _results(killed) == _results(whole)
  assert not list(killed.rglob("*orbax-checkpoint-tmp*"))
  # The per-step history survived the kill: every run logged its last step.
  from ncjax import telemetry
  last = {m["run"]: m["step"] for m in telemetry.read_metrics(str(killed / "metrics.jsonl"))}
  assert last["mlp-digits-layer-layer2"] == 400 and last["pretrain-mlp-digits"] == 200
  assert "Traceback" not in out.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_disk_ends_with_one_clear_line_and_keeps_earlier_results(tmp_path):
  """In a 6 MB tmpfs (a private mount namespace): a finished run, then the disk filled, then a
  --fresh rerun: it ends with one line naming the path and "No space left on device" (no
  traceback before it), and the earlier results.json is intact."""
  probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f"unprivileged mount namespaces unavailable: {probe.stderr.decode()[:200]}")
  mnt = tmp_path / "disk"
  mnt.mkdir()
  cmd = f"{sys.executable} -m ncjax.main --workdir={mnt}/w {TINY} --config.compile_cache_dir="
  script = f"""
set -u
mount -t tmpfs -o size=6m tmpfs {mnt} || exit 97
{cmd} > /dev/null 2>&1 || exit 98
head -c $(( $(df -B1 --output=avail {mnt} | tail -1) - 150000 )) /dev/zero > {mnt}/fill
{cmd} --config.optim.steps=400 --config.checkpoint_every=1 --fresh > {tmp_path}/out 2> {tmp_path}/err
echo "rc=$?"
tail -n 1 {tmp_path}/err
echo "tracebacks=$(grep -c Traceback {tmp_path}/err)"
{sys.executable} -c "import json; print('records', len(json.load(open('{mnt}/w/results.json'))))"
"""
  out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if out.returncode == 97:
    pytest.skip("cannot mount a tmpfs here")
  assert out.returncode == 0, out.stdout + out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == "rc=1", out.stdout
  assert lines[1].startswith(f"ncjax: {mnt}/w") and lines[1].endswith(
      ": No space left on device"), lines[1]
  assert lines[2] == "tracebacks=0", out.stdout  # orbax's error log, tensorstore's callbacks
  assert lines[3] == "records 4"
