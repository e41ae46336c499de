"""Command line: ``python -m ncjax.main --config=configs/<name>.py [--config.<field>=...]``.

Every table and figure of the paper is a config file, and so is fine-tuning your own model
(configs/custom.py); this entry point only reads the config, runs its job and writes the
report to ``--workdir``. ``configs/`` is installed beside the package: ``--config=`` is a
path from the current directory first, then a config of the installed ones
(``configs/<name>.py``, ``<name>.py`` or ``<name>``). ``--help`` lists the configs with their
purpose, the main fields and the flags, and exits 0.

A mistake on the command line, in the config or on disk is one ``ncjax: ...`` line on stderr,
never a traceback (``--verbose`` or NCJAX_TRACEBACK=1 adds it). Exit statuses: 0 done, 2 a user
error (flags, config, data, weights, the workdir, a diverged run), 1 the run could not go on
(no space left, multi-host processes that never met), 130 interrupted (Ctrl-C; a second one
ends the process at once).
"""
from __future__ import annotations

import _thread
import ast
import importlib.machinery
import importlib.util
import inspect
import os
import re
import signal
import socket
import sys
import threading
import traceback

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from ncjax import io
from ncjax.errors import UserError
from ncjax.experiment.fields import field_names, suggest_fields

# `configs/` is installed beside the package (site-packages/configs); in a source checkout or
# an editable install it is the repository's own folder.
INSTALLED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs")


def resolve_config(value: str) -> str | None:
  """``--config`` value ``path[:arg]`` -> the config file that serves it, ``:arg`` kept, or
  None. `path` as given (relative to the current directory) wins; else the installed configs
  answer ``configs/<name>.py``, ``<name>.py`` and ``<name>``."""
  path, sep, arg = value.partition(":")
  candidates = [os.path.expanduser(path)]
  if not os.path.isabs(candidates[0]):
    rel = os.path.normpath(path)
    rel = rel[len("configs" + os.sep):] if rel.startswith("configs" + os.sep) else rel
    candidates.append(os.path.join(INSTALLED_CONFIGS, rel))
    if not rel.endswith(".py"):
      candidates.append(os.path.join(INSTALLED_CONFIGS, rel + ".py"))
  found = next((c for c in candidates if os.path.isfile(c)), None)
  return None if found is None else found + sep + arg


_DEFAULT_CONFIG = resolve_config("configs/default.py") or "configs/default.py"


def _config_arg(argv) -> str:
  """The ``--config`` value of argv (``path[:arg]``, the last one wins), else the default;
  both ``--config=X`` and ``--config X``, as absl reads them."""
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
      value = argv[i + 1]
    elif m := re.match(r"--?config=(.*)", arg, re.S):
      value = m.group(1)
  return value


def _with_config(argv, value: str) -> list[str]:
  """argv with every ``--config`` value replaced by `value` (ml_collections then loads the
  resolved file, whatever the current directory)."""
  out, skip = [argv[0]], False
  for i, arg in enumerate(argv[1:], 1):
    if skip:
      skip = False
      out.append(value)
    elif arg == "--":
      out += argv[i:]
      break
    elif re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
      out.append(arg)
      skip = True
    elif m := re.match(r"(--?config=)", arg):
      out.append(m.group(1) + value)
    else:
      out.append(arg)
  return out


def _bind_configs_package(config: str) -> None:
  """Configs import their base by package (`from configs import default`). Binds the package
  `configs` to the folder of the config being run (when it is a `configs/` folder), then to
  the installed configs: a config's siblings come from its own checkout or install, and a
  config kept anywhere else (or in a `configs/` folder of your own) can still import ours.
  Nothing is executed: the package's ``__init__.py`` is empty. `config`: a resolved
  ``path[:arg]``."""
  if "configs" in sys.modules:
    return
  folder = os.path.dirname(os.path.abspath(config.split(":", 1)[0]))
  search = [folder] if os.path.basename(folder) == "configs" else []
  search += [INSTALLED_CONFIGS] if os.path.isdir(INSTALLED_CONFIGS) else []
  if search:
    spec = importlib.machinery.ModuleSpec("configs", None, is_package=True)
    spec.submodule_search_locations = list(dict.fromkeys(search))
    sys.modules["configs"] = importlib.util.module_from_spec(spec)


FLAGS = flags.FLAGS
# --config is defined by parse_flags (`_define_config_flag`), after its overrides were checked.
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints and results.")
flags.DEFINE_bool("fresh", False, "Start the config's runs over in a used workdir; the removed "
                  "checkpoints/results are listed.")
flags.DEFINE_bool("dry_run", False, "Print the resolved grid and the assets it needs, then "
                  "exit without training.")
flags.DEFINE_string("coordinator", "", "host:port of process 0, for multi-host runs "
                    "(jax.distributed); empty on a single host. IPv6: [::1]:1234.")
flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", 0, "This process's index, 0..num_processes-1 (multi-host).")
flags.DEFINE_bool("verbose", False, "With a user error's one line, print its traceback too "
                  "(also NCJAX_TRACEBACK=1).")
flags.DEFINE_integer("init_timeout", 120, "Seconds a multi-host process waits for all the "
                     "others to join the coordinator before giving up.")


# --- flag parsing: every mistake reported at once, as one message, exit 2 ---------------------

def _fail(status: int, message: str):
  """Ends the command with `message` as ``ncjax: ...`` line(s) on stderr: no traceback."""
  print(f"ncjax: {message}", file=sys.stderr)
  sys.exit(status)


def _fail_all(problems) -> None:
  """Exits 2 with one ``ncjax: <problem>`` line per problem, if there are any."""
  if problems:
    _fail(2, "\nncjax: ".join(problems))


def _where_in(exc: BaseException, path: str) -> str:
  """``<path>:<line>``: the innermost line of the config file `path` in `exc`'s traceback
  (a syntax error: its own line), or the file alone."""
  if isinstance(exc, SyntaxError) and exc.lineno:
    return f"{exc.filename or path}:{exc.lineno}"
  same = [f for f in traceback.extract_tb(exc.__traceback__)
          if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f"{path}:{same[-1].lineno}" if same else path


def _load_config(value: str):
  """The ConfigDict of ``--config=path[:arg]``, loaded as ml_collections loads it. A config
  whose own code fails (it raises, does not parse, imports a missing name, takes no
  ``:arg``) or whose `get_config` returns no ConfigDict ends the command with one line
  naming the file and its line. None: not a ConfigDict but something ml_collections takes."""
  path, *arg = value.split(":", 1)
  loader = importlib.machinery.SourceFileLoader("_ncjax_cli_config", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - the config file's own error, reported as such
    _config_file_error(value, e, f"{_where_in(e, path)}: {_exc_line(e)}")
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    _fail(2, f"--config={value}: {path} defines no get_config() (a config file returns its "
          "ml_collections.ConfigDict from get_config(), see configs/default.py)")
  try:
    config = get_config(*arg)
  except ValueError as e:  # the config refuses its argument (``--config=<file>:<arg>``)
    _fail(2, f"--config={value}: {e}")
  except TypeError as e:
    if arg and _takes_no_argument(get_config):
      _fail(2, f"--config={value}: {path}'s get_config() takes no argument; drop "
            f"':{arg[0]}'")
    _config_file_error(value, e, f"{_where_in(e, path)}: {_exc_line(e)}")
  except Exception as e:  # noqa: BLE001
    _config_file_error(value, e, f"{_where_in(e, path)}: {_exc_line(e)}")
  if config is None:
    _fail(2, f"--config={value}: {path}'s get_config() returned None; it must return the "
          "ml_collections.ConfigDict (a missing `return`?)")
  return config if isinstance(config, ml_collections.ConfigDict) else None


def _takes_no_argument(fn) -> bool:
  try:
    return not inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _exc_line(exc: BaseException) -> str:
  """``Type: message`` on one line."""
  if isinstance(exc, SyntaxError):
    return f"{type(exc).__name__}: {exc.msg}"
  return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _config_file_error(value: str, exc: BaseException, what: str) -> None:
  """Ends the command: the config file failed; `what` says where and how."""
  if _verbose():
    traceback.print_exception(exc)
  _fail(2, f"--config={value}: the config file failed: {what} (fix the config file)")


def _config_overrides(argv) -> list[str]:
  """The dotted paths of argv's ``--config.<path>[=value]`` (and ``--noconfig.<bool>``) flags,
  in order, once each; argv as ml_collections scans it (all of it)."""
  paths = []
  for arg in argv[1:]:
    if (m := re.match(r"--?(?:no)?config\.([^=]*)", arg)) and m.group(1) not in paths:
      paths.append(m.group(1))
  return paths


def unknown_config_fields(argv, config) -> list[str]:
  """One problem per ``--config.<path>`` of argv that `config` has no field for, each with
  its close matches. An index (``field[0]``) is checked by ml_collections itself."""
  names = field_names(config)
  problems = []
  for path in _config_overrides(argv):
    if path.split("[", 1)[0] in names:
      continue
    hint = " or ".join(f"--config.{n}" for n in suggest_fields(path, names))
    problems.append(f"--config.{path}: no such config field"
                    + (f" (did you mean {hint}?)" if hint else ""))
  return problems


def parse_coordinator(address: str) -> tuple[str, int]:
  """``host:port`` (IPv6 as ``[::1]:port``) -> (host, port); ValueError saying what is wrong."""
  m = re.fullmatch(r"(?:\[(?P<ipv6>[^\[\]\s]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d+)", address)
  if not m:
    raise ValueError("expected host:port, e.g. 10.0.0.1:1234 or [::1]:1234")
  port = int(m.group("port"))
  if not 1 <= port <= 65535:
    raise ValueError(f"port {port} is not in 1..65535")
  return m.group("ipv6") or m.group("host"), port


def multihost_problems() -> list[str]:
  """Every inconsistency of --coordinator / --num_processes / --process_id / --init_timeout,
  found before any process blocks waiting for the others."""
  problems = []
  if FLAGS.coordinator:
    try:
      parse_coordinator(FLAGS.coordinator)
    except ValueError as e:
      problems.append(f"--coordinator={FLAGS.coordinator}: {e}")
  else:
    # Without a coordinator the run is single-process: these would be silently ignored.
    for name in ("num_processes", "process_id"):
      if FLAGS[name].value != FLAGS[name].default:
        problems.append(f"--{name}={FLAGS[name].value}: needs --coordinator=host:port "
                        "(the address of process 0)")
  n, pid = FLAGS.num_processes, FLAGS.process_id
  if n < 1:
    problems.append(f"--num_processes={n}: must be >= 1")
  if pid < 0 or (n >= 1 and pid >= n):
    problems.append(f"--process_id={pid}: must be in 0..{max(n, 1) - 1} "
                    f"(--num_processes={n})")
  if FLAGS.init_timeout <= 0:
    problems.append(f"--init_timeout={FLAGS.init_timeout}: must be > 0 seconds")
  return problems


def _define_config_flag() -> None:
  """Defines --config. Without --config on the command line, ml_collections loads the default
  config and resolves its ``--config.<field>`` overrides as soon as the flag is defined: at
  import time that would turn an unknown field into a traceback, before `parse_flags` runs."""
  if "config" not in FLAGS:
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                    lock_config=True)


def parse_flags(argv) -> list[str]:
  """absl's flag parsing (`app.run`'s flags_parser), with every mistake as ``ncjax:`` lines
  and exit 2 instead of a traceback (ml_collections raises AttributeError for an unknown
  field, one at a time) or absl's 'FATAL Flags parsing error'. ``--help`` prints `usage`
  and exits 0 (absl's own help exits 1 and knows nothing of configs)."""
  if wants_help(argv):
    print(usage(full="--helpfull" in argv))
    sys.exit(0)
  try:
    expanded = FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile=...
  except flags.Error as e:
    _fail(2, str(e))
  config_value = _config_arg(expanded)
  resolved = resolve_config(config_value)
  if resolved is None:
    _fail(2, f"--config={config_value}: no such config file (configs: "
          f"{', '.join(name for name, _, _ in list_configs())}; see --help)")
  _bind_configs_package(resolved)
  config = _load_config(resolved)
  if config is not None:
    _fail_all(unknown_config_fields(expanded, config))
  try:
    _define_config_flag()
    rest = FLAGS(_with_config(expanded, resolved))
  except flags.Error as e:  # a bad value (--config.optim.steps=abc), an unknown --flag, ...
    _fail(2, str(e))
  except (AttributeError, KeyError, IndexError) as e:  # an override path ml_collections rejects
    _fail(2, f"bad --config override: {e}")
  problems = multihost_problems()
  if len(rest) > 1:
    problems.append(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
  _fail_all(problems)
  return rest


# --- --help: the configs and the fields most runs change -------------------------------------

# Shown with their comment in configs/default.py (which documents every field).
MAIN_FIELDS = ("job", "models", "datasets", "downstream_classes", "methods", "train_sizes",
               "backbone.default.weights", "backbone.default.unit",
               "backbone.default.image_size", "backbone.default.channels",
               "backbone.default.normalization", "pretrain.enabled", "optim.epochs",
               "optim.steps", "optim.batch_size", "optim.aug_level", "dtype",
               "checkpoint_every")
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull",
               "-helpfull")


def wants_help(argv) -> bool:
  """Whether argv (before any ``--``) asks for help."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(a in _HELP_FLAGS for a in args)


def list_configs() -> list[tuple[str, str, str]]:
  """``(name, purpose, path)`` of every config ``--config=configs/<name>.py`` finds, sorted:
  the current directory's ``configs/`` first, then the installed ones. `purpose` is the
  first line of the config's module docstring (read, not executed)."""
  found = {}
  for folder in (INSTALLED_CONFIGS, os.path.abspath("configs")):  # the later one wins
    if os.path.isdir(folder):
      for f in os.listdir(folder):
        if f.endswith(".py") and not f.startswith("_"):
          found[f[:-3]] = os.path.join(folder, f)
  out = []
  for name, path in sorted(found.items()):
    try:
      with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
      doc = ""
    out.append((name, doc.strip().split("\n", 1)[0], path))
  return out


def field_comments(path: str) -> dict[str, tuple[str, str]]:
  """``{dotted field: (value, comment)}`` from a config written like configs/default.py: the
  value and trailing comment of ``c.<field> = ...`` lines and of ``<name>=...,`` lines inside
  ``c.<section> = ml_collections.ConfigDict(dict(``, with comment lines aligned under it.
  Values read as they are typed on the command line (a tuple of names as ``a,b``)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return {}

  def shown(text):
    try:
      v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
    if isinstance(v, tuple):
      return ",".join(map(str, v)) or "()"
    return repr(v) if v == "" else str(v)

  out, section, last, column = {}, None, None, -1
  for line in lines:
    if (m := re.match(r"\s*c\.([\w.]+)\s*=\s*ml_collections\.ConfigDict\(dict\(\s*$", line)):
      section, last = m.group(1), None
      continue
    if section and re.match(r"\s*\)\)", line):
      section, last = None, None
      continue
    if (m := re.match(r"\s*c\.([\w.]+)\s*=\s*([^#]*?)\s*(?:#\s*(.*))?$", line)):
      last = m.group(1)
    elif section and (m := re.match(r"\s*(\w+)=([^#]*?),?\s*(?:#\s*(.*))?$", line)):
      last = f"{section}.{m.group(1)}"
    else:
      if last and column > 0 and line.find("#") == column and not line[:column].strip():
        value, comment = out[last]
        out[last] = value, f"{comment} {line[column + 1:].strip()}"  # the comment goes on
      else:
        last = None
      continue
    out[last] = shown(m.group(2).rstrip(",").strip()), m.group(3) or ""
    column = line.find("#") if m.group(3) else -1
  return out


def usage(full: bool = False) -> str:
  """The ``--help`` text: how to run, every config with its purpose, the main fields (from
  configs/default.py's comments), the other flags; `full` adds absl's list of every flag."""
  configs = list_configs()
  width = max((len(n) for n, _, _ in configs), default=0) + 2
  comments = field_comments(os.path.join(INSTALLED_CONFIGS, "default.py"))
  fwidth = max(len(f) for f in MAIN_FIELDS) + len("--config.") + 2
  flag_help = [("--workdir=DIR", "checkpoints and results (default: ./workdir); rerunning "
                "the same command resumes"),
               ("--fresh", FLAGS["fresh"].help), ("--dry_run", FLAGS["dry_run"].help),
               ("--coordinator=host:port --num_processes=N --process_id=i",
                "multi-host runs (jax.distributed; --init_timeout=120 s)"),
               ("--helpfull", "every flag, absl's included")]
  lines = [
      "usage: python -m ncjax.main [--config=configs/<name>.py[:arg]] "
      "[--config.<field>=<value> ...] [--workdir=DIR] [--fresh] [--dry_run]",
      "",
      "Runs the job of a config (the paper's tables and figures, or your own fine-tuning) and",
      "writes results.{json,csv,md} and plots to --workdir. A user mistake is one 'ncjax:' line",
      "per problem and exit status 2.",
      "",
      f"configs (--config=configs/<name>.py: a file at that path in the current directory, "
      f"else the installed one in {INSTALLED_CONFIGS}):",
      *(f"  {name:<{width}}{purpose}" for name, purpose, _ in configs),
      "",
      "fine-tune your own model (an image folder <dir>/{train,test}/<class>/*.jpg):",
      "  python -m ncjax.main --config=configs/custom.py --config.data=folder:<dir> "
      "--config.weights=<checkpoint> --config.model=<name>",
      "",
      "main fields (--config.<field>=<value>; lists as a,b,c; configs/default.py documents "
      "every field):",
      *(f"  {'--config.' + f:<{fwidth}}{' -- '.join(filter(None, comments.get(f, ())))}"
        for f in MAIN_FIELDS),
      "",
      "flags:",
      *(f"  {name}\n      {text}" for name, text in flag_help),
  ]
  if full:
    lines += ["", "all flags:", FLAGS.get_help()]
  return "\n".join(lines)


# --- multi-host start-up: never a silent hang, never a crash -----------------------------------

def _coordinator_port_problem(port: int) -> str | None:
  """Why process 0 cannot serve the coordinator on `port` (jax binds [::]:port), or None.
  jax crashes with a segmentation fault when the port is taken; a probe bind says so first."""
  if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    return None  # jax binds elsewhere
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this host: the IPv4 probe decides
    with probe:
      # Like gRPC: a port left in TIME_WAIT by an earlier run is free, a listener is not.
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((host, port))
        return None
      except OSError as e:
        return e.strerror or str(e)
  return None


def _hard_exit(status: int, message: str) -> None:
  """Ends the process from any thread (the main one may be blocked in C++)."""
  sys.stdout.flush()
  print(f"ncjax: {message}", file=sys.stderr, flush=True)
  os._exit(status)


def initialize_distributed() -> None:
  """jax.distributed.initialize with --init_timeout, announced before it blocks. A timeout
  is one line naming the coordinator and exit 1: jax itself would abort from C++ (a check
  failure and a stack dump) only at about twice the timeout, so a watchdog thread ends the
  process at the timeout first. Ctrl-C ends it while it waits."""
  import jax  # only a multi-host run pays for jax before its flags are checked
  address, n, pid = FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id
  timeout = FLAGS.init_timeout
  if pid == 0:
    port = parse_coordinator(address)[1]
    if problem := _coordinator_port_problem(port):
      _fail(1, f"--coordinator={address}: process 0 cannot serve the coordinator on port "
            f"{port} ({problem}); is an earlier run still using it?")
  who = f"process {pid}/{n}"
  print(f"ncjax: {who} connecting to {address} (timeout {timeout} s)", flush=True)
  joined = threading.Event()
  if pid == 0:
    gave_up = (f"{who}: the other processes did not all join the coordinator {address} "
               f"within {timeout} s (--init_timeout); start each with --coordinator={address} "
               f"--num_processes={n} and its own --process_id")
  else:
    gave_up = (f"{who} could not join the coordinator {address} within {timeout} s "
               f"(--init_timeout); is process 0 running there with --num_processes={n}, "
               "and reachable from this host?")

  def watchdog():
    if not joined.wait(timeout):
      _hard_exit(1, gave_up)

  threading.Thread(target=watchdog, name="ncjax-init-watchdog", daemon=True).start()
  # Python's Ctrl-C handler would only run once initialize returns; the default action ends
  # the process at once (a SIGINT ignored by the parent, as under nohup, stays ignored).
  interrupt = signal.getsignal(signal.SIGINT)
  if interrupt is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                               initialization_timeout=timeout)
  except Exception as e:  # noqa: BLE001 - whatever jax raises, the user needs the address
    _fail(1, f"{who} could not join the coordinator {address}: {e}")
  finally:
    joined.set()
    if interrupt is signal.default_int_handler:
      signal.signal(signal.SIGINT, interrupt)


# --- errors a user acts on ----------------------------------------------------------------------

def _verbose() -> bool:
  """--verbose or NCJAX_TRACEBACK=1: a user error's traceback is printed before its line."""
  if os.environ.get("NCJAX_TRACEBACK", "") not in ("", "0"):
    return True
  if FLAGS.is_parsed():
    return FLAGS.verbose
  return any(a in ("--verbose", "-verbose") for a in sys.argv[1:])  # while parsing flags


def _report(exc: Exception, hard_exit: bool = False) -> None:
  """Exits with one line if `exc` is a user error or a full disk; returns otherwise (a bug:
  the caller re-raises it, traceback and all). `hard_exit`: a full disk ends the process
  at once (`os._exit`), skipping exit hooks."""
  full = None if isinstance(exc, UserError) else io.disk_full(exc)
  if _verbose() and (isinstance(exc, UserError) or full is not None):
    traceback.print_exception(exc)
  if isinstance(exc, UserError):
    _fail(2, str(exc))
  if full is not None:
    where = getattr(full, "filename", None) or FLAGS.workdir
    print(f"ncjax: {where}: No space left on device", file=sys.stderr, flush=True)
    # Background writers (TensorBoard's flush thread, its exit hook) would fail again on the
    # full disk and print their tracebacks after this line: end here, so it stays the last.
    (os._exit if hard_exit else sys.exit)(1)


def _quiet_disk_full_in_threads() -> None:
  """A background writer that hits a full disk stays quiet: the main thread meets the same
  error on its next write and reports it as one line."""
  default = threading.excepthook

  def hook(args):
    if io.disk_full(args.exc_value) is None:
      default(args)
  threading.excepthook = hook


# Seconds an interrupted command has to close its files before it exits regardless.
_WIND_DOWN_S = 20
_INTERRUPTED = "interrupted; rerun the same command to resume"
_interrupted = threading.Event()  # the line above was printed


def _interrupt_once() -> None:
  """The first Ctrl-C raises KeyboardInterrupt (files are closed on the way out, main says
  so); a second one ends the process at once with 130 and that one line. Python's own
  handler would raise again wherever the unwinding is (a gc callback, an atexit hook:
  another traceback, or an exit by the signal, status -2). A SIGINT the parent ignores
  (nohup) stays ignored."""
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return

  def again(signum, frame):
    if not _interrupted.is_set():
      _hard_exit(130, _INTERRUPTED)
    os._exit(130)

  def first(signum, frame):
    signal.signal(signal.SIGINT, again)
    _stop_requested.set()
    raise KeyboardInterrupt

  global _first_interrupt
  _first_interrupt = first
  signal.signal(signal.SIGINT, first)


_stop_requested = threading.Event()  # the first Ctrl-C came
_first_interrupt = None


def _redeliver_interrupt() -> None:
  """The first Ctrl-C's KeyboardInterrupt was raised where Python swallows exceptions (a gc
  callback such as jax's, a `__del__`): it is delivered again, as the first, so the run
  stops where the interrupt can reach `main`, instead of training on."""
  if _first_interrupt is None or _interrupted.is_set():
    return
  signal.signal(signal.SIGINT, _first_interrupt)
  # From another thread, a moment later: raised from here, it would be swallowed again.
  threading.Timer(0.05, _thread.interrupt_main).start()


def _closed_loop_callback(exc: BaseException | None) -> bool:
  """Whether `exc` is asyncio's "Event loop is closed" from `call_soon_threadsafe`: a
  tensorstore callback of an orbax save or restore that already failed (and was reported, or
  recovered from), arriving after orbax closed its loop. Nothing is lost by it."""
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  return any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(exc.__traceback__))


def _quiet_closed_loop_callbacks() -> None:
  """Keeps `_closed_loop_callback` tracebacks (16 of them per failed checkpoint read) off
  the console; any other exception is printed as before."""
  if getattr(sys.excepthook, "_ncjax", False):
    return  # installed by an earlier main() of this process
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(kind, value, tb):
    if not _closed_loop_callback(value):
      excepthook(kind, value, tb)

  def on_unraisable(u):
    if isinstance(u.exc_value, KeyboardInterrupt) and _stop_requested.is_set():
      _redeliver_interrupt()
    elif not _closed_loop_callback(u.exc_value):
      unraisablehook(u)
  on_exception._ncjax = True
  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def main(argv):
  del argv  # parse_flags rejected positional arguments
  if not FLAGS["verbosity"].present:
    # Keep the console to progress bars and results (orbax logs every checkpoint at INFO).
    logging.set_verbosity(logging.WARNING)
  _quiet_disk_full_in_threads()
  _quiet_closed_loop_callbacks()
  try:
    _run()
  except KeyboardInterrupt:
    # A wind-down that hangs (atexit hooks, threads joined at exit) still ends, with 130.
    watchdog = threading.Timer(_WIND_DOWN_S, os._exit, (130,))
    watchdog.daemon = True  # a normal exit does not wait for it
    watchdog.start()
    _interrupted.set()
    _fail(130, _INTERRUPTED)
  except Exception as e:  # noqa: BLE001 - reported if the user can act on it, else re-raised
    _report(e, hard_exit=True)
    raise


def _run() -> None:
  """Joins the other processes (multi-host), then runs the config's job."""
  if FLAGS.coordinator:
    initialize_distributed()  # (a Ctrl-C while it waits ends the process at once)
  _interrupt_once()
  from ncjax.experiment import runner  # jax loads here, after the flags' checks and --help
  config = FLAGS.config
  logging.info("config:\n%s", config)
  print(f"ncjax: job {config.job!r}, workdir {FLAGS.workdir!r}, devices {jax_devices()}")
  runner.run(config, FLAGS.workdir, fresh=FLAGS.fresh, dry_run=FLAGS.dry_run)


def jax_devices() -> str:
  import jax
  d = jax.devices()
  return f"{len(d)} x {d[0].platform}" + (f" on {jax.process_count()} processes"
                                          if jax.process_count() > 1 else "")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
