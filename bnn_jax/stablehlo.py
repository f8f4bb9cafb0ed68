"""The bit-packed model as a deployable artifact: a serialised ``jax.export`` program (StableHLO)
and its weights in one ``.npz``, run with jax and numpy alone (no bnn_jax, no Flax).

The program is the packed model's pure-JAX path (bnn_jax.packed, backend "jax": XNOR-popcount on
uint32 words, no custom call), lowered for the CPU and, where this jax can lower for them, CUDA;
the batch size is symbolic. Its arguments are the weights, flattened in the file's order, then
the images::

    import jax, numpy as np
    with np.load("model.npz") as file:
      program = jax.export.deserialize(bytearray(file["program"]))
      weights = [file[f"weights/{i}"] for i in range(int(file["num_weights"]))]
    logits = program.call(weights, images)  # images: (N, H, W, 3) float32

Keys: "program" (uint8, ``Exported.serialize()``), "num_weights", "weights/<i>", "input_shape"
(one image's (H, W, C)), "model" (the model config as JSON, for reference).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import packed

PLATFORMS = ("cpu", "cuda")


def exported_program(model: nn.Module, variables: Dict[str, Any], weights: Dict[str, Any],
                     image_shape: Sequence[int]) -> jax.export.Exported:
  """``(weights, images) -> logits`` of the packed model, batch size symbolic.

  Args:
    model, variables: the classifier and its trained variables.
    weights: :func:`bnn_jax.packed.pack_weights` of them.
    image_shape: one image's (H, W, C).
  """
  classifier = packed.PackedClassifier(model, weights, backend="jax")
  leaves, tree = jax.tree.flatten(_arguments(variables, weights))

  def apply(flat, images):
    variables, weights = jax.tree.unflatten(tree, flat)
    return classifier.apply(variables, images, weights=weights)

  batch, = jax.export.symbolic_shape("batch")
  specs = ([jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves],
           jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32))
  for platforms in (PLATFORMS, PLATFORMS[:1]):  # CUDA where this jax lowers for it
    try:
      return jax.export.export(jax.jit(apply), platforms=platforms)(*specs)
    except (ValueError, NotImplementedError, RuntimeError):
      if len(platforms) == 1:
        raise
  raise AssertionError("unreachable")


def _arguments(variables, weights):
  """The program's weights: the packed bits and every variable but the binary kernels."""
  return packed.without_binary_kernels(variables, weights), weights


def save(path: str, model: nn.Module, model_config: Dict[str, Any], variables: Dict[str, Any],
         weights: Dict[str, Any], image_shape: Sequence[int]) -> jax.export.Exported:
  """Writes the artifact (the format above) to ``path``; returns its program."""
  program = exported_program(model, variables, weights, image_shape)
  leaves = jax.tree.leaves(_arguments(variables, weights))
  arrays = {"program": np.frombuffer(bytes(program.serialize()), np.uint8),
            "num_weights": np.asarray(len(leaves)), "input_shape": np.asarray(image_shape),
            "model": np.asarray(json.dumps(model_config))}
  arrays.update({f"weights/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
  with open(path, "wb") as file:
    np.savez(file, **arrays)
  return program


def load(path: str) -> Callable[[jax.Array], jax.Array]:
  """``images -> logits`` of an artifact :func:`save` wrote: what the docstring's five lines do."""
  with np.load(path) as file:
    program = jax.export.deserialize(bytearray(file["program"]))
    weights = [file[f"weights/{i}"] for i in range(int(file["num_weights"]))]
  return lambda images: program.call(weights, images)
