"""BinaryConv and the learnable pieces of the binary-network methods.

Module names follow the original PyTorch modules and leaf names follow Flax
(``kernel``, ``scale``, ``bias``) or the original (``weight`` of PReLU,
``alpha``/``beta``/``gamma``), so converted checkpoints map leaf by leaf.
All modules take NHWC inputs.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import binarize
from bnn_jax.binarize import EDE, BinarizerSpec, winner_take_all
from bnn_jax.errors import ConfigError

Dtype = Any

# mmcv's kaiming_init: normal, fan_out, ReLU gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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
  if (groups == 1 and x.dtype == jnp.float32 and x.size >= STORED_INPUT_MIN_SIZE
      and x.shape[-1] % 8 == 0 and jax.default_backend() == "cpu"
      and os.environ.get("BNN_JAX_CPU_CONV_BACKWARD", "stored_input") == "stored_input"):
    return cpu_conv2d(x, kernel, strides, pad)
  return _conv(x, kernel, strides, pad, groups).astype(dtype)


# Conv inputs of this many values and more take cpu_conv2d on CPU (every conv of a ResNet-18 at
# 224² and batch 16: 16×7×7×256 and up); below, a transposition is cheap and XLA's own backward
# compiles faster (the test suite's small models).
STORED_INPUT_MIN_SIZE = 1 << 17


def _conv(x: jax.Array, kernel: jax.Array, strides: int, pad: int, groups: int = 1) -> jax.Array:
  """The NHWC ⊛ HWIO convolution, its products summed in at least float32."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding=[(pad, pad)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


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
  return _conv(x, kernel, strides, pad)


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
  return _conv(x, kernel, strides, pad), (stored, kernel)


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
  d_x = jax.linear_transpose(lambda x: _conv(x, kernel, strides, pad),
                             jax.ShapeDtypeStruct(shape, g.dtype))(g)[0]
  return d_x, jnp.transpose(d_kernel, (1, 2, 0, 3))


_stored_input_conv.defvjp(_stored_input_conv_fwd, _stored_input_conv_bwd)


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


# PyTorch's default for nn.Linear / HCEBNN's expert kernels: kaiming_uniform(a=√5) = U(±1/√fan_in).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# Values a model records when asked (``apply(..., mutable=[SOWN])``): Flax's ``intermediates``,
# which ``init`` leaves out. Expert convs record each sample's expert there.
SOWN = "intermediates"
GATES = {"sigmoid": jax.nn.sigmoid, "softmax": jax.nn.softmax}


def torch_default_bias(fan_in: int):
  """PyTorch's default bias init of a layer with ``fan_in`` inputs: U(±1/√fan_in)."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def chosen_experts(one_hot: Optional[jax.Array], batch: int) -> jax.Array:
  """Each sample's expert index from the gate's one-hot (B, E); None: expert 0 for every sample."""
  return jnp.zeros((batch,), jnp.int32) if one_hot is None else jnp.argmax(one_hot, axis=-1)


def expert_choices(collections: Any) -> dict:
  """{expert conv path ("layer1.0.conv1", without "backbone"): each sample's expert} from the
  collections ``apply(..., mutable=[SOWN])`` returned."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collections.get(SOWN, {}))[0]:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if names[-1] == "expert_choice":
      found[".".join(n for n in names[:-1] if n != "backbone")] = leaf
  return found


@jax.custom_vjp
def select_experts(choice: jax.Array, kernels: jax.Array) -> jax.Array:
  """Each sample's kernel, Σ_n choice[b, n]·kernels[n] for a one-hot ``choice`` (B, N), computed
  as a gather of the chosen expert (no multiply by the N−1 zeros).

  The backward is the weighted sum's: every expert's kernel reaches the gate,
  ∂L/∂choice[b, n] = ⟨∂L/∂kernel_b, kernels[n]⟩, and ∂L/∂kernels[n] = Σ_b choice[b, n]·∂L/∂kernel_b.
  """
  return kernels[jnp.argmax(choice, axis=-1)]


def _select_experts_fwd(choice, kernels):
  return select_experts(choice, kernels), (choice, kernels)


def _select_experts_bwd(residuals, g):
  choice, kernels = residuals
  flat_g, flat_k = g.reshape(g.shape[0], -1), kernels.reshape(kernels.shape[0], -1)
  d_choice = (flat_g @ flat_k.T).astype(choice.dtype)
  d_kernels = (choice.T.astype(g.dtype) @ flat_g).reshape(kernels.shape)
  return d_choice, d_kernels


select_experts.defvjp(_select_experts_fwd, _select_experts_bwd)


class ChannelScale(nn.Module):
  """A learnable per-output-channel factor ``alpha`` (init 1): HCEBNN's scale after the conv."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.param("alpha", nn.initializers.ones, (x.shape[-1],)).astype(x.dtype)


class ExpertBinaryConv(nn.Module):
  """HCEBNN's expert binary convolution (EBConv): ``num_experts`` kernels, one per sample.

  A gate (Dense → sigmoid or softmax) on the global average of the real-valued input picks each
  sample's expert by winner-take-all (straight-through backward, so the gate and the input
  learn); the sample is convolved with that expert's kernel alone (a gather, then
  :func:`per_sample_conv2d`), binarized as the method says; then the per-channel scale α
  (``scale``) and the squeeze-and-excitation factor from the same average (``use_se``).
  ``use_first_expert`` always takes expert 0 (the gate gets no gradient): the official code
  does so for real activations and its real-valued downsample convs.
  The kernel is (experts, k, k, in/groups, out): each expert in Flax's HWIO.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  num_experts: int = 4
  gate: str = "sigmoid"
  activation_binarizer: Optional[BinarizerSpec] = None
  weight_binarizer: Optional[BinarizerSpec] = None
  use_first_expert: bool = False
  scale: bool = True
  use_se: bool = True
  dtype: Dtype = jnp.float32

  def convolve(self, x: jax.Array, one_hot: Optional[jax.Array], ede: EDE) -> jax.Array:
    """The binarized convolution of each sample with its expert (``one_hot`` (B, E); None: expert
    0 for every sample, an ordinary convolution). Bit-packed inference replaces this method, so
    the float kernels are read here only (a packed file does not hold them)."""
    kernels = self.get_variable("params", "kernel")
    if self.activation_binarizer is not None:
      x = binarize.get(self.activation_binarizer)(x, ede)
    binarize_kernel = (lambda w: w) if self.weight_binarizer is None else (
        lambda w: binarize.get(self.weight_binarizer)(w, ede))
    pad = self.kernel_size // 2
    if one_hot is None:
      return conv2d(x, binarize_kernel(kernels[0]), self.strides, pad, self.groups, self.dtype)
    per_sample = jax.vmap(binarize_kernel)(select_experts(one_hot, kernels))
    return per_sample_conv2d(x, per_sample, self.strides, pad, self.groups, self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, ede: Optional[EDE] = None) -> jax.Array:
    ede = EDE.initial() if ede is None else ede
    batch, channels, k = x.shape[0], x.shape[-1], self.kernel_size
    if self.gate not in GATES:
      raise ConfigError(f"unknown gate {self.gate!r}; valid: {sorted(GATES)}")
    if self.use_se and self.features < 8:
      raise ConfigError(f"{self.name}: squeeze-and-excitation needs at least 8 output channels "
                        f"(its hidden width is out/8), not {self.features}")
    if self.is_initializing():  # read by convolve
      self.param("kernel", nn.initializers.variance_scaling(
          1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,)),
          (self.num_experts, k, k, channels // self.groups, self.features))
    pooled = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
    gate_logits = nn.Dense(self.num_experts, kernel_init=torch_default_init,
                           bias_init=torch_default_bias(channels), name="fc")(pooled)
    one_hot = None if self.use_first_expert else winner_take_all(GATES[self.gate](gate_logits))
    y = self.convolve(x, one_hot, ede)
    self.sow(SOWN, "expert_choice", chosen_experts(one_hot, batch))
    if self.scale:
      y = ChannelScale(name="activation_post_process")(y)
    if self.use_se:
      hidden = nn.relu(nn.Dense(self.features // 8, use_bias=False, kernel_init=torch_default_init,
                                name="se_fc.0")(pooled))
      excitation = nn.sigmoid(nn.Dense(self.features, use_bias=False,
                                       kernel_init=torch_default_init, name="se_fc.2")(hidden))
      y = y * excitation[:, None, None, :].astype(y.dtype)
    return y


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


def hardtanh(x: jax.Array) -> jax.Array:
  """clip(x, −1, 1) whose derivative is 0 at ±1 exactly, as PyTorch's Hardtanh (jnp.clip gives ½)."""
  return jnp.where(x <= -1, -1, jnp.where(x >= 1, 1, x)).astype(x.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(3, 2, padding=1), the ResNet stem pool.

  Its gradient goes to the first maximum of each window in row-major order, as PyTorch's;
  ties are common after a hardtanh stem (IR-Net), where XLA leaves the choice unspecified.
  """
  return _max_pool(x, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, shape: tuple) -> jax.Array:
  del shape  # the backward's: an output size comes from two input sizes
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


def _max_pool_fwd(x, shape):
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


def _max_pool_bwd(shape, first, g):
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


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
