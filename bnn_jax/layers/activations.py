"""Activations and the learnable pieces of the methods: shifts, PReLU/RPReLU, scales, gates."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.errors import ConfigError

Dtype = Any


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
    # x > 0, not >= 0: at exactly 0 the derivative is the slope, as PyTorch's (binary
    # convolutions without a weight scale give integer outputs, so exact zeros are common).
    return jnp.where(x > 0, x, slope * x)


class KerasPReLU(nn.Module):
  """Keras' PReLU: slopes ``alpha`` (initialised to 0) of the input's shape without the batch
  axis, size 1 along ``shared_axes`` (Keras' numbering: batch = 0). Computed as Keras does,
  relu(x) − alpha·relu(−x), so the derivative at exactly 0 is 0, as TensorFlow's."""
  shared_axes: tuple = ()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(1 if axis in self.shared_axes else size
                  for axis, size in enumerate(x.shape) if axis > 0)
    alpha = self.param("alpha", nn.initializers.zeros, shape).astype(x.dtype)
    return nn.relu(x) - alpha * nn.relu(-x)


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


def hardtanh(x: jax.Array) -> jax.Array:
  """clip(x, −1, 1) whose derivative is 0 at ±1 exactly, as PyTorch's Hardtanh (jnp.clip gives ½)."""
  return jnp.where(x <= -1, -1, jnp.where(x >= 1, 1, x)).astype(x.dtype)


ACTIVATIONS = {"hardtanh": lambda: hardtanh,
               "relu": lambda: nn.relu,
               "prelu": lambda: PReLU(name="stem_act")}


def make_activation(name: Optional[str]):
  """A stem activation by name (``None`` = identity); PReLU is a module named ``stem_act``."""
  if name is None:
    return lambda x: x
  if name not in ACTIVATIONS:
    raise ConfigError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)} or None")
  return ACTIVATIONS[name]()
