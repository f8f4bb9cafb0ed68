"""What each parameter of a model is, read off the model itself: a binary kernel, a normalisation
parameter or the rest, and the stage of each binary kernel.

A *binary kernel* is a kernel that its layer binarizes: a :class:`~bnn_jax.layers.BinaryConv`'s or
:class:`~bnn_jax.layers.ExpertBinaryConv`'s (every expert) with a ``weight_binarizer``, a larq
:class:`~bnn_jax.layers.quant.QuantConv`'s or :class:`~bnn_jax.layers.quant.QuantDense`'s with a
``kernel_quantizer`` (larq's ``precision == 1`` variables, what its ``Bop.is_binary_variable``
picks). *Normalisation parameters* are those of :class:`~bnn_jax.layers.BatchNorm` and
:class:`~bnn_jax.layers.KerasBatchNorm`. Both are found by intercepting every module call of an
abstract ``init`` (``jax.eval_shape``: nothing is compiled or run), never from names.

A binary kernel's *stage* is the feature-map size its layer outputs: ``stage1`` is the largest
size any binary layer outputs, ``stage2`` the next, …; binary dense layers are ``dense``. In a
ResNet these are its ``layer1`` … ``layer4``; in a Larq Zoo model its sections.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.layers import BatchNorm, BinaryConv, ExpertBinaryConv
from bnn_jax.layers.norm import KerasBatchNorm
from bnn_jax.layers.quant import QuantConv, QuantDense

BINARY, NORM, REAL = "binary", "norm", "real"
KINDS = (BINARY, NORM, REAL)
NORM_MODULES = (BatchNorm, KerasBatchNorm)


def binary_kernel_names(module: nn.Module) -> Tuple[str, ...]:
  """The names of the parameters ``module`` binarizes (none for any other layer)."""
  if isinstance(module, (BinaryConv, ExpertBinaryConv)) and module.weight_binarizer is not None:
    return ("kernel",)
  if isinstance(module, QuantConv) and module.kernel_quantizer is not None:
    return ("depthwise_kernel" if module.depthwise else "kernel",)
  if isinstance(module, QuantDense) and module.kernel_quantizer is not None:
    return ("kernel",)
  return ()


@dataclasses.dataclass(frozen=True)
class VariableKinds:
  """Two trees of the model's ``params`` structure: ``kinds`` (one of :data:`KINDS` per
  parameter) and ``stages`` (a binary kernel's stage, ``""`` for every other parameter)."""
  kinds: Any
  stages: Any

  @property
  def stage_names(self) -> Tuple[str, ...]:
    """The stages that hold binary kernels, in order (``stage1`` …, then ``dense``)."""
    return tuple(sorted({s for s in jax.tree_util.tree_leaves(self.stages) if s},
                        key=lambda s: (s == "dense", len(s), s)))

  def count(self, kind: str) -> int:
    return sum(k == kind for k in jax.tree_util.tree_leaves(self.kinds))


def _spatial(output: Any) -> Tuple[int, ...]:
  """(H, W) of an NHWC output; () for a dense layer's (N, C)."""
  return tuple(output.shape[1:-1]) if hasattr(output, "shape") else ()


def variable_kinds(model: nn.Module, input_shape: Sequence[int]) -> VariableKinds:
  """The :class:`VariableKinds` of ``model``'s parameters for inputs of ``input_shape`` (NHWC)."""
  modules: Dict[Tuple[str, ...], Tuple[Tuple[str, ...], bool, Tuple[int, ...]]] = {}

  def record(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__":
      binary, norm = binary_kernel_names(module), isinstance(module, NORM_MODULES)
      if binary or norm:
        modules[tuple(module.scope.path)] = (binary, norm, _spatial(output))
    return output

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros(input_shape), train=False)

  params = jax.eval_shape(init)["params"]
  sizes = sorted({spatial for binary, _, spatial in modules.values() if binary and spatial},
                 key=lambda hw: -int(jnp.prod(jnp.asarray(hw))))
  stage_of = {hw: f"stage{i + 1}" for i, hw in enumerate(sizes)}

  def describe(path) -> Tuple[str, str]:
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    binary, norm, spatial = modules.get(keys[:-1], ((), False, ()))
    if keys[-1] in binary:
      return BINARY, stage_of.get(spatial, "dense")
    return (NORM if norm else REAL), ""

  described = jax.tree_util.tree_map_with_path(lambda path, _: describe(path), params)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)  # noqa: E731
  return VariableKinds(jax.tree_util.tree_map(lambda d: d[0], described, is_leaf=is_pair),
                       jax.tree_util.tree_map(lambda d: d[1], described, is_leaf=is_pair))
