"""Errors a user can cause, reported as one clear line by the command-line tools."""


class ConfigError(ValueError):
  """A bad value in a config or on the command line: names the value and the valid choices."""


def one_line(error: BaseException) -> str:
  """An exception's message on one line (ml_collections' span several lines, inside a KeyError
  inside an AttributeError, whose str() would quote them)."""
  message = error
  while isinstance(message, BaseException) and len(message.args) == 1:
    message = message.args[0]
  return " ".join(str(message).split())
