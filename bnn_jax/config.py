"""The default configuration every recipe in configs/ starts from.

Sections: ``model`` (see :func:`bnn_jax.models.build_model`; a ``None`` field
means the backbone's default), ``dataset``, ``optimizer``, ``schedule``, ``ede``,
``loss``, ``teacher``, ``parallel`` and ``train``. Durations other than the run's
``train.epochs`` follow :mod:`bnn_jax.durations` (``warmup_steps`` or ``warmup_epochs``…).
Every field exists here, so any of them can be set from the command line
(``--config.train.epochs=5``) and a typo is an error. Fields that default to ``None`` are
typed placeholders, so they can be set there too
(``--config.dataset.path=DIR``, ``--config.model.strides='(1, 2, 2, 1)'``).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Optional

import ml_collections
from ml_collections.config_dict import placeholder

from bnn_jax import durations
from bnn_jax.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from bnn_jax.errors import ConfigError, one_line


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec: str, workdirs: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of a file, as ``--config`` reads it: ``path.py`` or ``path.py:argument``.

  A bare name (``irnet_r18``) means ``configs/irnet_r18.py``. ``workdirs`` replaces
  :data:`WORKDIRS` for recipes that name other runs (their ``get_config`` takes ``workdirs``).
  Raises ConfigError, in one line, for a file that is missing, does not load (a syntax error),
  has no ``get_config``, or whose ``get_config`` raises or returns anything but a ConfigDict.
  """
  path, _, argument = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(CONFIGS_DIR, f"{path}.py")
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py"))
    raise ConfigError(f"no config file {path}; configs/ has {known}")
  get_config = getattr(_load_module(path), "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {path} has no get_config()")
  args = (argument,) if argument else ()
  takes_workdirs = "workdirs" in inspect.signature(get_config).parameters
  call = f"get_config({argument!r})" if argument else "get_config()"
  try:
    config = get_config(*args, **({"workdirs": workdirs} if workdirs and takes_workdirs else {}))
  except Exception as error:  # noqa: BLE001 - whatever the file's own code raises
    raise ConfigError(f"config file {path}: {call} raised {type(error).__name__}: "
                      f"{one_line(error)}") from error
  if not isinstance(config, ml_collections.ConfigDict):
    returned = "None" if config is None else type(config).__name__
    raise ConfigError(f"config file {path}: {call} returned {returned}, not an "
                      "ml_collections.ConfigDict")
  return config


def _load_module(path: str):
  """The config file ``path`` as a module; one line for a file that does not load."""
  module_spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as error:
    raise ConfigError(f"config file {path}, line {error.lineno}: {error.msg}") from None
  except Exception as error:  # noqa: BLE001 - an import or a name the file's code lacks
    raise ConfigError(f"config file {path} does not load: {type(error).__name__}: "
                      f"{one_line(error)}") from error
  return module


# Where recipes look for the runs they start from or distil from (load_config's ``workdirs``).
WORKDIRS = "workdirs"


def teacher_dir(depth: int, workdirs: str = WORKDIRS) -> str:
  """Where the recipes expect their real ResNet-``depth`` teacher: on ImageNet the original's
  mmclassification checkpoints, converted (torchvision's convert as well; README: "Teachers")."""
  return f"{workdirs}/teachers/resnet{depth}"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_section()
  c.dataset = imagenet()
  # binary / real / norm: an optimizer per kind of variable (larq's CaseOptimizer; bnn_jax.optim),
  # each field None = the top-level optimizer's (norm: real's), unset = trained by it.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0, norm_decay_mult=1.0,
      grad_clip=placeholder(float), b1=0.9, b2=0.999, eps=1e-8,
      binary=kind_optimizer(clip=placeholder(float), threshold=placeholder(float),
                            gamma=placeholder(float), threshold_schedule=schedule_override()),
      real=kind_optimizer(), norm=kind_optimizer()))
  c.schedule = ml_collections.ConfigDict(dict(
      name="constant", by_epoch=True, milestones=placeholder(tuple), gamma=0.1, power=1.0, min_lr=0.0,
      warmup=placeholder(str), warmup_ratio=0.1, **durations.fields("warmup")))
  # IR-Net's Error Decay Estimator over span_steps / span_epochs / span_fraction (None: the run).
  c.ede = ml_collections.ConfigDict(dict(enabled=False, t_min=0.1, t_max=10.0,
                                         **durations.fields("span")))
  # Per-example objective: ce_weight·CE + kd_weight·KD + at_weight·AT (only_kd drops CE).
  # attention_blocks: block names (e.g. "layer1.0") or stages ("layer2": its last block) to
  # compare, or parts of a larq-zoo model's layer names ("block_2_out"); None = every block.
  # attention_norm: each attention map divided by its "max" (Real-to-Binary; "max_tf": the
  # maximum's gradient shared among ties, as larq-zoo's TensorFlow) or "l2" norm (HCEBNN).
  # kd_loss: "cross_entropy" against the teacher's softmax (ReActNet) or "keras_kl" (larq-zoo).
  c.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.0, ce_weight=1.0, kd_weight=0.0, at_weight=0.0, only_kd=False,
      temperature=1.0, attention_blocks=placeholder(tuple), attention_norm="max",
      kd_loss="cross_entropy"))
  # The KD teacher: its model section, and an Orbax workdir (one of our runs, or the output of
  # python -m bnn_jax.convert) or a .pth / .npz state dict. Not trained, not checkpointed.
  # batchnorm: "running" (eval mode) or "batch": normalise with the statistics of each batch
  # (of each model.bn_group_size group), as the original, which never puts its teacher in eval
  # mode. Either way the teacher's variables never change.
  c.teacher = ml_collections.ConfigDict(dict(
      model=model_section(arch="ResNet-34", stem_act="relu"), checkpoint=placeholder(str),
      step=placeholder(int), batchnorm="running"))
  # Data parallelism: "sharded" (one program over the global batch, synchronised BatchNorm) or
  # "per_device" (shard_map, per-device BatchNorm: PyTorch DDP). distributed=True starts
  # jax.distributed (multi-host); unset fields are read from the cluster's environment.
  c.parallel = ml_collections.ConfigDict(dict(
      mode="sharded", distributed=False, coordinator_address=placeholder(str),
      num_processes=placeholder(int), process_id=placeholder(int)))
  c.train = ml_collections.ConfigDict(dict(
      epochs=100, batch_size=256, drop_last=False, eval_batch_size=placeholder(int), seed=166,
      log_every=100, eval_every_epochs=1, checkpoint_every_epochs=1, max_to_keep=3,
      max_steps=placeholder(int),
      load_from=placeholder(str), load_transform=placeholder(str), progress=True, plot=True))
  return c


def schedule_override() -> ml_collections.ConfigDict:
  """A ``schedule`` whose every field is None: what a per-kind optimizer changes of the top level's."""
  return ml_collections.ConfigDict(dict(
      name=placeholder(str), by_epoch=placeholder(bool), milestones=placeholder(tuple),
      gamma=placeholder(float), power=placeholder(float), min_lr=placeholder(float),
      warmup=placeholder(str), warmup_ratio=placeholder(float), **durations.fields("warmup")))


def kind_optimizer(**fields) -> ml_collections.ConfigDict:
  """``optimizer.binary`` / ``.real`` / ``.norm``: the top-level optimizer's fields, all None
  (inherited), and a ``schedule`` over the top-level one. Binary kernels' also take ``clip`` and
  Bop's ``threshold``, ``gamma`` (scheduled by ``schedule``) and ``threshold_schedule``."""
  return ml_collections.ConfigDict(dict(
      name=placeholder(str), lr=placeholder(float), momentum=placeholder(float),
      nesterov=placeholder(bool), weight_decay=placeholder(float),
      norm_decay_mult=placeholder(float), b1=placeholder(float), b2=placeholder(float),
      eps=placeholder(float), schedule=schedule_override(), **fields))


def model_section(**fields) -> ml_collections.ConfigDict:
  """A ``model`` section: see :func:`bnn_jax.models.build_model`; ``None`` = the backbone's default."""
  section = ml_collections.ConfigDict(dict(
      backbone="ResArch", arch="ReActNet-18", num_classes=1000, neck="gap", dtype="float32",
      stem_channels=placeholder(int), base_channels=placeholder(int), strides=placeholder(tuple),
      avg_down=placeholder(bool), stem_act=placeholder(str), binary_type=placeholder(tuple),
      binarizers=placeholder(tuple), cifar_stem=placeholder(bool), layers_cfg=placeholder(tuple),
      bn_group_size=placeholder(int),
      # EBResNet (HCEBNN) only: see bnn_jax.models.hcebnn.EBResNet
      structure=placeholder(tuple), groups=placeholder(tuple), expansion=placeholder(tuple),
      num_experts=placeholder(int), gate=placeholder(str), use_se=placeholder(bool),
      g_layer=placeholder(bool), downsample_ratio=placeholder(int), stem=placeholder(str),
      use_only_first=placeholder(bool), released_form=placeholder(bool),
      # Larq Zoo models (configs/larq_zoo.py) only: larq-zoo's own Fields, by their names, and
      # width_divisor for the models whose widths larq-zoo writes into its code
      section_blocks=placeholder(tuple), section_filters=placeholder(tuple),
      filters=placeholder(int), initial_filters=placeholder(int), growth_rate=placeholder(int),
      spec=placeholder(tuple), width_divisor=placeholder(int),
      batch_norm_momentum=placeholder(float),
      inflation_ratio=placeholder(int), activations_k_bit=placeholder(int),
      num_layers=placeholder(int), model_name=placeholder(str), momentum=placeholder(float),
      scaling_r=placeholder(int)))
  section.update(fields)
  return section


def real_resnet(depth: int, dataset: Optional[ml_collections.ConfigDict] = None
                ) -> ml_collections.ConfigDict:
  """A real-valued ResNet-18/34 in torchvision's layout and recipe (SGD 0.1, ×0.1 every 30 epochs,
  90 epochs of 256 on 8 GPUs, so BatchNorm over 32): a KD teacher this project can train itself."""
  c = default_config()
  c.model.update(arch=f"ResNet-{depth}", stem_act="relu", bn_group_size=32)
  if dataset is not None:
    c.dataset = dataset
  c.optimizer.update(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
  c.schedule.update(name="step", milestones=(30, 60))
  c.train.update(epochs=90, batch_size=256)
  return c


def imagenet(colour_jitter: bool = False, resize: str = "cv2") -> ml_collections.ConfigDict:
  """ImageNet as the original: RandomResizedCrop 224 + flip (+ colour jitter), eval 256 → 224,
  resized as ``mmcv.imresize`` with ``resize``: "cv2" (bilinear, no antialiasing: mmcv's
  default) or "pillow" (antialiased bilinear: the ``*_pil_resize`` data configs).
  ``eval_preprocess="larq_zoo"`` evaluates as larq-zoo: the central 224/256 of the shorter side,
  bicubic to 224 (``bnn_jax.data``)."""
  return ml_collections.ConfigDict(dict(
      name="imagenet2012", path=placeholder(str), train_split="train", eval_split="validation",
      image_size=224, augment="imagenet_colorjitter" if colour_jitter else "imagenet", resize=resize,
      eval_preprocess="resize_crop",
      mean=IMAGENET_MEAN, std=IMAGENET_STD, shuffle_buffer=16384,
      bad_images="skip"))


def cifar10(path=None) -> ml_collections.ConfigDict:
  """CIFAR-10: TFDS when ``path`` is None, else an image folder (``path/<split>/<class>/*.jpg``)."""
  return ml_collections.ConfigDict(dict(
      name="image_folder" if path else "cifar10", path=ml_collections.FieldReference(path, field_type=str), train_split="train",
      eval_split="test", image_size=32, augment="cifar", mean=CIFAR_MEAN, std=CIFAR_STD,
      shuffle_buffer=50000, bad_images="skip"))


def digits() -> ml_collections.ConfigDict:
  """scikit-learn's 8×8 handwritten digits: the embedded offline data set."""
  return ml_collections.ConfigDict(dict(
      name="digits", path=placeholder(str), train_split="train", eval_split="test", image_size=8,
      augment="digits", mean=(127.5,), std=(127.5,), shuffle_buffer=2048,
      bad_images="skip"))
