"""Binary convolutions: BinaryConv (binarized input and/or kernel), the compute-dtype
convolution every layer runs, and the per-sample convolution of expert layers."""
from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import binarize
from bnn_jax.binarize import EDE, BinarizerSpec
from bnn_jax.layers.cpu_kernels import STORED_INPUT_MIN_SIZE, cpu_conv2d, plain_conv

Dtype = Any

# mmcv's kaiming_init: normal, fan_out, ReLU gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

class BinaryConv(nn.Module):
  """A 2-D convolution that binarizes its input and/or its kernel.

  ``activation_binarizer`` / ``weight_binarizer`` are what :func:`bnn_jax.binarize.get`
  takes (a registered name, a dict with parameters, a callable); ``None`` leaves that operand real
  (this is how ``binary_type`` switches halves on and off).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Optional[int] = None  # default: kernel_size // 2, as every conv of the original
  groups: int = 1
  activation_binarizer: Optional[BinarizerSpec] = None
  weight_binarizer: Optional[BinarizerSpec] = None
  dtype: Dtype = jnp.float32

  @property
  def pad_width(self) -> int:
    """Zero padding on each side of both spatial axes."""
    return self.kernel_size // 2 if self.padding is None else self.padding

  @nn.compact
  def __call__(self, x: jax.Array, ede: Optional[EDE] = None) -> jax.Array:
    ede = EDE.initial() if ede is None else ede
    k, pad = self.kernel_size, self.pad_width
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1] // self.groups, self.features))
    if self.activation_binarizer is not None:
      x = binarize.get(self.activation_binarizer)(x, ede)
    if self.weight_binarizer is not None:
      kernel = binarize.get(self.weight_binarizer)(kernel, ede)
    return conv2d(x, kernel, self.strides, pad, self.groups, self.dtype)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, pad: int, groups: int,
           dtype: Dtype) -> jax.Array:
  """NHWC ⊛ HWIO in ``dtype``.

  Operands in the compute dtype (±1 is exact in any), products summed in at least float32 and
  rounded once: bfloat16 holds integers only up to 256, a binary dot product up to 4,608.
  On CPU, float32 ungrouped convolutions of large inputs take :func:`cpu_conv2d`'s backward
  (same values; ``BNN_JAX_CPU_CONV_BACKWARD=xla`` in the environment keeps XLA's own).
  """
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if (groups == 1 and x.dtype == jnp.float32 and _at_least(x.size, STORED_INPUT_MIN_SIZE)
      and x.shape[-1] % 8 == 0 and jax.default_backend() == "cpu"
      and os.environ.get("BNN_JAX_CPU_CONV_BACKWARD", "stored_input") == "stored_input"):
    return cpu_conv2d(x, kernel, strides, pad)
  return plain_conv(x, kernel, strides, pad, groups).astype(dtype)


def _at_least(size, minimum: int) -> bool:
  """``size >= minimum`` for a known size; a symbolic one (a jax.export batch) is not: it only
  decides which backward a convolution takes."""
  return isinstance(size, int) and size >= minimum


def conv(features: int, kernel_size: int, strides: int = 1, name: Optional[str] = None,
         dtype: Dtype = jnp.float32) -> BinaryConv:
  """A real-valued convolution without bias (a BinaryConv with both halves off)."""
  return BinaryConv(features, kernel_size, strides, dtype=dtype, name=name)


def per_sample_conv2d(x: jax.Array, kernels: jax.Array, strides: int, pad: int, groups: int,
                      dtype: Dtype) -> jax.Array:
  """Sample b of ``x`` (NHWC) convolved with ``kernels[b]`` (HWIO): the official code's one
  convolution over (1, B·C, H, W) with B·groups groups, written as im2col (k² shifted views)
  and one batched matmul per (sample, group).

  XLA:CPU runs a convolution with B·groups feature groups (what ``vmap`` of a convolution gives)
  33 to 348 times slower than this, forward and backward, for HCEBNN-like shapes
  (``scripts/benchmark_per_sample_conv.py``).
  """
  batch, height, width, channels = x.shape
  k, features = kernels.shape[1], kernels.shape[-1]
  out_h, out_w = (height + 2 * pad - k) // strides + 1, (width + 2 * pad - k) // strides + 1
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(dtype)
  taps = [padded[:, i:i + strides * (out_h - 1) + 1:strides, j:j + strides * (out_w - 1) + 1:strides]
          for i in range(k) for j in range(k)]
  patches = jnp.stack(taps, axis=3).reshape(batch, out_h, out_w, k * k, groups, channels // groups)
  kernels = kernels.astype(dtype).reshape(batch, k * k, channels // groups, groups, features // groups)
  y = jnp.einsum("bhwtgc,btcgo->bhwgo", patches, kernels,
                 preferred_element_type=jnp.promote_types(dtype, jnp.float32))
  return y.reshape(batch, out_h, out_w, features).astype(dtype)
