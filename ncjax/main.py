"""Command line: ``python -m ncjax.main --config=configs/<name>.py [--config.<field>=...]``.

Every table and figure of the paper is a config file; this entry point only reads the config,
runs its job and writes the report to ``--workdir``.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# `configs/` lives beside the package in the repository: run from the repository root (or
# a source checkout, when installed in editable mode).
_DEFAULT_CONFIG = next(
    (p for p in (os.path.join(os.getcwd(), "configs", "default.py"),
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")) if os.path.exists(p)),
    "configs/default.py")


def _config_root_on_path(argv) -> None:
  """Configs import their base (`from configs import default`): put the folder that holds
  `configs/` on sys.path, so the CLI also works outside the repository root."""
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or [_DEFAULT_CONFIG]
  root = os.path.dirname(os.path.dirname(os.path.abspath(paths[-1].split(":")[0])))
  if root not in sys.path:
    sys.path.insert(0, root)


_config_root_on_path(sys.argv)
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints and results.")
flags.DEFINE_string("coordinator", "", "host:port of process 0, for multi-host runs "
                    "(jax.distributed); empty on a single host.")
flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", 0, "This process's index (multi-host).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    # Keep the console to progress bars and results (orbax logs every checkpoint at INFO).
    logging.set_verbosity(logging.WARNING)
  if FLAGS.coordinator:
    import jax
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from ncjax import jobs
  config = FLAGS.config
  logging.info("config:\n%s", config)
  print(f"ncjax: job {config.job!r}, workdir {FLAGS.workdir!r}, devices {jax_devices()}")
  from ncjax import transfer
  try:
    jobs.run(config, FLAGS.workdir)
  except transfer.ConfigError as e:  # a user error: the message, not a traceback
    print(f"ncjax: {e}", file=sys.stderr)
    sys.exit(2)


def jax_devices() -> str:
  import jax
  d = jax.devices()
  return f"{len(d)} x {d[0].platform}" + (f" on {jax.process_count()} processes"
                                          if jax.process_count() > 1 else "")


if __name__ == "__main__":
  app.run(main)
