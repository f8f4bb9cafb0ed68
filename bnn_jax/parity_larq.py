"""Numerical parity with larq-zoo, on fixtures its own Keras models recorded.

A fixture (``<name>.h5`` + ``.npz`` + ``.json``, format in shared/reference/larq/README.md) is a
reduced larq-zoo model with random weights: its weight file, an input batch, and larq-zoo's eval
logits, train-mode logits, loss, every gradient and the BatchNorm moving statistics after the
training-mode call. :func:`check_larq_fixture` builds the model from ``configs/larq_zoo.py`` and
the fixture's reduction, converts the ``.h5`` as ``python -m bnn_jax.convert`` does, recomputes all
of them here and reports norm-wise relative errors with :class:`bnn_jax.parity.ParityReport`.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_jax import keras_weights
from bnn_jax.config import load_config
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.models.larq_zoo.functional import Layer, recording
from bnn_jax.parallel import run_once_compiler_options
from bnn_jax.parity import GRAD_ATOL, GRAD_RTOL, ParityReport, read_fixture, relative_error


def is_larq_fixture(description: Dict[str, Any]) -> bool:
  return "larq_zoo_factory" in description


def model_config(description: Dict[str, Any]) -> Dict[str, Any]:
  """The model section of ``configs/larq_zoo.py:<name>`` with the fixture's reduction applied:
  larq-zoo Fields by their names, ResNetE's ``spec``, or a ``width_divisor``."""
  section = load_config(f"larq_zoo:{description['name']}").model
  reduced = description.get("reduced", {})
  section.update(num_classes=description["num_classes"], **reduced.get("fields", {}))
  for field in ("spec", "width_divisor"):
    if field in reduced:
      section[field] = reduced[field]
  return section.to_dict()


def check_larq_fixture(npz_path: str) -> ParityReport:
  """Recomputes a larq-zoo fixture here and compares it with larq-zoo's numbers."""
  description, fixture = read_fixture(npz_path)
  model = build_model(model_config(description))
  images, labels = jnp.asarray(fixture["input_nhwc"]), jnp.asarray(fixture["labels"])
  file_layers = keras_weights.read_h5(npz_path[:-len(".npz")] + ".h5")
  variables, missing = keras_weights.keras_to_flax(
      file_layers, model, images.shape, abstract_variables(model, images.shape), npz_path)
  if missing:
    raise ValueError(f"{npz_path}: the fixture's weight file lacks {missing}")
  variables = jax.tree.map(jnp.asarray, variables)
  # the fixture's weight names -> ours, pairing layers as the conversion did
  renamed = {}
  for layer, (file_name, weights) in keras_weights.match_layers(file_layers, model, images.shape):
    for (collection, leaf), (weight_name, _) in zip(layer.weights, weights):
      renamed[weight_name] = (collection, layer.name, leaf)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})

  def train_loss(params):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, state)

  train_graph = []  # the train-mode step's layers; its max pools note tied windows as it runs

  def both(variables):  # one program: the train-mode step and the eval logits
    with recording() as layers:
      step = jax.value_and_grad(train_loss, has_aux=True)(variables["params"])
    train_graph.extend(layers)
    return step, model.apply(variables, images, train=False)

  ((loss, (logits_train, state)), grads), logits_eval = jax.jit(
      both, compiler_options=run_once_compiler_options())(variables)
  jax.effects_barrier()
  outputs = {name: relative_error(value, fixture[name]) for name, value in
             (("logits_eval", logits_eval), ("logits_train", logits_train), ("loss_train", loss))
             if name in fixture}
  ours = {"params": grads, "batch_stats": state.get("batch_stats", {})}
  pairs = {"moving": [], "grad": []}
  for key in fixture:
    prefix, _, weight_name = key.partition("/")
    group = {"moving_after_train_call": "moving", "grad": "grad"}.get(prefix)
    if group is None:
      continue
    if weight_name not in renamed:
      raise ValueError(f"{npz_path}: {key} names no weight of the model")
    collection, layer, leaf = renamed[weight_name]
    value = ours["params" if group == "grad" else collection][keras_weights.MODULE][layer][leaf]
    pairs[group].append((weight_name, np.asarray(value, np.float64), fixture[key]))
  for stat in ("moving_mean", "moving_variance"):
    chosen = [(v, r) for name, v, r in pairs["moving"] if name.endswith(f"/{stat}:0")]
    if chosen:
      outputs[f"{stat}_after_train_call"] = relative_error(
          np.concatenate([v.ravel() for v, _ in chosen]),
          np.concatenate([r.ravel() for _, r in chosen]))
  trainable = len(jax.tree.leaves(params))
  if pairs["grad"] and len(pairs["grad"]) != trainable:
    raise ValueError(f"{npz_path}: {len(pairs['grad'])} gradients in the fixture, {trainable} "
                     f"trainable variables in the model")
  rows = [(name, float(np.linalg.norm(v - r)), float(np.linalg.norm(r)))
          for name, v, r in pairs["grad"]]
  rows.sort(key=lambda row: row[1] / (GRAD_RTOL * row[2] + GRAD_ATOL), reverse=True)
  report = ParityReport(outputs, rows)
  if not report.passed:
    report.tie_routed = tie_routed(train_graph, renamed)
  return report


def tie_routed(layers: Sequence[Layer], renamed: Dict[str, Tuple[str, str, str]]
               ) -> Tuple[str, ...]:
  """The weights (the fixture's names) whose gradient passes a max-pool window with a tied
  maximum in the recorded training-mode run (``layers``). Binary convolutions make exactly equal
  sums common; each framework's float rounding then breaks the tie its own way, and the gradient
  goes to a different input of the window: not a difference of the models, and one no
  implementation can match."""
  upstream, stack = set(), [i for i, layer in enumerate(layers) if layer.tied]
  while stack:
    for parent in layers[stack.pop()].inputs:
      if parent not in upstream:
        upstream.add(parent)
        stack.append(parent)
  names = {layers[i].name for i in upstream}
  return tuple(weight for weight, (collection, layer, _) in renamed.items()
               if collection == "params" and layer in names)
