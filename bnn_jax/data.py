"""Input pipelines: TFDS, image folders and the embedded digits, on tf.data.

Sources (``dataset.name``): ``imagenet2012`` (manual download), ``cifar10`` /
``cifar100`` (downloaded by TFDS when online), ``image_folder``
(``root/<split>/<class>/*.jpg``) and ``digits`` (scikit-learn's handwritten
digits, shipped with it: the offline default). Augmentation (``dataset.augment``)
is chosen independently: ``imagenet``, ``imagenet_colorjitter``, ``cifar``,
``digits`` or ``none``.

Training order is a pure function of (seed, epoch), and augmentation uses
stateless random ops seeded by (seed, epoch, index), so a resumed run sees
exactly the batches an uninterrupted one would. Evaluation covers every example
of the split exactly once: the last batch is padded and masked, never dropped.
Each process reads its own shard; batches here are per process.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Callable, Iterator, Optional, Tuple

import numpy as np

from bnn_jax.errors import ConfigError

# Imported lazily so that tools that never read data (bops, convert) start fast.
tf = None


def _tf():
  global tf
  if tf is None:
    import tensorflow
    tensorflow.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX
    tf = tensorflow
  return tf


class DataError(ConfigError):
  """A data set that is missing or unreadable, with where it was looked for and what to do."""


SOURCES = ("digits", "cifar10", "cifar100", "imagenet2012", "image_folder")
AUGMENTATIONS = ("imagenet", "imagenet_colorjitter", "cifar", "digits", "none")

# Training examples of the TFDS data sets, known without opening them (the schedules of a recipe
# on a data set that is not downloaded yet: bnn_jax.durations).
TRAIN_EXAMPLES = {"imagenet2012": 1_281_167, "cifar10": 50_000, "cifar100": 50_000}
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CIFAR_MEAN, CIFAR_STD = (125.307, 122.961, 113.8575), (51.5865, 50.847, 51.255)


@dataclasses.dataclass
class Source:
  """A split as a tf.data dataset of {'image', 'label'} for this process, and the split's size."""
  make: Callable[[Optional[int]], "tf.data.Dataset"]  # file-shuffle seed (None: file order)
  num_examples: int  # in the whole split, all processes together
  process_examples: int  # in this process's shard
  num_classes: int  # labels are 0 … num_classes − 1
  channels: int = 3  # of the decoded images (encoded files decode as RGB)


def input_shape(config) -> Tuple[int, int, int, int]:
  """The shape of one input batch of the ``dataset`` section ``config``, batch 1 (NHWC)."""
  return (1, config.image_size, config.image_size, len(config.mean))


# --- Sources -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def digits_arrays(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8×8 digits as uint8 (N, 8, 8, 1) images; a fixed 80/20 train/test split."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
  order = np.random.RandomState(0).permutation(len(images))
  cut = int(0.8 * len(images))
  chosen = {"train": order[:cut], "test": order[cut:]}
  if split not in chosen:
    raise DataError(f"digits has splits ['train', 'test'], not {split!r}")
  return images[chosen[split]], digits.target[chosen[split]].astype(np.int64)


def _digits_source(split: str, process_index: int, process_count: int) -> Source:
  all_images, all_labels = digits_arrays(split)
  images, labels = all_images[process_index::process_count], all_labels[process_index::process_count]
  tf_ = _tf()
  return Source(lambda seed: tf_.data.Dataset.from_tensor_slices({"image": images, "label": labels}),
                num_examples=len(all_labels), process_examples=len(labels), num_classes=10,
                channels=all_images.shape[-1])


def _check_imagenet(builder, data_dir: Optional[str]) -> None:
  if builder.is_prepared():
    return
  manual = os.path.join(data_dir or os.path.expanduser("~/tensorflow_datasets"), "downloads", "manual")
  needed = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
  missing = [n for n in needed if not os.path.exists(os.path.join(manual, n))]
  if missing:
    raise DataError(f"imagenet2012 must be downloaded by hand: put {', '.join(missing)} in {manual} "
                    "(from image-net.org), or point dataset.path at a TFDS data_dir where it is prepared")


def _tfds_source(name: str, split: str, data_dir: Optional[str], process_index: int,
                 process_count: int) -> Source:
  import tensorflow_datasets as tfds
  _tf()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as error:  # noqa: BLE001 - any failure here is a data-set problem for the user
    raise DataError(f"cannot open TFDS data set {name!r} in {data_dir or 'the default data_dir'}: "
                    f"{error}") from None
  if name == "imagenet2012":
    _check_imagenet(builder, data_dir)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001
      raise DataError(f"{name} is not in {builder.data_dir} and could not be downloaded "
                      f"({type(error).__name__}: {error}); run once online, or set dataset.path "
                      "to a TFDS data_dir that holds it") from None
  return _builder_source(builder, split, process_index, process_count)


def _image_folder_source(root: Optional[str], split: str, process_index: int,
                         process_count: int) -> Source:
  import tensorflow_datasets as tfds
  _tf()
  if not root or not os.path.isdir(os.path.join(root, split)):
    raise DataError(f"image folder split not found: {os.path.join(root or '<dataset.path unset>', split)} "
                    "(expected dataset.path/<split>/<class>/*.jpg)")
  _check_same_classes(root)
  builder = tfds.ImageFolder(root)
  if split not in builder.info.splits or not builder.info.splits[split].num_examples:
    raise DataError(f"no images in class folders under {os.path.join(root, split)} (expected "
                    "dataset.path/<split>/<class>/*.jpg)")
  num_examples = builder.info.splits[split].num_examples

  def make(seed: Optional[int]):
    # ImageFolder lists files in a fixed order and cannot seed its own file shuffle:
    # the seeded shuffle of train_batches does it.
    del seed
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.shard(process_count, process_index)
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"],
                              "filename": ex["image/filename"]})

  return Source(make, num_examples, len(range(process_index, num_examples, process_count)),
                num_classes=builder.info.features["label"].num_classes)


def _check_same_classes(root: str) -> None:
  """Every split of an image folder must have the same class folders: ImageFolder numbers the
  labels over all of them, so a class one split lacks moves the others' labels."""
  subfolders = lambda path: {n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))}  # noqa: E731
  classes = {split: subfolders(os.path.join(root, split)) for split in sorted(subfolders(root))}
  every = set().union(*classes.values())
  lacking = [f"{split} lacks {sorted(every - names)}" for split, names in classes.items()
             if every - names]
  if lacking:
    raise DataError(f"the splits of image folder {root} have different class folders "
                    f"({'; '.join(lacking)}); labels are numbered over all of them, so every split "
                    "needs the same class folders")


def _builder_source(builder, split: str, process_index: int, process_count: int) -> Source:
  import tensorflow_datasets as tfds
  splits = builder.info.splits
  if split not in splits:
    raise DataError(f"{builder.name} has no split {split!r}; available: {sorted(splits)}")
  shard = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)

  def make(seed: Optional[int]):
    read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True)
    ds = builder.as_dataset(split=shard, shuffle_files=seed is not None, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"],
                              "filename": ex.get("file_name", ex.get("id", tf.constant("")))})

  return Source(make, num_examples=splits[split].num_examples,
                process_examples=splits[shard].num_examples,
                num_classes=builder.info.features["label"].num_classes)


def train_examples(config) -> int:
  """How many examples the train split of the data set ``config`` names has."""
  known = TRAIN_EXAMPLES.get(config.name) if config.train_split == "train" else None
  return known or open_source(config, config.train_split).num_examples


def open_source(config, split: str, process_index: int = 0, process_count: int = 1) -> Source:
  """The split ``split`` of the data set ``config`` (a ``dataset`` config section) names, checked
  to have as many channels as ``dataset.mean`` and ``dataset.std`` have values."""
  name = config.name
  if name == "digits":
    source = _digits_source(split, process_index, process_count)
  elif name == "image_folder":
    source = _image_folder_source(config.get("path"), split, process_index, process_count)
  elif name in ("cifar10", "cifar100", "imagenet2012"):
    source = _tfds_source(name, split, config.get("path"), process_index, process_count)
  else:
    raise ConfigError(f"unknown dataset {name!r}; valid: {list(SOURCES)}")
  sizes = {field: len(config[field]) for field in ("mean", "std")}
  if set(sizes.values()) != {source.channels}:
    raise ConfigError(f"{name} images have {source.channels} channel(s), but dataset.mean has "
                      f"{sizes['mean']} value(s) and dataset.std {sizes['std']}: give each "
                      f"{source.channels}")
  return source


# --- Preprocessing -------------------------------------------------------------------


def _decode(image):
  if image.dtype == tf.string:
    return tf.io.decode_image(image, channels=3, expand_animations=False)
  return image


RESIZES = ("pillow", "cv2")
# dataset.eval_preprocess: the original's resize of the shorter side to image_size · 256/224 and
# central crop (``dataset.resize``), or larq-zoo's central crop then bicubic resize.
EVAL_PREPROCESSES = ("resize_crop", "larq_zoo")
LARQ_ZOO_CROP_PADDING = 32  # larq-zoo's CROP_PADDING: the crop is size / (size + 32) of the shorter side
BAD_IMAGES = ("skip", "fail")
# JPEG, PNG, GIF, BMP and WebP files start so: anything else (empty, garbage, text) cannot decode.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")
_skipped_files: set = set()


def _note_skipped(filename) -> bool:
  """Host side, for an undecodable file only: names it once per process; False drops it."""
  name = filename.numpy().decode(errors="replace")
  if name not in _skipped_files:
    _skipped_files.add(name)
    print(f"skipping an undecodable image ({len(_skipped_files)} so far): {name}", flush=True)
  return False


def screen_images(ds, policy: str):
  """Drops (``skip``: each file named once) or stops at (``fail``: one line naming it) examples
  whose image bytes are no JPEG, PNG, GIF, BMP or WebP file. Files that start as one but do not
  decode (truncated) are dropped by :func:`_drop_errors` in ``skip``, and end the run in ``fail``."""
  if policy not in BAD_IMAGES:
    raise ConfigError(f"unknown dataset.bad_images {policy!r}; valid: {list(BAD_IMAGES)}")

  def readable(example):
    image = example["image"]
    if image.dtype != tf.string:  # already pixels (digits)
      return tf.constant(True)
    looks = tf.reduce_any([tf.strings.substr(image, 0, len(m)) == m for m in _IMAGE_MAGIC])
    if policy == "fail":
      check = tf.debugging.Assert(looks, ["undecodable image:", example["filename"]])
      with tf.control_dependencies([check]):
        return tf.identity(looks)
    return tf.cond(looks, lambda: tf.constant(True),
                   lambda: tf.py_function(_note_skipped, [example["filename"]], tf.bool))

  return ds.filter(readable)


def _drop_errors(ds, policy: str):
  """``skip``: drop the examples whose decoding failed (TensorFlow logs each)."""
  return ds.ignore_errors(log_warning=True) if policy == "skip" else ds


def _failing_image(error) -> DataError:
  """The one line for an image that stopped a ``fail`` run (TensorFlow's error, shortened)."""
  named = re.search(r"undecodable image:\]\s*\[b?'?([^\]']*)", error.message)
  if named:
    return DataError(f"undecodable image {named.group(1)} (dataset.bad_images=skip skips such files)")
  cause = error.message.split("\n")[0].rsplit(": ", 1)[-1].strip()  # TensorFlow's last clause
  return DataError(f"an image could not be decoded ({cause}); dataset.bad_images=skip skips such "
                   "files")


def resize_image(image, height_width, backend: str):
  """Bilinear resize to uint8 values as the original's ``mmcv.imresize``: ``pillow`` smooths
  when it shrinks (antialiased, Pillow's BILINEAR filter), ``cv2`` samples without smoothing."""
  _tf()
  if backend not in RESIZES:
    raise ConfigError(f"unknown dataset.resize {backend!r}; valid: {list(RESIZES)}")
  image = tf.image.resize(image, height_width, method="bilinear", antialias=backend == "pillow")
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def random_resized_crop_box(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """(top, left, height, width) of torchvision's RandomResizedCrop, as the original's mmcls runs it.

  Up to ``attempts`` draws of an area fraction ~ U(scale) and a log-uniform aspect ratio in
  ``ratio``; the first whose rounded width and height fit is placed uniformly at random.
  If none fits, the central crop of the image clamped to ``ratio`` (the whole image when its
  aspect ratio is inside). All draws are made at once: the same result, no graph loop.
  """
  _tf()
  seeds = tf.random.experimental.stateless_split(seed, 4)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  area = tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1], tf.float64)
  area = area * height * width
  log_ratio = tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]),
                                          math.log(ratio[1]), tf.float64)
  aspect = tf.exp(log_ratio)
  crop_w, crop_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  in_ratio = width / height
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, crop_h[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(found, crop_w[first], fallback_w), tf.int32)
  room_h, room_w = tf.cast(shape[0], tf.int32) - crop_h, tf.cast(shape[1], tf.int32) - crop_w
  top = tf.where(found, tf.random.stateless_uniform([], seeds[2], 0, room_h + 1, tf.int32), room_h // 2)
  left = tf.where(found, tf.random.stateless_uniform([], seeds[3], 0, room_w + 1, tf.int32), room_w // 2)
  return top, left, crop_h, crop_w


def _random_resized_crop(image_bytes_or_image, size: int, seed, backend: str):
  """RandomResizedCrop(size) of torchvision's algorithm (:func:`random_resized_crop_box`)."""
  image = _decode(image_bytes_or_image)
  top, left, height, width = random_resized_crop_box(tf.shape(image), seed)
  image = image[top:top + height, left:left + width]
  return resize_image(image, (size, size), backend)


def _colour_jitter(image, seed):
  """ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2) on a 0–255 float image."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = image * tf.random.stateless_uniform([], seeds[0], 0.8, 1.2)
  image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[1])
  image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seeds[2])
  return tf.clip_by_value(image, 0.0, 255.0)


def resized_shape(shape, short_side: int):
  """mmcls' Resize((short_side, −1)): the shorter side becomes ``short_side``, the longer one
  scales with it, truncated to an integer."""
  _tf()
  height, width = shape[0], shape[1]
  long_side = lambda longer, shorter: tf.cast(  # noqa: E731
      tf.math.floor(short_side * tf.cast(longer, tf.float64) / tf.cast(shorter, tf.float64)), tf.int32)
  return tf.cond(width < height, lambda: tf.stack([long_side(height, width), short_side]),
                 lambda: tf.stack([short_side, long_side(width, height)]))


def _resize_centre_crop(image, size: int, resize: int, backend: str):
  """Resize the shorter side to ``resize`` (:func:`resized_shape`), then the central crop,
  its offset (side − size)/2 rounded half to even, as mmcls' CenterCrop."""
  image = _decode(image)
  new_shape = resized_shape(tf.shape(image), resize)
  image = resize_image(image, new_shape, backend)
  top, left = [tf.cast(tf.round(tf.cast(side - size, tf.float64) / 2), tf.int32)
               for side in (new_shape[0], new_shape[1])]
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def larq_zoo_crop_window(shape, size: int):
  """(top, left, side) of larq-zoo's evaluation crop: the central square whose side is
  size / (size + 32) of the shorter side, computed in float32 and truncated; offsets
  (side of the image − crop + 1) // 2."""
  _tf()
  height, width = shape[0], shape[1]
  fraction = size / (size + LARQ_ZOO_CROP_PADDING)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  return (height - side + 1) // 2, (width - side + 1) // 2, side


def _larq_zoo_centre_crop(image, size: int):
  """larq-zoo's ImageNet evaluation (``larq_zoo/training/data.py``, ``_decode_and_center_crop``):
  the central crop of :func:`larq_zoo_crop_window`, decoded as larq-zoo decodes it (a JPEG with
  ``decode_and_crop_jpeg``, whose pixels at the crop's edges differ from decoding the whole image
  and then cropping), resized to size × size by TensorFlow's legacy bicubic
  (``tf.compat.v1.image.resize_bicubic``: Keys' cubic with a = −0.75, no half-pixel offset, no
  antialiasing), to float values neither rounded nor clipped."""
  if image.dtype == tf.string:
    def jpeg():
      top, left, side = larq_zoo_crop_window(tf.image.extract_jpeg_shape(image), size)
      return tf.image.decode_and_crop_jpeg(image, tf.stack([top, left, side, side]), channels=3)

    def other():  # a PNG (or GIF, BMP) of an image folder: decoded whole, then cropped
      decoded = _decode(image)
      top, left, side = larq_zoo_crop_window(tf.shape(decoded), size)
      return tf.image.crop_to_bounding_box(decoded, top, left, side, side)

    cropped = tf.cond(tf.io.is_jpeg(image), jpeg, other)
  else:
    top, left, side = larq_zoo_crop_window(tf.shape(image), size)
    cropped = tf.image.crop_to_bounding_box(image, top, left, side, side)
  return tf.compat.v1.image.resize_bicubic(cropped[None], [size, size])[0]


def _pad_crop_flip(image, pad: int, seed, flip: bool):
  """RandomCrop(size, padding=pad) with zero padding, then an optional horizontal flip."""
  image = _decode(image)
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, shape, seeds[0])
  return tf.image.stateless_random_flip_left_right(image, seeds[1]) if flip else image


def make_preprocess(config, train: bool) -> Callable:
  """(example, seed) -> {'image': float32 normalised HWC, 'label'} for ``config.augment``."""
  _tf()
  augment, size = config.augment, config.image_size
  if augment not in AUGMENTATIONS:
    raise ConfigError(f"unknown augment {augment!r}; valid: {list(AUGMENTATIONS)}")
  mean = np.asarray(config.mean, np.float32)
  std = np.asarray(config.std, np.float32)
  resize = int(round(size * config.get("eval_resize_ratio", 256 / 224)))
  backend = config.get("resize", "cv2")
  eval_preprocess = config.get("eval_preprocess", "resize_crop")
  if eval_preprocess not in EVAL_PREPROCESSES:
    raise ConfigError(f"unknown dataset.eval_preprocess {eval_preprocess!r}; valid: "
                      f"{list(EVAL_PREPROCESSES)}")

  def preprocess(example, seed):
    image = example["image"]
    if augment.startswith("imagenet"):
      if train:
        seeds = tf.random.experimental.stateless_split(seed, 3)
        image = _random_resized_crop(image, size, seeds[0], backend)
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        if augment == "imagenet_colorjitter":
          image = _colour_jitter(image, seeds[2])
      elif eval_preprocess == "larq_zoo":
        image = _larq_zoo_centre_crop(image, size)
      else:
        image = _resize_centre_crop(image, size, resize, backend)
    elif augment in ("cifar", "digits") and train:
      image = _pad_crop_flip(image, 4 if augment == "cifar" else 1, seed, flip=augment == "cifar")
    else:
      image = _decode(image)
    image = (tf.cast(image, tf.float32) - mean) / std
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  return preprocess


# --- Pipelines -----------------------------------------------------------------------


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  return options


def steps_per_epoch(num_examples: int, global_batch: int, drop_last: bool = False) -> int:
  """Iterations per epoch: the original's DataLoader keeps the last partial batch (ceil);
  ``drop_last`` drops it (floor)."""
  if global_batch > num_examples:
    raise ConfigError(f"train.batch_size {global_batch} exceeds the {num_examples} training examples")
  return num_examples // global_batch if drop_last else -(-num_examples // global_batch)


def train_batches(source: Source, config, batch_size: int, seed: int, steps: int,
                  start_step: int = 0) -> Iterator[dict]:
  """Endless host batches (numpy) of ``batch_size`` for this process, from step ``start_step`` on.

  Epoch ``e`` is the split shuffled with seed (seed, e), cut into ``steps`` batches
  (:func:`steps_per_epoch`). A last batch that the split does not fill is completed from the
  start of the same epoch's order, as PyTorch's DistributedSampler pads its shards, so every
  step has the same shape (one compiled step). Resuming at any step reproduces the same stream.
  """
  _tf()
  epoch, offset = divmod(start_step, steps)
  preprocess = make_preprocess(config, train=True)
  policy = config.get("bad_images", "skip")
  while True:
    epoch_seed = seed * 100003 + epoch
    ds = screen_images(source.make(epoch_seed), policy)
    ds = ds.shuffle(min(config.get("shuffle_buffer", 16384), source.process_examples),
                    seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.repeat().enumerate()  # the same order again: the wrap-around fill
    ds = ds.map(lambda i, ex: preprocess(ex, tf.stack([tf.cast(epoch_seed, tf.int64), i])),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = _drop_errors(ds, policy).take(steps * batch_size)  # full epochs, even after skips
    ds = ds.batch(batch_size, drop_remainder=True).skip(offset).prefetch(tf.data.AUTOTUNE)
    yield from _numpy_batches(ds)
    epoch, offset = epoch + 1, 0


def eval_batches(source: Source, config, batch_size: int, process_count: int = 1) -> Iterator[dict]:
  """Every example of the split once, in batches with a 'mask' (1 = real, 0 = padding).

  Every process yields the same number of batches (what a multi-host step needs).
  """
  _tf()
  per_process = -(-source.num_examples // process_count)
  num_batches = -(-per_process // batch_size)
  preprocess = make_preprocess(config, train=False)
  policy = config.get("bad_images", "skip")
  ds = screen_images(source.make(None), policy).map(
      lambda ex: {**preprocess(ex, tf.zeros([2], tf.int64)), "mask": 1.0},
      num_parallel_calls=tf.data.AUTOTUNE)
  ds = _drop_errors(ds, policy)
  padding = ds.take(1).map(lambda ex: tf.nest.map_structure(tf.zeros_like, ex)).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size).batch(batch_size)
  return _numpy_batches(ds.prefetch(tf.data.AUTOTUNE))


def _numpy_batches(ds) -> Iterator[dict]:
  """The batches of ``ds`` as numpy; a data error (an image a ``fail`` run cannot decode) as one line."""
  iterator = ds.with_options(_options()).as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as error:
      raise _failing_image(error) from None
    yield batch


def synthetic_batches(batch_size: int, image_size: int, channels: int, num_classes: int,
                      seed: int = 0) -> Iterator[dict]:
  """Random images and labels, for shape and speed tests that read no data."""
  rng = np.random.default_rng(seed)
  while True:
    yield {"image": rng.standard_normal((batch_size, image_size, image_size, channels), np.float32),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}
