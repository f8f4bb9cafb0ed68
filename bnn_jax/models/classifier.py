"""Classifier = backbone → neck → linear head, the original's ImageClassifier."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.binarize import EDE
from bnn_jax.layers import batch_norm

NECKS = ("gap", "gap_bn")


class Neck(nn.Module):
  """Global average pooling, followed by BatchNorm1d for IR-Net's ``gap_bn``."""
  kind: str = "gap"
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = jnp.mean(x, axis=(1, 2))
    if self.kind == "gap_bn":
      x = batch_norm(train, "bn", self.dtype, self.bn_group_size)(x)
    return x


class Head(nn.Module):
  """mmcls' LinearClsHead: one Dense layer named ``fc`` (init N(0, 0.01), as mmcls)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=nn.initializers.normal(0.01), name="fc")(x)


class Classifier(nn.Module):
  """``apply(variables, images, train=..., ede=...)`` → float32 logits (float64 for a float64 model).

  ``ede`` is IR-Net's (k, t); other methods ignore it. ``neck=None``: the backbone is a whole
  model, its classifier included (larq-zoo's), and returns the logits itself.
  """
  backbone: nn.Module
  num_classes: int
  neck: Optional[str] = "gap"
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, ede: Optional[EDE] = None):
    x = self.backbone(images.astype(self.dtype), train=train, ede=ede)
    if self.neck is None:
      return x.astype(jnp.promote_types(self.dtype, jnp.float32))
    x = Neck(self.neck, self.bn_group_size, self.dtype, name="neck")(x, train=train)
    logits = Head(self.num_classes, self.dtype, name="head")(x)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
