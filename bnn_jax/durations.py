"""Durations in one convention (big_vision's): a length is set once, as ``{name}_steps``,
``{name}_epochs`` or ``{name}_fraction`` (of the run), and read through :func:`steps`.

Recipes write each duration in the unit of the code they reproduce (mmcv's warmup in
iterations, IR-Net's EDE span in epochs). :func:`rescale_run` moves a recipe to another data
set or run length keeping every duration the same fraction of the run, so a variant of an
ImageNet recipe names its data set and length and carries no ImageNet constant.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from bnn_jax import data
from bnn_jax.errors import ConfigError

UNITS = ("steps", "epochs", "fraction")

# The durations of a config: (section, name) read as ``section.{name}_{unit}``.
DURATIONS = (("schedule", "warmup"), ("ede", "span"))


def fields(name: str):
  """The config fields that can hold the duration ``name``, one per unit, all None by default."""
  return {f"{name}_{unit}": ml_collections.config_dict.placeholder(int if unit == "steps" else float)
          for unit in UNITS}


def steps(section, name: str, steps_per_epoch: int, total_steps: int) -> Optional[int]:
  """The duration ``name`` of ``section`` in steps (fractions rounded to the nearest step), or
  None when none of its fields is set; setting two is an error."""
  given = [(unit, section.get(f"{name}_{unit}")) for unit in UNITS
           if section.get(f"{name}_{unit}") is not None]
  if len(given) > 1:
    raise ConfigError(f"{name} is set twice ({', '.join(f'{name}_{u}={v}' for u, v in given)}); "
                      f"set one of {[f'{name}_{u}' for u in UNITS]}")
  if not given:
    return None
  unit, value = given[0]
  if value < 0:
    raise ConfigError(f"{name}_{unit} must not be negative, not {value}")
  if unit == "steps":
    return int(value)
  if unit == "epochs":
    return round(value * steps_per_epoch)
  return round(value * total_steps)


def run_steps(config, num_examples: Optional[int] = None):
  """(steps per epoch, total steps) of ``config``'s run on ``num_examples`` training examples
  (default: its data set's, :func:`bnn_jax.data.train_examples`)."""
  if num_examples is None:
    num_examples = data.train_examples(config.dataset)
  per_epoch = data.steps_per_epoch(num_examples, config.train.batch_size, config.train.drop_last)
  return per_epoch, config.train.epochs * per_epoch


def rescale_run(config, dataset: ml_collections.ConfigDict, epochs: int, batch_size: int) -> None:
  """Moves ``config``'s recipe (in place) to ``dataset`` for ``epochs`` epochs of ``batch_size``,
  each duration and learning-rate milestone the same fraction of the run (rounded down)."""
  old_per_epoch, old_total = run_steps(config)
  old_epochs = config.train.epochs
  old = {(section, name): steps(config[section], name, old_per_epoch, old_total)
         for section, name in DURATIONS}
  config.dataset = dataset
  config.train.update(epochs=epochs, batch_size=batch_size)
  _, new_total = run_steps(config)
  for (section, name), length in old.items():
    if length is not None:
      config[section].update({f"{name}_{unit}": None for unit in UNITS})
      config[section][f"{name}_steps"] = length * new_total // old_total
  schedule = config.schedule
  if schedule.milestones:
    scale = (epochs, old_epochs) if schedule.by_epoch else (new_total, old_total)
    schedule.milestones = tuple(m * scale[0] // scale[1] for m in schedule.milestones)
