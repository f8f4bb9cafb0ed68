"""larq-zoo's Keras ``.h5`` weight files <-> bnn_jax variables, with h5py alone (no TensorFlow).

The file format is Keras' ``save_weights``: the root's ``layer_names`` lists every layer of the
model in ``model.layers`` order; each layer is a group whose ``weight_names`` lists its weights
(``quant_conv2d_3/kernel:0``), each a dataset at ``<layer>/<weight name>``. Keras loads such a
file by position: the k-th layer with weights in the file goes to the k-th layer with weights of
the model, whatever the names say. So do we, with the order
:func:`~bnn_jax.models.larq_zoo.functional.layer_order` computes, checking that each layer is of
the same kind and each weight of the same name and shape; a file without the classifier (larq-zoo's
``*_notop.h5``) fills everything but it.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple

import h5py
import jax
import numpy as np

from bnn_jax.errors import ConfigError
from bnn_jax.models.larq_zoo.functional import Layer, layer_order

FileLayer = Tuple[str, List[Tuple[str, np.ndarray]]]  # (layer name, [(weight name, value)])
MODULE = "backbone"  # where a Classifier keeps a larq-zoo model's layers


def read_h5(path: str) -> List[FileLayer]:
  """Every layer of a ``save_weights`` file, in its order, with its weights (name, value)."""
  try:
    with h5py.File(path, "r") as f:
      if "layer_names" not in f.attrs:
        raise ConfigError(f"{path} is not a Keras weight file (no layer_names: a whole saved "
                          f"model? save it with model.save_weights)")
      layers = []
      for layer in (_text(n) for n in f.attrs["layer_names"]):
        names = [_text(n) for n in f[layer].attrs.get("weight_names", [])]
        layers.append((layer, [(n, np.asarray(f[layer][n])) for n in names]))
      return layers
  except OSError as error:
    raise ConfigError(f"cannot read {path} as HDF5: {error}") from None


def write_h5(path: str, layers: Sequence[FileLayer]) -> None:
  """``layers`` as Keras' ``save_weights`` writes them (``python -m bnn_jax.export --format
  keras-h5`` writes through a temporary file, so a failed write leaves no partial file)."""
  with h5py.File(path, "w") as f:
    f.attrs["backend"], f.attrs["keras_version"] = "tensorflow", "2.16.0"
    f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers], dtype="S")
    for name, weights in layers:
      group = f.create_group(name)
      group.attrs["weight_names"] = np.array([n.encode() for n, _ in weights], dtype="S")
      for weight_name, value in weights:
        group.create_dataset(weight_name, data=np.asarray(value))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def kind(layer_name: str) -> str:
  """A Keras layer's class from its automatic name: ``quant_conv2d_3`` -> ``quant_conv2d``."""
  return re.sub(r"_\d+$", "", layer_name)


def leaf(weight_name: str) -> str:
  """``quant_conv2d_3/kernel:0`` -> ``kernel``."""
  return weight_name.rsplit("/", 1)[-1].split(":")[0]


def weighted_layers(model, input_shape) -> List[Layer]:
  """The model's layers that have weights, in Keras' order."""
  return [layer for layer in layer_order(model, input_shape) if layer.weights]


def match_layers(file_layers: Sequence[FileLayer], model, input_shape,
                 source: str = "the file") -> List[Tuple[Layer, FileLayer]]:
  """Each layer with weights of a file, paired with the model's layer it loads into (Keras' rule:
  by position); a file without the classifier pairs all but the model's top layers. A file with
  another number of such layers is a ConfigError naming both counts."""
  ours = weighted_layers(model, input_shape)
  theirs = [(name, weights) for name, weights in file_layers if weights]
  body = [layer for layer in ours if not layer.top]
  if len(theirs) not in (len(ours), len(body)):
    raise ConfigError(
        f"{source} has {len(theirs)} layers with weights, the model {len(ours)} ({len(body)} "
        f"without its classifier): a file of another model or configuration "
        f"(file: {_summary([n for n, _ in theirs])}; model: {_summary([l.name for l in ours])})")
  return list(zip(ours, theirs))


def keras_to_flax(file_layers: Sequence[FileLayer], model, input_shape, template: Dict[str, Any],
                  source: str = "the file") -> Tuple[Dict[str, Any], List[str]]:
  """Variables of ``model`` from a weight file's layers, and the names of the classifier's layers
  the file lacks (a notop file; those keep ``template``'s values).

  ``template``: the model's variables (``params``, ``batch_stats``) as arrays, or as shapes when
  the file has every layer. Raises a ConfigError naming every layer that does not fit.
  """
  pairs = match_layers(file_layers, model, input_shape, source)
  variables = jax.tree.map(lambda x: x, dict(template))  # new containers, filled in place
  problems = []
  for layer, (file_name, weights) in pairs:
    problems += _fill(variables, layer, file_name, weights)
  if problems:
    raise ConfigError(f"{source} does not fit the model: " + "; ".join(problems[:8])
                      + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
  missing = [layer.name for layer in weighted_layers(model, input_shape)[len(pairs):]]
  return variables, missing


def _summary(names: Sequence[str]) -> str:
  return ", ".join(names[:3]) + (f", ... {names[-1]}" if len(names) > 3 else "")


def _fill(variables, layer: Layer, file_name: str, weights) -> List[str]:
  """Puts one file layer's weights into ``variables`` (in place); what does not fit, as text."""
  where = f"layer {file_name} (model: {layer.name})"
  if kind(file_name) != kind(layer.name):
    return [f"{where}: a {kind(file_name)}, the model has a {kind(layer.name)}"]
  file_leaves, model_leaves = [leaf(n) for n, _ in weights], [name for _, name in layer.weights]
  if file_leaves != model_leaves:
    return [f"{where}: weights {file_leaves}, the model's {model_leaves}"]
  problems = []
  for (collection, name), (_, value) in zip(layer.weights, weights):
    if collection == "constant":
      if not np.array_equal(value, layer.constants[name]):
        problems.append(f"{where}: its fixed {name} is not the model's")
      continue
    slot = variables[collection][MODULE][layer.name]
    if tuple(value.shape) != tuple(slot[name].shape):
      problems.append(f"{where}: {name} {tuple(value.shape)}, the model's {tuple(slot[name].shape)}")
    else:
      slot[name] = value.astype(slot[name].dtype)
  return problems


def flax_to_keras(variables: Dict[str, Any], model, input_shape) -> List[FileLayer]:
  """The file layers of ``variables``: every layer of the model in Keras' order, named as a
  freshly built larq-zoo model names them (what larq-zoo's ``weights=path`` loads)."""
  layers = []
  for layer in layer_order(model, input_shape):
    weights = []
    for collection, name in layer.weights:
      value = (layer.constants[name] if collection == "constant"
               else variables[collection][MODULE][layer.name][name])
      weights.append((f"{layer.name}/{name}:0", np.asarray(value, np.float32)))
    layers.append((layer.name, weights))
  return layers


def keras_names(model, input_shape) -> Dict[Tuple[str, str, str], str]:
  """{(collection, layer, leaf): Keras weight name as a fresh larq-zoo model names it}, for every
  variable of the model (what a fixture's ``grad/<name>`` keys use)."""
  return {(collection, layer.name, name): f"{layer.name}/{name}:0"
          for layer in layer_order(model, input_shape) for collection, name in layer.weights
          if collection != "constant"}
