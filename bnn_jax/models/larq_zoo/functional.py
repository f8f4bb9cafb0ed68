"""Keras' functional API inside a Flax module, so that larq-zoo's models read here line by line.

A :class:`Graph` is made at the top of a backbone's compact ``__call__``; each of its methods is
one Keras layer call (``graph.quant_conv2d(x, ...)``, ``graph.batch_normalization(x, ...)``,
``graph.add(x, y)``) and creates the Flax submodule under the name Keras gives that layer
(``quant_conv2d_3``: per layer class, in call order).

Keras saves and loads a model's weights by each layer's position in ``model.layers``, which is
neither the call order nor alphabetical: layers sorted by depth in the graph (longest path to the
output, inputs deepest), ties by a depth-first walk from the outputs that visits a layer's inputs
in order. :func:`layer_order` records the graph of one trace and returns that order, weightless
layers included, which is what reading and writing larq-zoo's ``.h5`` files needs.

Given its module, a Graph also records the outputs of the layers that
:func:`~bnn_jax.models.backbones.requesting_layers` names (what larq-zoo's attention matching
compares), as block outputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax.binarize import BinarizerSpec
from bnn_jax.errors import ConfigError
from bnn_jax.layers.activations import KerasPReLU
from bnn_jax.layers.cpu_kernels import depthwise_conv
from bnn_jax.layers.norm import KerasBatchNorm
from bnn_jax.layers.pooling import max_pool
from bnn_jax.layers.quant import QuantConv, QuantDense, glorot_uniform, spatial_padding
from bnn_jax.models.backbones import requested_layers, sow_block_output

Dtype = Any


@dataclasses.dataclass
class Layer:
  """One Keras layer of a recorded graph: its name, the layers it reads (indices), and its
  weights in Keras' order, each as (collection, name), or ("constant", name) for a fixed
  weight that bnn_jax computes instead of storing (``constants`` holds its value)."""
  name: str
  inputs: Tuple[int, ...]
  weights: Tuple[Tuple[str, str], ...] = ()
  constants: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  top: bool = False  # part of the classifier (absent from a larq-zoo "notop" file)
  tied: bool = False  # a max pool with a window whose maximum is reached twice (once run)


# larq's SteSign(clip_value=...) as binarizer specs: the quantizers of larq-zoo's binary layers
STE_SIGN_125 = {"name": "ste_sign", "clip": 1.25}  # QuickNet, BinaryResNetE
STE_SIGN_13 = {"name": "ste_sign", "clip": 1.3}  # BinaryDenseNet, MeliusNet


_RECORDING: contextvars.ContextVar = contextvars.ContextVar("keras_graph", default=None)


class Graph:
  """Keras layer calls for one compact ``__call__`` (see the module docstring); ``module``, the
  model whose ``__call__`` that is, records the requested layers' outputs."""

  def __init__(self, image: jax.Array, train: bool, dtype: Dtype = jnp.float32,
               module: Optional[nn.Module] = None):
    self.train, self.dtype, self.module = train, dtype, module
    self._requested = requested_layers()
    self._found: Dict[str, str] = {}  # requested name -> the layer recorded under it
    self._counts: Dict[str, int] = {}
    self._layers: Optional[List[Layer]] = _RECORDING.get()
    self._producer: Dict[int, int] = {}
    self._alive: List[jax.Array] = []  # recorded outputs, kept so that no id is reused
    self._in_top = False
    self._record("input", (), image, name="input_1")

  # --- bookkeeping ------------------------------------------------------------------------

  def name(self, kind: str) -> str:
    """Keras' automatic name for the next layer of ``kind``: kind, kind_1, kind_2, ..."""
    count = self._counts.get(kind, 0)
    self._counts[kind] = count + 1
    return kind if count == 0 else f"{kind}_{count}"

  def _record(self, kind: str, inputs: Sequence[jax.Array], output: jax.Array, name=None,
              weights: Sequence[Tuple[str, str]] = (), constants=None) -> jax.Array:
    name = name or self.name(kind)
    self._sow_if_requested(name, output)
    if self._layers is not None:
      missing = [i for i, x in enumerate(inputs) if id(x) not in self._producer]
      if missing:
        raise ValueError(f"{name}: input {missing[0]} was not made by a Graph layer; every "
                         f"computation between layers must be a Graph call")
      self._layers.append(Layer(name, tuple(self._producer[id(x)] for x in inputs),
                                tuple(weights), dict(constants or {}), self._in_top))
      # a layer with several outputs (a Lambda of tf.split) produces each of them
      for tensor in output if isinstance(output, (tuple, list)) else (output,):
        self._producer[id(tensor)] = len(self._layers) - 1
      self._alive.append(output)
    return output

  def _sow_if_requested(self, name: str, output) -> None:
    for wanted in self._requested:
      if wanted not in name:
        continue
      if self.module is None:
        raise ConfigError(f"layer {name!r} was asked for, but this model's Graph was made "
                          f"without its module (Graph(..., module=self)), so it records none")
      if wanted in self._found:
        raise ConfigError(f"{wanted!r} names more than one layer ({self._found[wanted]!r}, "
                          f"{name!r}): give a longer part of the name")
      self._found[wanted] = name
      sow_block_output(self.module, wanted, output)

  def top(self) -> None:
    """Marks the layers from here on as the classifier ("include_top" in larq-zoo)."""
    self._in_top = True

  def op(self, kind: str, function: Callable, *inputs: jax.Array,
         name: Optional[str] = None) -> jax.Array:
    """A weightless Keras layer of ``kind`` computing ``function(*inputs)``. Every method takes
    ``name``: the name larq-zoo gives the layer, if it gives one (Keras' automatic names then
    skip it, as Keras' do)."""
    return self._record(kind, inputs, function(*inputs), name)

  def custom(self, kind: str, module: Callable[..., nn.Module], *inputs: jax.Array,
             weights: Sequence[str], name: Optional[str] = None) -> jax.Array:
    """A Keras layer with weights that a model defines itself: ``module(name=...)`` makes its
    Flax module, whose params are ``weights`` in Keras' order."""
    name = name or self.name(kind)
    return self._record(kind, inputs, module(name=name)(*inputs), name, _params(weights))

  # --- layers with weights ----------------------------------------------------------------

  def _conv(self, kind: str, x, features: int, kernel_size: int, *, depthwise: bool,
            activation: Optional[str] = None, use_bias: bool = True, name: Optional[str] = None,
            **options) -> jax.Array:
    name = name or self.name(kind)
    y = QuantConv(features, kernel_size, depthwise=depthwise, use_bias=use_bias,
                  dtype=self.dtype, name=name, **options)(x)
    y = activate(activation, y)
    kernel = "depthwise_kernel" if depthwise else "kernel"
    return self._record(kind, (x,), y, name, _params([kernel] + ["bias"] * use_bias))

  def conv2d(self, x, filters: int, kernel_size: int, **options) -> jax.Array:
    """Keras' Conv2D (``strides``, ``padding``, ``dilation``, ``use_bias``, ``kernel_init``,
    ``activation``)."""
    return self._conv("conv2d", x, filters, kernel_size, depthwise=False, **options)

  def quant_conv2d(self, x, filters: int, kernel_size: int, **options) -> jax.Array:
    """larq's QuantConv2D: Conv2D's options and ``input_quantizer``, ``kernel_quantizer``,
    ``pad_values``."""
    return self._conv("quant_conv2d", x, filters, kernel_size, depthwise=False, **options)

  def quant_depthwise_conv2d(self, x, kernel_size: int, depth_multiplier: int = 1,
                             **options) -> jax.Array:
    """larq's QuantDepthwiseConv2D (its ``depthwise_quantizer`` is ``kernel_quantizer``)."""
    return self._conv("quant_depthwise_conv2d", x, depth_multiplier, kernel_size,
                      depthwise=True, **options)

  def fixed_depthwise_conv2d(self, x, kernel: np.ndarray, strides: int = 1,
                             padding: str = "valid") -> jax.Array:
    """Keras' DepthwiseConv2D with a fixed (``trainable=False``) kernel (kh, kw, C, 1), such as
    QuickNet's blur pool: a constant here, not a variable; the ``.h5`` converter checks it."""
    name = self.name("depthwise_conv2d")
    pads = spatial_padding(x.shape, padding, kernel.shape[0], strides)
    y = depthwise_conv(x, jnp.asarray(kernel), strides, pads).astype(x.dtype)
    return self._record("depthwise_conv2d", (x,), y, name, [("constant", "depthwise_kernel")],
                        {"depthwise_kernel": kernel})

  def _dense(self, kind: str, x, units: int, activation: Optional[str] = None,
             use_bias: bool = True, name: Optional[str] = None, **options) -> jax.Array:
    name = name or self.name(kind)
    y = activate(activation, QuantDense(units, use_bias=use_bias, dtype=self.dtype, name=name,
                                        **options)(x))
    return self._record(kind, (x,), y, name, _params(["kernel"] + ["bias"] * use_bias))

  def dense(self, x, units: int, **options) -> jax.Array:
    """Keras' Dense (``use_bias``, ``kernel_init``, ``activation``)."""
    return self._dense("dense", x, units, **options)

  def quant_dense(self, x, units: int, **options) -> jax.Array:
    """larq's QuantDense: Dense's options and ``input_quantizer``, ``kernel_quantizer``."""
    return self._dense("quant_dense", x, units, **options)

  def batch_normalization(self, x, momentum: float = 0.99, epsilon: float = 1e-3,
                          center: bool = True, scale: bool = True,
                          name: Optional[str] = None) -> jax.Array:
    """Keras' BatchNormalization (:class:`~bnn_jax.layers.KerasBatchNorm`)."""
    name = name or self.name("batch_normalization")
    y = KerasBatchNorm(not self.train, momentum, epsilon, center, scale, self.dtype, name=name)(x)
    weights = _params(["gamma"] * scale + ["beta"] * center)
    weights += [("batch_stats", "moving_mean"), ("batch_stats", "moving_variance")]
    return self._record("batch_normalization", (x,), y, name, weights)

  def p_re_lu(self, x, shared_axes: Sequence[int] = (), name: Optional[str] = None) -> jax.Array:
    """Keras' PReLU (slopes ``alpha`` initialised to 0, one per position outside
    ``shared_axes``, which count the batch axis as 0, as Keras')."""
    name = name or self.name("p_re_lu")
    y = KerasPReLU(tuple(shared_axes), name=name)(x)
    return self._record("p_re_lu", (x,), y, name, _params(["alpha"]))

  # --- weightless layers --------------------------------------------------------------------

  def activation(self, x, function: str, name: Optional[str] = None) -> jax.Array:
    """Keras' Activation layer."""
    return self.op("activation", lambda v: activate(function, v), x, name=name)

  def add(self, *xs, name: Optional[str] = None) -> jax.Array:
    """Keras' Add layer (``tf.keras.layers.add``)."""
    return self.op("add", lambda *v: sum(v[1:], v[0]), *xs, name=name)

  def plus(self, x, y) -> jax.Array:
    """``x + y`` written on Keras tensors (a TFOpLambda layer)."""
    return self.op("tf.__operators__.add", lambda a, b: a + b, x, y)

  def concatenate(self, *xs) -> jax.Array:
    """Keras' Concatenate along channels."""
    return self.op("concatenate", lambda *v: jnp.concatenate(v, axis=-1), *xs)

  def max_pool2d(self, x, pool_size: int, strides: Optional[int] = None,
                 padding: str = "valid", name: Optional[str] = None) -> jax.Array:
    """Keras' MaxPool2D (strides default to the pool size); "same" padding never wins."""
    strides = strides or pool_size
    pads = spatial_padding(x.shape, padding, pool_size, strides)
    y = self.op("max_pooling2d", lambda v: max_pool(v, pool_size, strides, pads), x, name=name)
    if self._layers is not None:  # when the recorded graph is run: does a window tie?
      layer = self._layers[-1]

      def note_ties(value):
        layer.tied = has_tied_windows(np.asarray(value), pool_size, strides, pads)
      jax.debug.callback(note_ties, x)
    return y

  def average_pool2d(self, x, pool_size: int, strides: Optional[int] = None,
                     padding: str = "valid", name: Optional[str] = None) -> jax.Array:
    """Keras' AvgPool2D; "same" padding is left out of each average, as TensorFlow's."""
    strides = strides or pool_size
    pads = spatial_padding(x.shape, padding, pool_size, strides)
    return self.op("average_pooling2d", lambda v: nn.avg_pool(
        v, (pool_size,) * 2, (strides,) * 2, pads, count_include_pad=False), x, name=name)

  def flatten(self, x, name: Optional[str] = None) -> jax.Array:
    """Keras' Flatten (row-major over H, W, C, as TensorFlow's NHWC)."""
    return self.op("flatten", lambda v: v.reshape(v.shape[0], -1), x, name=name)

  def reshape(self, x, shape: Sequence[int], name: Optional[str] = None) -> jax.Array:
    """Keras' Reshape (``shape`` without the batch axis)."""
    return self.op("reshape", lambda v: v.reshape((v.shape[0], *shape)), x, name=name)

  def global_pool(self, x, name: Optional[str] = None) -> jax.Array:
    """larq-zoo's ``utils.global_pool``: an average pool over the whole map, then Flatten
    (named ``<name>_pool`` and ``<name>_flatten`` when given a name)."""
    pooled = self.average_pool2d(x, x.shape[1], 1, name=name and f"{name}_pool")
    return self.flatten(pooled, name=name and f"{name}_flatten")

  def logits(self, x, kind: str = "activation", name: Optional[str] = None) -> jax.Array:
    """The model's final ``Activation("softmax")`` (or ``kind="softmax"``, a Softmax layer):
    recorded (the saved model has the layer) but not applied, since bnn_jax's models return
    logits (the loss applies the softmax)."""
    return self.op(kind, lambda v: v, x, name=name)


ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid, "softmax": nn.softmax}


def activate(function: Optional[str], x: jax.Array) -> jax.Array:
  """Keras' activation ``function`` by name (None: linear)."""
  if function is None:
    return x
  if function not in ACTIVATIONS:
    raise ConfigError(f"unknown activation {function!r}; valid: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[function](x)


def has_tied_windows(x: np.ndarray, pool_size: int, strides: int, pads, rtol: float = 1e-5
                     ) -> bool:
  """Whether a max pool over ``x`` has a window whose two largest inputs agree up to float
  rounding (``rtol`` of the channel's largest magnitude). Binary convolutions make such ties
  common; which input then gets the gradient depends on how each framework rounded its sums."""
  x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
  rows, cols = ((n - pool_size) // strides + 1 for n in x.shape[1:3])
  def span(start, count):
    return slice(start, start + strides * (count - 1) + 1, strides)
  taps = np.stack([x[:, span(i, rows), span(j, cols)]
                   for i in range(pool_size) for j in range(pool_size)])
  second, first = np.sort(taps, axis=0)[-2:]
  scale = np.abs(np.where(np.isfinite(x), x, 0)).max(axis=(0, 1, 2))
  return bool(np.any(first - second <= rtol * scale))


def _params(names: Sequence[str]) -> List[Tuple[str, str]]:
  return [("params", n) for n in names]


@contextlib.contextmanager
def recording():
  """Within: every :class:`Graph` appends its layers to the yielded list."""
  layers: List[Layer] = []
  token = _RECORDING.set(layers)
  try:
    yield layers
  finally:
    _RECORDING.reset(token)


def keras_order(layers: Sequence[Layer]) -> List[Layer]:
  """``layers`` (one recorded graph; the last is the output) in Keras' ``model.layers`` order."""
  visit_index: Dict[int, int] = {}
  finished: List[int] = []
  done = set()
  stack = [(len(layers) - 1, False)]
  while stack:  # depth-first from the output, inputs in order; index on entry, list on exit
    node, exiting = stack.pop()
    if exiting:
      if node not in done:
        done.add(node)
        finished.append(node)
      continue
    if node in done:
      continue
    visit_index.setdefault(node, len(visit_index))
    stack.append((node, True))
    stack.extend((parent, False) for parent in reversed(layers[node].inputs))
  depth: Dict[int, int] = {}
  for node in reversed(finished):
    here = depth.setdefault(node, 0)
    for parent in layers[node].inputs:
      depth[parent] = max(here + 1, depth.get(parent, 0))
  return [layers[i] for i in sorted(finished, key=lambda i: (-depth[i], visit_index[i]))]


def layer_order(model: nn.Module, input_shape: Sequence[int]) -> List[Layer]:
  """The Keras layers of ``model`` (whose backbone builds a :class:`Graph`) in the order Keras
  saves them, from one abstract trace (nothing is computed)."""
  with recording() as layers:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))
  if not layers:
    raise ConfigError(f"{type(getattr(model, 'backbone', model)).__name__} is not a Keras-style "
                      f"model (it builds no larq_zoo Graph)")
  return keras_order(layers)


__all__ = ["Graph", "Layer", "layer_order", "keras_order", "recording", "activate",
           "glorot_uniform", "BinarizerSpec"]
