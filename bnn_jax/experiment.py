"""Everything a run is built from, made once from its config: model, data, schedules, teacher, steps.

Shared by ``train`` and ``evaluate`` so that both see the same model, input
pipeline and shardings.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional, Tuple

import jax
import optax

from bnn_jax import data, durations, parallel, step
from bnn_jax.checkpoint import Checkpoints, config_json, model_check
from bnn_jax.convert import load_state_dict, torch_to_flax
from bnn_jax.ede import ede_schedule
from bnn_jax.errors import ConfigError
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.optim import kind_groups, make_kind_optimizer, make_lr_schedule, make_optimizer
from bnn_jax.variables import VariableKinds, variable_kinds


@dataclasses.dataclass
class Experiment:
  config: Any
  mesh: Any
  model: Any

  @classmethod
  def from_config(cls, config) -> "Experiment":
    return cls(config, parallel.make_mesh(), build_model(config.model))

  @property
  def input_shape(self):
    return data.input_shape(self.config.dataset)

  @property
  def eval_batch_size(self) -> int:
    """Global eval batch (defaults to the train batch)."""
    return self.config.train.eval_batch_size or self.config.train.batch_size

  def source(self, split: str) -> data.Source:
    """A split of the config's data set, checked to have no label outside the model's classes
    (an out-of-range label has no logit: a NaN loss, and no prediction can match it)."""
    source = data.open_source(self.config.dataset, split, jax.process_index(), jax.process_count())
    classes = self.config.model.num_classes
    if source.num_classes > classes:
      raise data.DataError(f"{self.config.dataset.name} split {split!r} has {source.num_classes} "
                           f"classes (labels 0-{source.num_classes - 1}), more than the model's "
                           f"model.num_classes={classes}")
    return source

  def variables_template(self, model=None) -> Dict[str, Any]:
    """Shapes of ``params`` and ``batch_stats`` (``{}`` for a model without) of ``model`` (default:
    the run's) on this config's inputs, computed without running it."""
    return abstract_variables(model or self.model, self.input_shape)

  @functools.cached_property
  def variable_kinds(self) -> VariableKinds:
    """Which parameters are binary kernels, normalisation parameters or the rest, and the stage
    of each binary kernel (:mod:`bnn_jax.variables`), read off the model without running it."""
    return variable_kinds(self.model, self.input_shape)

  def train_sums(self):
    """The train step's empty accumulator: with this model's flip ratios (:func:`step.train_sums`)."""
    return step.zero_sums(step.train_sums(self.variable_kinds.stages))

  def lr_schedule(self, steps_per_epoch: int, total_steps: int):
    """The learning rate at each step of a run of this length (``schedule`` from ``optimizer.lr``)."""
    schedule_config = self.config.schedule.copy_and_resolve_references()
    with schedule_config.unlocked():
      schedule_config.lr = self.config.optimizer.lr
    return make_lr_schedule(schedule_config, steps_per_epoch, total_steps)

  def schedules(self, steps_per_epoch: int, total_steps: int) -> step.Schedules:
    """The learning rate and, where ``ede.enabled``, EDE over a run of this length."""
    ede = self.config.ede
    span = durations.steps(ede, "span", steps_per_epoch, total_steps) or total_steps
    return step.Schedules(
        self.lr_schedule(steps_per_epoch, total_steps),
        ede_schedule(span / steps_per_epoch, steps_per_epoch, ede.t_min, ede.t_max)
        if ede.enabled else None)

  def make_optimizer(self, steps_per_epoch: int, total_steps: int
                     ) -> Tuple[optax.GradientTransformation, step.Schedules]:
    """(tx, the run's schedules) for a run of this length; tx follows ``schedules.lr`` or, with
    an optimizer per kind of variable (``optimizer.binary`` …), ``schedules.others`` too."""
    schedules = self.schedules(steps_per_epoch, total_steps)
    template = self.variables_template()
    if kind_groups(self.config.optimizer, self.config.schedule) is None:
      tx = make_optimizer(self.config.optimizer, schedules.lr, template["params"],
                          template["batch_stats"])
      return tx, schedules
    tx, values = make_kind_optimizer(self.config.optimizer, self.config.schedule, steps_per_epoch,
                                     total_steps, template["params"], template["batch_stats"],
                                     self.variable_kinds.kinds)
    return tx, dataclasses.replace(schedules, lr=values.pop("lr", None), others=values)

  @property
  def objective(self) -> step.Objective:
    return step.Objective.from_config(self.config.loss)

  def load_teacher(self) -> Tuple[Optional[Any], Dict[str, Any], Dict[str, Any]]:
    """(teacher model, its variables replicated on the mesh, what to record of it), or (None, {}, {}).

    ``teacher.checkpoint`` is an Orbax workdir (a run of ours, or ``bnn_jax.convert``'s output)
    or a ``.pth`` / ``.npz`` state dict, converted here.
    """
    teacher = self.config.teacher
    if not self.objective.needs_teacher:
      if teacher.checkpoint:
        raise ConfigError(f"teacher.checkpoint is set ({teacher.checkpoint}) but loss.kd_weight and "
                          "loss.at_weight are 0: set one, or unset the teacher")
      return None, {}, {}
    if not teacher.checkpoint:
      raise ConfigError("loss.kd_weight / loss.at_weight need teacher.checkpoint: an Orbax workdir "
                        "or a .pth / .npz state dict of teacher.model")
    model = build_model(teacher.model)
    template = self.variables_template(model)
    sharding = parallel.replicated(self.mesh)
    if os.path.isdir(teacher.checkpoint):
      name = f"the teacher ({teacher.model.arch})"
      variables, meta = Checkpoints(teacher.checkpoint, read_only=True).restore_variables(
          template, sharding, teacher.step, model_name=name,
          check=model_check(config_json(teacher.model), name, advice="fix teacher.model"))
      step_restored = meta.get("step")
    elif os.path.isfile(teacher.checkpoint):
      variables = jax.device_put(torch_to_flax(load_state_dict(teacher.checkpoint), template), sharding)
      step_restored = None
    else:
      raise ConfigError(f"teacher.checkpoint {teacher.checkpoint} does not exist")
    record = {"checkpoint": os.path.abspath(teacher.checkpoint), "step": step_restored,
              "model": teacher.model.to_dict(), "batchnorm": teacher.batchnorm}
    return model, variables, record

  def make_train_step(self, tx: optax.GradientTransformation, schedules: step.Schedules,
                      teacher=None):
    """The jitted train step of this config's objective, in its parallel mode."""
    mode = self.config.get("parallel", {}).get("mode", "sharded")
    train_step = step.make_train_step(
        self.model, tx, schedules, self.objective, teacher,
        axis_name=parallel.DATA_AXIS if mode == "per_device" else None,
        teacher_batchnorm=self.config.teacher.batchnorm, binary_stages=self.variable_kinds.stages)
    return parallel.jit_train_step(train_step, self.mesh, mode)

  def init_state(self, tx: optax.GradientTransformation) -> step.TrainState:
    """A fresh, replicated TrainState (seeded by train.seed)."""
    init = lambda rng: step.init_state(self.model, tx, rng, self.input_shape)  # noqa: E731
    return jax.jit(init, out_shardings=parallel.replicated(self.mesh),
                   compiler_options=parallel.run_once_compiler_options())(
        jax.random.key(self.config.train.seed))

  def evaluate(self, state: step.TrainState, eval_step=None,
               source: Optional[data.Source] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 over every example of the eval split (padding masked out)."""
    eval_step = eval_step or parallel.jit_eval_step(step.make_eval_step(self.model), self.mesh)
    local_batch = parallel.local_batch_size(self.eval_batch_size, "eval batch size")
    source = source or self.source(self.config.dataset.eval_split)
    batches = data.eval_batches(source, self.config.dataset, local_batch, jax.process_count())
    sums = jax.device_put(step.zero_sums(), parallel.replicated(self.mesh))
    for batch in parallel.prefetch_to_devices(batches, self.mesh):
      sums = eval_step(state, batch, sums)
    fetched = step.fetch(sums)
    return step.summarize(fetched) | {"num_examples": int(fetched["count"])}
