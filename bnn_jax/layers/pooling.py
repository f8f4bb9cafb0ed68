"""Pooling: PyTorch's ceil-mode average pool, Keras' max pool, and the ResNet stem's max pool
with PyTorch's gradient at ties. Max pools compute their forward as the maximum of shifted taps,
one fused loop: XLA:CPU's reduce-window took 1.4 ms for larq's BiRealNet stem pool (3×3 /2 on
112² × 64, one core)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.layers.cpu_kernels import materialized, strided_taps


def avg_pool_ceil(x: jax.Array, window: int) -> jax.Array:
  """PyTorch's AvgPool2d(window, window, ceil_mode=True, count_include_pad=False)."""
  pads = [(0, -size % window) for size in x.shape[1:3]]
  return nn.avg_pool(x, (window, window), (window, window), padding=pads, count_include_pad=False)


def tap_maximum(x: jax.Array, window: int, strides: int, pads) -> jax.Array:
  """The max pool's values: the maximum over the window's taps, padding never winning."""
  taps = [view for _, _, view in strided_taps(x, window, strides, pads, pad_value=-jnp.inf)]
  return functools.reduce(jnp.maximum, taps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, strides: int, pads) -> jax.Array:
  """Keras' MaxPool2D: ``pads`` ((top, bottom), (left, right)) never win; its gradient is XLA's
  reduce-window one (select-and-scatter), its values the maximum of taps."""
  return tap_maximum(x, window, strides, pads)


def _reduce_window_pool(x, window, strides, pads):
  return nn.max_pool(x, (window, window), (strides, strides), padding=pads)


def _max_pool_fwd(x, window, strides, pads):
  return tap_maximum(x, window, strides, pads), x


def _max_pool_bwd(window, strides, pads, x, g):
  return jax.vjp(lambda v: _reduce_window_pool(v, window, strides, pads), x)[1](g)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(3, 2, padding=1), the ResNet stem pool.

  Its gradient goes to the first maximum of each window in row-major order, as PyTorch's;
  ties are common after a hardtanh stem (IR-Net), where XLA leaves the choice unspecified.
  """
  return _stem_pool(x, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _stem_pool(x: jax.Array, shape: tuple) -> jax.Array:
  del shape  # the backward's: an output size comes from two input sizes
  return tap_maximum(x, 3, 2, ((1, 1), (1, 1)))


def _stem_pool_fwd(x, shape):
  """The pool, and for each output the first of its 9 window taps (row-major) holding its
  maximum, as a float 0–8 written out once (:func:`materialized`) for the backward. Both come
  from one pass over the taps (a later tap wins only if strictly greater), so the padded input
  is never written out and the stem's BatchNorm and activation are not recomputed for a
  second pass."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_rows, out_cols = (shape[1] - 1) // 2 + 1, (shape[2] - 1) // 2 + 1
  y = padded[:, 0:2 * out_rows - 1:2, 0:2 * out_cols - 1:2, :]
  first = jnp.zeros(y.shape, jnp.float32)
  for tap in range(1, 9):
    i, j = divmod(tap, 3)
    window = padded[:, i:i + 2 * out_rows - 1:2, j:j + 2 * out_cols - 1:2, :]
    later = window > y
    y, first = jnp.where(later, window, y), jnp.where(later, float(tap), first)
  return y, materialized(first)


def _stem_pool_bwd(shape, first, g):
  """Each output's gradient goes to its first maximum. A padded input row 2a is tap 0 of output
  row a and tap 2 of row a − 1, row 2a + 1 tap 1 of row a only (columns alike), so the input
  gradient is four parity classes of shifted, masked copies of ``g``, interleaved: one pass, no
  scatter. Each class sums in PyTorch's order (outputs in raster order), so the sums are
  bit-equal. ``g`` is written out first: each class reads it, and XLA would otherwise recompute
  its producer (the next conv's estimator backward, a tanh for IR-Net) at every read."""
  g = materialized(g)
  zero = jnp.zeros((), g.dtype)

  def placed(i, j):  # tap (i, j)'s gradients on the (rows + 1, cols + 1) grid of their class
    rows, cols = (1, 0) if i == 2 else (0, 1), (1, 0) if j == 2 else (0, 1)
    return jnp.pad(jnp.where(first == 3 * i + j, g, zero), ((0, 0), rows, cols, (0, 0)))

  even_even = placed(2, 2) + placed(2, 0) + placed(0, 2) + placed(0, 0)
  even_odd, odd_even = placed(2, 1) + placed(0, 1), placed(1, 2) + placed(1, 0)
  classes = jnp.stack([jnp.stack([even_even, even_odd]), jnp.stack([odd_even, placed(1, 1)])])
  batch, rows, cols, channels = classes.shape[2:]
  grad = jnp.transpose(classes, (2, 3, 0, 4, 1, 5)).reshape(batch, 2 * rows, 2 * cols, channels)
  return (grad[:, 1:1 + shape[1], 1:1 + shape[2], :],)


_stem_pool.defvjp(_stem_pool_fwd, _stem_pool_bwd)
