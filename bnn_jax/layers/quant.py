"""larq's quantized layers as larq-zoo builds its models: QuantConv (regular or depthwise, with
TensorFlow's padding, padding by a constant such as +1, dilation) and QuantDense.

Variables keep Keras' names and layouts (``kernel`` HWIO or (in, out), ``depthwise_kernel``
(kh, kw, channels, multiplier), ``bias``), so a larq-zoo weight file maps array for array.
Quantizers are binarizer specs (:func:`bnn_jax.binarize.get`): the input quantizer acts on the
input before padding, as larq's does, so +1 padding of a binarized input stays ±1.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import binarize
from bnn_jax.binarize import BinarizerSpec
from bnn_jax.errors import ConfigError
from bnn_jax.layers.cpu_kernels import (depthwise_conv, plain_conv, small_input_conv,
                                        takes_small_input_conv)

Dtype = Any
PADDINGS = ("same", "valid")

# Keras' default kernel initialiser and the two larq-zoo names (truncated normals, as Keras').
glorot_uniform = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
glorot_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "truncated_normal")
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def same_padding(size: int, kernel_size: int, strides: int, dilation: int = 1) -> Tuple[int, int]:
  """TensorFlow's "same" padding of one spatial axis: the output has ceil(size / strides)
  positions; the odd pixel of an odd total goes after (bottom/right), so a stride-2 layer on an
  even input pads only after."""
  extent = (kernel_size - 1) * dilation + 1
  total = max((-(-size // strides) - 1) * strides + extent - size, 0)
  return total // 2, total - total // 2


def spatial_padding(shape: Sequence[int], padding: str, kernel_size: int, strides: int,
                    dilation: int = 1) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """((top, bottom), (left, right)) for an NHWC input of ``shape`` and a Keras ``padding``."""
  if padding not in PADDINGS:
    raise ConfigError(f"unknown padding {padding!r}; valid: {list(PADDINGS)}")
  if padding == "valid":
    return (0, 0), (0, 0)
  return tuple(same_padding(size, kernel_size, strides, dilation) for size in shape[1:3])


def quantized(spec: Optional[BinarizerSpec], x: jax.Array) -> jax.Array:
  """``x`` through the quantizer ``spec`` names (``None``: unchanged)."""
  return x if spec is None else binarize.get(spec)(x)


class QuantConv(nn.Module):
  """larq's QuantConv2D (``depthwise=False``) or QuantDepthwiseConv2D (``features`` is then the
  depth multiplier). ``pad_values`` fills "same" padding with a constant instead of zeros:
  QuickNet pads its binarized inputs with +1, which bit-packed inference needs no correction for.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: str = "valid"
  pad_values: float = 0.0
  dilation: int = 1
  depthwise: bool = False
  use_bias: bool = True
  input_quantizer: Optional[BinarizerSpec] = None
  kernel_quantizer: Optional[BinarizerSpec] = None
  kernel_init: Callable = glorot_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param("depthwise_kernel" if self.depthwise else "kernel", self.kernel_init,
                        (k, k, channels, self.features))
    x = quantized(self.input_quantizer, x)
    kernel = quantized(self.kernel_quantizer, kernel)
    pads = spatial_padding(x.shape, self.padding, k, self.strides, self.dilation)
    if self.pad_values != 0 and any(any(p) for p in pads):
      x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=self.pad_values)
      pads = ((0, 0), (0, 0))
    conv = (depthwise_conv if self.depthwise  # (kh, kw, C, M) | HWIO kernel
            else small_input_conv if takes_small_input_conv(kernel.shape) else plain_conv)
    y = conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pads,
             dilation=self.dilation).astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (y.shape[-1],)).astype(self.dtype)
    return y


class QuantDense(nn.Module):
  """larq's QuantDense (Keras' Dense without quantizers): ``kernel`` (in, out), ``bias``."""
  features: int
  use_bias: bool = True
  input_quantizer: Optional[BinarizerSpec] = None
  kernel_quantizer: Optional[BinarizerSpec] = None
  kernel_init: Callable = glorot_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    x = quantized(self.input_quantizer, x).astype(self.dtype)
    kernel = quantized(self.kernel_quantizer, kernel).astype(self.dtype)
    y = jnp.matmul(x, kernel, preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))
    y = y.astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y
