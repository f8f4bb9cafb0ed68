"""PyTorch state dicts (the original implementation, torchvision) -> Flax variables.

The Flax tree mirrors the PyTorch module paths (``layer1.0.conv1``), so the
mapping is derived from the model itself: walk the Flax variables, name the
PyTorch key of each leaf, and transpose kernels (OIHW -> HWIO, (out, in) ->
(in, out)). Nothing is listed per architecture.

    python -m bnn_jax.convert --config configs/irnet_r18.py \
        --torch-checkpoint irnet_r18.pth --out /tmp/irnet_r18_converted
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from bnn_jax.errors import ConfigError

# Flax leaf name -> PyTorch parameter / buffer name
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class StateDictMismatch(ConfigError):
  """A state dict that does not fit the model: lists every missing, unexpected and mis-shaped key."""

  def __init__(self, missing, unexpected, misshaped):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
      parts.append("mis-shaped keys: " + ", ".join(
          f"{k} (checkpoint {got}, model expects {want})" for k, got, want in misshaped))
    super().__init__("state dict does not fit the model; " + "; ".join(parts))


def with_prefix(arrays: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
  """The entries of ``arrays`` whose key starts with ``prefix``, the prefix removed (fixtures
  store state dicts as ``state_dict/<key>``, ``grad/<key>``, …)."""
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a ``.pth`` (torch, ``weights_only=True``) or ``.npz`` state dict as numpy arrays.

  Accepts mmcv checkpoints (``{"state_dict": ...}``), DDP's ``module.`` prefix
  and parity fixtures (``state_dict/<key>`` entries of an ``.npz``).
  """
  if not os.path.isfile(path):
    raise ConfigError(f"no checkpoint file {path}")
  if not zipfile.is_zipfile(path):  # .npz files and torch.save's (since PyTorch 1.6) are zip archives
    raise ConfigError(f"{path} is not a readable checkpoint: not a complete zip archive (truncated, "
                      "damaged, or neither a .npz nor a torch.save file)")
  if path.endswith(".npz"):
    try:
      with np.load(path) as data:
        entries = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
      raise ConfigError(f"cannot read {path}: {error}") from None
    state = with_prefix(entries, "state_dict/") or entries
  else:
    try:
      import torch
    except ImportError:
      raise ConfigError(f"reading {path} needs PyTorch (pip install torch); "
                        ".npz state dicts need nothing more") from None
    # A checkpoint is untrusted input: tensors and plain containers only, no arbitrary unpickling.
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
      raise ConfigError(f"{path} holds more than tensors and plain containers, which are not "
                        "loaded (weights_only=True: a checkpoint is untrusted input)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
      raise ConfigError(f"cannot read {path}, damaged or truncated: "
                        f"{str(error).split('. ')[0]}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
      loaded = loaded["state_dict"]
    state = {k: v.detach().float().numpy() for k, v in loaded.items() if hasattr(v, "detach")}
  return {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in state.items()}


def torch_key(path: Tuple[str, ...], torchvision: bool = False) -> str:
  """The PyTorch key of a Flax leaf path such as ('backbone', 'layer1.0', 'conv1', 'kernel')."""
  *modules, leaf = path
  if torchvision:  # torchvision's ResNet has no backbone/head wrappers
    modules = ["fc"] if modules == ["head", "fc"] else [m for m in modules if m != "backbone"]
  return ".".join([*modules, _LEAF_NAMES.get(leaf, leaf)])


def by_torch_key(tree: Any) -> Dict[str, Any]:
  """The leaves of one collection's tree (``params``, ``batch_stats``, gradients) by PyTorch key."""
  return {torch_key(tuple(p.key for p in path)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_flax_layout(value: np.ndarray, leaf: str, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
  if leaf == "kernel" and value.ndim == 5:
    value = value.transpose(0, 3, 4, 2, 1)  # experts × OIHW -> experts × HWIO
  elif leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T  # (out, in) -> (in, out)
  elif value.size == int(np.prod(shape)):
    value = value.reshape(shape)  # (1, C, 1, 1) -> (C,) and friends
  return value if value.shape == tuple(shape) else None


def _torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 5:
    return (shape[0], shape[4], shape[3], shape[1], shape[2])
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def is_torchvision(state_dict: Mapping[str, Any]) -> bool:
  """True for torchvision's ResNet keys (``fc.weight``), false for mmcls' (``backbone.…``)."""
  return "fc.weight" in state_dict and not any(k.startswith("backbone.") for k in state_dict)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any],
                  allow_missing: bool = False, torchvision: Optional[bool] = None) -> Dict[str, Any]:
  """Converts a PyTorch state dict into Flax variables.

  Args:
    state_dict: PyTorch key -> array (:func:`load_state_dict`): the original's, mmclassification's,
      torchvision's or HCEBNN's (training keys; :func:`hcebnn_training_keys` renames released ones).
    template: the variables' shapes, :func:`bnn_jax.models.abstract_variables`.
    allow_missing: keep the template's leaf (a ShapeDtypeStruct) where the state dict has none.
    torchvision: whether keys lack the ``backbone.``/``head.`` prefixes (default: told by
      :func:`is_torchvision`; set it for a part of a state dict, such as its running statistics).
  Returns:
    ``{"params": ..., "batch_stats": ...}`` as numpy arrays shaped like ``template``.
  Raises:
    StateDictMismatch: naming every missing (unless ``allow_missing``), unexpected and
      mis-shaped key.
  """
  torchvision = is_torchvision(state_dict) if torchvision is None else torchvision
  used, missing, misshaped = set(), [], []

  def convert(path, leaf_template):
    names = tuple(p.key for p in path)
    key = torch_key(names[1:], torchvision)
    if key not in state_dict:
      missing.append(key)
      return None
    used.add(key)
    value = _to_flax_layout(np.asarray(state_dict[key], np.float32), names[-1], leaf_template.shape)
    if value is None:
      misshaped.append((key, tuple(np.shape(state_dict[key])),
                        _torch_shape(names[-1], leaf_template.shape)))
    return value

  variables = jax.tree_util.tree_map_with_path(convert, dict(template))
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if misshaped or unexpected or (missing and not allow_missing):
    raise StateDictMismatch(sorted(missing), unexpected, misshaped)
  return variables


def model_config_from_original(original: Mapping[str, Any]) -> Dict[str, Any]:
  """Our model config from the original's (mmcls backbone kwargs + neck + num_classes).

  The backbone options keep their names; ``neck`` is ``gap_bn`` or absent (plain GAP).
  """
  config = {k: v for k, v in original.items() if k not in ("ede", "style", "out_indices", "num_stages")}
  config["neck"] = original.get("neck") or "gap"
  return config


# --- HCEBNN (official code: 1adrianb/expert-binary-networks) -------------------

_RELEASED_STEM = ("conv1", "conv2_1", "conv2_2", "conv3")


def is_released_hcebnn(state_dict: Mapping[str, Any]) -> bool:
  """True for the released HCEBNN inference model's keys (``test/model.py``: ``…alpha2``)."""
  return any(k.endswith(".alpha2") for k in state_dict)


def hcebnn_training_keys(state_dict: Mapping[str, Any], released: Optional[bool] = None
                         ) -> Dict[str, Any]:
  """A released HCEBNN state dict under the training code's names (which our model has):
  ``conv2_1.*`` → ``conv1.conv2_1.*`` (the stem), ``activationK`` → ``actK``,
  ``alpha2`` → ``activation_post_process.alpha``. Other state dicts are returned as they are.
  ``released``: whether the keys are the released model's (default: told by
  :func:`is_released_hcebnn`; give it for a part of a state dict, such as its running
  statistics, which has no ``alpha2`` to tell)."""
  if not (is_released_hcebnn(state_dict) if released is None else released):
    return dict(state_dict)
  renamed = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[0] in _RELEASED_STEM:
      parts = ["conv1"] + parts
    parts = [f"act{p[len('activation'):]}" if p.startswith("activation") and p[-1].isdigit() else p
             for p in parts]
    if parts[-1] == "alpha2":
      parts[-1:] = ["activation_post_process", "alpha"]
    renamed[".".join(parts)] = value
  return renamed


def _gate_name(activation: str) -> str:
  name = activation.rsplit(".", 1)[-1]
  if name not in ("sigmoid", "softmax"):
    raise ConfigError(f"unknown HCEBNN gate activation {activation!r}")
  return name


def model_config_from_hcebnn(description: Mapping[str, Any], released: bool = False
                             ) -> Dict[str, Any]:
  """Our model config (``EBResNet``) from an HCEBNN description: the training code's ``main.py``
  arguments (``num_groups``, ``downsample_ratio``, ``binary_activations``, …) or the released
  ``test/model.py`` ones (``groups``, ``decompose_downsample``, ``binary``, ``activation``).
  ``released`` builds the released model's variant (:class:`bnn_jax.models.hcebnn.EBResNet`)."""
  d = description
  binary = d.get("binary")
  return {
      "backbone": "EBResNet", "num_classes": d.get("num_classes", 1000), "neck": "gap",
      "structure": tuple(d["structure"]),
      "groups": tuple(d.get("num_groups") or d.get("groups") or (1, 1, 1, 1)),
      "expansion": tuple(float(e) for e in d.get("expansion", (1, 1, 1, 1))),
      "num_experts": d.get("num_experts", 4),
      "gate": _gate_name(d.get("gate") or d.get("ebconv_activation") or d.get("activation")
                         or ("softmax" if released else "sigmoid")),
      "use_se": bool(d.get("use_se", False)),
      "g_layer": bool(d.get("add_g_layer", False)),
      "downsample_ratio": d.get("downsample_ratio") or d.get("decompose_downsample") or 1,
      "stem": d.get("stem_type", "dabnn" if released else "basic"),
      "stem_channels": d.get("stem_width", 64),
      "binary_type": ((bool(binary), bool(binary)) if binary is not None else
                      (bool(d.get("binary_activations")), bool(d.get("binary_weights")))),
      "use_only_first": bool(d.get("use_only_first", False)),
      "released_form": released,
  }


def convert_checkpoint(config, torch_checkpoint: str, out: str) -> Dict[str, Any]:
  """Converts a PyTorch checkpoint for the model ``config`` describes into an Orbax checkpoint
  (the original's, torchvision's, HCEBNN's official training or released checkpoints).

  ``out`` becomes a workdir that ``python -m bnn_jax.evaluate`` (and ``train.load_from``,
  and a KD teacher) can read: step 0, with the config and the source file as metadata.
  """
  from bnn_jax.data import input_shape
  from bnn_jax.models import abstract_variables, build_model

  template = abstract_variables(build_model(config.model), input_shape(config.dataset))
  variables = torch_to_flax(hcebnn_training_keys(load_state_dict(torch_checkpoint)), template)
  save_converted(config, variables, torch_checkpoint, out)
  return variables


def convert_keras_weights(config, weights: str, out: str) -> Tuple[Dict[str, Any], List[str]]:
  """Converts a larq-zoo Keras ``.h5`` weight file (``save_weights`` format, with or without the
  classifier) for the Larq Zoo model ``config`` describes into an Orbax workdir, as
  :func:`convert_checkpoint`. Returns the variables and the classifier layers a notop file lacks
  (initialised from ``train.seed``, for fine-tuning)."""
  from bnn_jax import keras_weights
  from bnn_jax.data import input_shape
  from bnn_jax.models import build_model, init_variables

  model, shape = build_model(config.model), input_shape(config.dataset)
  initial = jax.tree_util.tree_map(np.asarray, init_variables(model, shape, config.train.seed))
  variables, missing = keras_weights.keras_to_flax(keras_weights.read_h5(weights), model, shape,
                                                   initial, weights)
  save_converted(config, variables, weights, out)
  return variables, missing


def save_converted(config, variables: Dict[str, Any], source: str, out: str) -> None:
  """``variables`` as step 0 of a new workdir ``out``, with the config and the source file."""
  import json

  from bnn_jax.checkpoint import Checkpoints

  state = {"step": np.zeros((), np.int32), "params": variables["params"],
           "batch_stats": variables.get("batch_stats", {})}
  Checkpoints(out, max_to_keep=None).save(
      0, state, {"config": json.loads(config.to_json_best_effort()), "step": 0, "epoch": 0,
                 "converted_from": source})


def main():
  from absl import flags

  from bnn_jax import cli

  config = cli.config_flag("Config of the model the checkpoint holds.")
  torch_checkpoint = flags.DEFINE_string("torch-checkpoint", None,
                                         "A .pth (mmcls or torchvision) or .npz state dict.")
  keras = flags.DEFINE_string("keras-weights", None,
                              "A larq-zoo Keras .h5 weight file (with or without top).")
  out = flags.DEFINE_string("out", None, "Directory for the Orbax checkpoint (a workdir).")

  def body():
    if (torch_checkpoint.value is None) == (keras.value is None):
      raise ConfigError("give one of --torch-checkpoint and --keras-weights")
    missing = []
    if keras.value:
      variables, missing = convert_keras_weights(config.value, keras.value, out.value)
    else:
      variables = convert_checkpoint(config.value, torch_checkpoint.value, out.value)
    count = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
    model = config.value.model
    print(f"converted {keras.value or torch_checkpoint.value}: {count:,} parameters of "
          f"{model.arch or model.backbone} -> {out.value}/checkpoints/0")
    if missing:
      print(f"the file has no classifier (a notop file): {', '.join(missing)} initialised "
            f"(seed {config.value.train.seed}), for fine-tuning")

  cli.run(body, required=(config, out), errors=(ConfigError, FileNotFoundError))


if __name__ == "__main__":
  main()
