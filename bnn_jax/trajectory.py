"""Trajectory parity: a short run of one of the original's recipes, step by step.

A trajectory fixture (``<name>.npz`` + ``<name>.json``, format in shared/reference/README.md)
holds a recipe as the original writes it (mmcv's ``optimizer`` with ``paramwise_cfg``, its
``lr_config``, IR-Net's ``ede``, a ``distill`` section), the initial weights, the batch of
every step, the objective and learning rate of each step, and the weights and BatchNorm
statistics after the last one.

:func:`config_from_mmcv` translates such a recipe into our config: this is also how a user
brings an mmclassification recipe over. :func:`check_trajectory` then trains it with our own
train step, optimizer, schedule and EDE, one step per recorded batch, in float64 (a width-8
binary network turns float32 rounding into a flipped sign within a dozen steps; the fixtures
are within their ``robustness`` of the exact run), and compares every step and the end.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnn_jax import step
from bnn_jax.binarize import EDE
from bnn_jax.config import default_config
from bnn_jax.convert import by_torch_key, model_config_from_original, torch_to_flax, with_prefix
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.optim import WARMUPS
from bnn_jax.parallel import run_once_compiler_options
from bnn_jax.parity import read_fixture, relative_error

LOSS_RTOL = 1e-4  # the objective of every step
SCHEDULE_RTOL = 1e-6  # the learning rate and EDE's k and t of every step
FINAL_RTOL = 1e-3  # all final parameters and BatchNorm statistics together, norm-wise

_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
_POLICIES = {"step": "step", "poly": "poly", "CosineAnnealing": "cosine", "fixed": "constant"}
# The teacher's mode as a fixture or recipe may name it: train mode = batch statistics.
_TEACHER_BATCHNORM = {"train": "batch", "training": "batch", "batch": "batch",
                      "eval": "running", "evaluation": "running", "running": "running"}


def _unsupported(what: str, leftover: Mapping[str, Any], supported) -> None:
  if leftover:
    raise ConfigError(f"{what} keys {sorted(leftover)} are not supported; supported: {sorted(supported)}")


def optimizer_from_mmcv(spec: Mapping[str, Any]) -> Dict[str, Any]:
  """Our ``optimizer`` section from mmcv's ``optimizer`` dict (SGD, Adam, AdamW; norm_decay_mult)."""
  spec = dict(spec)
  kind = spec.pop("type", None)
  if kind not in _OPTIMIZERS:
    raise ConfigError(f"optimizer type {kind!r} is not supported; supported: {sorted(_OPTIMIZERS)}")
  out = {"name": _OPTIMIZERS[kind], "lr": float(spec.pop("lr")),
         "weight_decay": float(spec.pop("weight_decay", 0.01 if kind == "AdamW" else 0.0))}
  paramwise = dict(spec.pop("paramwise_cfg", None) or {})
  if "norm_decay_mult" in paramwise:
    out["norm_decay_mult"] = float(paramwise.pop("norm_decay_mult"))
  _unsupported("paramwise_cfg", paramwise, ["norm_decay_mult"])
  if kind == "SGD":
    out.update(momentum=float(spec.pop("momentum", 0.0)), nesterov=bool(spec.pop("nesterov", False)))
    if spec.pop("dampening", 0):
      raise ConfigError("SGD with dampening is not supported")
  else:
    b1, b2 = spec.pop("betas", (0.9, 0.999))
    out.update(b1=float(b1), b2=float(b2), eps=float(spec.pop("eps", 1e-8)))
  _unsupported(f"{kind} optimizer", spec, ["type", "lr", "weight_decay", "paramwise_cfg", "momentum",
                                           "nesterov", "betas", "eps"])
  return out


def schedule_from_mmcv(spec: Mapping[str, Any], base_lr: float, epochs: int,
                       iters_per_epoch: int) -> Dict[str, Any]:
  """Our ``schedule`` section from mmcv's ``lr_config`` (step, poly, CosineAnnealing, fixed;
  linear warmup; ``by_epoch`` defaulting to True as mmcv's)."""
  spec = dict(spec)
  policy = spec.pop("policy", None)
  if policy not in _POLICIES:
    raise ConfigError(f"lr_config policy {policy!r} is not supported; supported: {sorted(_POLICIES)}")
  out = {"name": _POLICIES[policy], "by_epoch": bool(spec.pop("by_epoch", True))}
  warmup = spec.pop("warmup", None)
  if warmup is not None:
    if warmup not in WARMUPS or spec.pop("warmup_by_epoch", False):
      raise ConfigError(f"warmup {warmup!r} (by epoch) is not supported; supported: "
                        f"{[w for w in WARMUPS if w]}, by iteration")
    out.update(warmup=warmup, warmup_steps=int(spec.pop("warmup_iters", 0)),
               warmup_ratio=float(spec.pop("warmup_ratio", 0.1)))
  if policy == "step":
    milestones = spec.pop("step")
    if isinstance(milestones, int):  # every `step` epochs (iterations)
      length = epochs if out["by_epoch"] else epochs * iters_per_epoch
      milestones = range(milestones, length, milestones)
    out.update(milestones=tuple(int(m) for m in milestones), gamma=float(spec.pop("gamma", 0.1)),
               min_lr=float(spec.pop("min_lr", None) or 0.0))
  elif policy == "poly":
    out.update(power=float(spec.pop("power", 1.0)), min_lr=float(spec.pop("min_lr", 0.0)))
  elif policy == "CosineAnnealing":
    ratio = spec.pop("min_lr_ratio", None)
    out["min_lr"] = float(spec.pop("min_lr", 0.0) if ratio is None else ratio * base_lr)
  _unsupported(f"lr_config ({policy})", spec, [])
  return out


def config_from_mmcv(recipe: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config of a recipe written as the original's: ``model`` (in the parity fixtures'
  terms), ``optimizer``, ``lr_config``, optional ``ede`` {total_epoch} and ``distill``, and
  ``epochs``, ``batch``, ``iters_per_epoch``."""
  c = default_config()
  model = model_config_from_original(recipe["model"])
  c.model.update(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
  c.optimizer.update(**optimizer_from_mmcv(recipe["optimizer"]))
  c.schedule.update(**schedule_from_mmcv(recipe["lr_config"], c.optimizer.lr, recipe["epochs"],
                                         recipe["iters_per_epoch"]))
  if "ede" in recipe:
    c.ede.update(enabled=True, span_epochs=int(recipe["ede"]["total_epoch"]))
  distill = recipe.get("distill")
  if distill:
    teacher = distill["teacher"]
    c.teacher.model.update(backbone="ResArch", arch=f"ResNet-{teacher['depth']}", stem_act="relu",
                           stem_channels=teacher.get("stem_channels", 64),
                           base_channels=teacher.get("base_channels", 64),
                           num_classes=teacher.get("num_classes", c.model.num_classes))
    mode = str(distill.get("teacher_batchnorm", "train")).lower()
    if mode not in _TEACHER_BATCHNORM:
      raise ConfigError(f"distill.teacher_batchnorm {mode!r}; valid: {sorted(_TEACHER_BATCHNORM)}")
    c.teacher.batchnorm = _TEACHER_BATCHNORM[mode]
    if {"kd_weight", "at_weight", "ce_weight"} & set(distill):  # ATKDImageClassifier
      # Its ce_weight only switches the cross-entropy on (the head's loss, weight 1).
      c.loss.update(ce_weight=1.0 if distill.get("ce_weight", 1.0) else 0.0,
                    kd_weight=float(distill.get("kd_weight", 1.0)),
                    at_weight=float(distill.get("at_weight", 0.0)))
    else:  # DistillingImageClassifier
      c.loss.update(only_kd=bool(distill.get("only_kdloss", False)),
                    kd_weight=float(distill.get("loss_weight", 1.0)))
  c.train.update(epochs=int(recipe["epochs"]), batch_size=int(recipe["batch"]))
  return c


@dataclasses.dataclass
class TrajectoryReport:
  name: str
  loss: List[Tuple[float, float]]  # (ours, original) per step
  schedule_error: float  # worst relative error of lr, EDE k, EDE t over the steps
  final_error: float  # all final parameters and statistics together
  worst_tensor: Tuple[str, float]  # the final tensor furthest from the original's

  @property
  def loss_errors(self) -> List[float]:
    return [abs(ours - ref) / abs(ref) for ours, ref in self.loss]

  @property
  def passed(self) -> bool:
    return (max(self.loss_errors) <= LOSS_RTOL and self.schedule_error <= SCHEDULE_RTOL
            and self.final_error <= FINAL_RTOL)

  def lines(self) -> List[str]:
    ok = lambda good: "ok" if good else "FAIL"  # noqa: E731
    worst_step = int(np.argmax(self.loss_errors))
    return [f"{'loss per step':<24} {len(self.loss)} steps, worst rel err {self.loss_errors[worst_step]:.2e} "
            f"at step {worst_step}  {ok(max(self.loss_errors) <= LOSS_RTOL)}",
            f"{'lr, EDE k, t per step':<24} worst rel err {self.schedule_error:.2e}  "
            f"{ok(self.schedule_error <= SCHEDULE_RTOL)}",
            f"{'final weights + stats':<24} rel err {self.final_error:.2e}  "
            f"{ok(self.final_error <= FINAL_RTOL)}; worst tensor {self.worst_tensor[0]} "
            f"{self.worst_tensor[1]:.2e}"]


def _by_torch_key(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Every tensor of ``params`` and ``batch_stats`` by PyTorch key, as float64 host arrays."""
  return {key: np.asarray(leaf, np.float64) for collection in ("params", "batch_stats")
          for key, leaf in by_torch_key(variables[collection]).items()}


def _float64(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def check_trajectory(npz_path: str) -> TrajectoryReport:
  """Trains a trajectory fixture's recipe here, step by step, and compares it with the original's."""
  recipe, fixture = read_fixture(npz_path)
  with jax.enable_x64(True):
    config = config_from_mmcv(recipe)
    images = np.asarray(fixture["inputs"], np.float64).transpose(0, 1, 3, 4, 2)  # NCHW -> NHWC
    config.dataset.image_size = images.shape[2]
    config.model.dtype = config.teacher.model.dtype = "float64"
    experiment = Experiment.from_config(config)
    template = experiment.variables_template()
    variables = _float64(torch_to_flax(with_prefix(fixture, "state_dict/"), template))
    iters, steps = recipe["iters_per_epoch"], len(images)
    tx, schedules = experiment.make_optimizer(iters, config.train.epochs * iters)
    teacher, teacher_variables = _teacher(experiment, fixture)
    train_step = experiment.make_train_step(tx, schedules, teacher)
    state = step.TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                            tx.init(variables["params"]))
    batches = [{"image": images[index], "label": np.asarray(fixture["labels"][index], np.int32)}
               for index in range(steps)]
    # A dozen steps of a tiny model: compiling fast matters, optimised machine code does not.
    train_step = train_step.lower(state, batches[0], step.zero_sums(), teacher_variables).compile(
        run_once_compiler_options())
    # Without an EDE schedule the model runs at EDE's initial values, as the original's fixtures say.
    initial = {"ede_k": float(EDE.initial().k), "ede_t": float(EDE.initial().t)}
    recorded = []
    for batch in batches:
      state, sums, scheduled = train_step(state, batch, step.zero_sums(), teacher_variables)
      recorded.append(initial | step.fetch(sums | scheduled))
    ours = _by_torch_key({"params": state.params, "batch_stats": state.batch_stats})
  reference = _by_torch_key(torch_to_flax(with_prefix(fixture, "final_state_dict/"), template))
  schedule_error = max(relative_error([m[name] for m in recorded], fixture[key])
                       for name, key in (("lr", "lr"), ("ede_k", "ede_k"), ("ede_t", "ede_t")))
  tensors = sorted(reference)
  final_error = relative_error(np.concatenate([ours[k].ravel() for k in tensors]),
                               np.concatenate([reference[k].ravel() for k in tensors]))
  worst = max(((k, relative_error(ours[k], reference[k])) for k in tensors), key=lambda kv: kv[1])
  return TrajectoryReport(recipe.get("name", npz_path), [
      (m["loss_sum"] / m["count"], float(ref)) for m, ref in zip(recorded, fixture["loss"])],
      schedule_error, final_error, worst)


def _teacher(experiment: Experiment, fixture: Mapping[str, np.ndarray]) -> Tuple[Optional[Any], Any]:
  """The distilling teacher (an mmclassification ResNet state dict in the fixture), or (None, {})."""
  if not experiment.objective.needs_teacher:
    return None, {}
  model = build_model(experiment.config.teacher.model)
  template = abstract_variables(model, experiment.input_shape)
  return model, _float64(torch_to_flax(with_prefix(fixture, "teacher_state_dict/"), template))
