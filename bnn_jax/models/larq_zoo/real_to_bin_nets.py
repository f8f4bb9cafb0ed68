"""larq-zoo's Real-to-Binary networks (Martinez et al., 2020) and the two stages its multi-stage
recipe trains before them, layer for layer (and name for name) as larq-zoo 2.4's
``literature/real_to_bin_nets.py`` builds them:

- ``resnet_fp``: a real-valued ResNet-18, the first teacher;
- ``baseline_ban`` / ``baseline_bnn``: the strong baseline (binary activations; binary weights
  too), each binary conv's output rescaled by learned per-row, per-column and per-channel scales;
- ``r2b_fp`` / ``r2b_ban`` / ``r2b_bnn``: the Real-to-Binary net (tanh, then binary activations;
  then binary weights: larq-zoo's RealToBinaryNet, 65.01%), whose rescale is data-dependent, a
  squeeze-and-excite gate computed from the binary conv's input.

larq-zoo names every layer ``<model_name>_block_<n>...``; so do we. Its L2 kernel regularizers
(the fp and ban stages) and WeightClip constraints (bnn) belong to the training recipe, not to
the model's forward or gradient, and are not here.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.errors import ConfigError
from bnn_jax.layers.quant import glorot_normal, he_normal
from bnn_jax.models.larq_zoo.functional import Graph

# model_name (larq-zoo's default for each factory) -> (block kind, input quantizer, kernel
# quantizer); larq's "ste_sign" is SteSign(clip_value=1.0)
VARIANTS = {
    "resnet_fp": ("resnet", None, None),
    "baseline_ban": ("baseline", "ste_sign", None),
    "baseline_bnn": ("baseline", "ste_sign", "ste_sign"),
    "r2b_fp": ("r2b", "tanh", None),
    "r2b_ban": ("r2b", "ste_sign", None),
    "r2b_bnn": ("r2b", "ste_sign", "ste_sign"),
}
STEM_FILTERS = 64  # larq-zoo writes it into first_block; every other width follows from it


class LearnedRescale(nn.Module):
  """The strong baseline's XNOR-Net++-style output scale, with larq-zoo's weights: ``scale_h``
  (H, 1, 1), ``scale_w`` (1, W, 1) and ``scale_c`` (1, 1, C), all initialised to 1, so the
  model is tied to the image size it was built for, as larq-zoo's."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    scale_h = self.param("scale_h", nn.initializers.ones, (h, 1, 1))
    scale_w = self.param("scale_w", nn.initializers.ones, (1, w, 1))
    scale_c = self.param("scale_c", nn.initializers.ones, (1, 1, c))
    return x * (scale_h * scale_w * scale_c).astype(x.dtype)


class RealToBinNet(nn.Module):
  """A 7×7 stem, eight blocks (the width doubling and the map halving at blocks 4, 6 and 8) and
  a dense classifier; ``model_name`` picks the stage (see the module docstring).

  ``momentum`` (0.99) and ``scaling_r`` (the gate's reduction, 8) are larq-zoo's;
  ``width_divisor`` divides the stem's 64 filters, which every later width follows (a reduced
  model for tests; larq-zoo has no such field). ``cifar_stem`` runs the 7×7 conv at stride 1 and
  drops the max pool (the same weights).
  """
  num_classes: int = 1000
  model_name: str = "r2b_bnn"
  momentum: float = 0.99
  scaling_r: int = 8
  width_divisor: int = 1
  cifar_stem: Optional[bool] = None  # None: larq-zoo's (ImageNet) stem
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    if self.model_name not in VARIANTS:
      raise ConfigError(f"unknown Real-to-Binary model_name {self.model_name!r}; valid: "
                        f"{sorted(VARIANTS)}")
    kind = VARIANTS[self.model_name][0]
    g = Graph(images, train, self.dtype, module=self)
    x = self.first_block(g, images, prelu=kind != "resnet", name=self.block_name(1))
    block = self.resnet_block if kind == "resnet" else self.binary_block
    for n in range(2, 10):
      x = block(g, x, downsample=n % 2 == 0 and n > 3, name=self.block_name(n))
    g.top()
    name = self.block_name(10)
    x = g.global_pool(x, name=f"{name}_global_pool")
    x = g.dense(x, self.num_classes, name=f"{name}_logits")
    return g.logits(x, "softmax", name=f"{name}_probs")

  def block_name(self, n: int) -> str:
    return f"{self.model_name}_block_{n}"

  def batch_norm(self, g: Graph, x, name: str):
    return g.batch_normalization(x, momentum=self.momentum, name=name)

  def first_block(self, g: Graph, x, prelu: bool, name: str):
    filters = max(1, STEM_FILTERS // self.width_divisor)
    x = g.conv2d(x, filters, 7, strides=1 if self.cifar_stem else 2, padding="same",
                 use_bias=False, kernel_init=glorot_normal, name=f"{name}_conv2d")
    x = self.batch_norm(g, x, f"{name}_batch_norm")
    if prelu:
      x = g.p_re_lu(x, shared_axes=(1, 2), name=f"{name}_prelu")
    else:
      x = g.op("re_lu", nn.relu, x, name=f"{name}_relu")
    if self.cifar_stem:
      return x
    return g.max_pool2d(x, 3, 2, padding="same", name=f"{name}_pool")

  def shortcut(self, g: Graph, x, out_channels: int, name: str):
    if x.shape[-1] == out_channels:
      return x
    x = g.average_pool2d(x, 2, 2, padding="same", name=f"{name}_shortcut_pool")
    x = g.conv2d(x, out_channels, 1, use_bias=False, kernel_init=glorot_normal,
                 name=f"{name}_shortcut_conv2d")
    return self.batch_norm(g, x, f"{name}_shortcut_batch_norm")

  def binary_block(self, g: Graph, x, downsample: bool, name: str):
    """Two half blocks, then an identity layer naming the block's output (larq-zoo matches
    the teacher's attention maps there)."""
    x = self.half_binary_block(g, x, downsample, f"{name}a")
    x = self.half_binary_block(g, x, False, f"{name}b")
    return g.op("lambda", lambda v: v, x, name=f"{name}_out")

  def half_binary_block(self, g: Graph, x, downsample: bool, name: str):
    _, input_quantizer, kernel_quantizer = VARIANTS[self.model_name]
    out_channels = x.shape[-1] * (2 if downsample else 1)
    shortcut = self.shortcut(g, x, out_channels, name)
    conv_input = self.batch_norm(g, x, f"{name}_batch_norm")
    y = g.quant_conv2d(conv_input, out_channels, 3, strides=2 if downsample else 1,
                       padding="same", use_bias=False, input_quantizer=input_quantizer,
                       kernel_quantizer=kernel_quantizer, kernel_init=glorot_normal,
                       name=f"{name}_conv2d")
    if VARIANTS[self.model_name][0] == "baseline":
      y = g.custom("learned_rescale_layer", LearnedRescale, y,
                   weights=("scale_h", "scale_w", "scale_c"), name=f"{name}_rescale")
    else:
      y = self.gate(g, conv_input, y, name)
    y = g.p_re_lu(y, shared_axes=(1, 2), name=f"{name}_prelu")
    return g.add(y, shortcut, name=f"{name}_skip_add")

  def gate(self, g: Graph, conv_input, conv_output, name: str):
    """Real-to-Binary's data-dependent scale: per-channel gates from the conv's input."""
    out_channels = conv_output.shape[-1]
    z = g.global_pool(conv_input, name=f"{name}_scaling_pool")
    z = g.dense(z, conv_input.shape[-1] // self.scaling_r, activation="relu", use_bias=False,
                kernel_init=he_normal, name=f"{name}_scaling_dense_reduce")
    z = g.dense(z, out_channels, activation="sigmoid", use_bias=False, kernel_init=he_normal,
                name=f"{name}_scaling_dense_expand")
    scales = g.reshape(z, (1, 1, out_channels), name=f"{name}_scaling_reshape")
    return g.op("multiply", lambda a, b: a * b, conv_output, scales,
                name=f"{name}_scaling_multiplication")

  def resnet_block(self, g: Graph, x, downsample: bool, name: str):
    """One real ResNet basic block (two biased 3×3 convs), named as the binary blocks."""
    out_channels = x.shape[-1] * (2 if downsample else 1)
    shortcut = self.shortcut(g, x, out_channels, name)
    for conv in ("a", "b"):
      x = g.conv2d(x, out_channels, 3, strides=2 if downsample and conv == "a" else 1,
                   padding="same", name=f"{name}{conv}_conv2d")
      x = self.batch_norm(g, x, f"{name}{conv}_batch_norm")
      x = g.activation(x, "relu", name=f"{name}{conv}_relu")
    x = g.add(x, shortcut, name=f"{name}_skip_add")
    return g.op("re_lu", nn.relu, x, name=f"{name}_out")
