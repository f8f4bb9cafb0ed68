"""HCEBNN's expert binary convolution: a gate picks one expert kernel per sample."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import binarize
from bnn_jax.binarize import EDE, BinarizerSpec, winner_take_all
from bnn_jax.errors import ConfigError
from bnn_jax.layers.conv import conv2d, per_sample_conv2d

Dtype = Any

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
