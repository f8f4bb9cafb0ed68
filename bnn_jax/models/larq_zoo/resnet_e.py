"""larq-zoo's BinaryResNetE (Bethge et al., 2019, "Back to Simplicity"), layer for layer as
larq-zoo 2.4's ``literature/resnet_e.py`` builds it."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.errors import ConfigError
from bnn_jax.layers.quant import glorot_normal, he_normal
from bnn_jax.models.larq_zoo.functional import Graph, STE_SIGN_125


# num_layers -> (blocks per stage, widths per stage), larq-zoo's table
SPECS = {
    18: ((2, 2, 2, 2), (64, 128, 256, 512)),
    34: ((3, 4, 6, 3), (64, 128, 256, 512)),
    50: ((3, 4, 6, 3), (256, 512, 1024, 2048)),
    101: ((3, 4, 23, 3), (256, 512, 1024, 2048)),
    152: ((3, 8, 36, 3), (256, 512, 1024, 2048)),
}


class BinaryResNetE(nn.Module):
  """A real stem, then every ResNet block's two convolutions as two single-conv binary blocks,
  each with its own shortcut (what "E" adds), downsampling shortcuts average-pooled.

  ``num_layers`` picks larq-zoo's stage ``spec`` (blocks, widths); ``spec`` overrides it, as a
  fixture does. Images under 50 pixels get larq-zoo's CIFAR stem (one 3×3 conv, no pooling);
  ``cifar_stem`` True or False builds that stem or the ImageNet one whatever the input size.
  larq's WeightClip(1.25) on the binary kernels is an optimizer-side constraint, not part of the
  forward or gradient, so it is not here.
  """
  num_classes: int = 1000
  num_layers: int = 18
  initial_filters: int = 64
  spec: Optional[Sequence[Sequence[int]]] = None
  cifar_stem: Optional[bool] = None  # None: larq-zoo's choice by the input size
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = self.stem(g, images)
    for stage, (blocks, filters) in enumerate(zip(*self.stage_spec())):
      for layer in range(2 * blocks):  # each ResNet block is two binary blocks here
        x = self.residual(g, x, filters, strides=2 if stage > 0 and layer == 0 else 1)
    x = g.activation(x, "relu")
    g.top()
    x = g.dense(g.global_pool(x), self.num_classes, kernel_init=glorot_normal)
    return g.logits(x)

  def stage_spec(self):
    if self.spec is not None:
      return self.spec
    if self.num_layers not in SPECS:
      raise ConfigError(f"BinaryResNetE has no num_layers={self.num_layers}; valid: "
                        f"{sorted(SPECS)}")
    return SPECS[self.num_layers]

  def stem(self, g: Graph, x):
    cifar = x.shape[1] < 50 if self.cifar_stem is None else self.cifar_stem
    if cifar:
      return g.conv2d(x, self.initial_filters, 3, padding="same", use_bias=False,
                      kernel_init=he_normal)
    x = g.conv2d(x, self.initial_filters, 7, strides=2, padding="same", use_bias=False,
                 kernel_init=he_normal)
    x = g.activation(g.batch_normalization(x, momentum=0.9, epsilon=1e-5), "relu")
    x = g.max_pool2d(x, 3, 2, padding="same")
    return g.batch_normalization(x, momentum=0.9, epsilon=1e-5)

  @staticmethod
  def residual(g: Graph, x, filters: int, strides: int):
    shortcut = x
    if x.shape[-1] != filters:
      shortcut = g.average_pool2d(x, 2, 2)
      shortcut = g.conv2d(shortcut, filters, 1, use_bias=False, kernel_init=glorot_normal)
      shortcut = g.batch_normalization(shortcut, momentum=0.9, epsilon=1e-5)
    x = g.quant_conv2d(x, filters, 3, strides=strides, padding="same", use_bias=False,
                       input_quantizer=STE_SIGN_125, kernel_quantizer=STE_SIGN_125,
                       kernel_init=glorot_normal)
    return g.add(g.batch_normalization(x, momentum=0.9, epsilon=1e-5), shortcut)
