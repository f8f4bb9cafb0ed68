"""Bit-packed inference: binary layers as XNOR-popcount on 32-bit words, exactly.

The dot product of K values ±1 is K − 2·popcount(a XOR w) on their bits (bit 1 = +1, sign(0) = +1
as everywhere in bnn_jax). Activations are packed along channels (channels last, words innermost),
weights along input channels; a binary weight binarizer's output is ±α per output channel, so the
layer is α·dot. Padding by ±1 (QuickNet pads with +1) packs the padded positions as those bits and
is exact as is. Zero padding is neither +1 nor −1: padded positions are packed as −1 (all bits 0)
and each output subtracts, exactly, what the padded taps contributed. Binary layers are bnn_jax's
BinaryConv and ExpertBinaryConv and larq's QuantConv (regular, depthwise, strided, dilated, with
TensorFlow's asymmetric "same" padding) and QuantDense; everything else (stem, shortcuts,
BatchNorm, PReLU, head) runs as in the float model.

Two backends compute the same integers: "native", :mod:`bnn_jax.kernels`' hand-written CPU kernel
(register-tiled AVX-512 popcounts; padding handled in the kernel), and "jax", the portable pure-JAX
path below (any device; what ``export --format stablehlo`` serialises). "auto" takes native on the
CPU where it builds.

    logits = packed.packed_model(model, variables, images.shape)(images)
"""
from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import binarize, kernels
from bnn_jax.errors import ConfigError, one_line
from bnn_jax.layers import BinaryConv, ExpertBinaryConv, chosen_experts
from bnn_jax.layers.quant import QuantConv, QuantDense, spatial_padding
from bnn_jax.models import build_model

WORD_BITS = 32
Pads = Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right))
NO_PADS: Pads = ((0, 0), (0, 0))
PAD_VALUES = (0.0, 1.0, -1.0)  # what a packed layer may pad its ±1 input with
BACKENDS = ("auto", "native", "jax")


def native(backend: str = "auto") -> bool:
  """Whether ``backend`` runs the native kernel: "native" (an error if it cannot), "jax" (never),
  "auto" (on the CPU, where it builds)."""
  if backend not in BACKENDS:
    raise ConfigError(f"bit-packed backend {backend!r}; valid: {list(BACKENDS)}")
  if backend == "native" and not kernels.available():
    raise ConfigError("the native bit-packed kernel is unavailable (no C++ compiler, a failed "
                      "build (logged), or BNN_JAX_NATIVE=0); use backend 'jax'")
  return backend != "jax" and jax.default_backend() == "cpu" and kernels.available()


def symmetric(padding: int) -> Pads:
  """``padding`` on each side of both spatial axes."""
  return (padding, padding), (padding, padding)


def pack(x: jax.Array) -> jax.Array:
  """Packs signs along the last axis (in XLA on every backend: it fuses with the layer that
  produced ``x``, which the native kernel's input could not).

  Args:
    x: any shape (..., C); x >= 0 is bit 1 (+1), as sign(0) = +1 (NaN is −1).
  Returns:
    uint32 (..., ceil(C / 32)): bit i of word j is element 32·j + i; the last word's unused
    bits are 0.
  """
  # Eight channels to a byte, four bytes (the first the lowest) to a word:
  # XLA:CPU vectorises the 8-wide uint8 sum 64 lanes at a time, 2-3x faster than one 32-wide
  # uint32 sum (56² × 64 at batch 1: 0.06 vs 0.15 ms, one core), and fuses it with the layer
  # that produced x.
  channels = x.shape[-1]
  words = -(-channels // WORD_BITS)
  bits = (x >= 0).astype(jnp.uint8)
  bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, words * WORD_BITS - channels)])
  bits = bits.reshape(x.shape[:-1] + (words, WORD_BITS // 8, 8))
  octets = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
  shifts = 8 * jnp.arange(WORD_BITS // 8, dtype=jnp.uint32)  # (a bitcast has no symbolic batch)
  return jnp.sum(octets.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


def output_shape(in_shape, kernel_size: int, strides: int, pads: Pads, dilation: int):
  """(H', W') of a convolution of an (H, W) input."""
  extent = (kernel_size - 1) * dilation + 1
  return tuple((size + sum(pad) - extent) // strides + 1 for size, pad in zip(in_shape, pads))


def _taps(padded: jax.Array, kernel_size: int, strides: int, dilation: int,
          out_shape) -> Sequence[jax.Array]:
  """The kernel_size² shifted (dilated, strided) views of a spatially padded NHWC tensor,
  row-major."""
  rows, cols = out_shape
  return [padded[:, i:i + strides * (rows - 1) + 1:strides, j:j + strides * (cols - 1) + 1:strides]
          for i, j in itertools.product(range(0, dilation * kernel_size, dilation), repeat=2)]


def _inside(in_shape, pads: Pads) -> np.ndarray:
  """(1, H + pads, W + pads, 1): 1 on the real input, 0 on the padding."""
  return np.pad(np.ones(in_shape, np.int32), pads)[None, ..., None]


def padding_correction(weight_bits: jax.Array, channels: int, in_shape, kernel_size: int,
                       strides: int, pads: Pads, dilation: int = 1) -> jax.Array:
  """(H', W', O) int32: what the taps in the zero padding added when packed as −1, which is
  −Σ_c w_c = C − 2·ones(w) per tap and output channel (``weight_bits``: (taps, words, O))."""
  tap_sums = channels - 2 * jnp.sum(jax.lax.population_count(weight_bits), axis=1, dtype=jnp.int32)
  out_shape = output_shape(in_shape, kernel_size, strides, pads, dilation)
  taps = _taps(_inside(in_shape, pads), kernel_size, strides, dilation, out_shape)
  in_padding = 1 - np.concatenate(taps, axis=-1)[0]
  return jnp.asarray(in_padding) @ tap_sums  # (H', W', taps) @ (taps, O)


def packed_conv(activation_bits: jax.Array, weight_bits: jax.Array, channels: int, kernel_size: int,
                strides: int = 1, pads: Pads = NO_PADS, pad_value: float = 0.0,
                dilation: int = 1, backend: str = "jax") -> jax.Array:
  """A ±1 convolution on packed bits: K − 2·popcount(a XOR w) per output, padding exact.

  Args:
    activation_bits: (N, H, W, words) from :func:`pack`.
    weight_bits: (k·k, words, O), the packed HWIO kernel (:func:`packed_weights`).
    channels: the input channels before packing.
    kernel_size, strides, dilation: as the float convolution's.
    pads: ((top, bottom), (left, right)), e.g. TensorFlow's asymmetric "same" padding.
    pad_value: what the padding holds, one of :data:`PAD_VALUES`: ±1 is packed as such; 0 as −1,
      then corrected.
    backend: one of :data:`BACKENDS`.
  Returns:
    int32 (N, H', W', O): the exact dot products of the ±1 convolution.
  """
  _, height, width, _ = activation_bits.shape
  out_shape = output_shape((height, width), kernel_size, strides, pads, dilation)
  if native(backend):
    return kernels.xnor_conv(activation_bits, weight_bits.reshape(-1, weight_bits.shape[-1]),
                             channels, kernel_size, strides, dilation, pads, pad_value, out_shape)
  padded = jnp.pad(activation_bits, ((0, 0), *pads, (0, 0)))  # padding as −1 (all bits 0)
  if pad_value == 1 and pads != NO_PADS:  # as +1: every channel's bit set
    padded = jnp.where(_inside((height, width), pads) == 1, padded, pack(jnp.ones((channels,))))
  patches = jnp.concatenate(_taps(padded, kernel_size, strides, dilation, out_shape), axis=-1)
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
  if pad_value == 0 and pads != NO_PADS:
    dots = dots - padding_correction(weight_bits, channels, (height, width), kernel_size, strides,
                                     pads, dilation)
  return dots


def packed_grouped_conv(binary_x: jax.Array, weight_bits: jax.Array, backend: str = "jax",
                        **geometry) -> jax.Array:
  """A grouped ±1 convolution (a depthwise one: one input channel per group): natively one call
  over every group, on the pure-JAX path each group on :func:`packed_conv`.

  Args:
    binary_x: ±1 (or any values whose signs are meant), NHWC; its channels split evenly into
      the groups.
    weight_bits: (groups, k·k, words, O/groups) (:func:`packed_grouped_weights`).
    backend: one of :data:`BACKENDS`.
    geometry: :func:`packed_conv`'s kernel_size, strides, pads, pad_value, dilation.
  Returns:
    int32 (N, H', W', O): group j's outputs are channels j·O/groups onwards.
  """
  batch, height, width, channels = binary_x.shape
  groups = weight_bits.shape[0]
  activations = pack(binary_x.reshape(batch, height, width, groups, channels // groups))
  if native(backend):
    k, strides, dilation = geometry["kernel_size"], geometry.get("strides", 1), geometry.get(
        "dilation", 1)
    pads = geometry.get("pads", NO_PADS)
    out_shape = output_shape((height, width), k, strides, pads, dilation)
    return kernels.xnor_conv(activations.reshape(batch, height, width, -1),
                             weight_bits.reshape(-1, weight_bits.shape[-1]), channels // groups,
                             k, strides, dilation, pads, geometry.get("pad_value", 0.0),
                             out_shape, groups)
  one = functools.partial(packed_conv, channels=channels // groups, **geometry)
  dots = jax.vmap(one, in_axes=(3, 0), out_axes=3)(activations, weight_bits)  # (N, H', W', g, O/g)
  return dots.reshape(dots.shape[:3] + (-1,))


def packed_weights(binary_kernel: jax.Array):
  """Packs a binarized HWIO kernel whose output channel o holds ±α_o.

  Returns:
    (bits uint32 (k·k, words, O), α float (O,)).
  """
  k, _, channels, out = binary_kernel.shape
  bits = pack(jnp.transpose(binary_kernel, (0, 1, 3, 2)).reshape(k * k, out, channels))
  scale = jnp.max(jnp.abs(binary_kernel), axis=(0, 1, 2))
  return jnp.transpose(bits, (0, 2, 1)), scale


def packed_grouped_weights(binary_kernel: jax.Array, groups: int):
  """(bits (groups, k·k, words, O/groups), scale (O,)) of a binarized grouped HWIO kernel
  (k, k, C/groups, O): each group packed as its own convolution."""
  k, _, inputs, out = binary_kernel.shape
  per_group = binary_kernel.reshape(k, k, inputs, groups, out // groups)
  bits, scale = jax.vmap(packed_weights, in_axes=3)(per_group)
  return bits, scale.reshape(out)


def packed_expert_conv(binary_x: jax.Array, choice: jax.Array, layer: Dict[str, jax.Array],
                       kernel_size: int, strides: int, backend: str = "jax") -> jax.Array:
  """Sample b of ``binary_x`` (±1, NHWC) convolved on bits with expert ``choice[b]``'s packed
  grouped kernel; float32 ``scale · dot`` (``layer``: bits (E, groups, k·k, words, O/groups),
  scale (E, O), :func:`packed_grouped_weights` of every expert)."""
  def one(x, bits):
    return packed_grouped_conv(x[None], bits, backend, kernel_size=kernel_size, strides=strides,
                               pads=symmetric(kernel_size // 2))[0]
  dots = jax.vmap(one)(binary_x, layer["bits"][choice])
  return dots.astype(jnp.float32) * layer["scale"][choice][:, None, None, :]


# --- Which layers are packed, and how ---------------------------------------------------

# The methods bit-packed inference replaces: a layer's forward, an ExpertBinaryConv's convolution.
_PACKED_METHODS = {BinaryConv: "__call__", ExpertBinaryConv: "convolve", QuantConv: "__call__",
                   QuantDense: "__call__"}


def _quantizers(module: nn.Module):
  """(activation, weight) binarizer specs of a packable layer (None: that half is real)."""
  if isinstance(module, (QuantConv, QuantDense)):
    return module.input_quantizer, module.kernel_quantizer
  return module.activation_binarizer, module.weight_binarizer


def is_binary_layer(module: nn.Module) -> bool:
  """Whether both halves of ``module`` are binary (±1 activations, ±α weights)."""
  return all(spec is not None and binarize.get(spec).binary for spec in _quantizers(module))


def _path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def check_packable(module: nn.Module) -> None:
  """Refuses a layer with one half binary and the other real or non-binary (a k-bit DoReFa
  input, tanh), a grouped :class:`BinaryConv` (expert convolutions pack each group), and
  padding by anything but 0 or ±1."""
  halves = _quantizers(module)
  name = _path(module)
  if halves == (None, None):
    return
  if not is_binary_layer(module):
    raise ConfigError(
        f"bit-packed inference needs fully binary layers; {name} has activations "
        f"{_describe(halves[0])} and weights {_describe(halves[1])} (binary: "
        f"{sorted(n for n, b in binarize.REGISTRY.items() if b.binary)})")
  if isinstance(module, BinaryConv) and module.groups != 1:
    raise ConfigError(f"bit-packed inference supports ungrouped binary convolutions; "
                      f"{name} has groups={module.groups}")
  if isinstance(module, QuantConv) and module.pad_values not in PAD_VALUES:
    raise ConfigError(f"bit-packed inference pads with one of {list(PAD_VALUES)}; {name} pads "
                      f"with {module.pad_values}")


def _describe(spec) -> str:
  return "real" if spec is None else binarize.get(spec).name


def _binary_layer_call(context) -> bool:
  """Whether an intercepted call is a binary layer to pack (checked packable)."""
  if _PACKED_METHODS.get(type(context.module)) == context.method_name:
    check_packable(context.module)
    return is_binary_layer(context.module)
  return False


def _packed_layer(module: nn.Module) -> Dict[str, jax.Array]:
  """{"bits", "scale"} of a binary layer's kernel, binarized by its own weight binarizer."""
  binarize_kernel = binarize.get(_quantizers(module)[1])
  if isinstance(module, ExpertBinaryConv):  # every expert, each binarized on its own
    kernels = jax.vmap(binarize_kernel)(module.get_variable("params", "kernel"))
    bits, scale = jax.vmap(packed_grouped_weights, in_axes=(0, None))(kernels, module.groups)
  elif isinstance(module, QuantConv) and module.depthwise:  # (k, k, C, M): C groups of M outputs
    kernel = binarize_kernel(module.get_variable("params", "depthwise_kernel"))
    k, _, channels, multiplier = kernel.shape
    bits, scale = packed_grouped_weights(kernel.reshape(k, k, 1, channels * multiplier), channels)
  else:
    kernel = binarize_kernel(module.get_variable("params", "kernel"))
    if isinstance(module, QuantDense):  # (in, out) as a 1×1 convolution's HWIO
      kernel = kernel[None, None]
    bits, scale = packed_weights(kernel)
  return {"bits": bits, "scale": scale}


def _packed_forward(module: nn.Module, layer: Dict[str, jax.Array], args,
                    backend: str) -> jax.Array:
  """What ``module``'s replaced method returns, computed on ``layer``'s bits on ``backend``."""
  x = args[0]
  binarizer = binarize.get(_quantizers(module)[0])
  # pack(x) has sign(x)'s bits: the pack reads x itself.
  binary_x = x if binarizer.sign_forward else binarizer(x)
  if isinstance(module, ExpertBinaryConv):
    return packed_expert_conv(binary_x, chosen_experts(args[1], x.shape[0]), layer,
                              module.kernel_size, module.strides, backend).astype(module.dtype)
  if isinstance(module, QuantDense):  # a 1×1 convolution of one pixel
    dots = packed_conv(pack(binary_x).reshape(-1, 1, 1, layer["bits"].shape[1]),
                       layer["bits"], x.shape[-1], 1, backend=backend).reshape(x.shape[:-1] + (-1,))
  elif isinstance(module, QuantConv):
    k, strides, dilation = module.kernel_size, module.strides, module.dilation
    geometry = dict(kernel_size=k, strides=strides, dilation=dilation, pad_value=module.pad_values,
                    pads=spatial_padding(x.shape, module.padding, k, strides, dilation))
    dots = (packed_grouped_conv(binary_x, layer["bits"], backend, **geometry) if module.depthwise
            else packed_conv(pack(binary_x), layer["bits"], x.shape[-1], **geometry,
                             backend=backend))
  else:
    dots = packed_conv(pack(binary_x), layer["bits"], x.shape[-1], module.kernel_size,
                       module.strides, symmetric(module.pad_width), backend=backend)
  y = (dots.astype(jnp.float32) * layer["scale"]).astype(module.dtype)
  if getattr(module, "use_bias", False):
    y = y + module.get_variable("params", "bias").astype(module.dtype)
  return y


def pack_weights(model: nn.Module, variables: Dict[str, Any], input_shape) -> Dict[str, Any]:
  """Packs every binary layer of ``model`` once, binarized by the method's own weight binarizer.

  Args:
    model: a classifier of :func:`bnn_jax.models.build_model`.
    variables: its trained ``params`` and ``batch_stats``.
    input_shape: one batch's, e.g. (1, 224, 224, 3) (the model is traced on it).
  Returns:
    {layer path: {"bits": (k·k, words, O) uint32, "scale": (O,) float32}} (a dense layer as a
    1×1 convolution; a depthwise conv: bits (C, k·k, 1, M); expert convs: bits
    (E, groups, k·k, words, O/groups), scale (E, O)).
  Raises:
    ConfigError: naming a layer that is neither fully binary nor fully real.
  """
  found = {}

  def record(next_fun, args, kwargs, context):
    if _binary_layer_call(context):
      found[_path(context.module)] = _packed_layer(context.module)
    return next_fun(*args, **kwargs)

  def collect(variables):
    with nn.intercept_methods(record):
      model.apply(variables, jnp.zeros(input_shape), train=False)
    return dict(found)

  return jax.jit(collect)(variables)


class PackedClassifier:
  """``model`` whose binary layers run on ``weights`` (:func:`pack_weights`): the same
  ``apply(variables, images, train=False)`` as the Flax model, so evaluation steps take it as is.
  ``backend``: one of :data:`BACKENDS`."""

  def __init__(self, model: nn.Module, weights: Dict[str, Any], backend: str = "auto"):
    native(backend)  # refuses an unknown backend, or "native" where it cannot run, now
    self.model, self.weights, self.backend = model, weights, backend

  def apply(self, variables, images, train: bool = False, weights=None):
    if train:
      raise ConfigError("bit-packed models are for inference (train=False)")
    weights = self.weights if weights is None else weights

    def packed_forward(next_fun, args, kwargs, context):
      if not _binary_layer_call(context):
        return next_fun(*args, **kwargs)
      return _packed_forward(context.module, weights[_path(context.module)], args, self.backend)

    with nn.intercept_methods(packed_forward):
      return self.model.apply(variables, images, train=False)

  def bind(self, variables: Dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """The jitted ``images -> logits`` with ``variables`` (the weights passed as arguments, not
    folded into the program as constants)."""
    apply = jax.jit(lambda v, w, x: self.apply(v, x, weights=w))
    return functools.partial(apply, variables, self.weights)


def packed_model(model: nn.Module, variables: Dict[str, Any], input_shape,
                 backend: str = "auto") -> Callable[[jax.Array], jax.Array]:
  """``model`` for inference with its binary layers on bits packed once.

  Args:
    model, variables, input_shape: as :func:`pack_weights`'s.
    backend: one of :data:`BACKENDS`.
  Returns:
    A jitted ``images -> logits`` (eval mode), equal to the float model's up to float rounding.
  """
  weights = pack_weights(model, variables, input_shape)
  return PackedClassifier(model, weights, backend).bind(variables)


# --- The exported file -------------------------------------------------------
# One .npz, readable with numpy alone:
#   "model"                 the model config as JSON (bnn_jax.models.build_model's input)
#   "input_shape"           one batch's input shape, e.g. [1, 224, 224, 3]
#   "packed/<layer>/bits"   uint32 (k·k, words, O): bit i of word j = input channel 32·j + i is +1
#                           (a dense layer: k = 1; a depthwise conv: (C, k·k, 1, M); an expert
#                           conv: (E, groups, k·k, words, O/groups))
#   "packed/<layer>/scale"  float32 (O,): the layer's output is scale · (K − 2·popcount(a XOR w))
#                           (an expert conv: (E, O))
#   "<collection>/<path>"   every other variable (real layers, biases, BatchNorm, PReLU, head) as
#                           is; a packed layer's kernel (KERNEL_LEAVES) is stored only as its bits

KERNEL_LEAVES = ("kernel", "depthwise_kernel")  # a packed layer's kernel variable, by layer kind


def _named_leaves(tree) -> Dict[str, np.ndarray]:
  """{"collection/path/leaf": array} of a nested dict of arrays."""
  return {"/".join(str(getattr(k, "key", k)) for k in key_path): np.asarray(value)
          for key_path, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


def without_binary_kernels(variables: Dict[str, Any], weights: Dict[str, Any]) -> Dict[str, Any]:
  """``variables`` less each packed layer's kernel (:data:`KERNEL_LEAVES`), which a
  :class:`PackedClassifier` never reads: it runs on ``weights``' bits."""
  binary_kernels = {("params", *layer.split("/"), leaf) for layer in weights
                    for leaf in KERNEL_LEAVES}

  def kept(node, path):
    return {key: kept(value, path + (key,)) if isinstance(value, dict) else value
            for key, value in node.items() if path + (key,) not in binary_kernels}
  return kept(dict(variables), ())


def save(path: str, model_config: Dict[str, Any], input_shape, variables: Dict[str, Any],
         weights: Dict[str, Any]) -> None:
  """Writes a packed model to one .npz (the format above); binary kernels are stored only as bits.

  Args:
    path: the file to write.
    model_config: the ``model`` section as a dict (what :func:`load` rebuilds the model from).
    input_shape: one batch's input shape.
    variables: the trained variables; weights: :func:`pack_weights`'s output.
  """
  arrays = {"model": np.asarray(json.dumps(model_config)), "input_shape": np.asarray(input_shape)}
  arrays.update(_named_leaves(without_binary_kernels(variables, weights)))
  for layer, packed_layer in weights.items():
    for field, value in packed_layer.items():
      arrays[f"packed/{layer}/{field}"] = np.asarray(value)
  with open(path, "wb") as file:
    np.savez(file, **arrays)


def _read(path: str) -> Dict[str, np.ndarray]:
  """The arrays of a file :func:`save` wrote; one line naming the file and what is wrong with it
  (never numpy's advice to load it "unsafely": unpickling an untrusted file runs its code)."""
  try:
    with np.load(path) as file:
      arrays = {name: file[name] for name in file.files}
  except FileNotFoundError:
    raise ConfigError(f"no packed model file {path}") from None
  except Exception as error:  # noqa: BLE001 - whatever a damaged or foreign file raises
    text = str(error)  # numpy reads a file that is no .npz or .npy as a pickle, and says so
    reason = ("it holds a pickled object, which is never unpickled" if "Object arrays" in text
              else "it is no .npz archive" if "pickle" in text or isinstance(error, TypeError)
              else f"{type(error).__name__}: {one_line(error)}")
    raise ConfigError(f"{path} is not a packed model file of bnn_jax.export ({reason})") from None
  missing = sorted({"model", "input_shape"} - set(arrays))
  if missing:
    raise ConfigError(f"{path} is not a packed model file of bnn_jax.export (it has no {missing})")
  return arrays


def load(path: str, backend: str = "auto") -> Callable[[jax.Array], jax.Array]:
  """Reads a file written by :func:`save` (``backend``: one of :data:`BACKENDS`).

  Returns:
    The jitted ``images -> logits`` of the packed model (needs no checkpoint or config).
  """
  arrays = _read(path)
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
  return PackedClassifier(model, weights, backend).bind(variables)
