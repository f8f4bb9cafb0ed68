"""larq-zoo's BinaryDenseNet family (BinaryDenseNet28, 37, 37Dilated, 45; Bethge et al., 2019),
layer for layer as larq-zoo 2.4's ``literature/densenet.py`` builds it."""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.layers.quant import glorot_normal, he_normal
from bnn_jax.models.larq_zoo.functional import Graph, STE_SIGN_13



def transition_filters(channels: int, reduction: float) -> int:
  """larq-zoo's transition width: ``channels`` divided by ``reduction`` (floored), rounded to a
  multiple of 32 as Python's ``round`` does (half to even: 0.5 -> 0)."""
  return round(channels // reduction / 32) * 32


class BinaryDenseNet(nn.Module):
  """A stem, dense blocks of binary 3×3 convolutions whose outputs are concatenated to their
  inputs, and real-valued 1×1 transitions that shrink the width by ``reduction``.

  ``initial_filters`` (stem width) and ``growth_rate`` (channels each binary layer adds) are
  larq-zoo's Fields. Each variant sets, as larq-zoo's concrete factories do, the binary layers
  per block (larq-zoo's ``layers``), the transitions' ``reduction`` and each block's
  ``dilation_rate``: a dilated block keeps the resolution, so the transition before it has no
  max pool. Inputs under 50 pixels get larq-zoo's CIFAR stem, a 3×3 convolution without pooling;
  ``cifar_stem`` True or False builds that stem or the ImageNet one whatever the input size.
  """
  num_classes: int = 1000
  initial_filters: int = 64
  growth_rate: int = 64
  cifar_stem: Optional[bool] = None  # None: larq-zoo's choice by the input size
  dtype: Any = jnp.float32

  layers_per_block: ClassVar[Sequence[int]]
  reduction: ClassVar[Sequence[float]]
  dilation_rate: ClassVar[Sequence[int]]

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = self.stem(g, images)
    last = len(self.layers_per_block) - 1
    for block, layers in enumerate(self.layers_per_block):
      for _ in range(layers):
        x = self.densely_connected(g, x, self.dilation_rate[block])
      if block < last:
        x = self.transition(g, x, self.reduction[block], pool=self.dilation_rate[block + 1] == 1)
    x = g.activation(norm(g, x), "relu")
    g.top()
    x = g.global_pool(x)
    return g.logits(g.dense(x, self.num_classes, kernel_init=he_normal))

  def stem(self, g: Graph, images):
    cifar = images.shape[1] < 50 if self.cifar_stem is None else self.cifar_stem
    if cifar:
      return g.conv2d(images, self.initial_filters, 3, padding="same", use_bias=False,
                      kernel_init=he_normal)
    x = g.conv2d(images, self.initial_filters, 7, strides=2, padding="same", use_bias=False,
                 kernel_init=he_normal)
    x = g.activation(norm(g, x), "relu")
    return g.max_pool2d(x, 3, 2, "same")

  def densely_connected(self, g: Graph, x, dilation: int):
    y = g.quant_conv2d(norm(g, x), self.growth_rate, 3, dilation=dilation, padding="same",
                       use_bias=False, input_quantizer=STE_SIGN_13, kernel_quantizer=STE_SIGN_13,
                       kernel_init=glorot_normal)
    return g.concatenate(x, y)

  @staticmethod
  def transition(g: Graph, x, reduction: float, pool: bool):
    x = norm(g, x)
    if pool:
      x = g.max_pool2d(x, 2, 2)
    x = g.activation(x, "relu")
    return g.conv2d(x, transition_filters(x.shape[-1], reduction), 1, use_bias=False,
                    kernel_init=he_normal)


def norm(g: Graph, x):
  """BinaryDenseNet's BatchNormalization (momentum 0.9, epsilon 1e-5)."""
  return g.batch_normalization(x, momentum=0.9, epsilon=1e-5)


class BinaryDenseNet28(BinaryDenseNet):
  layers_per_block = (6, 6, 6, 5)
  reduction = (2.7, 2.7, 2.2)
  dilation_rate = (1, 1, 1, 1)


class BinaryDenseNet37(BinaryDenseNet):
  layers_per_block = (6, 8, 12, 6)
  reduction = (3.3, 3.3, 4)
  dilation_rate = (1, 1, 1, 1)


class BinaryDenseNet37Dilated(BinaryDenseNet):
  layers_per_block = (6, 8, 12, 6)
  reduction = (3.3, 3.3, 4)
  dilation_rate = (1, 1, 2, 4)


class BinaryDenseNet45(BinaryDenseNet):
  layers_per_block = (6, 12, 14, 8)
  reduction = (2.7, 3.3, 4)
  dilation_rate = (1, 1, 1, 1)
