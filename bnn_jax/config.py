"""The default configuration every recipe in configs/ starts from.

Sections: ``model`` (see :func:`bnn_jax.models.build_model`; a ``None`` field
means the backbone's default), ``dataset``, ``optimizer``, ``schedule``, ``ede``,
``loss`` and ``train``. Every field exists here, so any of them can be set from
the command line (``--config.train.epochs=5``) and a typo is an error. Fields
that default to ``None`` are typed placeholders, so they can be set there too
(``--config.dataset.path=DIR``, ``--config.model.strides='(1, 2, 2, 1)'``).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from bnn_jax.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      backbone="ResArch", arch="ReActNet-18", num_classes=1000, neck="gap", dtype="float32",
      stem_channels=placeholder(int), base_channels=placeholder(int), strides=placeholder(tuple),
      avg_down=placeholder(bool), stem_act=placeholder(str), binary_type=placeholder(tuple),
      binarizers=placeholder(tuple), cifar_stem=placeholder(bool), layers_cfg=placeholder(tuple)))
  c.dataset = imagenet()
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0, norm_decay_mult=1.0,
      grad_clip=placeholder(float), b1=0.9, b2=0.999, eps=1e-8))
  c.schedule = ml_collections.ConfigDict(dict(
      name="constant", by_epoch=True, milestones=placeholder(tuple), gamma=0.1, power=1.0, min_lr=0.0,
      warmup=placeholder(str), warmup_iters=0, warmup_ratio=0.1))
  # IR-Net's Error Decay Estimator; epochs None = the whole run.
  c.ede = ml_collections.ConfigDict(dict(enabled=False, epochs=placeholder(int), t_min=0.1, t_max=10.0))
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  c.train = ml_collections.ConfigDict(dict(
      epochs=100, batch_size=256, eval_batch_size=placeholder(int), seed=166, log_every=100,
      eval_every_epochs=1, checkpoint_every_epochs=1, max_to_keep=3, max_steps=placeholder(int),
      load_from=placeholder(str), progress=True, plot=True))
  return c


def imagenet(colour_jitter: bool = False) -> ml_collections.ConfigDict:
  """ImageNet as the original: RandomResizedCrop 224 + flip (+ colour jitter), eval 256 → 224."""
  return ml_collections.ConfigDict(dict(
      name="imagenet2012", path=placeholder(str), train_split="train", eval_split="validation",
      image_size=224, augment="imagenet_colorjitter" if colour_jitter else "imagenet",
      mean=IMAGENET_MEAN, std=IMAGENET_STD, shuffle_buffer=16384))


def cifar10(path=None) -> ml_collections.ConfigDict:
  """CIFAR-10: TFDS when ``path`` is None, else an image folder (``path/<split>/<class>/*.jpg``)."""
  return ml_collections.ConfigDict(dict(
      name="image_folder" if path else "cifar10", path=ml_collections.FieldReference(path, field_type=str), train_split="train",
      eval_split="test", image_size=32, augment="cifar", mean=CIFAR_MEAN, std=CIFAR_STD,
      shuffle_buffer=50000))


def digits() -> ml_collections.ConfigDict:
  """scikit-learn's 8×8 handwritten digits: the embedded offline data set."""
  return ml_collections.ConfigDict(dict(
      name="digits", path=placeholder(str), train_split="train", eval_split="test", image_size=8,
      augment="digits", mean=(127.5,), std=(127.5,), shuffle_buffer=2048))
