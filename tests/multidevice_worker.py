"""Run by test_multidevice.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by
the parent before JAX starts). Prints one JSON object of measured differences."""
import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from bnn_jax import data, parallel, step
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.losses import cross_entropy
from bnn_jax.models import build_model

from helpers import digits_config

GLOBAL_BATCH = 16


def small_experiment(devices, mode="sharded", bn_group_size=None):
  config = digits_config()
  config.model.update(num_classes=10, bn_group_size=bn_group_size)
  config.dataset.update(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  # Plain SGD with lr 1: the parameter change of one step is minus the gradient.
  config.optimizer.update(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
  config.schedule.name = "constant"
  config.parallel.mode = mode
  return Experiment(config, Mesh(np.asarray(devices), (parallel.DATA_AXIS,)),
                    build_model(config.model))


_INITIAL = {}


def initial_state(experiment, tx):
  """The model's freshly initialised state, initialised once: every experiment here has the same
  model (only the mesh, the mode and the BatchNorm groups differ) and the same seed."""
  if not _INITIAL:
    state = experiment.init_state(tx)
    _INITIAL.update(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
  return step.TrainState(np.zeros((), np.int32), _INITIAL["params"], _INITIAL["batch_stats"],
                         tx.init(_INITIAL["params"]))


def one_step(experiment, batch):
  tx, schedules = experiment.make_optimizer(steps_per_epoch=10, total_steps=100)
  state = initial_state(experiment, tx)
  before = jax.device_get(state.params)
  train_step = experiment.make_train_step(tx, schedules)
  sums = jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh))
  state, sums, _ = train_step(state, parallel.to_global(batch, experiment.mesh), sums, {})
  grads = jax.tree_util.tree_map(lambda b, a: b - a, before, jax.device_get(state.params))
  return before, grads, jax.device_get(state.batch_stats), float(sums["loss_sum"])


def max_relative_difference(a, b):
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.linalg.norm(np.asarray(x) - np.asarray(y)) /
                         max(np.linalg.norm(np.asarray(y)), 1e-12)), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def manual_per_device(experiment, params, batch_stats, batch, shards):
  """Each shard's gradient and BatchNorm update on its own, then averaged: DDP by hand."""
  model = experiment.model

  def shard_loss(p, images, labels):
    logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                  mutable=["batch_stats"])
    per_example = cross_entropy(logits, labels)
    return per_example.mean(), (per_example.sum(), updates["batch_stats"])

  shard_grad = jax.jit(jax.grad(shard_loss, has_aux=True))
  grads, stats, loss_sum = [], [], 0.0
  for images, labels in zip(np.split(batch["image"], shards), np.split(batch["label"], shards)):
    g, (total, new_stats) = shard_grad(params, images, labels)
    grads.append(g)
    stats.append(new_stats)
    loss_sum += float(total)
  mean = lambda trees: jax.tree_util.tree_map(lambda *xs: np.mean(xs, axis=0), *trees)  # noqa: E731
  return mean(grads), mean(stats), loss_sum


def main():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 simulated devices, got {len(devices)}"
  batch = next(data.synthetic_batches(GLOBAL_BATCH, 16, 3, 10, seed=3))
  result = {}

  _, grads1, stats1, loss1 = one_step(small_experiment(devices[:1]), batch)
  _, grads8, stats8, loss8 = one_step(small_experiment(devices), batch)
  result["sharded"] = {"grads": max_relative_difference(grads8, grads1),
                       "batch_stats": max_relative_difference(stats8, stats1),
                       "loss": abs(loss8 - loss1) / abs(loss1)}

  experiment = small_experiment(devices, "per_device")
  params, grads_pd, stats_pd, loss_pd = one_step(experiment, batch)
  init_stats = initial_state(experiment, optax.sgd(1.0)).batch_stats
  grads_ref, stats_ref, loss_ref = manual_per_device(experiment, params, init_stats, batch, 8)
  result["per_device"] = {"grads": max_relative_difference(grads_pd, grads_ref),
                          "batch_stats": max_relative_difference(stats_pd, stats_ref),
                          "loss": abs(loss_pd - loss_ref) / abs(loss_ref),
                          # per-device BatchNorm really differs from the global batch's
                          "differs_from_sharded": max_relative_difference(grads_pd, grads8)}
  # Ghost BatchNorm: groups of 4 give the same step on 1 and on 8 devices (2 examples each, so a
  # group spans two devices), and groups of 2 on 8 devices equal per-device BatchNorm (DDP).
  _, grads_g1, stats_g1, loss_g1 = one_step(small_experiment(devices[:1], bn_group_size=4), batch)
  _, grads_g8, stats_g8, loss_g8 = one_step(small_experiment(devices, bn_group_size=4), batch)
  _, grads_g2, stats_g2, _ = one_step(small_experiment(devices, bn_group_size=2), batch)
  result["ghost"] = {"grads": max_relative_difference(grads_g8, grads_g1),
                     "batch_stats": max_relative_difference(stats_g8, stats_g1),
                     "loss": abs(loss_g8 - loss_g1) / abs(loss_g1),
                     "differs_from_global": max_relative_difference(grads_g1, grads1),
                     "groups_of_2_vs_per_device": max_relative_difference(grads_g2, grads_pd),
                     "groups_of_2_vs_per_device_stats": max_relative_difference(stats_g2, stats_pd)}
  try:
    parallel.local_batch_size(12)
    result["indivisible_error"] = None
  except ConfigError as error:
    result["indivisible_error"] = str(error)
  print(json.dumps(result))


if __name__ == "__main__":
  sys.exit(main())
