"""larq-zoo's MeliusNet (MeliusNet22; Bethge et al., 2020), layer for layer as larq-zoo 2.4's
``literature/meliusnet.py`` builds it, with larq-zoo's own layer names."""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.errors import ConfigError
from bnn_jax.layers.quant import glorot_normal
from bnn_jax.models.larq_zoo.functional import Graph, STE_SIGN_13

BLOCK_FILTERS = 64  # channels each dense block adds and each improvement block refines


class MeliusNet(nn.Module):
  """A grouped-convolution stem, then sections of (dense block, improvement block) pairs with
  real-valued 1×1 transitions between them.

  A dense block concatenates a binary 3×3 convolution's 64 new channels to its input; the
  improvement block after it adds another binary convolution's output to the newest 64 channels
  (a Lambda that pads it with zeros in front), so the binary layers refine the features they
  made. ``batch_norm_momentum`` is larq-zoo's Field; each variant sets ``num_blocks`` and
  ``transition_features`` (None: no transition) as larq-zoo's concrete factories do.
  ``width_divisor`` divides every convolution's filter count (rounded down, at least 1; a
  grouped convolution's per-group count), for reduced test models: larq-zoo writes these widths
  into its code. ``cifar_stem`` runs the stem's first convolution at stride 1 and drops its max
  pool (the same weights).
  """
  num_classes: int = 1000
  batch_norm_momentum: float = 0.9
  width_divisor: int = 1
  cifar_stem: Optional[bool] = None  # None: larq-zoo's (ImageNet) stem
  dtype: Any = jnp.float32

  num_blocks: ClassVar[Sequence[int]]
  transition_features: ClassVar[Sequence[Optional[int]]]

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = self.group_stem(g, images, "stem")
    for i, (blocks, features) in enumerate(zip(self.num_blocks, self.transition_features)):
      for j in range(blocks):
        x = self.dense_block(g, x, f"section_{i}_block_{j}_dense")
        x = self.improvement_block(g, x, f"section_{i}_block_{j}_improve")
      if features:
        x = self.transition_block(g, x, features, f"section_{i}_transition")
    x = g.activation(self.norm(g, x, "head_bn"), "relu", name="head_relu")
    g.top()
    x = g.global_pool(x, name="head_globalpool")
    x = g.dense(x, self.num_classes, kernel_init=glorot_normal, name="head_dense")
    return g.logits(x, name="head_softmax")

  def width(self, filters: int) -> int:
    return max(1, filters // self.width_divisor)

  def norm(self, g: Graph, x, name: str):
    return g.batch_normalization(x, momentum=self.batch_norm_momentum, epsilon=1e-5, name=name)

  def group_conv(self, g: Graph, x, filters: int, groups: int, name: str):
    """A 3×3 convolution in ``groups`` groups as larq-zoo writes it: a Lambda of ``tf.split``,
    one Conv2D per group, a Lambda of ``tf.concat``."""
    if x.shape[-1] % groups:
      raise ConfigError(f"MeliusNet {name}: {x.shape[-1]} input channels do not split into "
                        f"{groups} groups (width_divisor {self.width_divisor} too large)")
    pieces = g.op("lambda", lambda v: tuple(jnp.split(v, groups, axis=-1)), x,
                  name=f"{name}_split")
    outputs = [g.conv2d(piece, self.width(filters // groups), 3, padding="same", use_bias=False,
                        kernel_init=glorot_normal, name=f"{name}_conv{i}")
               for i, piece in enumerate(pieces)]
    return g.op("lambda", lambda *v: jnp.concatenate(v, axis=-1), *outputs, name=f"{name}_concat")

  def group_stem(self, g: Graph, x, name: str):
    x = g.conv2d(x, self.width(32), 3, strides=1 if self.cifar_stem else 2, padding="same",
                 use_bias=False, kernel_init=glorot_normal, name=f"{name}_s0_conv")
    x = g.activation(self.norm(g, x, f"{name}_s0_bn"), "relu", name=f"{name}_s0_relu")
    x = self.group_conv(g, x, 32, 4, f"{name}_s1_groupconv")
    x = g.activation(self.norm(g, x, f"{name}_s1_bn"), "relu", name=f"{name}_s1_relu")
    x = self.group_conv(g, x, 64, 8, f"{name}_s2_groupconv")
    x = g.activation(self.norm(g, x, f"{name}_s2_bn"), "relu", name=f"{name}_s2_relu")
    return x if self.cifar_stem else self.pool(g, x, f"{name}_pool")

  @staticmethod
  def pool(g: Graph, x, name: str):
    return g.max_pool2d(x, 2, 2, "same", name=name)

  def binary_conv(self, g: Graph, x, name: str):
    return g.quant_conv2d(x, self.width(BLOCK_FILTERS), 3, padding="same", use_bias=False,
                          input_quantizer=STE_SIGN_13, kernel_quantizer=STE_SIGN_13,
                          kernel_init=glorot_normal, name=name)

  def dense_block(self, g: Graph, x, name: str):
    w = self.binary_conv(g, self.norm(g, x, f"{name}_bn"), f"{name}_binconv")
    return g.op("lambda", lambda a, b: jnp.concatenate([a, b], axis=-1), x, w,
                name=f"{name}_concat")

  def improvement_block(self, g: Graph, x, name: str):
    w = self.binary_conv(g, self.norm(g, x, f"{name}_bn"), f"{name}_binconv")
    front = x.shape[-1] - w.shape[-1]  # w refines the newest channels
    return g.op("lambda", lambda a, b: a + jnp.pad(b, ((0, 0), (0, 0), (0, 0), (front, 0))),
                x, w, name=f"{name}_merge")

  def transition_block(self, g: Graph, x, features: int, name: str):
    x = self.pool(g, self.norm(g, x, f"{name}_bn"), f"{name}_maxpool")
    x = g.activation(x, "relu", name=f"{name}_relu")
    return g.conv2d(x, self.width(features), 1, use_bias=False, kernel_init=glorot_normal,
                    name=f"{name}_pw")


class MeliusNet22(MeliusNet):
  num_blocks = (4, 5, 4, 4)
  transition_features = (160, 224, 256, None)
