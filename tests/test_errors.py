"""Bad input (issue 21): every mistake a user can make in the config, the data, the weights or
the workdir ends as one ``ncjax: <what>, <where>, <what to do>`` line on stderr and exit 2,
before any work, with no traceback; ``--verbose`` / NCJAX_TRACEBACK=1 adds the traceback.

`CASES` is the table: a new case is one row (id, the arguments, the files it needs, the
text its line must hold). The CLI runs in this process (`cli`: flags parsed anew each time,
as a real process parses them), so a row costs its own work only, not a Python start.
"""
from __future__ import annotations

import contextlib
import io as _io
import os
import shutil
import signal
import struct
import sys
import zlib

import numpy as np
import pytest

from ncjax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={ROOT}/tests/tiny_config.py:transfer"


def cli(*args, cwd=None) -> tuple[int, str, str]:
  """``python -m ncjax.main <args>`` in this process: (exit status, stdout, stderr)."""
  argv = ["ncjax", *args]
  saved, sys.argv = sys.argv, argv
  main.FLAGS.unparse_flags()
  for name in [n for n in main.FLAGS if n == "config" or n.startswith("config.")]:
    delattr(main.FLAGS, name)  # --config and its overrides are defined anew per command
  out, err = _io.StringIO(), _io.StringIO()
  status = 0
  here, interrupt = os.getcwd(), signal.getsignal(signal.SIGINT)
  try:
    if cwd:
      os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        main.main(main.parse_flags(argv))
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
  finally:
    os.chdir(here)
    sys.argv = saved
    signal.signal(signal.SIGINT, interrupt)  # main's Ctrl-C handler
  return status, out.getvalue(), err.getvalue()


def one_line(status: int, err: str, want: int = 2) -> str:
  """The error line, after checking the status, that it is the only line (a problem list:
  its header and indented problems) and that no traceback was printed."""
  assert status == want, (status, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  # The tiny configs' schedules are too short to learn: their WARNING lines come first.
  lines = [l for l in err.strip().splitlines() if not l.startswith("WARNING: ")]
  assert lines and lines[0].startswith("ncjax: "), err
  assert all(l.startswith("  ") for l in lines[1:]), err  # the problems of one list
  return " ".join(l.strip() for l in lines)


# --- files the cases need -------------------------------------------------------------------------

def _png(path, array: np.ndarray) -> None:
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def image_folder(root, classes=("a", "b", "c"), splits=("train", "test"), per_class=4,
                 empty=(), size=8):
  """``<root>/<split>/<class>/<i>.png`` (random gray-level images); `empty`: (split, class)
  directories left without images."""
  rng = np.random.default_rng(0)
  for s in splits:
    for c in classes:
      os.makedirs(os.path.join(root, s, c), exist_ok=True)
      if (s, c) in empty or ("*", c) in empty:
        continue
      for i in range(per_class):
        _png(os.path.join(root, s, c, f"{i}.png"),
             rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
  return f"folder:{root}"


def folder_args(source: str) -> list[str]:
  # `aircraft` is the one dataset_sources entry of the default config
  return [TINY, f"--config.dataset_sources.aircraft={source}", "--config.datasets=aircraft",
          "--config.downstream_classes="]


def bomb_png(path, side=100_000) -> None:
  """A PNG whose header claims `side` x `side` pixels (10^10), with almost no data."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _text(path) -> None:
  with open(path, "w") as f:
    f.write("not an image\n")


def _truncated_jpeg(path) -> None:
  """An 8 x 8 JPEG cut in the middle of its data (its header intact)."""
  from PIL import Image
  buf = _io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
      buf, "JPEG")
  with open(path, "wb") as f:
    f.write(buf.getvalue()[:-60])


def config_file(tmp, body: str) -> str:
  path = os.path.join(tmp, "mine.py")
  with open(path, "w") as f:
    f.write(body)
  return path


_CONFIG_HEAD = "from configs import default\n\n\ndef get_config():\n"


def tiny(*args: str):
  """A case's `make`: tests/tiny_config.py (transfer) with `args`."""
  return lambda tmp: [TINY, *args]


def own_config(body: str, arg: str = ""):
  """A case's `make`: the config file `body` as ``tmp/mine.py``, given as --config."""
  return lambda tmp: [f"--config={config_file(tmp, body)}{arg}"]


def resnet_weights(tmp, poison) -> list[str]:
  """A config fine-tuning a small resnet18 (width 4, CIFAR stem) from a torchvision-layout
  .npz whose tensors `poison(name, array)` may spoil; its argv."""
  from ncjax import models, weights
  from flax import traverse_util
  shapes = models.param_shapes("resnet18", 2, image_size=8, channels=1, width=4, stem="cifar")
  flat = traverse_util.flatten_dict({k: shapes[k] for k in ("params", "batch_stats")})
  rng = np.random.default_rng(0)
  state = {}
  for p, (k, fn) in weights.torchvision_key_map("resnet18", flat).items():
    a = np.abs(rng.standard_normal(weights._torch_shape(tuple(flat[p].shape), fn)))
    state[k] = poison(k, a.astype(np.float32))
  np.savez(f"{tmp}/r18.npz", **state)
  body = (f"import sys\nsys.path.insert(0, {ROOT + '/tests'!r})\n"
          "from tiny_config import tiny_mlp_config\n\n\ndef get_config():\n"
          "  c = tiny_mlp_config('transfer')\n  c.models = ('resnet18',)\n"
          "  c.backbone.default.options = {'width': 4, 'stem': 'cifar'}\n"
          "  c.backbone.default.unit = ('block2',)\n"
          f"  c.backbone.default.weights = '{tmp}/r18.npz'\n"
          "  return c\n")
  return [f"--config={config_file(tmp, body)}"]


def _nan_in(key):
  """A `poison`: NaN in tensor `key` (every tensor for '*')."""
  return lambda k, a: np.full_like(a, np.nan) if key in (k, "*") else a


def _set(key, value, index=0):
  return lambda k, a: (a.reshape(-1).__setitem__(index, value) or a) if k == key else a


_HELD: list[int] = []  # lock files a case holds, as another run would


@pytest.fixture(autouse=True)
def _release_held():
  yield
  while _HELD:
    os.close(_HELD.pop())


def held_workdir(tmp) -> list[str]:
  """A workdir whose lock another process holds (here: this one, on its own descriptor)."""
  import fcntl
  os.makedirs(f"{tmp}/w", exist_ok=True)
  fd = os.open(f"{tmp}/w/.lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.pwrite(fd, b"process 4242 on elsewhere\n", 0)
  _HELD.append(fd)
  return [TINY]


def lost_fingerprint(tmp) -> list[str]:
  """A workdir whose pre-training has a checkpoint but no fingerprint.json (kill -9)."""
  os.makedirs(f"{tmp}/w/runs/pretrain-mlp-digits/checkpoints/4")
  return [TINY]


def _file(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "w").close()
  return path


# --- the table ----------------------------------------------------------------------------------
# (id, make(tmp) -> argv (without --workdir), what the line must contain[, after_work]).
# `make` builds the files a case needs under tmp; `after_work`: the error can only come from
# training itself (a divergence), else the workdir must hold no run yet.

CASES = [
    # the config
    ("lr_inf", tiny("--config.optim.lr=inf"),
     "--config.optim.lr=inf: must be a finite number"),
    ("pretrain_lr_inf", tiny("--config.pretrain.optim.lr=inf"),
     "--config.pretrain.optim.lr=inf: must be a finite number"),
    ("lr_diverges", tiny("--config.pretrain.optim.lr=1e6"),
     "ncjax: pretrain-mlp-digits: non-finite loss nan at step 2 (lower the learning rate, or "
     "check the input data); the run's learning rate is "
     "--config.pretrain.optim.lr=1e+06: lower it and rerun with --fresh", True),
    ("model_typo", tiny("--config.models=resnet19"),
     "ncjax: invalid config: --config.models=resnet19: unknown model 'resnet19', did you mean "
     "'resnet18'? (valid: resnet18, "),
    ("method_typo", tiny("--config.methods=linear,fulll"),
     "--config.methods=linear,fulll: unknown method 'fulll', did you mean 'full'?"),
    ("mlp_width_negative", tiny("--config.backbone.default.options.width=-3"),
     "--config.backbone.default.options.width=-3: must be an integer >= 1"),
    ("mlp_depth_zero", tiny("--config.backbone.default.options.depth=0"),
     "--config.backbone.default.options.depth=0: must be an integer >= 1"),
    ("one_downstream_class", tiny("--config.downstream_classes=3"),
     "--config.downstream_classes=3: needs at least 2 classes"),
    ("downstream_classes_out_of_range", tiny("--config.downstream_classes=5-12"),
     "--config.downstream_classes=5,6,7,8,9,10,11,12: class 10 is out of range: digits:train "
     "has 10 class(es) (ids 0-9)"),
    ("pretrain_classes_out_of_range", tiny("--config.pretrain.classes=0,10"),
     "--config.pretrain.classes=0,10: class 10 is out of range: digits:train has 10 class(es)"),
    ("fewshot_ways_past_classes",
     lambda t: [f"--config={ROOT}/tests/tiny_config.py:fewshot", "--config.fewshot.ways=12"],
     "--config.fewshot.ways=12: digits:train has 5 class(es) among --config.downstream_classes "
     "with at least shots + queries = 5 + 15 images; lower --config.fewshot.ways"),
    ("compile_cache_dir_not_creatable",
     tiny("--config.compile_cache_dir=/proc/no/c"),
     "--config.compile_cache_dir=/proc/no/c: cannot create it (No such file or directory: "
     "/proc/no); pass another directory, or '' for no cache"),
    ("train_size_past_the_split", tiny("--config.train_sizes=10,100000"),
     "--config.train_sizes=100000: class 0 ('5') has 146 examples in digits:train, fewer "
     "than the 20000 a balanced subset of 100000 needs (5 classes are short)"),
    ("pretrain_train_size_under_the_classes", tiny("--config.pretrain.train_size=3"),
     "--config.pretrain.train_size=3: size 3 < num_classes 5: a balanced subset needs at "
     "least one example per class (digits:train)"),
    # the user's own config file
    ("config_raises", own_config(_CONFIG_HEAD + "  raise RuntimeError('no GPU')\n"),
     "mine.py:5: RuntimeError: no GPU (fix the config file)"),
    ("config_syntax_error", own_config(_CONFIG_HEAD + "  c = (\n"), "mine.py:5: SyntaxError:"),
    ("config_returns_none", own_config(_CONFIG_HEAD + "  c = default.get_config()\n"),
     "get_config() returned None; it must return the ml_collections.ConfigDict"),
    ("config_imports_missing_name", own_config("from configs.default import nosuch\n"),
     "mine.py:1: ImportError: cannot import name 'nosuch'"),
    ("config_takes_no_argument",
     own_config(_CONFIG_HEAD + "  return default.get_config()\n", ":foo"),
     "get_config() takes no argument; drop ':foo'"),
    # weights
    ("weights_nan_everywhere", lambda t: resnet_weights(t, _nan_in("*")),
     "r18.npz: the weights cannot be used: layer1.0.bn1.bias has 4 of 4 values NaN or Inf; "),
    ("weights_nan_in_one_tensor", lambda t: resnet_weights(t, _nan_in("layer2.1.conv2.weight")),
     "r18.npz: the weights cannot be used: layer2.1.conv2.weight has 576 of 576 values NaN"),
    ("weights_negative_running_variance",
     lambda t: resnet_weights(t, _set("layer1.0.bn1.running_var", -0.5)),
     "layer1.0.bn1.running_var (a BatchNorm running variance) has 1 negative value(s), "
     "down to -0.5"),
    ("weights_inf_running_variance",
     lambda t: resnet_weights(t, _set("bn1.running_var", np.inf, 2)),
     "the weights cannot be used: bn1.running_var has 1 of 4 values NaN or Inf"),
    # the workdir
    ("workdir_is_a_file", lambda t: [TINY, f"--workdir={_file(t + '/f')}"],
     "f is a file, not a directory; pass a directory (it is created if missing)"),
    ("workdir_under_a_file", lambda t: [TINY, f"--workdir={_file(t + '/f')}/w"],
     "/f/w lies under "),
    ("workdir_empty", tiny("--workdir="),
     "ncjax: --workdir is empty; pass a directory (it is created if missing)"),
    ("workdir_in_use", held_workdir,
     "/w is in use by another run (process 4242 on elsewhere); wait for it to end, or pass "
     "another --workdir"),
    ("workdir_run_lost_its_fingerprint", lost_fingerprint,
     "runs/pretrain-mlp-digits: its fingerprint.json is missing or unreadable, so its "
     "checkpoints and results cannot be matched to this config; pass --fresh to redo it"),
    # images
    ("image_decompression_bomb",
     lambda t: folder_args(image_folder(f"{t}/d") and bomb_png(f"{t}/d/train/b/bomb.png")
                           or f"folder:{t}/d"),
     "/d/train/b/bomb.png: Image size (10000000000 pixels) exceeds limit of 178956970 pixels, "
     "could be decompression bomb DOS attack.; refused as a decompression bomb"),
    ("image_not_an_image",
     lambda t: folder_args(image_folder(f"{t}/d") and _text(f"{t}/d/test/a/notes.jpg")
                           or f"folder:{t}/d"),
     "/d/test/a/notes.jpg: cannot be decoded (UnidentifiedImageError: cannot identify image "
     "file"),
    ("image_truncated",  # found when decoded (after the assets check: see the note)
     lambda t: folder_args(image_folder(f"{t}/d") and _truncated_jpeg(f"{t}/d/train/c/t.jpg")
                           or f"folder:{t}/d") + ["--config.pretrain.enabled=False"],
     "/d/train/c/t.jpg: cannot be decoded (OSError: image file is truncated", True),
    ("images_of_mixed_sizes",
     lambda t: folder_args(image_folder(f"{t}/d") and image_folder(f"{t}/d", size=12,
                                                                    classes=("c",))),
     "images have different sizes (e.g. [(8, 8, 3), (12, 12, 3)]); set "
     "--config.backbone.default.image_size=<the model's input side> (or "
     "backbone.<model>.image_size) to fit them"),
    # image folders
    ("folder_empty_class_in_train",
     lambda t: folder_args(image_folder(f"{t}/d", empty={("train", "b")})),
     "aircraft:train: 1 class(es) without images: 1 ('b')"),
    ("folder_empty_class_everywhere",
     lambda t: folder_args(image_folder(f"{t}/d", empty={("*", "c")})),
     "aircraft:train: 1 class(es) without images: 2 ('c')"),
    ("folder_test_classes_differ",
     lambda t: folder_args(image_folder(f"{t}/d", splits=("train",)) and
                           image_folder(f"{t}/d", classes=("a", "b", "z"), splits=("test",))),
     "aircraft:train: 1 class(es) without images: 3 ('z')"),
    ("folder_single_class",
     lambda t: folder_args(image_folder(f"{t}/d", classes=("a",))),
     "aircraft:train has 1 class (a); a classifier needs at least 2"),
]


@pytest.mark.parametrize("make, want, after_work", [(*c[1:3], c[3:] == (True,)) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(make, want, after_work, tmp_path):
  argv = make(str(tmp_path))
  runs = lambda: set(map(str, (tmp_path / "w").glob("runs/**/*")))
  before = runs()
  status, _, err = cli(f"--workdir={tmp_path}/w", *argv)  # a case's own --workdir wins
  line = one_line(status, err)
  assert want in line, line
  assert after_work or runs() == before  # before any work


def test_verbose_adds_the_traceback(tmp_path, monkeypatch):
  status, _, err = cli(TINY, "--config.downstream_classes=3", "--verbose",
                       f"--workdir={tmp_path}")
  assert status == 2 and "Traceback" in err and err.strip().splitlines()[-2].startswith("ncjax: ")
  monkeypatch.setenv("NCJAX_TRACEBACK", "1")
  path = config_file(str(tmp_path), _CONFIG_HEAD + "  raise RuntimeError('no GPU')\n")
  status, _, err = cli(f"--config={path}", f"--workdir={tmp_path}")
  assert status == 2 and "Traceback" in err and "RuntimeError: no GPU" in err


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
  """kill -9 of the process holding the workdir lock: the next run takes it at once."""
  import subprocess
  from ncjax.experiment import records
  code = ("import sys, time; from ncjax.experiment import records\n"
          f"with records.workdir_lock({str(tmp_path)!r}):\n  print('held', flush=True)\n"
          "  time.sleep(60)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert proc.stdout.readline() == "held\n"
    with pytest.raises(Exception, match=f"process {proc.pid} on "):
      with records.workdir_lock(str(tmp_path)):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with records.workdir_lock(str(tmp_path)):
    assert f"process {os.getpid()} " in (tmp_path / ".lock").read_text()


def test_a_run_directory_without_fingerprint_or_results_starts_anew(tmp_path):
  from ncjax.experiment import runner, spec
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from tiny_config import tiny_mlp_config
  runs = spec.build(tiny_mlp_config("transfer"))[0].runs()
  os.makedirs(tmp_path / "runs" / runs[0].id)
  assert runner._check_workdir_runs(str(tmp_path), runs, fresh=False) == [
      f"{tmp_path}/runs/{runs[0].id}"]


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
  """A 16-bit gray PNG (a 0..65535 gradient) decodes to 0..255, not to 99.6% white."""
  from ncjax import data
  image_folder(str(tmp_path), size=64)
  ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
  _png(str(tmp_path / "train" / "a" / "0.png"), ramp)
  ds = data.load(f"folder:{tmp_path}", "train")
  img = np.asarray(ds.images[0:1])[0]
  assert img.shape == (64, 64, 3) and (img[..., 0] == img[..., 2]).all()
  np.testing.assert_array_equal(img[..., 0], np.round(ramp / 257).astype(np.uint8))


def test_hidden_directories_are_not_classes(tmp_path):
  from ncjax import data
  image_folder(str(tmp_path))
  image_folder(str(tmp_path), classes=(".ipynb_checkpoints",), splits=("train",))
  assert data.load(f"folder:{tmp_path}", "train").class_names == ["a", "b", "c"]


def test_closed_event_loop_callbacks_are_kept_off_the_console():
  """tensorstore's callbacks into orbax's closed loop (after a failed save or restore)."""
  import asyncio
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    closed = e
  assert main._closed_loop_callback(closed)
  assert not main._closed_loop_callback(RuntimeError("Event loop is closed"))  # raised by us
  assert not main._closed_loop_callback(ValueError("Event loop is closed"))


def test_ctrl_c_twice_exits_130_with_one_line(tmp_path):
  """Two SIGINTs in a row during training: exit status 130 (not -2, the signal's), the
  interrupted line last, no traceback."""
  import subprocess
  import time
  proc = subprocess.Popen(
      [sys.executable, "-m", "ncjax.main", f"--workdir={tmp_path}", TINY,
       "--config.pretrain.optim.steps=100000", "--config.checkpoint_every=0"],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), preexec_fn=_sigint_default)
  try:
    deadline, metrics = time.time() + 300, tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()):  # training has begun
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise AssertionError(f"no training within 300 s: {proc.communicate()[1][-3000:]}")
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    try:
      err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
      proc.kill()
      raise AssertionError(f"still running a minute after Ctrl-C: {proc.communicate()[1][-3000:]}")
  finally:
    proc.kill()
  assert proc.returncode == 130, (proc.returncode, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1] == "ncjax: interrupted; rerun the same command to resume"


_SWALLOWED_CTRL_C = """
import gc, signal, time
from ncjax import main
main._quiet_closed_loop_callbacks()
main._interrupt_once()
fired = []
def callback(phase, info):  # jax's own gc callback is where CI met it
  if phase == "start" and not fired:
    fired.append(1)
    signal.raise_signal(signal.SIGINT)
    sum(range(1000))  # the handler runs here, inside the callback
gc.callbacks.append(callback)
try:
  start = time.time()
  while time.time() - start < 20:
    gc.collect()
  print("trained on")
except KeyboardInterrupt:
  print("stopped")
"""


def _sigint_default():
  """In the child before exec: SIGINT at its default, whatever this process inherited (a job
  started in the background by a non-interactive shell ignores SIGINT, and Python, rightly,
  keeps an ignored SIGINT ignored)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_ctrl_c_swallowed_by_a_gc_callback_still_stops_the_run():
  """Python drops an exception raised in a gc callback ("Exception ignored in ..."): the first
  Ctrl-C's KeyboardInterrupt is delivered again, outside it, instead of the run training on."""
  import subprocess
  out = subprocess.run([sys.executable, "-c", _SWALLOWED_CTRL_C], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT),
                       preexec_fn=_sigint_default)
  assert out.stdout.split() == ["stopped"], (out.stdout, out.stderr[-2000:])
  assert "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs util-linux unshare")
def test_a_read_only_workdir(tmp_path):
  """On a read-only mount (a private mount namespace; root ignores permission bits): a new
  workdir is one line; a finished one prints its table from its records and writes nothing."""
  import subprocess
  from ncjax.experiment import records, spec
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from tiny_config import tiny_mlp_config
  probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f"unprivileged mount namespaces unavailable: {probe.stderr.decode()[:200]}")
  done = tmp_path / "done"
  for r in spec.build(tiny_mlp_config("transfer"))[0].runs():
    records.save_record(str(done), records.Record(
        model="mlp", dataset=r.dataset, method=r.method or "pretrain", unit=r.unit or "",
        accuracy=50.0, stage="pretrain" if r.kind == "pretrain" else "transfer", run=r.id))
  ro = tmp_path / "ro"
  ro.mkdir()
  cmd = f"{sys.executable} -m ncjax.main {TINY} --config.compile_cache_dir= --workdir={ro}"
  # The finished workdir is copied in before the bind mount turns read-only.
  script = (f"cp -r {done} {ro}/done\n"
            f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 97\n"
            f"{cmd}/new; echo rc=$?\n{cmd}/done; echo rc=$?\n")
  out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  if out.returncode == 97:
    pytest.skip("cannot mount read-only here")
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.strip().splitlines() if not l.startswith("WARNING: ")]
  assert lines[0] == (f"ncjax: --workdir={ro}/new: cannot write in {ro} (Read-only file "
                      "system); make it writable or pass another --workdir"), out.stderr
  rcs = [l for l in out.stdout.splitlines() if l.startswith("rc=")]
  assert rcs == ["rc=2", "rc=0"], out.stdout
  assert "| 50.0" in out.stdout and (f"ncjax: --workdir={ro}/done is read-only; every run is "
                                     "finished, so the table above is from its records "
                                     "(nothing was written)") in out.stdout
