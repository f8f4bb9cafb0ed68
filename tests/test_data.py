"""Input pipelines as the original's: torchvision's RandomResizedCrop, Pillow / OpenCV resizing,
mmcls' eval resize and centre crop, larq-zoo's evaluation crop and bicubic resize, and epochs that
keep the last partial batch."""
import math
import random

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from bnn_jax import data

SHAPE = (375, 500)  # a typical ImageNet photo
DRAWS = 4000


def reference_crop(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, written from its documented algorithm."""
  for _ in range(10):
    area = rng.uniform(*scale) * height * width
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  in_ratio = width / height
  w, h = width, height
  if in_ratio < ratio[0]:
    h = int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w = int(round(height * ratio[1]))
  return (height - h) // 2, (width - w) // 2, h, w


def our_crops(shape, draws=DRAWS):
  @tf.function  # one graph: eager map_fn dispatches op by op
  def crops():
    return tf.map_fn(lambda i: tf.stack(data.random_resized_crop_box(tf.constant(shape),
                                                                     tf.stack([i, i * 7 + 1]))),
                     tf.range(draws, dtype=tf.int64), fn_output_signature=tf.int32)
  return crops().numpy()


def test_random_resized_crop_follows_torchvision_distributions():
  ours = our_crops(SHAPE)
  rng = random.Random(0)
  theirs = np.array([reference_crop(*SHAPE, rng) for _ in range(DRAWS)])
  stats = {}
  for name, boxes in (("ours", ours), ("theirs", theirs)):
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= SHAPE[0]).all() and (left + w <= SHAPE[1]).all()
    area = h * w / (SHAPE[0] * SHAPE[1])
    stats[name] = (area, np.log(w / h))
  # The mean crop covers 0.435 of a 375×500 image (TF's sample_distorted_bounding_box: 0.365).
  assert np.mean(stats["ours"][0]) == pytest.approx(0.435, abs=0.01)
  for ours, theirs in zip(stats["ours"], stats["theirs"]):
    quantiles = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(ours, quantiles), np.quantile(theirs, quantiles),
                               atol=0.03)
  # The log aspect ratio is uniform in [log 3/4, log 4/3] up to the rounding of w and h.
  assert np.abs(stats["ours"][1]).max() <= math.log(4 / 3) + 0.02


@pytest.mark.parametrize("shape, expected", [((10, 1000), (0, 493, 10, 13)),  # wide: 4/3 × height
                                             ((1000, 10), (493, 0, 13, 10))])  # tall: width / (3/4)
def test_random_resized_crop_falls_back_to_the_clamped_centre(shape, expected):
  # No draw of ≥ 8% of the area fits such an image: every crop is the fallback.
  assert {tuple(int(v) for v in box) for box in our_crops(shape, draws=50)} == {expected}
  assert reference_crop(*shape, random.Random(0)) == expected


def test_eval_resize_truncates_the_long_side_and_rounds_the_crop_offset():
  assert tuple(data.resized_shape(tf.constant([375, 500]), 256).numpy()) == (256, 341)  # 341.33
  assert tuple(data.resized_shape(tf.constant([500, 333]), 256).numpy()) == (384, 256)  # 384.4
  config = ml_collections.ConfigDict(dict(augment="imagenet", image_size=224, mean=(0.0,) * 3,
                                          std=(1.0,) * 3, resize="cv2"))
  image = np.tile(np.arange(341, dtype=np.uint8)[None, :, None], (256, 1, 3))
  out = data.make_preprocess(config, train=False)({"image": image, "label": 0}, None)["image"]
  # (341 − 224) / 2 = 58.5 rounds half to even: 58, as mmcls' CenterCrop (Python's round).
  assert out.shape == (224, 224, 3) and float(out[0, 0, 0]) == 58.0


def smooth_image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
  return tf.cast(tf.round(tf.image.resize(coarse, (height, width), "bicubic")), tf.uint8).numpy()


def test_pillow_resize_is_antialiased_bilinear_as_pillow():
  pil = pytest.importorskip("PIL.Image")
  image = np.clip(smooth_image(300, 400), 0, 255).astype(np.uint8)
  for size in ((224, 224), (100, 133), (256, 341)):
    ours = data.resize_image(tf.constant(image), size, "pillow").numpy()
    theirs = np.asarray(pil.fromarray(image).resize(size[::-1], pil.BILINEAR), np.float32)
    assert np.abs(ours - theirs).mean() < 0.5 and np.abs(ours - theirs).max() <= 3


def test_cv2_resize_is_bilinear_without_antialiasing():
  torch = pytest.importorskip("torch")
  image = smooth_image(300, 400)
  for size in ((224, 224), (100, 133)):
    ours = data.resize_image(tf.constant(image), size, "cv2").numpy()
    # OpenCV's INTER_LINEAR: half-pixel centres, edge clamp, no smoothing (as this torch call).
    theirs = torch.nn.functional.interpolate(
        torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None], size=size, mode="bilinear",
        align_corners=False, antialias=False)[0].permute(1, 2, 0).round().numpy()
    assert np.abs(ours - theirs).max() <= 1
  smoothed = data.resize_image(tf.constant(image), (100, 133), "pillow").numpy()
  assert np.abs(smoothed - data.resize_image(tf.constant(image), (100, 133), "cv2").numpy()).mean() > 0.5


def legacy_bicubic_weights(in_size, out_size):
  """TensorFlow's legacy bicubic resize (``half_pixel_centers=False``) along one axis, written out
  from its algorithm: output i samples x = i · in/out (float32), Keys' cubic with a = −0.75 at the
  taps floor(x) − 1 … floor(x) + 2 clamped to the image, the fraction rounded to 1/1024 (its
  coefficient table)."""
  a = -0.75

  def cubic(t):
    t = abs(t)
    return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  weights = np.zeros((out_size, in_size))
  scale = np.float32(in_size) / np.float32(out_size)
  for i in range(out_size):
    x = np.float32(i) * scale
    base = int(np.floor(x))
    fraction = round(float(x - base) * 1024) / 1024
    for tap in range(-1, 3):
      weights[i, min(max(base + tap, 0), in_size - 1)] += cubic(tap - fraction)
  return weights


# larq-zoo's MEAN_RGB and STDDEV_RGB (its models have no normalisation layer)
LARQ_ZOO_MEAN = np.array([0.485 * 255, 0.456 * 255, 0.406 * 255], np.float32)
LARQ_ZOO_STD = np.array([0.229 * 255, 0.224 * 255, 0.225 * 255], np.float32)


def larq_zoo_eval_config():
  config = ml_collections.ConfigDict(dict(augment="imagenet", image_size=224, mean=data.IMAGENET_MEAN,
                                          std=data.IMAGENET_STD, resize="cv2",
                                          eval_preprocess="larq_zoo"))
  return data.make_preprocess(config, train=False)


@pytest.mark.parametrize("shape, window", [((213, 300), (14, 57, 186)),  # 0.875 · 213 = 186.375
                                           ((375, 500), (24, 86, 328)),  # 328.125; (172 + 1) // 2
                                           ((500, 333), (105, 21, 291))])  # 291.375
def test_larq_zoo_eval_crop_is_its_central_224_of_256_rounded_down(shape, window):
  assert tuple(int(v) for v in data.larq_zoo_crop_window(tf.constant(shape), 224)) == window


def test_larq_zoo_eval_is_the_central_crop_resized_by_legacy_bicubic_then_normalised():
  image = smooth_image(213, 300)
  ours = larq_zoo_eval_config()({"image": image, "label": 0}, None)["image"].numpy()
  crop = image[14:14 + 186, 57:57 + 186].astype(np.float64)  # the window above
  weights = legacy_bicubic_weights(186, 224)
  resized = np.einsum("ih,jw,hwc->ijc", weights, weights, crop, optimize=True)
  assert resized.min() < 0 and resized.max() > 255  # overshoots, neither rounded nor clipped
  np.testing.assert_allclose(ours, (resized - LARQ_ZOO_MEAN) / LARQ_ZOO_STD, atol=2e-5)
  png = tf.io.encode_png(image)  # an image folder's PNG: decoded whole, then cropped
  np.testing.assert_array_equal(larq_zoo_eval_config()({"image": png, "label": 0}, None)["image"],
                                ours)


def test_larq_zoo_eval_of_a_jpeg_decodes_the_crop_as_larq_zoo():
  # larq-zoo's _decode_and_center_crop, op for op: decode_and_crop_jpeg (whose pixels at the crop's
  # edges differ from decoding the whole file and cropping), the legacy bicubic, its mean and std.
  jpeg = tf.io.encode_jpeg(smooth_image(213, 300), quality=90)
  ours = larq_zoo_eval_config()({"image": jpeg, "label": 0}, None)["image"].numpy()
  crop = tf.image.decode_and_crop_jpeg(jpeg, [14, 57, 186, 186], channels=3)
  theirs = tf.compat.v1.image.resize_bicubic([crop], [224, 224])[0]
  np.testing.assert_allclose(ours, (theirs.numpy() - LARQ_ZOO_MEAN) / LARQ_ZOO_STD, rtol=0, atol=1e-6)


def test_larq_zoo_configs_evaluate_as_larq_zoo_and_an_unknown_eval_preprocess_is_one_line():
  from bnn_jax.config import load_config
  assert load_config("larq_zoo:quicknet").dataset.eval_preprocess == "larq_zoo"
  assert load_config("larq_zoo_r2b:r2b_bnn").dataset.eval_preprocess == "larq_zoo"
  assert load_config("birealnet_r18").dataset.eval_preprocess == "resize_crop"
  config = load_config("larq_zoo:quicknet").dataset
  config.eval_preprocess = "larq"
  with pytest.raises(data.ConfigError, match=r"unknown dataset.eval_preprocess 'larq'; valid: "
                                             r"\['resize_crop', 'larq_zoo'\]"):
    data.make_preprocess(config, train=False)


def test_an_epoch_keeps_its_last_partial_batch_filled_from_its_start():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  source = data.Source(lambda seed: tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(10)}), num_examples=10, process_examples=10,
      num_classes=10)
  config = ml_collections.ConfigDict(dict(augment="none", image_size=1, mean=(0.0,), std=(1.0,),
                                          shuffle_buffer=10))
  assert data.steps_per_epoch(10, 4) == 3 and data.steps_per_epoch(10, 4, drop_last=True) == 2
  stream = data.train_batches(source, config, 4, seed=0, steps=3)
  epoch = np.concatenate([next(stream)["label"] for _ in range(3)])
  assert sorted(epoch[:10]) == list(range(10))  # every example once…
  np.testing.assert_array_equal(epoch[10:], epoch[:2])  # …then the epoch's first two again
  assert sorted(np.concatenate([next(stream)["label"] for _ in range(3)])[:10]) == list(range(10))
