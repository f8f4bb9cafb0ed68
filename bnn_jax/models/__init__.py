"""Models: ``build_model(config.model)`` turns a model config into a Flax Classifier."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from bnn_jax.errors import ConfigError
from bnn_jax.parallel import run_once_compiler_options
from bnn_jax.models.backbones import (BACKBONES, BLOCK_OUTPUTS, MOBILE_ARCHS, RES_ARCHS, MobileArch,
                                     ResArch)
from bnn_jax.models.classifier import NECKS, Classifier
from bnn_jax.models.hcebnn import EBResNet, expand_experts
from bnn_jax.models.larq_zoo import LARQ_ZOO_BACKBONES

BACKBONES = {**BACKBONES, "EBResNet": EBResNet, **LARQ_ZOO_BACKBONES}
# Applied to the parameters ``train.load_from`` restores (``train.load_transform``).
LOAD_TRANSFORMS = {"expand_experts": expand_experts}

__all__ = ["build_model", "load_transform", "abstract_variables", "block_outputs", "Classifier",
           "ResArch", "MobileArch", "EBResNet", "RES_ARCHS", "MOBILE_ARCHS", "BLOCK_OUTPUTS"]

_CLASSIFIER_KEYS = ("backbone", "num_classes", "neck", "dtype")


def _as_tuples(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


# Compute dtypes: parameters, optimizer state, BatchNorm statistics and the loss stay float32
# (float64: numerical checks against the original under jax_enable_x64).
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")


def build_model(config: Mapping[str, Any]) -> Classifier:
  """Builds the classifier a model config describes.

  Args:
    config: a ``model`` section (or dict): ``backbone`` (one of :data:`BACKBONES`),
      ``num_classes``, ``neck`` (gap | gap_bn), ``dtype`` (the compute dtype), and the
      backbone's own fields (``arch``, ``stem_channels``, ``base_channels``, ``binary_type``,
      ``binarizers``, ``bn_group_size``, …); a field set to ``None`` takes the backbone's default.
  Returns:
    A :class:`Classifier`: ``apply(variables, images, train=..., ede=...)`` -> float32 logits.
  Raises:
    ConfigError: an unknown backbone, architecture, neck, dtype or field, naming the valid ones.
  """
  options = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  options = {k: v for k, v in options.items() if v is not None}  # None: the backbone's default
  backbone_name = options.pop("backbone", "ResArch")
  if backbone_name not in BACKBONES:
    raise ConfigError(f"unknown backbone {backbone_name!r}; valid: {sorted(BACKBONES)}")
  if "num_classes" not in options:
    raise ConfigError("model config needs num_classes")
  num_classes = options.pop("num_classes")
  neck = options.pop("neck", "gap")
  backbone_cls = BACKBONES[backbone_name]
  if backbone_name in LARQ_ZOO_BACKBONES:  # a whole Keras model: its own classifier
    neck, options["num_classes"] = None, num_classes
  elif neck not in NECKS:
    raise ConfigError(f"unknown neck {neck!r}; valid: {list(NECKS)}")
  dtype = options.pop("dtype", "float32")
  dtype = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"unknown model.dtype {dtype!r}; valid: {list(COMPUTE_DTYPES)}")
  dtype = jnp.dtype(dtype)
  fields = {f.name for f in dataclasses.fields(backbone_cls)} - {"parent", "name", "dtype"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ConfigError(f"unknown model option(s) {unknown} for {backbone_name}; valid: "
                      f"{sorted(fields | set(_CLASSIFIER_KEYS))}")
  group = options.get("bn_group_size")
  if group is not None and group < 2:
    raise ConfigError(f"model.bn_group_size must be at least 2 (or None for the whole batch), "
                      f"not {group}")
  backbone = backbone_cls(**{k: _as_tuples(v) for k, v in options.items()}, dtype=dtype)
  return Classifier(backbone=backbone, num_classes=num_classes, neck=neck, bn_group_size=group,
                    dtype=dtype)


def abstract_variables(model: Classifier, input_shape) -> Dict[str, Any]:
  """Shapes and dtypes of ``model``'s ``params`` and ``batch_stats`` (``{}`` when it has none)
  for inputs of ``input_shape``, computed without running it."""
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape),
                                               train=False))
  return {"params": template["params"], "batch_stats": template.get("batch_stats", {})}


def init_variables(model: Classifier, input_shape, seed: int = 0) -> Dict[str, Any]:
  """Freshly initialised variables of ``model`` for inputs of ``input_shape`` (compiled as a
  program that runs once)."""
  init = lambda rng: model.init(rng, jnp.zeros(input_shape), train=False)  # noqa: E731
  return jax.jit(init, compiler_options=run_once_compiler_options())(jax.random.key(seed))


def block_outputs(collections: Mapping[str, Any]) -> Dict[str, Any]:
  """{block name: output} from the collections ``apply(..., mutable=[BLOCK_OUTPUTS])`` returned."""
  return dict(collections.get(BLOCK_OUTPUTS, {}).get("backbone", {}).get("blocks", {}))


def load_transform(name: str):
  """The parameter transform registered as ``name`` in :data:`LOAD_TRANSFORMS`."""
  if name not in LOAD_TRANSFORMS:
    raise ConfigError(f"unknown train.load_transform {name!r}; valid: {sorted(LOAD_TRANSFORMS)}")
  return LOAD_TRANSFORMS[name]
