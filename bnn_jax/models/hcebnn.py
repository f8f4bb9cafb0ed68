"""High-Capacity Expert Binary Networks (Bulat, Martinez, Tzimiropoulos, ICLR 2021).

The backbone of the official code (1adrianb/expert-binary-networks, ``models/eb_resnet.py``):
a real-valued stem (``dabnn`` or ``basic``), four stages of pre-activation blocks of expert
binary convolutions (:class:`bnn_jax.layers.ExpertBinaryConv`) and a real-valued decomposed
downsample. Module names are the official training model's (``conv1.conv2_1.0``,
``layer1.0.conv1``, ``layer1.0.act1``, ``layer1.0.downsample.4``), so its state dicts convert
leaf by leaf; ``released_form`` builds the released inference model's variant (block
BatchNorm eps 1e-4; downsample convs with a scale and without SE), whose keys
:func:`bnn_jax.convert.hcebnn_training_keys` renames.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax.binarize import EDE, BinarizerPair
from bnn_jax.errors import ConfigError
from bnn_jax.layers import (BatchNorm, ExpertBinaryConv, PReLU, avg_pool_ceil, conv,
                            max_pool_3x3_s2)
from bnn_jax.models.backbones import sow_block_output

STAGE_WIDTHS = (64, 128, 256, 512)  # times ``expansion``
STRICT_STE_SIGN = {"name": "ste_sign", "closed": False}  # the official SignActivation
STEMS = ("dabnn", "basic", "cifar")  # cifar: 3×3/1 conv → BN → ReLU, for 8×8 to 32×32 inputs


class ConvBNReLU(nn.Module):
  """Real conv → BN → ReLU, children ``0`` and ``1`` as the official ``nn.Sequential``."""
  features: int
  kernel_size: int
  strides: int = 1
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = conv(self.features, self.kernel_size, self.strides, "0", self.dtype)(x)
    x = BatchNorm(not train, self.bn_group_size, dtype=self.dtype, name="1")(x)
    return nn.relu(x)


class DaBNNStem(nn.Module):
  """dabnn's stem: 3×3/2 conv, then a 1×1 → 3×3/2 branch next to a max-pool, concatenated, 1×1."""
  features: int = 64
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    unit = lambda f, k, s, name: ConvBNReLU(f, k, s, self.bn_group_size, self.dtype, name=name)  # noqa: E731
    x = unit(self.features // 2, 3, 2, "conv1")(x, train=train)
    branch = unit(self.features // 4, 1, 1, "conv2_1")(x, train=train)
    branch = unit(self.features // 2, 3, 2, "conv2_2")(branch, train=train)
    x = jnp.concatenate([branch, max_pool_3x3_s2(x)], axis=-1)
    return unit(self.features, 1, 1, "conv3")(x, train=train)


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
  """What every expert conv of one network shares; :meth:`conv` builds one."""
  num_experts: int = 4
  gate: str = "sigmoid"
  binarizers: BinarizerPair = (None, None)
  use_only_first: bool = False
  use_se: bool = True
  dtype: Any = jnp.float32

  def conv(self, features: int, kernel_size: int, strides: int = 1, groups: int = 1, *,
           name: str, real: bool = False, scale: bool = True, use_se: Optional[bool] = None
           ) -> ExpertBinaryConv:
    """An expert conv; ``real`` ones (the downsample's) never binarize and use expert 0 only,
    and so do convs with real activations (the official code forces expert 0 there)."""
    activations, weights = (None, None) if real else self.binarizers
    return ExpertBinaryConv(
        features, kernel_size, strides, groups, self.num_experts, self.gate, activations, weights,
        use_first_expert=real or activations is None or self.use_only_first, scale=scale,
        use_se=self.use_se if use_se is None else use_se, dtype=self.dtype, name=name)


class Downsample(nn.Module):
  """The real-valued shortcut: AvgPool → 1×1 C→C/r → BN → PReLU → 1×1 → BN → PReLU (r > 1), or
  AvgPool → 1×1 → BN (r = 1). Children named by the official ``nn.Sequential`` index.

  Its expert convs use expert 0 only; in the training code they carry SE and no scale, in the
  released model a scale and no SE (``released_form``).
  """
  features: int
  strides: int
  ratio: int
  experts: ExpertSettings
  released_form: bool = False
  bn_group_size: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = lambda name: BatchNorm(not train, self.bn_group_size, dtype=self.experts.dtype, name=name)  # noqa: E731
    unit = lambda features, name: self.experts.conv(  # noqa: E731
        features, 1, name=name, real=True, scale=self.released_form, use_se=not self.released_form)
    if self.strides != 1:
      x = avg_pool_ceil(x, self.strides)
    if self.ratio == 1:
      return bn("2")(unit(self.features, "1")(x))
    x = PReLU(name="3")(bn("2")(unit(x.shape[-1] // self.ratio, "1")(x)))
    return PReLU(name="6")(bn("5")(unit(self.features, "4")(x)))


class ExpertBlock(nn.Module):
  """Pre-activation block: x + PReLU(EBConv3×3(BN(x))), twice, then (``g_layer``) the same with an
  ungrouped 1×1 expert conv that mixes the groups. The first unit's shortcut is the downsample."""
  features: int
  strides: int
  groups: int
  experts: ExpertSettings
  downsample_ratio: Optional[int] = None  # None: identity shortcut
  g_layer: bool = True
  bn_eps: float = 1e-5
  released_form: bool = False
  bn_group_size: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    shortcut = x
    if self.downsample_ratio is not None:
      shortcut = Downsample(self.features, self.strides, self.downsample_ratio, self.experts,
                            self.released_form, self.bn_group_size, name="downsample")(x, train=train)
    units = [(3, self.strides, self.groups), (3, 1, self.groups)] + ([(1, 1, 1)] if self.g_layer else [])
    for index, (kernel_size, strides, groups) in enumerate(units, start=1):
      y = BatchNorm(not train, self.bn_group_size, epsilon=self.bn_eps, dtype=self.experts.dtype,
                    name=f"bn{index}")(x)
      y = self.experts.conv(self.features, kernel_size, strides, groups, name=f"conv{index}")(y, ede)
      x = PReLU(name=f"act{index}")(y) + shortcut
      shortcut = x
    return x


class EBResNet(nn.Module):
  """The HCEBNN backbone; defaults are the released ImageNet model's configuration.

  ``structure`` blocks per stage, ``groups`` of each stage's 3×3 convs, stage widths
  int(64·2^i · ``expansion``[i]), ``num_experts`` per conv, ``gate`` sigmoid (training) or
  softmax (released), ``g_layer`` (the 1×1 third unit), ``downsample_ratio`` r,
  ``binary_type`` (activations, weights) with ``binarizers`` (default: the official clipped
  sign, no gradient at ±1), ``use_only_first`` (expert 0 everywhere).
  """
  arch: str = "HCEBNN"  # a name for logs and checkpoints
  structure: Sequence[int] = (1, 2, 6, 2)
  groups: Sequence[int] = (4, 8, 8, 16)
  expansion: Sequence[float] = (2, 2, 2, 2)
  num_experts: int = 4
  gate: str = "sigmoid"
  use_se: bool = True
  g_layer: bool = True
  downsample_ratio: int = 4
  stem: str = "dabnn"
  stem_channels: int = 64
  binary_type: Tuple[bool, bool] = (True, True)
  binarizers: Optional[BinarizerPair] = None
  use_only_first: bool = False
  released_form: bool = False
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def stage_widths(self) -> Tuple[int, ...]:
    return tuple(int(width * factor) for width, factor in zip(STAGE_WIDTHS, self.expansion))

  @nn.compact
  def __call__(self, x, *, train: bool, ede: Optional[EDE] = None):
    if self.stem not in STEMS:
      raise ConfigError(f"unknown stem {self.stem!r}; valid: {list(STEMS)}")
    if not len(self.structure) == len(self.groups) == len(self.expansion) == 4:
      raise ConfigError("EBResNet needs four stages: structure, groups and expansion of length 4")
    if self.stem == "dabnn":
      x = DaBNNStem(self.stem_channels, self.bn_group_size, self.dtype, name="conv1")(x, train=train)
    else:
      basic = self.stem == "basic"
      x = conv(self.stem_channels, 7 if basic else 3, 2 if basic else 1, "conv1", self.dtype)(x)
      x = nn.relu(BatchNorm(not train, self.bn_group_size, dtype=self.dtype, name="bn1")(x))
      if basic:
        x = max_pool_3x3_s2(x)
    names = self.binarizers or (STRICT_STE_SIGN, STRICT_STE_SIGN)
    experts = ExpertSettings(
        self.num_experts, self.gate,
        tuple(name if on else None for name, on in zip(names, self.binary_type)),
        self.use_only_first, self.use_se, self.dtype)
    for stage, (depth, features, groups) in enumerate(zip(self.structure, self.stage_widths(),
                                                          self.groups)):
      for index in range(depth):
        strides = 2 if stage > 0 and index == 0 else 1
        reshape = strides != 1 or x.shape[-1] != features
        x = ExpertBlock(features, strides, groups, experts,
                        self.downsample_ratio if reshape else None, self.g_layer,
                        1e-4 if self.released_form else 1e-5, self.released_form,
                        self.bn_group_size, name=f"layer{stage + 1}.{index}")(x, train=train, ede=ede)
        sow_block_output(self, f"layer{stage + 1}.{index}", x)
    return x


def expand_experts(params: Any) -> Any:
  """``params`` with expert 0's kernel copied into every expert of each gated conv (the official
  ``--expansion-stage``: the downsample's expert-0-only convs are left as they are)."""
  def copy_first(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if names[-1] == "kernel" and jnp.ndim(leaf) == 5 and "downsample" not in names:
      return jnp.broadcast_to(leaf[:1], leaf.shape)
    return leaf
  return jax.tree_util.tree_map_with_path(copy_first, params)


def parameters_per_image(params: Any) -> int:
  """Parameters one image uses: all but the N−1 experts each expert conv leaves unselected."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(params):
    total += leaf.size // leaf.shape[0] if leaf.ndim == 5 else leaf.size
  return total
