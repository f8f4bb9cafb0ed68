"""What every command-line tool and script of bnn_jax does the same way: an ml_collections
``--config`` flag, quiet logs, required flags, and user errors (and Ctrl-C) as one line with exit
status 1."""
from __future__ import annotations

import logging as std_logging
import sys
import threading
from typing import Callable, Optional, Sequence, Tuple, Type

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from bnn_jax.config import load_config
from bnn_jax.errors import ConfigError, one_line

CONFIG_FLAG = "config"


def config_flag(help_text: str) -> flags.FlagHolder:
  """``--config FILE[:ARG]``, its fields overridable as ``--config.a.b=value`` (a typo is an error)."""
  return config_flags.DEFINE_config_file(CONFIG_FLAG, None, help_text, lock_config=True)


def run(body: Callable[[], None], required: Sequence[flags.FlagHolder],
        errors: Tuple[Type[BaseException], ...] = (ConfigError,)) -> None:
  """Parses the flags and runs ``body``; ``errors`` end in ``error: …`` on stderr, exit status 1."""

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # our lines and the progress bar, not JAX's chatter
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {holder.name: holder.value for holder in required}
    if CONFIG_FLAG in values and not isinstance(values[CONFIG_FLAG], ml_collections.ConfigDict):
      problem = _config_file_problem(sys.argv)  # its get_config returned None, or a dict
      if problem:
        fail(problem)
    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
      raise app.UsageError(f"required: {', '.join(missing)}")
    guarded(body, errors)

  def parse(argv):
    logging.set_verbosity(logging.ERROR)  # ml_collections' warning for a bad file: we say it
    try:
      return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - absl's or ml_collections' (a misspelt field)
      problem = _config_file_problem(argv)
      if problem:
        fail(problem)
      fail(one_line(error) if isinstance(error, flags.Error) else
           f"bad --config override: {one_line(error)}")

  app.run(main, flags_parser=parse)


def script(main: Callable[[], None],
           errors: Tuple[Type[BaseException], ...] = (ConfigError, FileNotFoundError)) -> None:
  """Runs a script's ``main`` (argparse): ``errors`` end in one line, as in the tools."""
  guarded(main, errors)


def guarded(body: Callable[[], None], errors: Tuple[Type[BaseException], ...]) -> None:
  """Runs ``body``; ``errors`` and Ctrl-C end in ``error: …`` on stderr, exit status 1."""
  try:
    body()
  except errors as error:
    fail(one_line(error))
  except KeyboardInterrupt:
    fail("interrupted (Ctrl-C)")


def _config_spec(argv: Sequence[str]) -> Optional[str]:
  """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``), if given."""
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{CONFIG_FLAG}="):
      return arg.split("=", 1)[1]
    if arg == f"--{CONFIG_FLAG}" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _config_file_problem(argv: Sequence[str]) -> Optional[str]:
  """What is wrong with the file ``--config`` names (:func:`bnn_jax.config.load_config` says it in
  one line), or None when it loads; ml_collections' own report of it is a traceback or absl's help."""
  spec = _config_spec(argv)
  try:
    if spec:
      load_config(spec)
  except ConfigError as error:
    return one_line(error)
  return None


def fail(message: str) -> None:
  """``error: message`` on stderr, exit status 1: how every user error ends. The line is the last
  word: what background threads (Orbax's failed writers) log or raise while the process exits
  after it is dropped."""
  print(f"error: {message}", file=sys.stderr)
  std_logging.disable(std_logging.CRITICAL)
  threading.excepthook = lambda args: None
  sys.exit(1)
