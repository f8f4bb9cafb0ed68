"""larq-zoo's AlexNet family: XNORNet (Rastegari et al., 2016), DoReFaNet (Zhou et al., 2016) and
BinaryAlexNet (Hubara et al., 2016), layer for layer as larq-zoo 2.4's ``literature/`` builds them.

All three are AlexNet's five convolutions and a fully connected head, binary (or k-bit) everywhere
but the first layer and the classifier, with BatchNorms without ``gamma`` (``scale=False``) at
Keras momentum 0.9. larq-zoo writes their widths into its code; ``width_divisor`` divides every
convolution's and hidden dense layer's width (never ``num_classes``), as the fixtures reduce them.

What larq-zoo adds only to training stays out of the forward pass: the ``weight_clip`` kernel
constraint (latent kernels clipped to [−1, 1] after each update) and XNORNet's L2(5e-7) kernel
regularisers, which add to the optimised loss but not to the model's output.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE, BinarizerSpec, clip_closed
from bnn_jax.models.larq_zoo.functional import Graph


class AlexNetFamily(nn.Module):
  """What the three share: the class count, the width reduction, their quantized convolution
  and their BatchNorm. Subclasses set ``input_quantizer`` / ``kernel_quantizer``."""
  num_classes: int = 1000
  width_divisor: int = 1
  dtype: Any = jnp.float32

  input_quantizer = None  # class constants (or properties), not fields: larq-zoo fixes them
  kernel_quantizer = None

  def width(self, filters: int) -> int:
    """larq-zoo's ``filters`` reduced by ``width_divisor`` (rounded down, at least 1)."""
    return max(filters // self.width_divisor, 1)

  def quant_conv(self, g: Graph, x, filters: int, kernel_size: int, **options):
    """A bias-free QuantConv2D ("same") with the model's quantizers; ``options`` override."""
    options = {"input_quantizer": self.input_quantizer,
               "kernel_quantizer": self.kernel_quantizer, "padding": "same", **options}
    return g.quant_conv2d(x, filters, kernel_size, use_bias=False, **options)

  @staticmethod
  def batch_norm(g: Graph, x, epsilon: float = 1e-3):
    return g.batch_normalization(x, momentum=0.9, epsilon=epsilon, scale=False)

  @staticmethod
  def max_pool(g: Graph, x, padding: str = "valid"):
    return g.max_pool2d(x, 3, 2, padding)


class XNORNet(AlexNetFamily):
  """XNOR-Net: ste_sign inputs, kernels α·sign(W) per output channel; a 6×6 "fully connected"
  convolution and, on top, a 1×1 one before the float Dense classifier."""
  input_quantizer = "ste_sign"
  kernel_quantizer = "xnor_weight_scale"

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = g.conv2d(images, self.width(96), 11, strides=4, padding="same", use_bias=False)
    x = g.activation(self.batch_norm(g, x, 1e-5), "relu")
    x = self.batch_norm(g, self.max_pool(g, x), 1e-4)
    x = self.quant_conv(g, x, self.width(256), 5)
    x = self.batch_norm(g, self.max_pool(g, x), 1e-4)
    for filters in (384, 384):
      x = self.batch_norm(g, self.quant_conv(g, x, self.width(filters), 3), 1e-4)
    x = self.quant_conv(g, x, self.width(256), 3)
    x = self.batch_norm(g, self.max_pool(g, x), 1e-4)
    x = self.batch_norm(g, self.quant_conv(g, x, self.width(4096), 6, padding="valid"), 1e-4)
    g.top()
    x = self.batch_norm(g, self.quant_conv(g, x, self.width(4096), 1, padding="valid"))
    x = g.flatten(g.activation(x, "relu"))
    return g.logits(g.dense(x, self.num_classes, use_bias=False))


def clip_unit(x):
  """larq-zoo's ``clip_by_value_activation``: x clipped to [0, 1], tf.clip_by_value's gradient."""
  return clip_closed(x, 0.0, 1.0)


class DoReFaNet(AlexNetFamily):
  """DoReFa-Net: ``activations_k_bit``-bit DoReFa inputs and sign(W)·mean|W| kernels (the scale
  per layer, the gradient the identity); a float first convolution with bias, BatchNorm before
  pooling, and two quantized Dense layers (with BatchNorms over 2-D inputs) on top."""
  activations_k_bit: int = 2
  kernel_quantizer = "magnitude_aware_sign_unclipped"

  @property
  def input_quantizer(self) -> BinarizerSpec:
    return {"name": "dorefa", "k_bit": self.activations_k_bit}

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = g.conv2d(images, self.width(96), 12, strides=4, padding="valid")
    x = self.conv_block(g, x, 256, 5, pool="same")
    x = self.conv_block(g, x, 384, 3, pool="same")
    x = self.conv_block(g, x, 384, 3)
    x = self.conv_block(g, x, 256, 3, pool="valid")
    g.top()
    x = g.flatten(x)
    for units in (4096, 4096):
      x = g.quant_dense(x, self.width(units), use_bias=False,
                        input_quantizer=self.input_quantizer,
                        kernel_quantizer=self.kernel_quantizer)
      x = self.batch_norm(g, x, 1e-4)
    x = g.op("activation", clip_unit, x)
    return g.logits(g.dense(x, self.num_classes))

  def conv_block(self, g: Graph, x, filters: int, kernel_size: int, pool: Optional[str] = None):
    """QuantConv2D and BatchNorm, then a max pool with ``pool`` padding (None: no pool)."""
    x = self.batch_norm(g, self.quant_conv(g, x, self.width(filters), kernel_size), 1e-4)
    return x if pool is None else self.max_pool(g, x, pool)


class BinaryAlexNet(AlexNetFamily):
  """Binarized Neural Networks' AlexNet: ste_sign inputs and kernels (float image into the first
  convolution), pooling before BatchNorm, and a head of 1×1 convolutions on the map reshaped to
  1×1 (the classifier binary too, with a BatchNorm, no Dense). ``inflation_ratio`` widens every
  convolution but the last."""
  inflation_ratio: int = 1
  input_quantizer = "ste_sign"
  kernel_quantizer = "ste_sign"

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    del ede
    g = Graph(images, train, self.dtype, module=self)
    x = self.conv_block(g, images, self.inflated(64), 11, strides=4, pool=True,
                        input_quantizer=None)
    x = self.conv_block(g, x, self.inflated(192), 5, pool=True)
    x = self.conv_block(g, x, self.inflated(384), 3)
    x = self.conv_block(g, x, self.inflated(384), 3)
    x = self.conv_block(g, x, self.width(256), 3, pool=True)
    g.top()
    x = g.reshape(x, (1, 1, x.shape[1] * x.shape[2] * x.shape[3]))
    for units in (self.width(4096), self.width(4096), self.num_classes):
      x = self.conv_block(g, x, units, 1, padding="valid")  # larq-zoo's dense_block
    return g.logits(g.flatten(x))

  def inflated(self, filters: int) -> int:
    return self.width(filters * self.inflation_ratio)

  def conv_block(self, g: Graph, x, filters: int, kernel_size: int, pool: bool = False,
                 **options):
    """QuantConv2D, a max pool if ``pool``, then BatchNorm."""
    x = self.quant_conv(g, x, filters, kernel_size, **options)
    return self.batch_norm(g, self.max_pool(g, x) if pool else x)
