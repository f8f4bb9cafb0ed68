"""larq-zoo's QuickNet family (QuickNetSmall, QuickNet, QuickNetLarge; Bannink et al., 2021),
layer for layer as larq-zoo 2.4's ``sota/quicknet.py`` builds it."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bnn_jax.binarize import EDE
from bnn_jax.layers.quant import glorot_normal, he_normal
from bnn_jax.models.larq_zoo.functional import Graph, STE_SIGN_125



def blur_kernel(channels: int) -> np.ndarray:
  """The 3×3 anti-aliasing (blur-pool) filter, [1, 2, 1]ᵀ[1, 2, 1] / 16, for each of ``channels``
  channels as a (3, 3, channels, 1) depthwise kernel (Zhang, 2019)."""
  taps = np.array([1.0, 2.0, 1.0])
  kernel = np.outer(taps, taps) / 16
  return np.repeat(kernel[:, :, None, None], channels, axis=2).astype(np.float32)


class QuickNet(nn.Module):
  """A stem, sections of binary residual blocks with blur-pool transitions, and a dense head.

  ``section_blocks`` / ``section_filters`` are larq-zoo's fields: QuickNet (4, 4, 4, 4) /
  (64, 128, 256, 512), QuickNetSmall's filters (32, 64, 256, 512), QuickNetLarge's blocks
  (6, 8, 12, 6). Binary convolutions pad their ±1 inputs with +1. ``cifar_stem`` runs the stem's
  two stride-2 convolutions at stride 1 (32×32 inputs then enter the first section as 56×56 ones
  after the ImageNet stem; the same weights).
  """
  num_classes: int = 1000
  section_blocks: Sequence[int] = (4, 4, 4, 4)
  section_filters: Sequence[int] = (64, 128, 256, 512)
  cifar_stem: Optional[bool] = None  # None: larq-zoo's (ImageNet) stem
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = self.stem(g, images, self.section_filters[0], strides=1 if self.cifar_stem else 2)
    for blocks, filters in zip(self.section_blocks, self.section_filters):
      for _ in range(blocks):
        if filters != x.shape[-1]:
          x = self.transition(g, x, filters, strides=2)
        x = self.residual(g, x)
    g.top()
    x = g.global_pool(g.activation(x, "relu"))
    return g.logits(g.quant_dense(x, self.num_classes, kernel_init=glorot_normal))

  @staticmethod
  def stem(g: Graph, x, filters: int, strides: int = 2):
    x = g.quant_conv2d(x, filters // 4, 3, strides=strides, padding="same", use_bias=False,
                       kernel_init=he_normal)
    x = g.activation(g.batch_normalization(x), "relu")
    x = g.quant_depthwise_conv2d(x, 3, strides=strides, padding="same", use_bias=False)
    x = g.batch_normalization(x, center=False, scale=False)
    x = g.quant_conv2d(x, filters, 1, use_bias=False, kernel_init=he_normal)
    return g.batch_normalization(x)

  @staticmethod
  def residual(g: Graph, x):
    y = g.quant_conv2d(x, x.shape[-1], 3, padding="same", pad_values=1.0, use_bias=False,
                       activation="relu", input_quantizer=STE_SIGN_125,
                       kernel_quantizer=STE_SIGN_125, kernel_init=glorot_normal)
    return g.plus(g.batch_normalization(y, momentum=0.9, epsilon=1e-5), x)

  @staticmethod
  def transition(g: Graph, x, filters: int, strides: int):
    x = g.max_pool2d(g.activation(x, "relu"), strides, 1)
    x = g.fixed_depthwise_conv2d(x, blur_kernel(x.shape[-1]), strides, "same")
    x = g.quant_conv2d(x, filters, 1, use_bias=False, kernel_init=glorot_normal)
    return g.batch_normalization(x, momentum=0.9, epsilon=1e-5)
