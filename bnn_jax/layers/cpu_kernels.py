"""Convolution kernels chosen for XLA:CPU: the plain convolution, a depthwise one as a sum of
shifted taps, and one whose backward reads its input from a stored, transposed copy (README,
Speed)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# Conv inputs of this many values and more take cpu_conv2d on CPU (every conv of a ResNet-18 at
# 224² and batch 16: 16×7×7×256 and up); below, a transposition is cheap and XLA's own backward
# compiles faster (the test suite's small models).
STORED_INPUT_MIN_SIZE = 1 << 17


def plain_conv(x: jax.Array, kernel: jax.Array, strides: int, pad, groups: int = 1,
               dilation: int = 1) -> jax.Array:
  """The NHWC ⊛ HWIO convolution, its products summed in at least float32. ``pad`` is zero
  padding on each side of both spatial axes, or ((top, bottom), (left, right))."""
  padding = [(pad, pad)] * 2 if isinstance(pad, int) else [tuple(p) for p in pad]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding=padding,
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


def strided_taps(x: jax.Array, kernel_size: int, strides: int, pads, dilation: int = 1,
                 pad_value: float = 0.0):
  """The kernel_size² (i, j, view) of a convolution's window over NHWC ``x`` padded by ``pads``
  (((top, bottom), (left, right))) with ``pad_value``: view[n, y, x] = padded[n, s·y + d·i,
  s·x + d·j], row-major."""
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
  extent = (kernel_size - 1) * dilation + 1
  rows, cols = ((size - extent) // strides + 1 for size in padded.shape[1:3])
  for i in range(kernel_size):
    for j in range(kernel_size):
      top, left = i * dilation, j * dilation
      yield i, j, padded[:, top:top + strides * (rows - 1) + 1:strides,
                         left:left + strides * (cols - 1) + 1:strides]


@functools.partial(jax.jit, static_argnames=("strides", "pads", "dilation"))
def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, pads,
                   dilation: int = 1) -> jax.Array:
  """The depthwise NHWC convolution with a (k, k, C, M) kernel (output channel c·M + m), as the
  sum of its k² shifted, strided taps times their weights in at least float32: XLA:CPU fuses
  that into one loop, where its grouped convolution took 2.7 ms for QuickNet's stem (3×3 /2 on
  112² × 16, one core) and this takes a few percent of it. A named call (``pads`` a tuple), so
  that bnn_jax.bops counts its MACs as a convolution's."""
  k, _, channels, multiplier = kernel.shape
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  total = None
  for i, j, view in strided_taps(x.astype(accumulate), k, strides, pads, dilation):
    term = view[..., :, None] * kernel[i, j].astype(accumulate)  # (N, H', W', C, M)
    total = term if total is None else total + term
  return total.reshape(total.shape[:3] + (channels * multiplier,))


# Convolutions of this few input channels (an image stem) with kernels up to 3×3 take
# small_input_conv on CPU.
SMALL_INPUT = dict(channels=4, kernel_size=3)


def takes_small_input_conv(kernel_shape) -> bool:
  """Whether an HWIO kernel's convolution runs as :func:`small_input_conv` here."""
  k, _, channels, _ = kernel_shape
  return (channels <= SMALL_INPUT["channels"] and k <= SMALL_INPUT["kernel_size"]
          and jax.default_backend() == "cpu")


@functools.partial(jax.jit, static_argnames=("strides", "pads", "dilation"))
def small_input_conv(x: jax.Array, kernel: jax.Array, strides: int, pads,
                     dilation: int = 1) -> jax.Array:
  """The NHWC ⊛ HWIO convolution of an input of few channels as the sum, over taps and input
  channels, of a shifted view of one channel times that tap's row of weights, in at least
  float32: XLA:CPU took 0.76 ms for QuickNet's stem (3×3 /2, 3 → 16 channels at 224², one core),
  this 0.35 ms. A named call (``pads`` a tuple), counted by bnn_jax.bops as a convolution."""
  k, _, channels, _ = kernel.shape
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  total = None
  for i, j, view in strided_taps(x.astype(accumulate), k, strides, pads, dilation):
    for channel in range(channels):
      term = view[..., channel:channel + 1] * kernel[i, j, channel].astype(accumulate)
      total = term if total is None else total + term
  return total


def cpu_conv2d(x: jax.Array, kernel: jax.Array, strides: int, pad: int) -> jax.Array:
  """An NHWC ⊛ HWIO convolution whose backward reads its input from a copy stored in
  (C, H, W, N) order in the forward pass.

  XLA:CPU computes a weight gradient from the input transposed to (C, H, W, N) and fuses that
  transposition with the elementwise ops that produced the input: a residual stream (ReActNet's
  shift → BatchNorm → add → RPReLU, block after block) is then recomputed in strided order,
  130 ms for one layer at 224² and batch 16 on a 2-core EPYC. Here the copy is written once
  (:func:`materialized`), and the weight gradient is the convolution XLA itself lowers it to
  (the batch contracted), so the values are those of ``jax.vjp`` of the plain convolution, bit
  for bit. A strided 1×1 convolution reads every s-th pixel only: only those are stored.
  """
  return _stored_input_conv(x, kernel, strides, pad, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _stored_input_conv(x, kernel, strides, pad, shape):
  del shape  # the backward's: a strided 1×1 convolution stores a subsample of x
  return plain_conv(x, kernel, strides, pad)


def materialized(x: jax.Array) -> jax.Array:
  """``x``, written out by a matmul with 8×8 identity blocks over its last axis.

  Exact (8 multiply-adds per value), and XLA does not fuse elementwise producers into a dot:
  whatever reads the result reads stored values instead of recomputing the ops that made ``x``
  at every use.
  """
  block = 8 if x.shape[-1] % 8 == 0 else x.shape[-1]
  return jnp.einsum("...kd,dc->...kc", x.reshape(x.shape[:-1] + (-1, block)),
                    jnp.eye(block, dtype=x.dtype),
                    precision=jax.lax.Precision.HIGHEST).reshape(x.shape)


def _pointwise(kernel: jax.Array, pad: int) -> bool:
  """A 1×1 convolution without padding reads every s-th pixel only: it stores just those."""
  return kernel.shape[0] == 1 and pad == 0


def _stored_input_conv_fwd(x, kernel, strides, pad, shape):
  step = strides if _pointwise(kernel, pad) else 1
  stored = jnp.transpose(materialized(x[:, ::step, ::step]), (3, 1, 2, 0))
  return plain_conv(x, kernel, strides, pad), (stored, kernel)


def _stored_input_conv_bwd(strides, pad, shape, residuals, g):
  x_chwn, kernel = residuals
  _, height, width, _ = x_chwn.shape
  size, stride = kernel.shape[0], 1 if _pointwise(kernel, pad) else strides  # in x_chwn
  # dW[i, j, c, o] = Σ_n,h,w x[n, s·h + i − pad, s·w + j − pad, c] · g[n, h, w, o]: a convolution
  # of x (channels as batch, batch as features) with g (dilated by the stride) as the kernel.
  high = [size + (out - 1) * stride - extent - pad
          for out, extent in ((g.shape[1], height), (g.shape[2], width))]
  d_kernel = jax.lax.conv_general_dilated(
      x_chwn, jnp.transpose(g, (1, 2, 0, 3)), (1, 1), [(pad, high[0]), (pad, high[1])],
      rhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  d_x = jax.linear_transpose(lambda x: plain_conv(x, kernel, strides, pad),
                             jax.ShapeDtypeStruct(shape, g.dtype))(g)[0]
  return d_x, jnp.transpose(d_kernel, (1, 2, 0, 3))


_stored_input_conv.defvjp(_stored_input_conv_fwd, _stored_input_conv_bwd)
