"""Errors a user can cause, reported as one clear line by the command-line tools."""


class ConfigError(ValueError):
  """A bad value in a config or on the command line: names the value and the valid choices."""
