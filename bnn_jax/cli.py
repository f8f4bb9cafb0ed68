"""What every command-line tool of bnn_jax does the same way: an ml_collections ``--config``
flag, quiet logs, required flags, and user errors as one line with exit status 1."""
from __future__ import annotations

import sys
from typing import Callable, Sequence, Tuple, Type

from absl import app, flags, logging
from ml_collections import config_flags

from bnn_jax.errors import ConfigError


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
    missing = [f"--{holder.name}" for holder in required if holder.value is None]
    if missing:
      raise app.UsageError(f"required: {', '.join(missing)}")
    try:
      body()
    except errors as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(1)

  app.run(main)
