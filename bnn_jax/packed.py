"""Bit-packed inference: binary convolutions as XNOR-popcount on 32-bit words, exactly.

The dot product of K values ±1 is K − 2·popcount(a XOR w) on their bits (bit 1 = +1, sign(0) = +1
as everywhere in bnn_jax). Activations are packed along channels (channels last, words innermost),
weights along input channels; a binary weight binarizer's output is ±α per output channel, so the
convolution is α·dot. Zero padding is neither +1 nor −1: padded positions are packed as −1 (all bits
0) and each output subtracts, exactly, what the padded taps contributed. Everything that is not a
binary convolution (stem, shortcuts, BatchNorm, PReLU, head) runs as in the float model.

    logits = packed.packed_model(model, variables, images.shape)(images)
"""
from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Callable, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import binarize
from bnn_jax.errors import ConfigError
from bnn_jax.layers import BinaryConv, ExpertBinaryConv, chosen_experts
from bnn_jax.models import build_model

WORD_BITS = 32


def pack(x: jax.Array) -> jax.Array:
  """Packs signs along the last axis.

  Args:
    x: any shape (..., C); x >= 0 is bit 1 (+1), as sign(0) = +1.
  Returns:
    uint32 (..., ceil(C / 32)): bit i of word j is element 32·j + i; the last word's unused
    bits are 0.
  """
  channels = x.shape[-1]
  words = -(-channels // WORD_BITS)
  bits = (x >= 0).astype(jnp.uint32)
  bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, words * WORD_BITS - channels)])
  bits = bits.reshape(x.shape[:-1] + (words, WORD_BITS))
  return jnp.sum(bits << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _taps(padded: jax.Array, kernel_size: int, strides: int, out_shape) -> Sequence[jax.Array]:
  """The kernel_size² shifted (and strided) views of a spatially padded NHWC tensor, row-major."""
  rows, cols = out_shape
  return [padded[:, i:i + strides * (rows - 1) + 1:strides, j:j + strides * (cols - 1) + 1:strides]
          for i, j in itertools.product(range(kernel_size), repeat=2)]


def padding_correction(weight_bits: jax.Array, channels: int, in_shape, kernel_size: int,
                       strides: int, padding: int) -> jax.Array:
  """(H', W', O) int32: what the taps in the zero padding added when packed as −1, which is
  Σ_c w_c = C − 2·ones(w) per tap and output channel (``weight_bits``: (taps, words, O))."""
  tap_sums = channels - 2 * jnp.sum(jax.lax.population_count(weight_bits), axis=1, dtype=jnp.int32)
  inside = np.pad(np.ones(in_shape, np.int32), padding)[None, ..., None]  # 1 on the real input
  rows = (in_shape[0] + 2 * padding - kernel_size) // strides + 1
  cols = (in_shape[1] + 2 * padding - kernel_size) // strides + 1
  in_padding = 1 - np.concatenate(_taps(inside, kernel_size, strides, (rows, cols)), axis=-1)[0]
  return jnp.asarray(in_padding) @ tap_sums  # (H', W', taps) @ (taps, O)


def packed_conv(activation_bits: jax.Array, weight_bits: jax.Array, channels: int, kernel_size: int,
                strides: int = 1, padding: int = 0) -> jax.Array:
  """A ±1 convolution on packed bits: K − 2·popcount(a XOR w) per output, zero padding exact.

  Args:
    activation_bits: (N, H, W, words) from :func:`pack`.
    weight_bits: (k·k, words, O), the packed HWIO kernel (:func:`packed_weights`).
    channels: the input channels before packing.
    kernel_size, strides, padding: as the float convolution's (padding on each side).
  Returns:
    int32 (N, H', W', O): the exact dot products of the ±1 convolution.
  """
  _, height, width, _ = activation_bits.shape
  rows = (height + 2 * padding - kernel_size) // strides + 1
  cols = (width + 2 * padding - kernel_size) // strides + 1
  padded = jnp.pad(activation_bits, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  patches = jnp.concatenate(_taps(padded, kernel_size, strides, (rows, cols)), axis=-1)
  flat_weights = weight_bits.reshape(-1, weight_bits.shape[-1])  # (taps·words, O)

  # One word at a time, output channels innermost: XLA:CPU vectorises XOR + popcount across the
  # output channels and never materialises (…, words, O). Measured against one broadcast XOR
  # reduced over the words (fast on small layers, 5-40x slower on 3x3 layers of 128+ channels)
  # and one pass per tap (fast at batch 1, 5x slower at batch 32 on 56² x 64).
  def add_word(index, mismatches):
    word = jax.lax.dynamic_index_in_dim(patches, index, axis=-1, keepdims=True)
    return mismatches + jax.lax.population_count(word ^ flat_weights[index]).astype(jnp.int32)

  mismatches = jax.lax.fori_loop(0, flat_weights.shape[0], add_word,
                                 jnp.zeros(patches.shape[:3] + flat_weights.shape[1:], jnp.int32))
  dots = kernel_size * kernel_size * channels - 2 * mismatches
  if padding:
    dots = dots - padding_correction(weight_bits, channels, (height, width), kernel_size, strides,
                                     padding)
  return dots


def packed_weights(binary_kernel: jax.Array):
  """Packs a binarized HWIO kernel whose output channel o holds ±α_o.

  Returns:
    (bits uint32 (k·k, words, O), α float (O,)).
  """
  k, _, channels, out = binary_kernel.shape
  bits = pack(jnp.transpose(binary_kernel, (0, 1, 3, 2)).reshape(k * k, out, channels))
  scale = jnp.max(jnp.abs(binary_kernel), axis=(0, 1, 2))
  return jnp.transpose(bits, (0, 2, 1)), scale


def packed_expert_weights(binary_kernels: jax.Array, groups: int):
  """(bits (E, groups, k·k, words, O/groups), scale (E, O)) of the binarized expert kernels
  (E, k, k, C/groups, O) of an :class:`ExpertBinaryConv`: each group of each expert packed as
  its own convolution (group j: output channels j·O/groups onwards, all C/groups inputs)."""
  experts, k, _, inputs, out = binary_kernels.shape
  per_group = binary_kernels.reshape(experts, k, k, inputs, groups, out // groups)
  bits, scale = jax.vmap(jax.vmap(packed_weights, in_axes=3))(per_group)  # over experts, groups
  return bits, scale.reshape(experts, out)


def packed_expert_conv(binary_x: jax.Array, choice: jax.Array, layer: Dict[str, jax.Array],
                       groups: int, kernel_size: int, strides: int, padding: int) -> jax.Array:
  """Sample b of ``binary_x`` (±1, NHWC) convolved on bits with expert ``choice[b]``'s packed
  kernel, group by group; float32 ``scale · dot`` (the layer of :func:`packed_expert_weights`)."""
  batch, height, width, channels = binary_x.shape
  inputs = channels // groups
  activations = pack(binary_x.reshape(batch, height, width, groups, inputs))  # (B, H, W, g, words)
  one = lambda a, w: packed_conv(a[None], w, inputs, kernel_size, strides, padding)[0]  # noqa: E731
  per_group = jax.vmap(one, in_axes=(2, 0), out_axes=2)  # over groups
  dots = jax.vmap(per_group)(activations, layer["bits"][choice])  # (B, H', W', g, O/g)
  dots = dots.reshape(dots.shape[:3] + (-1,))
  return dots.astype(jnp.float32) * layer["scale"][choice][:, None, None, :]


def is_binary_conv(module: BinaryConv) -> bool:
  """Whether both halves of ``module`` are binary (±1 activations, ±α weights)."""
  return all(spec is not None and binarize.get(spec).binary
             for spec in (module.activation_binarizer, module.weight_binarizer))


def _path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def check_packable(module: BinaryConv) -> None:
  """Refuses a convolution with one half binary and the other real, or a non-binary estimator
  (and a grouped :class:`BinaryConv`; expert convolutions pack each group)."""
  halves = (module.activation_binarizer, module.weight_binarizer)
  name = _path(module)
  if halves == (None, None) or is_binary_conv(module):
    if isinstance(module, BinaryConv) and module.groups != 1 and halves != (None, None):
      raise ConfigError(f"bit-packed inference supports ungrouped binary convolutions; "
                        f"{name} has groups={module.groups}")
    return
  raise ConfigError(
      f"bit-packed inference needs fully binary convolutions; {name} has activations "
      f"{_describe(halves[0])} and weights {_describe(halves[1])} (binary: "
      f"{sorted(n for n, b in binarize.REGISTRY.items() if b.binary)})")


def _describe(spec) -> str:
  return "real" if spec is None else binarize.get(spec).name


# The methods bit-packed inference replaces: a BinaryConv's forward, an ExpertBinaryConv's convolution.
_PACKED_METHODS = {BinaryConv: "__call__", ExpertBinaryConv: "convolve"}


def _binary_conv_call(context) -> bool:
  """Whether an intercepted call is a binary convolution to pack (checked packable)."""
  if _PACKED_METHODS.get(type(context.module)) == context.method_name:
    check_packable(context.module)
    return is_binary_conv(context.module)
  return False


def pack_weights(model: nn.Module, variables: Dict[str, Any], input_shape) -> Dict[str, Any]:
  """Packs every binary convolution of ``model`` once, binarized by the method's own weight binarizer.

  Args:
    model: a classifier of :func:`bnn_jax.models.build_model`.
    variables: its trained ``params`` and ``batch_stats``.
    input_shape: one batch's, e.g. (1, 224, 224, 3) (the model is traced on it).
  Returns:
    {layer path: {"bits": (k·k, words, O) uint32, "scale": (O,) float32}} (expert convs:
    bits (E, groups, k·k, words, O/groups), scale (E, O)).
  Raises:
    ConfigError: naming a convolution that is neither fully binary nor fully real.
  """
  found = {}

  def record(next_fun, args, kwargs, context):
    if _binary_conv_call(context):
      module = context.module
      binarize_kernel = binarize.get(module.weight_binarizer)
      kernel = module.get_variable("params", "kernel")
      if isinstance(module, ExpertBinaryConv):  # every expert, each binarized on its own
        bits, scale = packed_expert_weights(jax.vmap(binarize_kernel)(kernel), module.groups)
      else:
        bits, scale = packed_weights(binarize_kernel(kernel))
      found[_path(module)] = {"bits": bits, "scale": scale}
    return next_fun(*args, **kwargs)

  def collect(variables):
    with nn.intercept_methods(record):
      model.apply(variables, jnp.zeros(input_shape), train=False)
    return dict(found)

  return jax.jit(collect)(variables)


class PackedClassifier:
  """``model`` whose binary convolutions run on ``weights`` (:func:`pack_weights`): the same
  ``apply(variables, images, train=False)`` as the Flax model, so evaluation steps take it as is."""

  def __init__(self, model: nn.Module, weights: Dict[str, Any]):
    self.model, self.weights = model, weights

  def apply(self, variables, images, train: bool = False, weights=None):
    if train:
      raise ConfigError("bit-packed models are for inference (train=False)")
    weights = self.weights if weights is None else weights

    def packed_forward(next_fun, args, kwargs, context):
      if not _binary_conv_call(context):
        return next_fun(*args, **kwargs)
      module, x = context.module, args[0]
      layer = weights[_path(module)]
      binary_x = binarize.get(module.activation_binarizer)(x)
      if isinstance(module, ExpertBinaryConv):
        return packed_expert_conv(binary_x, chosen_experts(args[1], x.shape[0]), layer,
                                  module.groups, module.kernel_size, module.strides,
                                  module.kernel_size // 2).astype(module.dtype)
      dots = packed_conv(pack(binary_x), layer["bits"], x.shape[-1], module.kernel_size,
                         module.strides, module.pad_width)
      return (dots.astype(jnp.float32) * layer["scale"]).astype(module.dtype)

    with nn.intercept_methods(packed_forward):
      return self.model.apply(variables, images, train=False)

  def bind(self, variables: Dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """The jitted ``images -> logits`` with ``variables`` (the weights passed as arguments, not
    folded into the program as constants)."""
    apply = jax.jit(lambda v, w, x: self.apply(v, x, weights=w))
    return functools.partial(apply, variables, self.weights)


def packed_model(model: nn.Module, variables: Dict[str, Any],
                 input_shape) -> Callable[[jax.Array], jax.Array]:
  """``model`` for inference with its binary convolutions on bits packed once.

  Args:
    model, variables, input_shape: as :func:`pack_weights`'s.
  Returns:
    A jitted ``images -> logits`` (eval mode), equal to the float model's up to float rounding.
  """
  return PackedClassifier(model, pack_weights(model, variables, input_shape)).bind(variables)


# --- The exported file -------------------------------------------------------
# One .npz, readable with numpy alone:
#   "model"                 the model config as JSON (bnn_jax.models.build_model's input)
#   "input_shape"           one batch's input shape, e.g. [1, 224, 224, 3]
#   "packed/<layer>/bits"   uint32 (k·k, words, O): bit i of word j = input channel 32·j + i is +1
#   "packed/<layer>/scale"  float32 (O,): the layer's output is scale · (K − 2·popcount(a XOR w))
#                           (an expert conv: bits (E, groups, k·k, words, O/groups), scale (E, O))
#   "<collection>/<path>"   every other variable (real convolutions, BatchNorm, PReLU, head) as is


def save(path: str, model_config: Dict[str, Any], input_shape, variables: Dict[str, Any],
         weights: Dict[str, Any]) -> None:
  """Writes a packed model to one .npz (the format above); binary kernels are stored only as bits.

  Args:
    path: the file to write.
    model_config: the ``model`` section as a dict (what :func:`load` rebuilds the model from).
    input_shape: one batch's input shape.
    variables: the trained variables; weights: :func:`pack_weights`'s output.
  """
  binary_kernels = {f"params/{layer}/kernel" for layer in weights}
  arrays = {"model": np.asarray(json.dumps(model_config)), "input_shape": np.asarray(input_shape)}
  for key_path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    if name not in binary_kernels:
      arrays[name] = np.asarray(value)
  for layer, packed_layer in weights.items():
    for field, value in packed_layer.items():
      arrays[f"packed/{layer}/{field}"] = np.asarray(value)
  with open(path, "wb") as file:
    np.savez(file, **arrays)


def load(path: str) -> Callable[[jax.Array], jax.Array]:
  """Reads a file written by :func:`save`.

  Returns:
    The jitted ``images -> logits`` of the packed model (needs no checkpoint or config).
  """
  with np.load(path) as file:
    arrays = {name: file[name] for name in file.files}
  model = build_model(json.loads(str(arrays.pop("model"))))
  arrays.pop("input_shape")
  variables, weights = {}, {}
  for name, value in arrays.items():
    if name.startswith("packed/"):
      layer, field = name[len("packed/"):].rsplit("/", 1)
      weights.setdefault(layer, {})[field] = jnp.asarray(value)
      continue
    *parents, leaf = name.split("/")
    node = variables
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return PackedClassifier(model, weights).bind(variables)
