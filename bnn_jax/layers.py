"""BinaryConv and the learnable pieces of the binary-network methods.

Module names follow the original PyTorch modules and leaf names follow Flax
(``kernel``, ``scale``, ``bias``) or the original (``weight`` of PReLU,
``alpha``/``beta``/``gamma``), so converted checkpoints map leaf by leaf.
All modules take NHWC inputs.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.binarize import EDE, get_binarizer
from bnn_jax.errors import ConfigError

Dtype = Any

# mmcv's kaiming_init: normal, fan_out, ReLU gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str, dtype: Dtype = jnp.float32) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


class BinaryConv(nn.Module):
  """A 2-D convolution that binarizes its input and/or its kernel.

  ``activation_binarizer`` / ``weight_binarizer`` are names from
  :data:`bnn_jax.binarize.BINARIZERS`; ``None`` leaves that operand real
  (this is how ``binary_type`` switches halves on and off).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Optional[int] = None  # default: kernel_size // 2, as every conv of the original
  groups: int = 1
  activation_binarizer: Optional[str] = None
  weight_binarizer: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ede: Optional[EDE] = None) -> jax.Array:
    ede = EDE.initial() if ede is None else ede
    k = self.kernel_size
    pad = k // 2 if self.padding is None else self.padding
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1] // self.groups, self.features))
    if self.activation_binarizer is not None:
      x = get_binarizer(self.activation_binarizer)(x, ede)
    if self.weight_binarizer is not None:
      kernel = get_binarizer(self.weight_binarizer)(kernel, ede)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=[(pad, pad)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)


def conv(features: int, kernel_size: int, strides: int = 1, name: Optional[str] = None,
         dtype: Dtype = jnp.float32) -> BinaryConv:
  """A real-valued convolution without bias (a BinaryConv with both halves off)."""
  return BinaryConv(features, kernel_size, strides, dtype=dtype, name=name)


class LearnableBias(nn.Module):
  """A learnable per-channel shift (ReActNet's RSign / RPReLU shifts)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],)).astype(x.dtype)


class PReLU(nn.Module):
  """Per-channel PReLU, slope initialised to 0.25 as PyTorch's."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],)).astype(x.dtype)
    return jnp.where(x >= 0, x, slope * x)


class RPReLU(nn.Module):
  """ReActNet's RPReLU: shift → PReLU → shift."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = LearnableBias(name="bias1")(x)
    x = PReLU(name="prelu")(x)
    return LearnableBias(name="bias2")(x)


class LearnableScale(nn.Module):
  """XNOR-Net++ scale: α per channel × β per row × γ per column.

  The row and column counts are those of the feature map seen at init (the
  original hard-codes them for 224×224 inputs; this gives the same there).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    alpha = self.param("alpha", nn.initializers.ones, (c,))
    beta = self.param("beta", nn.initializers.ones, (h,))
    gamma = self.param("gamma", nn.initializers.ones, (w,))
    scale = alpha[None, None, :] * beta[:, None, None] * gamma[None, :, None]
    return x * scale.astype(x.dtype)


class AttentionScale(nn.Module):
  """Real-to-Binary gating: GAP → Dense(C/8) → ReLU → Dense(C) → sigmoid, times the input."""
  reduction: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    gate = jnp.mean(x, axis=(1, 2))
    gate = nn.relu(nn.Dense(c // self.reduction, dtype=self.dtype, name="fc1")(gate))
    gate = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="fc2")(gate))
    return x * gate[:, None, None, :]


def avg_pool_ceil(x: jax.Array, window: int) -> jax.Array:
  """PyTorch's AvgPool2d(window, window, ceil_mode=True, count_include_pad=False)."""
  pads = [(0, -size % window) for size in x.shape[1:3]]
  return nn.avg_pool(x, (window, window), (window, window), padding=pads, count_include_pad=False)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(3, 2, padding=1): the ResNet stem pool."""
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


ACTIVATIONS = {"hardtanh": lambda: lambda x: jnp.clip(x, -1, 1),
               "relu": lambda: nn.relu,
               "prelu": lambda: PReLU(name="stem_act")}


def make_activation(name: Optional[str]):
  """A stem activation by name (``None`` = identity); PReLU is a module named ``stem_act``."""
  if name is None:
    return lambda x: x
  if name not in ACTIVATIONS:
    raise ConfigError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)} or None")
  return ACTIVATIONS[name]()
