"""One residual block per method, structurally identical to the original.

Every block has the call signature ``block(x, *, train, ede)`` and names its
sub-modules as the original does (``conv1``, ``bn1``, ``move1``, ``prelu1``,
``downsample``…), so that PyTorch state dicts map onto the Flax tree by path.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE, BinarizerPair as Binarizers
from bnn_jax.layers import (AttentionScale, BinaryConv, LearnableBias, LearnableScale, PReLU,
                            RPReLU, avg_pool_ceil, batch_norm, conv, hardtanh)

STE_SIGN_1_25 = {"name": "ste_sign", "clip": 1.25}  # Real-to-Binary's activations and weights


class Downsample(nn.Module):
  """The shortcut of a block that changes shape: [AvgPool] → 1×1 real conv → BN.

  Child names are the original's ``nn.Sequential`` indices, so that ``avg_down``
  puts the conv at ``downsample.1`` as in its state dicts.
  """
  features: int
  strides: int
  avg_down: bool = False
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    pool = self.avg_down and self.strides != 1
    if pool:
      x = avg_pool_ceil(x, self.strides)
    x = conv(self.features, 1, 1 if pool else self.strides, name=str(int(pool)), dtype=self.dtype)(x)
    return batch_norm(train, str(int(pool) + 1), self.dtype, self.bn_group_size)(x)


class ResBlock(nn.Module):
  """Fields and helpers shared by the ResNet-layout blocks (two 3×3 convs).

  ``binarizers`` is the pair (activations, weights) of binarizers (:func:`bnn_jax.binarize.get`)
  the method uses; ``binary_type`` switches each half on or off; ``bn_group_size`` is the
  ghost-batch size of every BatchNorm (:class:`bnn_jax.layers.BatchNorm`).
  """
  features: int
  strides: int = 1
  downsample: bool = False
  avg_down: bool = False
  binary_type: Tuple[bool, bool] = (True, True)
  binarizers: Optional[Binarizers] = None
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  default_binarizers: ClassVar[Binarizers] = (None, None)

  def conv_binarizers(self) -> Binarizers:
    act, weight = self.binarizers or self.default_binarizers
    return (act if self.binary_type[0] else None, weight if self.binary_type[1] else None)

  def binary_conv(self, name: str, strides: int = 1, kernel_size: int = 3,
                  features: Optional[int] = None) -> BinaryConv:
    act, weight = self.conv_binarizers()
    return BinaryConv(features or self.features, kernel_size, strides, activation_binarizer=act,
                      weight_binarizer=weight, dtype=self.dtype, name=name)

  def bn(self, train: bool, name: str) -> nn.Module:
    return batch_norm(train, name, self.dtype, self.bn_group_size)

  def shortcut(self, x, train: bool):
    if not self.downsample:
      return x
    return Downsample(self.features, self.strides, self.avg_down, self.bn_group_size, self.dtype,
                      name="downsample")(x, train=train)


class IRNetBlock(ResBlock):
  """IR-Net: binary conv → BN, add the shortcut, hardtanh; twice."""
  default_binarizers: ClassVar[Binarizers] = ("ede_sign", "irnet_weight")

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    out = self.bn(train, "bn1")(self.binary_conv("conv1", self.strides)(x, ede))
    out = hardtanh(out + self.shortcut(x, train))
    out = out + self.bn(train, "bn2")(self.binary_conv("conv2")(out, ede))
    return hardtanh(out)


class BiRealNetBlock(ResBlock):
  """Bi-Real Net: a real shortcut around every binary conv → BN."""
  default_binarizers: ClassVar[Binarizers] = ("approx_sign", "scaled_ste_sign")

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    out = self.bn(train, "bn1")(self.binary_conv("conv1", self.strides)(x, ede))
    out = out + self.shortcut(x, train)
    return out + self.bn(train, "bn2")(self.binary_conv("conv2")(out, ede))


class ReActNetBlockA(ResBlock):
  """ReActNet, ResNet layout: RSign shift → binary conv → BN, shortcut, RPReLU; twice."""
  default_binarizers: ClassVar[Binarizers] = ("approx_sign", "scaled_ste_sign")

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    out = LearnableBias(name="move1")(x)
    out = self.bn(train, "bn1")(self.binary_conv("conv1", self.strides)(out, ede))
    out = RPReLU(name="prelu1")(out + self.shortcut(x, train))
    residual = out
    out = LearnableBias(name="move2")(out)
    out = self.bn(train, "bn2")(self.binary_conv("conv2")(out, ede))
    return RPReLU(name="prelu2")(out + residual)


class RealToBinaryBlock(ResBlock):
  """Real-to-Binary Net: BN → binary conv → attention scale → PReLU, shortcut; twice."""
  default_binarizers: ClassVar[Binarizers] = (STE_SIGN_1_25, STE_SIGN_1_25)
  scale: str = "attention"

  def make_scale(self, name: str) -> nn.Module:
    return AttentionScale(dtype=self.dtype, name=name) if self.scale == "attention" else (
        LearnableScale(name=name))

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    out = self.binary_conv("conv1", self.strides)(self.bn(train, "bn1")(x), ede)
    out = PReLU(name="nonlinear1")(self.make_scale("scale1")(out))
    out = out + self.shortcut(x, train)
    residual = out
    out = self.binary_conv("conv2")(self.bn(train, "bn2")(out), ede)
    out = PReLU(name="nonlinear2")(self.make_scale("scale2")(out))
    return out + residual


class StrongBaselineBlock(RealToBinaryBlock):
  """Real-to-Binary's strong baseline: the same block with XNOR-Net++'s learnable scale."""
  scale: str = "learnable"


class RealToBinaryFPBlock(RealToBinaryBlock):
  """Real-to-Binary's real-valued stage: tanh in place of sign, real weights, always."""

  def conv_binarizers(self) -> Binarizers:
    return ("tanh", None)


class BasicBlock(ResBlock):
  """The real-valued ResNet-18/34 block in torchvision's layout (the KD teacher)."""

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    del ede
    out = nn.relu(self.bn(train, "bn1")(conv(self.features, 3, self.strides, "conv1", self.dtype)(x)))
    out = self.bn(train, "bn2")(conv(self.features, 3, 1, "conv2", self.dtype)(out))
    return nn.relu(out + self.shortcut(x, train))


class ReActNetBlockB(ResBlock):
  """ReActNet-A (MobileNet layout): binary 3×3 conv, then a binary 1×1 conv.

  When the width doubles, the 1×1 conv is two convs whose outputs are
  concatenated, each added to the block's middle activation; a strided block
  average-pools its shortcut.
  """
  default_binarizers: ClassVar[Binarizers] = ("approx_sign", "scaled_ste_sign")

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    in_features = x.shape[-1]
    out1 = LearnableBias(name="move1")(x)
    out1 = self.binary_conv("binary_3x3", self.strides, features=in_features)(out1, ede)
    out1 = self.bn(train, "bn1")(out1)
    if self.strides == 2:
      x = nn.avg_pool(x, (2, 2), (2, 2))
    out1 = RPReLU(name="prelu1")(x + out1)
    out2 = LearnableBias(name="move2")(out1)
    if in_features == self.features:
      out2 = self.bn(train, "bn2")(self.binary_conv("binary_pw", kernel_size=1)(out2, ede)) + out1
    elif self.features == 2 * in_features:
      halves = [self.bn(train, f"bn2_{i}")(
          self.binary_conv(f"binary_pw_down{i}", kernel_size=1, features=in_features)(out2, ede)) + out1
                for i in (1, 2)]
      out2 = jnp.concatenate(halves, axis=-1)
    else:
      raise ValueError(f"ReActNet block B maps C to C or 2C channels; got {in_features} -> {self.features}")
    return RPReLU(name="prelu2")(out2)
