"""Optimizers, learning-rate schedules and weight-decay masks from config, through optax.

Schedules follow mmcv's LrUpdater hooks of the original: ``step`` (×gamma at
each milestone, never below ``min_lr``), ``poly`` and ``cosine`` over epochs
(``by_epoch``) or iterations, with an optional warmup (linear, exp or constant,
as mmcv's) over the ``warmup_*`` duration (:mod:`bnn_jax.durations`) from ``warmup_ratio``·lr. Weight
decay is PyTorch's (added to the gradient before the update) for SGD and Adam,
decoupled for AdamW.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bnn_jax import durations
from bnn_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "poly", "cosine", "constant", "keras_step")
WARMUPS = (None, "linear", "exp", "constant")


def make_lr_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """``config``: the ``schedule`` section; ``config.lr`` comes from the optimizer section's ``lr``."""
  name, base = config.name, config.lr
  if name not in SCHEDULES:
    raise ConfigError(f"unknown schedule {name!r}; valid: {list(SCHEDULES)}")
  by_epoch = config.get("by_epoch", True)
  epochs = max(total_steps // max(steps_per_epoch, 1), 1)
  min_lr = config.get("min_lr", 0.0)

  def regular(step):
    progress, length = (step // steps_per_epoch, epochs) if by_epoch else (step, total_steps)
    # 1 − progress/length as (length − progress)/length: exact in float32 to the last step.
    remaining = (length - progress) / length
    if name == "step":
      milestones = jnp.asarray(config.milestones)
      return jnp.maximum(base * config.get("gamma", 0.1) ** jnp.sum(progress >= milestones), min_lr)
    if name == "poly":
      return (base - min_lr) * remaining ** config.get("power", 1.0) + min_lr
    if name == "cosine":
      return min_lr + (base - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * (1 - remaining)))
    return jnp.asarray(base)

  warmup = config.get("warmup")
  if warmup not in WARMUPS:
    raise ConfigError(f"unknown warmup {warmup!r}; valid: {list(WARMUPS)}")
  warmup_steps = durations.steps(config, "warmup", steps_per_epoch, total_steps) or 0
  warmup_ratio = config.get("warmup_ratio", 0.1)
  if name == "keras_step":
    if warmup:
      raise ConfigError(f"schedule keras_step has its own warmup (from 0); unset "
                        f"schedule.warmup ({warmup!r}) and set only its length (warmup_epochs …)")
    return keras_step(base, config.milestones, config.get("gamma", 0.1), warmup_steps,
                      steps_per_epoch)

  def warmup_factor(step):
    """mmcv's warmup: the factor on the regular rate during the first warmup_steps steps."""
    left = (warmup_steps - step) / warmup_steps  # 1 at the start, 0 at the end of the warmup
    if warmup == "linear":
      return 1 - left * (1 - warmup_ratio)
    if warmup == "exp":
      return warmup_ratio ** left
    return jnp.asarray(warmup_ratio)  # constant

  def schedule(step):
    step = jnp.asarray(step)
    lr = regular(step)
    if warmup and warmup_steps:
      lr = jnp.where(step < warmup_steps, lr * warmup_factor(step), lr)
    return jnp.asarray(lr, jnp.result_type(float))  # float32, or float64 under jax_enable_x64

  return schedule


def keras_step(peak: float, milestones, gamma: float, warmup_steps: int, steps_per_epoch: int
               ) -> optax.Schedule:
  """larq-zoo's ``R2BStepSchedule`` (``learning_schedules.py``; its 5 warmup epochs, milestones
  40, 60, 70 and decay fraction are fields here), per step: Keras' PolynomialDecay from 0 that
  reaches ``peak`` at step W (W = ``warmup_steps``; none if 0), then Keras'
  PiecewiseConstantDecay, ``peak``·gamma^k after k milestones (in epochs), each passed at the
  step after it."""
  if not milestones:
    raise ConfigError("schedule keras_step needs schedule.milestones (epochs)")
  boundaries = jnp.asarray([m * steps_per_epoch for m in milestones])
  values = jnp.asarray([peak * gamma ** k for k in range(len(milestones) + 1)])  # as Keras'

  def schedule(step):
    step = jnp.asarray(step)
    lr = values[jnp.sum(step > boundaries)]
    if warmup_steps:
      lr = jnp.where(step <= warmup_steps, peak * step / warmup_steps, lr)
    return jnp.asarray(lr, jnp.result_type(float))

  return schedule


def norm_params_mask(params: Any, batch_stats: Any) -> Any:
  """True for parameters of normalisation layers: those whose module also holds batch statistics."""
  norm_modules = {path[:-1] for path, _ in
                  jax.tree_util.tree_flatten_with_path(batch_stats)[0]}
  return jax.tree_util.tree_map_with_path(lambda path, _: path[:-1] in norm_modules, params)


def weight_decay_mask(config, params: Any, batch_stats: Any) -> Any:
  """Which parameters get weight decay: all, or all but normalisation layers when norm_decay_mult = 0."""
  if config.get("norm_decay_mult", 1.0) not in (0.0, 1.0):
    raise ConfigError("optimizer.norm_decay_mult must be 0 or 1")
  norm = norm_params_mask(params, batch_stats)
  if config.get("norm_decay_mult", 1.0) == 0.0:
    return jax.tree_util.tree_map(lambda is_norm: not is_norm, norm)
  return jax.tree_util.tree_map(lambda _: True, norm)


def make_optimizer(config, lr_schedule: Callable, params: Any, batch_stats: Any
                   ) -> optax.GradientTransformation:
  """``config``: the ``optimizer`` section (name, momentum, nesterov, weight_decay, grad_clip, …)."""
  name = config.name
  if name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")
  decay = config.get("weight_decay", 0.0)
  mask = weight_decay_mask(config, params, batch_stats)
  parts = []
  if config.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if decay and name != "adamw":
    parts.append(optax.add_decayed_weights(decay, mask))
  if name == "sgd":
    parts.append(optax.sgd(lr_schedule, momentum=config.get("momentum", 0.9) or None,
                           nesterov=config.get("nesterov", False)))
  elif name == "adam":
    parts.append(optax.adam(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                            eps=config.get("eps", 1e-8)))
  else:
    parts.append(optax.adamw(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                             eps=config.get("eps", 1e-8), weight_decay=decay, mask=mask))
  return optax.chain(*parts)
