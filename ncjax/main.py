"""Command line: ``python -m ncjax.main --config=configs/<name>.py [--config.<field>=...]``.

Every table and figure of the paper is a config file; this entry point only reads the config,
runs its job and writes the report to ``--workdir``.

A mistake on the command line, in the config or on disk is one ``ncjax: ...`` line on stderr,
never a traceback. Exit statuses: 0 done, 2 a user error (flags, config, checkpoints), 1 the
run could not go on (no space left, multi-host processes that never met), 130 interrupted.
"""
from __future__ import annotations

import difflib
import errno
import importlib.machinery
import importlib.util
import os
import re
import signal
import socket
import sys
import threading

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

# `configs/` lives beside the package in the repository: run from the repository root (or
# a source checkout, when installed in editable mode).
_DEFAULT_CONFIG = next(
    (p for p in (os.path.join(os.getcwd(), "configs", "default.py"),
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")) if os.path.exists(p)),
    "configs/default.py")


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


def _config_root_on_path(argv) -> None:
  """Configs import their base (`from configs import default`): put the folder that holds
  `configs/` on sys.path, so the CLI also works outside the repository root."""
  path = _config_arg(argv).split(":", 1)[0]
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)


_config_root_on_path(sys.argv)
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


def _load_config(value: str):
  """The ConfigDict of ``--config=path[:arg]``, loaded as ml_collections loads it, or None
  when its own code fails: ml_collections then reports that, with the config's traceback."""
  path, *arg = value.split(":", 1)
  loader = importlib.machinery.SourceFileLoader("_ncjax_cli_config", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
    config = module.get_config(*arg)
  except Exception:  # noqa: BLE001 - a bug in the config file, not a flag mistake
    return None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field of `config`, nested ConfigDicts included (``optim``, ``optim.lr``)."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, f"{prefix}{key}.")
  return names


def _config_overrides(argv) -> list[str]:
  """The dotted paths of argv's ``--config.<path>[=value]`` (and ``--noconfig.<bool>``) flags,
  in order, once each; argv as ml_collections scans it (all of it)."""
  paths = []
  for arg in argv[1:]:
    if (m := re.match(r"--?(?:no)?config\.([^=]*)", arg)) and m.group(1) not in paths:
      paths.append(m.group(1))
  return paths


def _suggestions(path: str, names: list[str]) -> list[str]:
  """The config fields `path` most likely meant, best first: fields whose last part is
  (nearly) `path`'s (a typo, or the right name in the wrong section), else whole dotted paths
  close to it; ranked by both similarities, only those about as close as the best."""
  ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
  leaf = lambda name: name.rsplit(".", 1)[-1]
  scores = {n: (ratio(leaf(path), leaf(n)), ratio(path, n)) for n in names}
  close = [n for n, (tail, _) in scores.items() if tail >= 0.8]
  close = close or [n for n, (_, whole) in scores.items() if whole >= 0.75]
  close.sort(key=lambda n: -sum(scores[n]))
  return [n for n in close if sum(scores[n]) >= sum(scores[close[0]]) - 0.2][:3]


def unknown_config_fields(argv, config) -> list[str]:
  """One problem per ``--config.<path>`` of argv that `config` has no field for, each with
  its close matches. An index (``field[0]``) is checked by ml_collections itself."""
  names = field_names(config)
  problems = []
  for path in _config_overrides(argv):
    if path.split("[", 1)[0] in names:
      continue
    hint = " or ".join(f"--config.{n}" for n in _suggestions(path, names))
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
  field, one at a time) or absl's 'FATAL Flags parsing error'."""
  try:
    expanded = FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile=...
  except flags.Error as e:
    _fail(2, str(e))
  config_value = _config_arg(expanded)
  if not os.path.isfile(config_value.split(":", 1)[0]):
    _fail(2, f"--config={config_value}: no such config file")
  config = _load_config(config_value)
  if config is not None:
    _fail_all(unknown_config_fields(expanded, config))
  try:
    _define_config_flag()
    rest = FLAGS(argv)
  except flags.Error as e:  # a bad value (--config.optim.steps=abc), an unknown --flag, ...
    _fail(2, str(e))
  except (AttributeError, KeyError, IndexError) as e:  # an override path ml_collections rejects
    _fail(2, f"bad --config override: {e}")
  problems = multihost_problems()
  if len(rest) > 1:
    problems.append(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
  _fail_all(problems)
  return rest


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
  import jax
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

def disk_full_error(exc: BaseException) -> OSError | None:
  """The ENOSPC OSError in `exc`'s chain (`__cause__` / `__context__`), or None: libraries
  (orbax, numpy) re-raise a full disk as their own error. One that names its file wins: a
  cleanup that failed on the same disk later may not."""
  seen, found = set(), []
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
      found.append(exc)
    exc = exc.__cause__ or exc.__context__
  return next((e for e in found if e.filename), found[0] if found else None)


def _report(exc: Exception, hard_exit: bool = False) -> None:
  """Exits with one line if `exc` is a user error or a full disk; returns otherwise (a bug:
  the caller re-raises it, traceback and all). `hard_exit`: a full disk ends the process
  at once (`os._exit`), skipping exit hooks."""
  from ncjax.errors import UserError
  if isinstance(exc, UserError):
    _fail(2, str(exc))
  full = disk_full_error(exc)
  if full is not None:
    print(f"ncjax: {full.filename or FLAGS.workdir}: No space left on device", file=sys.stderr,
          flush=True)
    # Background writers (TensorBoard's flush thread, its exit hook) would fail again on the
    # full disk and print their tracebacks after this line: end here, so it stays the last.
    (os._exit if hard_exit else sys.exit)(1)


def _quiet_disk_full_in_threads() -> None:
  """A background writer that hits a full disk stays quiet: the main thread meets the same
  error on its next write and reports it as one line."""
  import threading
  default = threading.excepthook

  def hook(args):
    if disk_full_error(args.exc_value) is None:
      default(args)
  threading.excepthook = hook


def main(argv):
  del argv  # parse_flags rejected positional arguments
  if not FLAGS["verbosity"].present:
    # Keep the console to progress bars and results (orbax logs every checkpoint at INFO).
    logging.set_verbosity(logging.WARNING)
  _quiet_disk_full_in_threads()
  try:
    _run()
  except KeyboardInterrupt:
    _fail(130, "interrupted; rerun the same command to resume")
  except Exception as e:  # noqa: BLE001 - reported if the user can act on it, else re-raised
    _report(e, hard_exit=True)
    raise


def _run() -> None:
  """Joins the other processes (multi-host), then runs the config's job."""
  if FLAGS.coordinator:
    initialize_distributed()
  from ncjax import jobs
  config = FLAGS.config
  logging.info("config:\n%s", config)
  print(f"ncjax: job {config.job!r}, workdir {FLAGS.workdir!r}, devices {jax_devices()}")
  jobs.run(config, FLAGS.workdir, fresh=FLAGS.fresh, dry_run=FLAGS.dry_run)


def jax_devices() -> str:
  import jax
  d = jax.devices()
  return f"{len(d)} x {d[0].platform}" + (f" on {jax.process_count()} processes"
                                          if jax.process_count() > 1 else "")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
