"""Normalisation: PyTorch's BatchNorm with ghost batches and its closed-form backward."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.errors import ConfigError

Dtype = Any


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm (eps 1e-5, momentum 0.1 in PyTorch's convention), with ghost batches.

  In training, statistics come from groups of ``group_size`` consecutive examples (``None``:
  the whole batch), as PyTorch DDP without SyncBN normalises each GPU's batch on its own: a
  recipe then sees the statistics of the original's per-GPU batch on any number of devices.
  The running statistics move by the average of the groups' updates, the variance's with the
  unbiased batch variance, as PyTorch's. Statistics are computed in at least float32.
  Variables keep Flax's names (``scale``, ``bias``; ``mean``, ``var``).
  """
  use_running_average: bool
  group_size: Optional[int] = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(compute)
    if self.use_running_average:
      return normalized_affine(x, running_mean.value.astype(compute),
                               running_var.value.astype(compute), scale.astype(compute),
                               bias.astype(compute), self.epsilon).astype(self.dtype)
    groups = ghost_groups(x, self.group_size)
    y, mean, var = normalize_batch(groups, scale.astype(compute), bias.astype(compute),
                                   self.epsilon)
    if not self.is_initializing():
      count = math.prod(groups.shape[1:-1])  # values per channel in one group
      unbiased = var * (count / max(count - 1, 1))
      for running, batch_value in ((running_mean, mean), (running_var, unbiased)):
        update = batch_value.mean(0).reshape(features)  # the average of the groups' updates
        running.value = ((1 - self.momentum) * running.value
                         + self.momentum * update).astype(running.value.dtype)
    return y.reshape(x.shape).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(groups: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple:
  """Training BatchNorm of ``groups`` (groups, examples, ..., channels), each group over its
  examples and positions: (output, mean, biased variance), statistics keeping their axes.

  The backward is PyTorch's closed form, two reductions per channel (Σ dy and Σ dy·x̂, which
  are also the bias and scale gradients) and one elementwise pass, where differentiating the
  forward gives five reductions and more passes over the activations.
  """
  axes = tuple(range(1, groups.ndim - 1))
  mean = groups.mean(axes, keepdims=True)
  var = jnp.square(groups - mean).mean(axes, keepdims=True)
  return normalized_affine(groups, mean, var, scale, bias, epsilon), mean, var


def normalized_affine(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                      bias: jax.Array, epsilon: float) -> jax.Array:
  """(x − mean)/√(var + ε)·scale + bias as PyTorch's CPU kernel computes it: x·α + β with
  α = scale/√(var + ε) and β = bias − mean·α per channel. One multiply-add per value, and no
  centred copy of ``x`` for XLA to share between the variance and the output."""
  alpha = scale * jax.lax.rsqrt(var + epsilon)
  return x * alpha + (bias - mean * alpha)


def _normalize_batch_fwd(groups, scale, bias, epsilon):
  out = normalize_batch(groups, scale, bias, epsilon)
  return out, (groups, scale, out[1], out[2])


def _normalize_batch_bwd(epsilon, residuals, cotangents):
  groups, scale, mean, var = residuals
  d_out, d_mean, d_var = cotangents
  axes, count = tuple(range(1, groups.ndim - 1)), math.prod(groups.shape[1:-1])
  rstd, centred = jax.lax.rsqrt(var + epsilon), groups - mean
  normalized = centred * rstd
  sum_d_out = d_out.sum(axes, keepdims=True)
  sum_d_out_normalized = (d_out * normalized).sum(axes, keepdims=True)
  d_groups = (scale * rstd * (d_out - (sum_d_out + normalized * sum_d_out_normalized) / count)
              + (d_mean + 2 * d_var * centred) / count)
  channels = scale.shape
  return (d_groups, sum_d_out_normalized.sum(0).reshape(channels),
          sum_d_out.sum(0).reshape(channels))


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def ghost_groups(x: jax.Array, group_size: Optional[int]) -> jax.Array:
  """``x`` (batch first) as (groups, group_size, ...); one group when ``group_size`` is None."""
  batch = x.shape[0]
  size = group_size or batch
  if batch % size:
    raise ConfigError(f"a batch of {batch} examples does not split into BatchNorm groups of "
                      f"{size} (model.bn_group_size); use a batch (per device) that is a multiple")
  return x.reshape((batch // size, size) + x.shape[1:])


def batch_norm(train: bool, name: str, dtype: Dtype = jnp.float32,
               group_size: Optional[int] = None) -> BatchNorm:
  """BatchNorm with PyTorch's defaults, batch statistics in training (of ghost groups if set)."""
  return BatchNorm(use_running_average=not train, group_size=group_size, dtype=dtype, name=name)



# TensorFlow's fused BatchNorm kernel (Keras' choice for 4-D inputs) raises epsilon to this.
FUSED_MIN_EPSILON = 1.001e-5


class KerasBatchNorm(nn.Module):
  """Keras' BatchNormalization (defaults momentum 0.99, epsilon 1e-3), as larq-zoo's models use it.

  Keras' conventions, not PyTorch's: the moving averages move by ``moving − (moving − batch)·(1 −
  momentum)``; ``center`` / ``scale`` off drop ``beta`` / ``gamma``. On 4-D inputs Keras runs
  TensorFlow's fused kernel, which raises epsilon to at least 1.001e-5 and hands the moving
  variance the unbiased batch variance (what larq-zoo's models record; the fixtures' README says
  biased); other inputs normalise and update with the biased variance.
  Variables keep Keras' names (``gamma``, ``beta``; ``moving_mean``, ``moving_variance``).
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    compute = jnp.promote_types(x.dtype, jnp.float32)
    gamma = (self.param("gamma", nn.initializers.ones, (features,)) if self.scale
             else jnp.ones((features,))).astype(compute)
    beta = (self.param("beta", nn.initializers.zeros, (features,)) if self.center
            else jnp.zeros((features,))).astype(compute)
    moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (features,), jnp.float32)
    moving_var = self.variable("batch_stats", "moving_variance", jnp.ones, (features,),
                               jnp.float32)
    epsilon = max(self.epsilon, FUSED_MIN_EPSILON) if x.ndim == 4 else self.epsilon
    x = x.astype(compute)
    if self.use_running_average:
      return normalized_affine(x, moving_mean.value.astype(compute),
                               moving_var.value.astype(compute), gamma, beta,
                               epsilon).astype(self.dtype)
    y, mean, var = normalize_batch(x[None], gamma, beta, epsilon)
    if not self.is_initializing():
      count = math.prod(x.shape[:-1])
      var = var * (count / max(count - 1, 1)) if x.ndim == 4 else var
      decay = 1 - self.momentum
      for moving, batch_value in ((moving_mean, mean), (moving_var, var)):
        value = batch_value.reshape(features).astype(moving.value.dtype)
        moving.value = moving.value - (moving.value - value) * decay
    return y.reshape(x.shape).astype(self.dtype)
