"""Errors a user can act on: `ncjax.main` prints their message as one line (no traceback) and
exits non-zero. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """A problem the user fixes on the command line, in the config or on disk."""


class ConfigError(UserError, ValueError):
  """An invalid config; the message lists every problem, in command-line terms
  (``--config.optim.batch_size=0: must be >= 1``)."""


class CheckpointError(UserError):
  """No readable checkpoint where one is required, or a workdir whose runs were made with a
  different config (the message names the directory and the differing fields)."""
