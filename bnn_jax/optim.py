"""Optimizers, learning-rate schedules and weight-decay masks from config, through optax.

Schedules follow mmcv's LrUpdater hooks of the original: ``step`` (×gamma at
each milestone, never below ``min_lr``), ``poly`` and ``cosine`` over epochs
(``by_epoch``) or iterations, with an optional warmup (linear, exp or constant,
as mmcv's) over the ``warmup_*`` duration (:mod:`bnn_jax.durations`) from ``warmup_ratio``·lr. Weight
decay is PyTorch's (added to the gradient before the update) for SGD and Adam,
decoupled for AdamW. ``keras_sgd`` and ``keras_adam`` are Keras' (legacy) SGD and Adam, as
larq-zoo's recipes ran them: the learning rate inside the momentum (v ← μ·v − lr·g), and Adam's
epsilon added to the uncorrected √v. ``bop`` is larq's Bop (:func:`bop`), for binary kernels.

Per-variable optimizers (larq's ``CaseOptimizer``): ``optimizer.binary``, ``optimizer.real`` and
``optimizer.norm`` give binary kernels, the other parameters and the normalisation parameters
(:mod:`bnn_jax.variables`) optimizers of their own through ``optax.multi_transform``. Each field a
section leaves None is the top-level optimizer's (``norm``: ``real``'s, then the top level's), its
``schedule`` the top-level ``schedule`` with the section's fields over it; a kind whose section is
unset is trained by the top-level optimizer (``norm``: by ``real``'s). With no section set, the
optimizer is exactly the single one of before. ``optimizer.binary.clip`` projects binary kernels
into [−clip, clip] after each update (larq's ``WeightClip``); Bop projects them onto ±1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bnn_jax import durations
from bnn_jax.binarize import sign
from bnn_jax.errors import ConfigError
from bnn_jax.variables import BINARY, KINDS, NORM, REAL

OPTIMIZERS = ("sgd", "adam", "adamw", "keras_sgd", "keras_adam", "bop")
SCHEDULES = ("step", "poly", "cosine", "constant", "keras_cosine", "keras_step")
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
  if name == "keras_cosine":
    if warmup:
      raise ConfigError(f"schedule keras_cosine has its own warmup (from 0); unset "
                        f"schedule.warmup ({warmup!r}) and set only its length (warmup_epochs …)")
    return keras_cosine(base, warmup_steps, total_steps)
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


def keras_cosine(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """larq-zoo's ``CosineDecayWithWarmup`` (``learning_schedules.py``), per step: Keras'
  PolynomialDecay from 0 that reaches ``peak`` at step W − 1 (W = ``warmup_steps``), then Keras'
  CosineDecay from ``peak`` over the D − W − 1 steps after step W (D = ``total_steps``): 0 at
  step D − 1."""
  if warmup_steps < 2 or total_steps < warmup_steps + 2:
    raise ConfigError(f"schedule keras_cosine needs a warmup of at least 2 steps and 2 steps "
                      f"after it, not {warmup_steps} of {total_steps}")
  decay_steps = total_steps - warmup_steps - 1

  def schedule(step):
    step = jnp.asarray(step)
    warm = peak * jnp.minimum(step, warmup_steps - 1) / (warmup_steps - 1)
    progress = jnp.clip(step - warmup_steps, 0, decay_steps) / decay_steps
    cosine = peak * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.asarray(jnp.where(step < warmup_steps, warm, cosine), jnp.result_type(float))

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


_TOP_BOP = ("optimizer.name='bop': Bop trains binary kernels only; set "
            "optimizer.binary.name='bop' and keep another optimizer for the rest")


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
  if name == "bop":
    raise ConfigError(_TOP_BOP)
  if name == "sgd":
    parts.append(optax.sgd(lr_schedule, momentum=config.get("momentum", 0.9) or None,
                           nesterov=config.get("nesterov", False)))
  elif name == "keras_sgd":  # v <- momentum·v - lr·g; the update is v (Nesterov: momentum·v - lr·g)
    parts += [optax.scale_by_learning_rate(lr_schedule)]
    if config.get("momentum", 0.9):
      parts.append(optax.trace(config.momentum, nesterov=config.get("nesterov", False)))
  elif name == "keras_adam":
    parts += [scale_by_keras_adam(config.get("b1", 0.9), config.get("b2", 0.999),
                                  config.get("eps", 1e-7)),
              optax.scale_by_learning_rate(lr_schedule)]
  elif name == "adam":
    parts.append(optax.adam(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                            eps=config.get("eps", 1e-8)))
  else:
    parts.append(optax.adamw(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                             eps=config.get("eps", 1e-8), weight_decay=decay, mask=mask))
  return optax.chain(*parts)


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
                        ) -> optax.GradientTransformation:
  """Keras' (legacy) Adam direction: m̂·√(1 − b2ᵗ)/(1 − b1ᵗ) / (√v + eps), eps added to the
  uncorrected √v (TensorFlow's ResourceApplyAdam), where optax's adam adds it to √v̂."""

  def init(params):
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    direction = jax.tree_util.tree_map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, optax.ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


class BopState(NamedTuple):
  count: jax.Array  # updates so far: the step the schedules are read at
  m: Any  # the exponential moving average of the gradients


def bop(threshold: optax.ScalarOrSchedule = 1e-8, gamma: optax.ScalarOrSchedule = 1e-4
        ) -> optax.GradientTransformation:
  """Bop (Helwegen et al., 2019), larq 0.14's update, for ±1 weights without latent values:

      m ← m + γ·(g − m);   w ← sign(−sign(w·m − τ)·w)

  i.e. a weight flips where w·m ≥ τ: where its gradient's average has pushed against its sign
  for long enough. sign(0) = +1 as everywhere in bnn_jax, so a weight exactly at the threshold
  flips (larq's inner ``tf.sign`` is 0 there, which sets such a weight to +1). ``threshold`` τ and
  ``gamma`` γ are numbers or schedules of the step (counted from 0, as Keras'
  ``optimizer.iterations``). The update is the new weight minus the old one (±2 or 0 on ±1)."""
  at = lambda value, count: value(count) if callable(value) else value  # noqa: E731

  def init(params):
    return BopState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params):
    if params is None:
      raise ValueError("bop needs the parameters (tx.update(grads, state, params))")
    g, tau = at(gamma, state.count), at(threshold, state.count)
    m = jax.tree_util.tree_map(lambda m, grad: m + g * (grad - m), state.m, grads)
    updates = jax.tree_util.tree_map(lambda w, m: sign(-sign(w * m - tau) * w) - w, params, m)
    return updates, BopState(optax.safe_int32_increment(state.count), m)

  return optax.GradientTransformation(init, update)


class Optimizer(NamedTuple):
  """An optax transformation (``init``, ``update``) with what happens to the parameters around
  it: ``prepare`` once at initialisation (Bop's kernels start at the sign of their usual
  initialisation) and ``project`` after each update (``clip``, Bop's ±1)."""
  init: Callable
  update: Callable
  prepare: Callable
  project: Callable


def prepare_params(tx, params):
  """``params`` as ``tx`` starts from (unchanged for a plain optax transformation)."""
  return tx.prepare(params) if isinstance(tx, Optimizer) else params


def apply_updates(tx, params, updates):
  """``params + updates``, then ``tx``'s projection (none for a plain optax transformation)."""
  params = optax.apply_updates(params, updates)
  return tx.project(params) if isinstance(tx, Optimizer) else params


# --- One optimizer per kind of variable --------------------------------------------------

DEFAULT = "default"  # the group of the kinds without a section: the top-level optimizer
KIND_FIELDS = ("schedule", "threshold_schedule")  # the sections' sub-sections, not optimizer fields


def _is_set(section) -> bool:
  return section is not None and any(
      _is_set(v) if hasattr(v, "items") else v is not None for v in section.values())


def _over(base, section):
  """A copy of ``base`` with the fields ``section`` sets (a duration set there replaces every
  unit of that duration in ``base``)."""
  merged = base.copy_and_resolve_references()
  given = {k: v for k, v in (section or {}).items() if v is not None and not hasattr(v, "items")}
  with merged.unlocked():
    for name in {k.rsplit("_", 1)[0] for k in given if k.rsplit("_", 1)[-1] in durations.UNITS}:
      for unit in durations.UNITS:
        if f"{name}_{unit}" in merged:
          merged[f"{name}_{unit}"] = None
    for k in KIND_FIELDS:
      if k in merged:
        del merged[k]
    merged.update(given)
  return merged


@dataclasses.dataclass(frozen=True)
class Group:
  """One optimizer of a per-kind configuration and the schedules it follows."""
  name: str  # DEFAULT or the kind whose section it is
  optimizer: Any  # the resolved optimizer fields
  schedule: Any  # the resolved schedule of its lr (Bop: of its gamma)
  threshold_schedule: Optional[Any] = None  # Bop's threshold


def kind_groups(optimizer, schedule) -> Optional[Tuple[Dict[str, str], Dict[str, Group]]]:
  """({kind: group name}, {group name: Group}) of an ``optimizer`` section with per-kind
  sections, or None when it sets none (the single optimizer of before)."""
  sections = {kind: optimizer.get(kind) for kind in KINDS}
  if not any(_is_set(s) for s in sections.values()):
    return None
  if optimizer.name == "bop":
    raise ConfigError(_TOP_BOP)
  top = Group(DEFAULT, _over(optimizer, {}), schedule)
  with top.optimizer.unlocked():
    for kind in KINDS:
      if kind in top.optimizer:
        del top.optimizer[kind]
  groups, group_of = {DEFAULT: top}, {}
  for kind in (BINARY, REAL, NORM):  # norm falls back on real's group
    parent = groups[group_of[REAL]] if kind == NORM else top
    section = sections[kind]
    if not _is_set(section):
      group_of[kind] = parent.name
      continue
    resolved = _over(parent.optimizer, section)
    group_schedule = _over(parent.schedule, section.get("schedule"))
    threshold = None
    if resolved.name == "bop":
      if resolved.get("clip") is not None:
        raise ConfigError("optimizer.binary.clip does nothing with bop (its weights are ±1); "
                          "unset it")
      threshold = _over(_CONSTANT, section.get("threshold_schedule"))
    groups[kind] = Group(kind, resolved, group_schedule, threshold)
    group_of[kind] = kind
  for kind, name in group_of.items():
    if kind != BINARY and groups[name].optimizer.name == "bop":
      source = "optimizer.name" if name == DEFAULT else f"optimizer.{name}.name"
      raise ConfigError(f"Bop trains binary kernels only, and the {kind} parameters would get it "
                        f"({source}='bop'): give them another optimizer")
  used = set(group_of.values())
  return group_of, {name: group for name, group in groups.items() if name in used}


# Bop's threshold schedule unless ``threshold_schedule`` says otherwise.
_CONSTANT = ml_collections.ConfigDict(dict(name="constant", by_epoch=True, min_lr=0.0,
                                           **{f"warmup_{u}": None for u in durations.UNITS}))


def group_schedules(group: Group, steps_per_epoch: int, total_steps: int
                    ) -> Dict[str, optax.Schedule]:
  """{hyper-parameter: schedule} of a group: ``lr``, or Bop's ``gamma`` and ``threshold``."""
  def built(schedule, base):
    schedule = schedule.copy_and_resolve_references()
    with schedule.unlocked():
      schedule.lr = base
    return make_lr_schedule(schedule, steps_per_epoch, total_steps)

  config = group.optimizer
  if config.name == "bop":
    gamma = config.get("gamma") if config.get("gamma") is not None else 1e-4  # larq's defaults
    tau = config.get("threshold") if config.get("threshold") is not None else 1e-8
    return {"gamma": built(group.schedule, gamma), "threshold": built(group.threshold_schedule, tau)}
  return {"lr": built(group.schedule, config.lr)}


def make_kind_optimizer(optimizer, schedule, steps_per_epoch: int, total_steps: int,
                        params: Any, batch_stats: Any, kinds: Any
                        ) -> Tuple[Optimizer, Dict[str, optax.Schedule]]:
  """The per-kind optimizer of an ``optimizer`` section that sets ``binary``, ``real`` or
  ``norm`` (:func:`kind_groups`), and its schedules by reported name: the top-level group's
  ``lr``, the others' ``lr/<kind>`` (Bop: ``gamma/binary``, ``threshold/binary``).

  ``kinds``: :attr:`bnn_jax.variables.VariableKinds.kinds` of ``params``."""
  group_of, groups = kind_groups(optimizer, schedule)
  present = set(jax.tree_util.tree_leaves(kinds))
  for kind in KINDS:
    if group_of[kind] == kind and kind not in present:
      raise ConfigError(f"optimizer.{kind} is set but the model has no "
                        f"{ {BINARY: 'binary kernels', NORM: 'normalisation parameters', REAL: 'other parameters'}[kind]}")
  labels = jax.tree_util.tree_map(lambda kind: group_of[kind], kinds)
  transforms, reported, projections = {}, {}, {}
  for name, group in groups.items():
    values = group_schedules(group, steps_per_epoch, total_steps)
    reported |= {hyper if name == DEFAULT else f"{hyper}/{name}": s for hyper, s in values.items()}
    config = group.optimizer
    if config.name == "bop":
      transforms[name] = bop(values["threshold"], values["gamma"])
      projections[name] = sign
    else:
      with config.unlocked():
        config.grad_clip = None  # clipped once, over every gradient, before the groups
      transforms[name] = make_optimizer(config, values["lr"], params, batch_stats)
      if config.get("clip") is not None:
        clip = config.clip
        if clip <= 0:
          raise ConfigError(f"optimizer.{name}.clip must be positive, not {clip}")
        projections[name] = lambda w, c=clip: jnp.clip(w, -c, c)
  parts = [optax.clip_by_global_norm(optimizer.grad_clip)] if optimizer.get("grad_clip") else []
  tx = optax.chain(*parts, optax.multi_transform(transforms, labels))

  def project(params, only_bop: bool = False):
    def one(label, w):
      if label not in projections or (only_bop and groups[label].optimizer.name != "bop"):
        return w
      return projections[label](w)
    return jax.tree_util.tree_map(one, labels, params)

  return Optimizer(tx.init, tx.update, lambda p: project(p, only_bop=True), project), reported
