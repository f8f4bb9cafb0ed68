"""What every command-line tool of bnn_jax does the same way: an ml_collections ``--config``
flag, quiet logs, required flags, and user errors as one line with exit status 1."""
from __future__ import annotations

import sys
from typing import Callable, Sequence, Tuple, Type

from absl import app, flags, logging
from ml_collections import config_flags

from bnn_jax.errors import ConfigError, one_line


def config_flag(help_text: str) -> flags.FlagHolder:
  """``--config FILE[:ARG]``, its fields overridable as ``--config.a.b=value`` (a typo is an error)."""
  return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def run(body: Callable[[], None], required: Sequence[flags.FlagHolder],
        errors: Tuple[Type[BaseException], ...] = (ConfigError,)) -> None:
  """Parses the flags and runs ``body``; ``errors`` end in ``error: …`` on stderr, exit status 1."""

  def main(argv):
    logging.set_verbosity(logging.WARNING)  # our lines and the progress bar, not JAX's chatter
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {f"--{holder.name}": holder.value for holder in required}
    try:
      for value in values.values():
        getattr(value, "to_dict", None)  # a config file that failed to load raises on first use
    except Exception as error:  # noqa: BLE001 - whatever ml_collections raises for a bad config
      fail(f"bad --config: {one_line(error)}")
    missing = [name for name, value in values.items() if value is None]
    if missing:
      raise app.UsageError(f"required: {', '.join(missing)}")
    try:
      body()
    except errors as error:
      fail(str(error))

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:  # a value absl cannot parse
      fail(one_line(error))
    except Exception as error:  # noqa: BLE001 - a misspelt --config.a.b field, from ml_collections
      fail(f"bad --config override: {one_line(error)}")

  app.run(main, flags_parser=parse)


def fail(message: str) -> None:
  """``error: message`` on stderr, exit status 1: how every user error ends."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)
