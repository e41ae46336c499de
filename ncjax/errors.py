"""Errors a user can act on: `ncjax.main` prints their message as one line (no traceback) and
exits non-zero. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """A problem the user fixes on the command line, in the config or on disk."""


class ConfigError(UserError, ValueError):
  """An invalid config; the message lists every problem, in command-line terms
  (``--config.optim.batch_size=0: must be >= 1``)."""


class CheckpointError(UserError, ValueError):
  """No readable checkpoint where one is required, a weights file that does not fit its
  architecture, or a workdir whose runs were made with a different config (the message names
  the file or directory and what differs). A `ValueError` too, as `ncjax.weights` raised it."""


class Diverged(UserError, FloatingPointError):
  """Training met a non-finite loss or parameter (the message names the run and the step; the
  runner adds the learning-rate field to lower). A `FloatingPointError` too, as `fit` raised
  it before."""


class WorkdirError(UserError):
  """The workdir cannot be used: a file, read-only, or in use by another run (the message
  names the path and, for a lock, the process holding it)."""


class DataError(UserError, ValueError):
  """A data file that cannot be used (truncated, not an image, a decompression bomb): the
  message names the file. A `ValueError` too, as the loaders raised it."""
