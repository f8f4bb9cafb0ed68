"""larq-zoo's Bi-Real Net (Liu et al., 2018), layer for layer as larq-zoo 2.4's
``literature/birealnet.py`` builds it: larq's own version, which differs from the PyTorch one
bnn_jax's ``ResArch`` "Bi-Real-18" reproduces (no stem ReLU, BatchNorm momentum 0.8 and Keras'
epsilon, binary weights scaled by their mean magnitude per output channel)."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.layers.quant import glorot_normal
from bnn_jax.models.larq_zoo.functional import Graph


class BiRealNet(nn.Module):
  """A 7×7 stem and 16 binary 3×3 convolutions, each with its own shortcut (average-pooled and
  1×1-projected where the width doubles), then a dense classifier.

  ``filters`` is larq-zoo's field (64). larq's WeightClip on the binary kernels is an
  optimizer-side constraint, not part of the forward or gradient, so it is not here.
  ``cifar_stem`` runs the 7×7 conv at stride 1 and drops the max pool (the same weights).
  """
  num_classes: int = 1000
  filters: int = 64
  cifar_stem: Optional[bool] = None  # None: larq-zoo's (ImageNet) stem
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = g.conv2d(images, self.filters, 7, strides=1 if self.cifar_stem else 2, padding="same",
                 use_bias=False, kernel_init=glorot_normal)
    x = g.batch_normalization(x, momentum=0.8)
    if not self.cifar_stem:
      x = g.max_pool2d(x, 3, 2, padding="same")
    x = self.residual(g, x, self.filters)
    for _ in range(3):
      x = self.residual(g, x, x.shape[-1])
    for _ in range(3):
      x = self.residual(g, x, 2 * x.shape[-1])
      for _ in range(3):
        x = self.residual(g, x, x.shape[-1])
    g.top()
    return g.logits(g.dense(g.global_pool(x), self.num_classes))

  @staticmethod
  def residual(g: Graph, x, filters: int):
    shortcut = x
    if x.shape[-1] != filters:
      shortcut = g.average_pool2d(x, 2, 2, padding="same")
      shortcut = g.conv2d(shortcut, filters, 1, use_bias=False, kernel_init=glorot_normal)
      shortcut = g.batch_normalization(shortcut, momentum=0.8)
    strides = 1 if x.shape[-1] == filters else 2
    x = g.quant_conv2d(x, filters, 3, strides=strides, padding="same", use_bias=False,
                       input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign",
                       kernel_init=glorot_normal)
    return g.add(g.batch_normalization(x, momentum=0.8), shortcut)
