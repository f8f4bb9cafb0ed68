"""The train and eval steps as pure functions of (state, batch): what parallel.py jits.

Metrics are summed on device into an accumulator that the loop fetches every
few steps, so no step waits on the host. The train step's ``loss`` metric is
the whole objective (CE and, with a teacher, KD and attention transfer); the
eval step's is cross-entropy. The train step also returns the values its
schedules took (learning rate, EDE's k and t, …) by name, for the loop to report
without knowing what they are. Given the stages of the binary kernels, it also sums
the flip ratio of each step (the share of binary weights whose sign changed, sign(0)
= +1), overall and per stage, in the same accumulator: no transfer of its own.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from bnn_jax import optim
from bnn_jax.binarize import EDE
from bnn_jax.errors import ConfigError
from bnn_jax.losses import (ATTENTION_NORMS, KD_LOSSES, attention_transfer, cross_entropy,
                            distribution_loss, keras_kl_divergence, topk_correct)
from bnn_jax.models import BLOCK_OUTPUTS, block_outputs
from bnn_jax.models.backbones import requesting_layers

Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array, input_shape) -> TrainState:
  """Fresh variables and optimizer state for ``model`` (float32 parameters)."""
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = optim.prepare_params(tx, variables["params"])  # Bop's kernels: ±1
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                    tx.init(params))


SUMS = ("loss_sum", "top1_sum", "top5_sum", "count")
FLIP_RATIO = "flip_ratio"


def train_sums(stages: Any = None) -> Tuple[str, ...]:
  """The names the train step sums: :data:`SUMS` and, for a model with binary kernels
  (``stages``: :attr:`bnn_jax.variables.VariableKinds.stages`), the steps and their flip ratios."""
  names = sorted({s for s in jax.tree_util.tree_leaves(stages) if s}) if stages is not None else []
  if not names:
    return SUMS
  return SUMS + ("steps", FLIP_RATIO) + tuple(f"{FLIP_RATIO}/{name}" for name in names)


def zero_sums(names: Tuple[str, ...] = SUMS) -> Metrics:
  """The empty accumulator of the train and eval steps' sums (:func:`train_sums`'s names)."""
  return {name: jnp.zeros((), jnp.result_type(float)) for name in names}


def flip_ratios(old_params: Any, new_params: Any, stages: Any) -> Metrics:
  """The share of binary weights whose sign (sign(0) = +1) differs between ``old_params`` and
  ``new_params``, of all of them (``flip_ratio``) and of each stage (``flip_ratio/<stage>``)."""
  flipped: Dict[str, jax.Array] = {}
  sizes: Dict[str, int] = {}
  for old, new, stage in zip(jax.tree_util.tree_leaves(old_params),
                             jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(stages)):
    if stage:
      changed = jnp.sum((old >= 0) != (new >= 0), dtype=jnp.int32)
      flipped[stage] = flipped.get(stage, 0) + changed
      sizes[stage] = sizes.get(stage, 0) + old.size
  ratio = lambda n, size: n.astype(jnp.result_type(float)) / size  # noqa: E731
  return {FLIP_RATIO: ratio(sum(flipped.values()), sum(sizes.values()))} | {
      f"{FLIP_RATIO}/{stage}": ratio(flipped[stage], sizes[stage]) for stage in flipped}


@dataclasses.dataclass(frozen=True)
class Schedules:
  """What changes with the step: the learning rate (None where no variable follows the top-level
  one), the other optimizers' hyper-parameters by reported name (``lr/binary``, Bop's
  ``gamma/binary``, …) and, for IR-Net, EDE (None: its initial value)."""
  lr: Optional[optax.Schedule]
  ede: Optional[Callable[[jax.Array], EDE]] = None
  others: Dict[str, optax.Schedule] = dataclasses.field(default_factory=dict)

  def at(self, step: jax.Array) -> Tuple[EDE, Metrics]:
    """(the EDE value the model uses at ``step``, every scheduled value by its reported name)."""
    values = {} if self.lr is None else {"lr": self.lr(step)}
    values |= {name: schedule(step) for name, schedule in self.others.items()}
    if self.ede is None:
      return EDE.initial(), values
    ede = self.ede(step)
    return ede, values | {"ede_k": ede.k, "ede_t": ede.t}


def _batch_metrics(logits, labels, loss_per_example, mask) -> Metrics:
  return {"loss_sum": jnp.sum(loss_per_example * mask),
          "top1_sum": jnp.sum(topk_correct(logits, labels, 1) * mask),
          "top5_sum": jnp.sum(topk_correct(logits, labels, min(5, logits.shape[-1])) * mask),
          "count": jnp.sum(mask)}


@dataclasses.dataclass(frozen=True)
class Objective:
  """The per-example loss: ce·CE + kd·KD + at·AT, from a config's ``loss`` section."""
  ce: float = 1.0
  kd: float = 0.0
  at: float = 0.0
  label_smoothing: float = 0.0
  temperature: float = 1.0
  attention_blocks: Optional[Tuple[str, ...]] = None  # None: every block
  attention_norm: str = "max"  # losses.ATTENTION_NORMS
  kd_loss: str = "cross_entropy"  # losses.KD_LOSSES

  @classmethod
  def from_config(cls, loss) -> "Objective":
    blocks = loss.get("attention_blocks")
    if loss.get("attention_norm", "max") not in ATTENTION_NORMS:
      raise ConfigError(f"unknown loss.attention_norm {loss.get('attention_norm')!r}; "
                        f"valid: {list(ATTENTION_NORMS)}")
    if loss.get("kd_loss", "cross_entropy") not in KD_LOSSES:
      raise ConfigError(f"unknown loss.kd_loss {loss.get('kd_loss')!r}; valid: {list(KD_LOSSES)}")
    return cls(ce=0.0 if loss.get("only_kd") else loss.get("ce_weight", 1.0),
               kd=loss.get("kd_weight", 0.0), at=loss.get("at_weight", 0.0),
               label_smoothing=loss.get("label_smoothing", 0.0),
               temperature=loss.get("temperature", 1.0),
               attention_blocks=tuple(blocks) if blocks else None,
               attention_norm=loss.get("attention_norm", "max"),
               kd_loss=loss.get("kd_loss", "cross_entropy"))

  @property
  def needs_teacher(self) -> bool:
    return bool(self.kd or self.at)

  def attention_pairs(self, student: Dict[str, jax.Array], teacher: Dict[str, jax.Array]):
    """The block outputs to compare, checked to exist on both sides with equal spatial sizes.

    A stage's name (``"layer2"``) stands for its last block: the stage's output."""
    def last_block(name):
      blocks = [b for b in student if b.startswith(name + ".")]
      return max(blocks, key=lambda b: int(b.rsplit(".", 1)[1])) if "." not in name and blocks else name
    names = tuple(map(last_block, self.attention_blocks or tuple(student)))
    if not names:
      raise ConfigError("attention transfer: the student records no block outputs; name the "
                        "layers to compare in loss.attention_blocks")
    bad = [n for n in names if n not in student or n not in teacher]
    if bad:
      raise ConfigError(f"loss.attention_blocks {bad} are not blocks of both student and teacher; "
                        f"student: {sorted(student)}, teacher: {sorted(teacher)}")
    mismatched = [f"{n} (student {student[n].shape[1:3]}, teacher {teacher[n].shape[1:3]})"
                  for n in names if student[n].shape[1:3] != teacher[n].shape[1:3]]
    if mismatched:
      raise ConfigError(f"attention transfer needs equal spatial sizes: {', '.join(mismatched)}")
    return {n: student[n] for n in names}, {n: teacher[n] for n in names}

  def per_example(self, logits, labels, teacher_logits=None, student_blocks=None,
                  teacher_blocks=None) -> jax.Array:
    loss = jnp.zeros(logits.shape[:1], jnp.float32)
    if self.ce:  # skipped, not multiplied by 0, so labels cannot reach the gradient
      loss += self.ce * cross_entropy(logits, labels, self.label_smoothing)
    if self.kd:
      kd = keras_kl_divergence if self.kd_loss == "keras_kl" else distribution_loss
      loss += self.kd * kd(logits, teacher_logits, self.temperature)
    if self.at:
      loss += self.at * attention_transfer(*self.attention_pairs(student_blocks, teacher_blocks),
                                           self.attention_norm)
    return loss


TEACHER_BATCHNORM = ("running", "batch")


def make_train_step(model, tx: optax.GradientTransformation, schedules: Schedules,
                    objective: Objective = Objective(), teacher=None,
                    axis_name: Optional[str] = None, teacher_batchnorm: str = "running",
                    binary_stages: Any = None):
  """(state, batch, sums, teacher_variables) -> (state, sums, scheduled values): one step on
  {'image', 'label'}; the values (:meth:`Schedules.at`) are those this step used.

  ``tx``: an optax transformation or a :class:`bnn_jax.optim.Optimizer` (its projection follows
  each update). ``binary_stages`` (:attr:`bnn_jax.variables.VariableKinds.stages`): the flip
  ratios of the binary kernels are summed too, where ``sums`` has their names
  (:func:`train_sums`).

  ``teacher`` (a model) runs on the same images, under stop_gradient, inside this step; its
  variables are an argument (``{}`` without a teacher), never in the state, never updated.
  ``teacher_batchnorm`` "running" runs it in eval mode; "batch" normalises with the batch's
  statistics (its ghost groups), as the original's teacher, which stays in train mode.
  With ``axis_name`` the step runs per device (under ``shard_map``), as PyTorch DDP: BatchNorm
  normalises with each device's batch statistics, gradients are averaged over the axis, and
  so are the running statistics (their update is linear, so averaging every step equals
  averaging once before evaluation or a checkpoint).
  """
  if objective.needs_teacher and teacher is None:
    raise ConfigError("loss.kd_weight / loss.at_weight need a teacher (teacher.checkpoint)")
  if teacher_batchnorm not in TEACHER_BATCHNORM:
    raise ConfigError(f"unknown teacher.batchnorm {teacher_batchnorm!r}; valid: {list(TEACHER_BATCHNORM)}")
  teacher_train = teacher_batchnorm == "batch"
  mutable = ["batch_stats", BLOCK_OUTPUTS] if objective.at else ["batch_stats"]
  # Keras-style models record the layers attention transfer names (ours record every block).
  requested = (objective.attention_blocks or ()) if objective.at else ()

  def train_step(state: TrainState, batch, sums: Metrics, teacher_variables):
    ede, scheduled = schedules.at(state.step)
    images, labels = batch["image"], batch["label"]
    teacher_logits = teacher_blocks = None
    if objective.needs_teacher:
      # In "batch" mode the statistics' updates come back in the collections and are dropped.
      with requesting_layers(requested):
        teacher_logits, collections = teacher.apply(
            jax.lax.stop_gradient(teacher_variables), images, train=teacher_train,
            mutable=[BLOCK_OUTPUTS, "batch_stats"] if teacher_train else [BLOCK_OUTPUTS])
      teacher_blocks = block_outputs(collections)

    def loss_fn(params):
      with requesting_layers(requested):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      images, train=True, ede=ede, mutable=mutable)
      per_example = objective.per_example(logits, labels, teacher_logits, block_outputs(updates),
                                          teacher_blocks)
      return per_example.mean(), (logits, per_example, updates.get("batch_stats", {}))

    grads, (logits, per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    batch_metrics = _batch_metrics(logits, labels, per_example, jnp.ones_like(per_example))
    if axis_name is not None:
      grads, batch_stats = jax.lax.pmean((grads, batch_stats), axis_name)
      batch_metrics = jax.lax.psum(batch_metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(tx, state.params, updates)
    if binary_stages is not None and FLIP_RATIO in sums:  # replicated params: the same everywhere
      batch_metrics |= {"steps": jnp.ones((), jnp.result_type(float))} | flip_ratios(
          state.params, params, binary_stages)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
    return new_state, _add(sums, batch_metrics), scheduled

  return train_step


def make_eval_step(model):
  """(state, batch, sums) -> sums over the real (mask = 1) examples of a padded eval batch."""

  def eval_step(state: TrainState, batch, sums: Metrics):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    per_example = cross_entropy(logits, batch["label"])
    return _add(sums, _batch_metrics(logits, batch["label"], per_example, batch["mask"]))

  return eval_step


def _add(sums: Metrics, batch_metrics: Metrics) -> Metrics:
  return {name: sums[name] + batch_metrics[name] for name in sums}


def fetch(values: Metrics) -> Dict[str, float]:
  """Device scalars as host floats, in one transfer: call it every few steps, not every step."""
  return {name: float(value) for name, value in jax.device_get(values).items()}


def summarize(sums: Dict[str, float]) -> Dict[str, float]:
  """Means of fetched sums: loss, top1, top5 (fractions) over ``count`` examples, and the flip
  ratios over the ``steps`` they were summed over."""
  count = max(sums["count"], 1.0)
  steps = max(sums.get("steps", 0.0), 1.0)
  return {"loss": sums["loss_sum"] / count, "top1": sums["top1_sum"] / count,
          "top5": sums["top5_sum"] / count} | {
              name: value / steps for name, value in sums.items() if name.startswith(FLIP_RATIO)}
