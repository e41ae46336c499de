"""The command line (`python -m ncjax.main`): a user mistake is `ncjax:` lines on stderr and
exit 2, never a traceback; a multi-host start that cannot complete says so and exits, never
hangs; --help lists the configs; configs resolve from the current directory, then from the
installed ones, also after a non-editable install. Real subprocesses, each a second or so
(the unreachable coordinator: its timeout; the install: about 15 s)."""
import ast
import errno
import os
import shutil
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from ncjax import io, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What --config=configs/<name>.py finds from the repository root.
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                      if f.endswith(".py") and not f.startswith("_"))


def _cli(*args, timeout=60, cwd=ROOT, path=ROOT):
  """Runs the CLI from `cwd` (the repository root), `path` (this checkout) first on the
  Python path."""
  path = os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ncjax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _errors(proc, status=2) -> list[str]:
  """stderr's lines, after checking the exit status and that no traceback was printed."""
  assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines and all(line.startswith("ncjax: ") for line in lines), proc.stderr
  return lines


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- config overrides ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", [[], ["--config=configs/fig2.py:digits"]],
                         ids=["default_config", "explicit_config"])
def test_unknown_config_fields_are_reported_together_with_suggestions(config, tmp_path):
  """Every unknown --config.<path> at once (ml_collections stopped at the first, with an
  AttributeError traceback), each with the fields it most likely meant."""
  proc = _cli(*config, f"--workdir={tmp_path}", "--config.optim.batchsize=3",
              "--config.nosuch=1", "--noconfig.plot", "--config.pretrain.optim.batch_size=8",
              "--config.backbone.default.option.width=3", "--config.optim.lr=0.5")
  assert _errors(proc) == [
      "ncjax: --config.optim.batchsize: no such config field "
      "(did you mean --config.optim.batch_size?)",
      "ncjax: --config.nosuch: no such config field",
      "ncjax: --config.plot: no such config field (did you mean --config.plots?)",
      "ncjax: --config.pretrain.optim.batch_size: no such config field "
      "(did you mean --config.optim.batch_size?)",
      "ncjax: --config.backbone.default.option.width: no such config field "
      "(did you mean --config.backbone.default.options.width?)",
  ]
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--config.optim.steps=abc"],
     "ncjax: flag --config.optim.steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--nosuch=1"], "ncjax: Unknown command line flag 'nosuch'"),
    (["--config=configs/nosuch.py"], "ncjax: --config=configs/nosuch.py: no such config file "
     f"(configs: {', '.join(CONFIG_NAMES)}; see --help)"),
    (["--config=configs/fig2.py:digits", "--config.optim.batch_size=x"],
     "ncjax: flag --config.optim.batch_size=x: invalid literal for int() with base 10: 'x'"),
    (["train", "now"], "ncjax: unexpected arguments: train now (flags are --name=value)"),
], ids=["bad_type", "unknown_flag", "missing_config_file", "bad_type_explicit_config",
        "positional"])
def test_other_flag_mistakes_are_one_line(args, message, tmp_path):
  assert _errors(_cli(f"--workdir={tmp_path}", *args)) == [message]


def test_suggestions_rank_the_right_section_first():
  c = ml_collections.ConfigDict(dict(eval_batch_size=1, datasets="", plots=True,
                                     optim=dict(lr=0.1, batch_size=8, epochs=1),
                                     pretrain=dict(dataset="", optim=dict(lr=0.1, epochs=1))))
  assert main.unknown_config_fields(
      ["ncjax", "--config.batch_size=2", "--config.lr", "0.1", "--config.optim.epoch=3",
       "--config.optim.lr=1", "--config.optim", "--config.pretrain.optim.lr=2"], c) == [
      "--config.batch_size: no such config field "
      "(did you mean --config.optim.batch_size or --config.eval_batch_size?)",
      "--config.lr: no such config field "
      "(did you mean --config.optim.lr or --config.pretrain.optim.lr?)",
      "--config.optim.epoch: no such config field (did you mean --config.optim.epochs?)"]


# --- multi-host flags ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, messages", [
    (["--coordinator=localhost", "--num_processes=0", "--init_timeout=0"],
     ["ncjax: --coordinator=localhost: expected host:port, e.g. 10.0.0.1:1234 or [::1]:1234",
      "ncjax: --num_processes=0: must be >= 1",
      "ncjax: --init_timeout=0: must be > 0 seconds"]),
    (["--num_processes=2", "--process_id=1"],
     ["ncjax: --num_processes=2: needs --coordinator=host:port (the address of process 0)",
      "ncjax: --process_id=1: needs --coordinator=host:port (the address of process 0)"]),
    (["--coordinator=[::1]:70000", "--num_processes=2", "--process_id=2"],
     ["ncjax: --coordinator=[::1]:70000: port 70000 is not in 1..65535",
      "ncjax: --process_id=2: must be in 0..1 (--num_processes=2)"]),
    (["--coordinator=:1234", "--process_id=-1"],
     ["ncjax: --coordinator=:1234: expected host:port, e.g. 10.0.0.1:1234 or [::1]:1234",
      "ncjax: --process_id=-1: must be in 0..0 (--num_processes=1)"]),
], ids=["syntax_and_ranges", "no_coordinator", "port_and_process_id", "empty_host"])
def test_multihost_flag_problems_are_reported_together(args, messages, tmp_path):
  t0 = time.time()
  assert _errors(_cli(f"--workdir={tmp_path}", *args)) == messages
  assert time.time() - t0 < 30  # before any connection attempt


def test_parse_coordinator():
  assert main.parse_coordinator("10.0.0.1:1234") == ("10.0.0.1", 1234)
  assert main.parse_coordinator("node-3.cluster:65535") == ("node-3.cluster", 65535)
  assert main.parse_coordinator("[::1]:1") == ("::1", 1)
  for bad in ("localhost", "localhost:", ":80", "::1:1234", "host:0", "host:x", "a b:1",
              "[::1]", "host:65536"):
    with pytest.raises(ValueError):
      main.parse_coordinator(bad)


def test_unreachable_coordinator_gives_up_after_init_timeout(tmp_path):
  """Process 1 with nobody serving the coordinator: the 'connecting' line before it blocks,
  then one line naming the coordinator and the timeout, exit 1, at the timeout (jax alone
  aborts from C++ with a stack dump at about twice the timeout)."""
  address = f"localhost:{_free_port()}"
  t0 = time.time()
  proc = _cli(f"--workdir={tmp_path}", f"--coordinator={address}", "--num_processes=2",
              "--process_id=1", "--init_timeout=5", timeout=60)
  elapsed = time.time() - t0
  assert f"ncjax: process 1/2 connecting to {address} (timeout 5 s)" in proc.stdout
  (line,) = _errors(proc, status=1)
  assert f"could not join the coordinator {address} within 5 s (--init_timeout)" in line
  assert 5 <= elapsed < 5 + 15, elapsed


def test_process_0_reports_a_taken_coordinator_port(tmp_path):
  """jax's coordinator service crashes (SIGSEGV) on a port in use; the CLI says so first."""
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    proc = _cli(f"--workdir={tmp_path}", f"--coordinator={address}", "--num_processes=2",
                "--init_timeout=5")
  (line,) = _errors(proc, status=1)
  assert line.startswith(f"ncjax: --coordinator={address}: process 0 cannot serve the "
                         "coordinator on port")
  assert "in use" in line


# --- errors reported by main ---------------------------------------------------------------------

def _raised(make):
  """The exception `make` raises (keeps its __cause__ / __context__ chain)."""
  try:
    make()
  except BaseException as e:  # noqa: BLE001
    return e
  raise AssertionError("nothing raised")


def test_disk_full_error_is_found_through_the_exception_chain():
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/checkpoints/3")

  def explicit():  # raise ... from ...: __cause__
    try:
      raise full
    except OSError as e:
      raise ValueError("orbax: save failed") from e

  def implicit():  # raised while handling: __context__, two levels down
    try:
      explicit()
    except ValueError:
      raise RuntimeError("cleanup failed")

  assert io.disk_full(full) is full
  assert io.disk_full(_raised(explicit)) is full
  assert io.disk_full(_raised(implicit)) is full
  assert io.disk_full(OSError(errno.EACCES, "Permission denied", "/w")) is None
  assert io.disk_full(ValueError("No space left on device")) is None
  a, b = ValueError("a"), ValueError("b")
  a.__context__, b.__context__ = b, a  # a cycle ends the walk
  assert io.disk_full(a) is None


def test_a_full_disk_is_one_line_naming_the_file(capsys):
  """A wrapped ENOSPC ends the command with the file's name; other errors are left to their
  traceback (`_report` returns and main re-raises)."""
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/checkpoints/3")

  def wrapped():
    try:
      raise full
    except OSError as e:
      raise RuntimeError("tensorstore write failed") from e

  assert main._report(ValueError("a bug")) is None
  with pytest.raises(SystemExit) as e:
    main._report(_raised(wrapped))
  assert e.value.code == 1
  assert capsys.readouterr().err == "ncjax: /w/checkpoints/3: No space left on device\n"


def test_user_errors_are_their_message(capsys):
  from ncjax import errors
  with pytest.raises(SystemExit) as e:
    main._report(errors.CheckpointError("workdir/w: no readable checkpoint"))
  assert e.value.code == 2
  assert capsys.readouterr().err == "ncjax: workdir/w: no readable checkpoint\n"


# --- --help and where configs come from -----------------------------------------------------------

def _purposes(folder) -> dict:
  """{config name: first line of its module docstring} of a configs folder."""
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".py") and not f.startswith("_"):
      with open(os.path.join(folder, f)) as fh:
        out[f[:-3]] = ast.get_docstring(ast.parse(fh.read())).splitlines()[0]
  return out


def _help_ok(proc) -> str:
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
  assert proc.stderr == "", proc.stderr[-3000:]
  return proc.stdout


def test_help_lists_every_config_with_its_purpose_and_the_main_fields():
  out = _help_ok(_cli("--help"))
  assert out.startswith("usage: python -m ncjax.main [--config=configs/<name>.py[:arg]]")
  configs = _purposes(os.path.join(ROOT, "configs"))
  assert {"custom", "default", "table3", "fig2"} <= set(configs)
  for name, purpose in configs.items():
    assert f"\n  {name} " in out and purpose in out, name
  for field in ("job", "models", "datasets", "downstream_classes", "methods",
                "backbone.default.weights", "backbone.default.unit", "optim.epochs", "dtype"):
    assert f"\n  --config.{field} " in out, field
  # With its default and its comment in configs/default.py.
  assert "--config.methods" in out and "linear,layer,scl,full" in out
  assert "model input channels (0 = the data's; 3 tiles grayscale to RGB)" in out
  assert ("--config=configs/custom.py --config.data=folder:<dir> --config.weights=<checkpoint> "
          "--config.model=<name>") in out
  for flag in ("--workdir=DIR", "--fresh", "--dry_run", "--coordinator=host:port"):
    assert f"\n  {flag}" in out
  assert _help_ok(_cli("-h")) == out
  full = _help_ok(_cli("--helpfull", "--config.nosuch=1"))
  assert full.startswith(out) and "--init_timeout" in full[len(out):]


def test_configs_resolve_from_the_current_directory_then_the_installed_ones(tmp_path):
  """Outside the repository: configs/<name>.py, <name>.py and <name> find the installed
  configs (which import their base); a file of the current directory wins, and a config of
  your own in a configs/ folder of your own still imports ours."""
  def field_error(*args):  # the config loaded: its fields were checked
    (line,) = _errors(_cli(*args, "--config.nosuch=1", cwd=tmp_path))
    assert line == "ncjax: --config.nosuch: no such config field"

  field_error("--config=configs/fig2.py:digits")
  field_error("--config=table5.py")  # table5 -> table3 -> default
  field_error("--config=custom")
  field_error()  # the default config
  os.makedirs(tmp_path / "configs")
  (tmp_path / "configs" / "mine.py").write_text(
      '"""My own: the default on more epochs."""\nfrom configs import default\n\n\n'
      "def get_config():\n  c = default.get_config()\n  c.optim.epochs = 50\n  return c\n")
  (tmp_path / "configs" / "table3.py").write_text(
      '"""My table 3."""\nfrom configs import default\nget_config = default.get_config\n')
  field_error("--config=configs/mine.py")
  out = _help_ok(_cli("--help", cwd=tmp_path))
  assert "\n  mine            My own: the default on more epochs.\n" in out
  assert "\n  table3          My table 3.\n" in out and "\n  table5 " in out
  proc = _cli("--config=configs/mine.py", "--config.optim.epochs=x", cwd=tmp_path)
  assert _errors(proc) == ["ncjax: flag --config.optim.epochs=x: invalid literal for int() "
                           "with base 10: 'x'"]


def test_non_editable_install_runs_from_any_directory(tmp_path):
  """`pip install .` (not editable: into a --target directory, dependencies from this
  environment), then the CLI from an unrelated directory: --help, a config's import chain,
  and a real (small) run of an installed config. About 15 s."""
  src = tmp_path / "src"
  tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "ncjax", "configs"],
                           capture_output=True, text=True, check=True).stdout.split()
  if not tracked:
    pytest.skip("not a git checkout")
  for rel in tracked + ["pyproject.toml", "README.md", "configs/custom.py"]:
    if os.path.exists(os.path.join(ROOT, rel)):
      os.makedirs(os.path.dirname(src / rel), exist_ok=True)
      shutil.copy(os.path.join(ROOT, rel), src / rel)
  site = tmp_path / "site"
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=300)
  if pip.returncode != 0 and "setuptools" in pip.stderr:
    pytest.skip(f"cannot build here: {pip.stderr[-500:]}")
  assert pip.returncode == 0, pip.stderr[-3000:]
  shutil.rmtree(src)  # nothing of the source tree is left to fall back on
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  where = subprocess.run([sys.executable, "-c", "import ncjax.main as m; print(m.__file__); "
                          "print(m.INSTALLED_CONFIGS)"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
  assert where == [str(site / "ncjax" / "main.py"), str(site / "configs")]
  run = lambda *a: _cli(*a, cwd=elsewhere, path=str(site), timeout=300)
  out = _help_ok(run("--help"))
  assert f"installed one in {site / 'configs'}" in out
  assert set(_purposes(site / "configs")) == set(_purposes(os.path.join(ROOT, "configs")))
  for name, purpose in _purposes(site / "configs").items():
    assert f"\n  {name} " in out and purpose in out
  assert _errors(run("--config=configs/table5.py", "--config.nosuch=1")) == [
      "ncjax: --config.nosuch: no such config field"]
  proc = run("--config=configs/fig2.py:digits", f"--workdir={tmp_path / 'w'}",
             "--config.pretrain.optim.epochs=2", "--config.plots=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "w" / "results.json").exists() and not (elsewhere / "configs").exists()
