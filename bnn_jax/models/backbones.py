"""Backbones: ResArch (ResNet layout), MobileArch (ReActNet-A) and the real ResNet.

Each returns the last feature map (NHWC) and, when asked, every block's output
(:func:`sow_block_output`). Module names mirror the original
(``conv1``, ``bn1``, ``layer{i}.{j}``), which is what makes conversion a
leaf-by-leaf mapping.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE, BinarizerPair
from bnn_jax.errors import ConfigError
from bnn_jax.layers import SOWN, batch_norm, conv, make_activation, max_pool_3x3_s2
from bnn_jax.models import blocks

# arch -> (block, blocks per stage)
RES_ARCHS = {
    "IRNet-18": (blocks.IRNetBlock, (2, 2, 2, 2)),
    "IRNet-34": (blocks.IRNetBlock, (3, 4, 6, 3)),
    "BiRealNet-18": (blocks.BiRealNetBlock, (2, 2, 2, 2)),
    "BiRealNet-34": (blocks.BiRealNetBlock, (3, 4, 6, 3)),
    "ReActNet-18": (blocks.ReActNetBlockA, (2, 2, 2, 2)),
    "ReActNet-34": (blocks.ReActNetBlockA, (3, 4, 6, 3)),
    "StrongBaseline": (blocks.StrongBaselineBlock, (2, 2, 2, 2)),
    "Real2Bi": (blocks.RealToBinaryBlock, (2, 2, 2, 2)),
    "Real2BiFP": (blocks.RealToBinaryFPBlock, (2, 2, 2, 2)),
    "ResNet-18": (blocks.BasicBlock, (2, 2, 2, 2)),
    "ResNet-34": (blocks.BasicBlock, (3, 4, 6, 3)),
}

# arch -> (block, stages as (channels, blocks, stride))
MOBILE_ARCHS = {
    "ReActNet-A": (blocks.ReActNetBlockB,
                   ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))),
}


def _lookup(table: dict, arch: str, backbone: str):
  if arch not in table:
    raise ConfigError(f"unknown arch {arch!r} for backbone {backbone}; valid: {sorted(table)}")
  return table[arch]


BLOCK_OUTPUTS = SOWN  # the collection Flax's init leaves out


def sow_block_output(module: nn.Module, name: str, x) -> None:
  """Records a block's output in the ``intermediates`` collection when the caller asks for it
  (``apply(..., mutable=[BLOCK_OUTPUTS])``): what attention transfer compares. A no-op otherwise."""
  module.sow(BLOCK_OUTPUTS, "blocks", {name: x}, reduce_fn=lambda seen, new: {**seen, **new},
             init_fn=dict)


_REQUESTED: contextvars.ContextVar = contextvars.ContextVar("requested_layers", default=())


@contextlib.contextmanager
def requesting_layers(names: Sequence[str]) -> Iterator[None]:
  """Within: models whose layers have names of their own (the Keras-style larq-zoo models, which
  have no blocks of ours) also record, as block outputs under each of ``names``, the output of
  the one layer whose name contains it (larq-zoo's partial-name lookup: ``"block_2_out"`` finds
  ``r2b_fp_block_2_out``). Other models ignore it."""
  token = _REQUESTED.set(tuple(names))
  try:
    yield
  finally:
    _REQUESTED.reset(token)


def requested_layers() -> Tuple[str, ...]:
  """The names :func:`requesting_layers` asks for here (empty outside it)."""
  return _REQUESTED.get()


class ResArch(nn.Module):
  """ResNet-layout backbone: stem → 4 stages of residual blocks.

  ``cifar_stem`` replaces the 7×7/2 conv + max-pool with a 3×3/1 conv for
  32×32 inputs. An average pool follows the last stage when its stride is 1.
  """
  arch: str
  stem_channels: int = 64
  base_channels: int = 64
  strides: Sequence[int] = (1, 2, 2, 2)
  avg_down: bool = False
  stem_act: Optional[str] = None
  binary_type: Tuple[bool, bool] = (True, True)
  binarizers: Optional[BinarizerPair] = None
  cifar_stem: bool = False
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    block, depths = _lookup(RES_ARCHS, self.arch, "ResArch")
    if self.cifar_stem:
      x = conv(self.stem_channels, 3, 1, "conv1", self.dtype)(x)
    else:
      x = conv(self.stem_channels, 7, 2, "conv1", self.dtype)(x)
    x = make_activation(self.stem_act)(batch_norm(train, "bn1", self.dtype, self.bn_group_size)(x))
    if not self.cifar_stem:
      x = max_pool_3x3_s2(x)
    features = self.base_channels
    for stage, (depth, stride) in enumerate(zip(depths, self.strides)):
      for index in range(depth):
        first = index == 0
        x = block(features, strides=stride if first else 1,
                  downsample=first and (stride != 1 or x.shape[-1] != features),
                  avg_down=self.avg_down, binary_type=tuple(self.binary_type),
                  binarizers=self.binarizers, bn_group_size=self.bn_group_size, dtype=self.dtype,
                  name=f"layer{stage + 1}.{index}")(x, train=train, ede=ede)
        sow_block_output(self, f"layer{stage + 1}.{index}", x)
      features *= 2
    if self.strides[-1] == 1:
      x = nn.avg_pool(x, (2, 2), (2, 2))
    return x


class MobileArch(nn.Module):
  """MobileNet-layout backbone of ReActNet-A: 3×3/2 conv + BN stem, then stages of block B."""
  arch: str = "ReActNet-A"
  stem_channels: int = 32
  layers_cfg: Optional[Sequence[Sequence[int]]] = None
  stem_act: Optional[str] = None
  binary_type: Tuple[bool, bool] = (True, True)
  binarizers: Optional[BinarizerPair] = None
  cifar_stem: bool = False
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    block, default_stages = _lookup(MOBILE_ARCHS, self.arch, "MobileArch")
    stem = StemConv(self.stem_channels, 1 if self.cifar_stem else 2, self.bn_group_size, self.dtype,
                    name="conv1")
    x = make_activation(self.stem_act)(stem(x, train=train))
    for stage, (features, depth, stride) in enumerate(self.layers_cfg or default_stages):
      for index in range(depth):
        x = block(features, strides=stride if index == 0 else 1,
                  binary_type=tuple(self.binary_type), binarizers=self.binarizers,
                  bn_group_size=self.bn_group_size, dtype=self.dtype,
                  name=f"layer{stage + 1}.{index}")(x, train=train, ede=ede)
        sow_block_output(self, f"layer{stage + 1}.{index}", x)
    return x


class StemConv(nn.Module):
  """mmcv's ConvModule without activation: 3×3 conv → BN (children ``conv``, ``bn``)."""
  features: int
  strides: int
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = conv(self.features, 3, self.strides, "conv", self.dtype)(x)
    return batch_norm(train, "bn", self.dtype, self.bn_group_size)(x)


BACKBONES = {"ResArch": ResArch, "MobileArch": MobileArch}
