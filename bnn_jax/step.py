"""The train and eval steps as pure functions of (state, batch): what parallel.py jits.

Metrics are summed on device into an accumulator that the loop fetches every
few steps, so no step waits on the host.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from bnn_jax.binarize import EDE
from bnn_jax.losses import cross_entropy, topk_correct

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
  params = variables["params"]
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                    tx.init(params))


EVAL_SUMS = ("loss_sum", "top1_sum", "top5_sum", "count")
TRAIN_METRICS = EVAL_SUMS + ("lr", "ede_k", "ede_t")


def zero_metrics(names=TRAIN_METRICS) -> Metrics:
  return {name: jnp.zeros((), jnp.float32) for name in names}


def _batch_metrics(logits, labels, loss_per_example, mask) -> Metrics:
  return {"loss_sum": jnp.sum(loss_per_example * mask),
          "top1_sum": jnp.sum(topk_correct(logits, labels, 1) * mask),
          "top5_sum": jnp.sum(topk_correct(logits, labels, min(5, logits.shape[-1])) * mask),
          "count": jnp.sum(mask)}


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: Callable,
                    ede_schedule: Optional[Callable] = None, label_smoothing: float = 0.0):
  """(state, batch, metrics) -> (state, metrics): one SGD step on a batch of {'image', 'label'}."""

  def train_step(state: TrainState, batch, metrics: Metrics):
    ede = ede_schedule(state.step) if ede_schedule else EDE.initial()
    labels = batch["label"]

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    batch["image"], train=True, ede=ede, mutable=["batch_stats"])
      per_example = cross_entropy(logits, labels, label_smoothing)
      return per_example.mean(), (logits, per_example, updates.get("batch_stats", {}))

    grads, (logits, per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
    batch_metrics = _batch_metrics(logits, labels, per_example, jnp.ones_like(per_example))
    metrics = {name: metrics[name] + batch_metrics[name] for name in batch_metrics} | {
        "lr": lr_schedule(state.step), "ede_k": ede.k, "ede_t": ede.t}
    return new_state, metrics

  return train_step


def make_eval_step(model):
  """(state, batch, sums) -> sums over the real (mask = 1) examples of a padded eval batch."""

  def eval_step(state: TrainState, batch, sums: Metrics):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    per_example = cross_entropy(logits, batch["label"])
    batch_metrics = _batch_metrics(logits, batch["label"], per_example, batch["mask"])
    return {name: sums[name] + batch_metrics[name] for name in batch_metrics}

  return eval_step


def summarize(metrics: Dict[str, float]) -> Dict[str, float]:
  """Host-side means from fetched sums: loss, top1, top5 (fractions), plus lr / EDE when present."""
  count = max(metrics["count"], 1.0)
  summary = {"loss": metrics["loss_sum"] / count, "top1": metrics["top1_sum"] / count,
             "top5": metrics["top5_sum"] / count}
  return summary | {k: metrics[k] for k in ("lr", "ede_k", "ede_t") if k in metrics}
