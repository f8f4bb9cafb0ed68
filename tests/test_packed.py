"""Bit-packed inference: exact XNOR-popcount dot products, padding corrected, whole models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import packed
from bnn_jax.binarize import sign
from bnn_jax.errors import ConfigError
from bnn_jax.evaluate import evaluate_checkpoint, restore_checkpoint
from bnn_jax.export import export
from bnn_jax.models import abstract_variables, build_model

from helpers import load_config, random_variables, shrink, trained_like


def test_pack_puts_element_i_in_bit_i_and_zero_counts_as_plus_one():
  x = np.full((1, 40), -1.0, np.float32)
  x[0, [0, 3, 31, 32, 39]] = 1.0
  x[0, 5] = 0.0  # sign(0) = +1
  words = np.asarray(packed.pack(jnp.asarray(x)))
  assert words.dtype == np.uint32 and words.shape == (1, 2)
  assert words[0, 0] == (1 << 0) | (1 << 3) | (1 << 5) | (1 << 31)
  assert words[0, 1] == (1 << 0) | (1 << 7)  # channels 32 and 39; bits 8..31 unused, 0


@pytest.mark.parametrize("channels, kernel_size, strides, padding", [
    (64, 3, 1, 1), (37, 3, 2, 1), (70, 1, 1, 0), (16, 1, 2, 0), (33, 3, 1, 0), (8, 5, 2, 2)])
def test_packed_dot_products_equal_the_float_convolution_as_integers(channels, kernel_size, strides,
                                                                       padding):
  keys = jax.random.split(jax.random.key(channels + kernel_size + strides), 2)
  a = sign(jax.random.normal(keys[0], (2, 9, 11, channels)))
  w = sign(jax.random.normal(keys[1], (kernel_size, kernel_size, channels, 24)))
  expected = jax.lax.conv_general_dilated(a, w, (strides, strides), [(padding, padding)] * 2,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bits, scale = packed.packed_weights(w)
  np.testing.assert_array_equal(scale, 1.0)
  dots = packed.packed_conv(packed.pack(a), bits, channels, kernel_size, strides, padding)
  assert dots.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(dots), np.asarray(expected).astype(np.int32))


# One per kind of binary convolution: IR-Net's power-of-two scales and EDE sign, ReActNet-A's
# mean-|W| scales, ApproxSign, 1×1 and split 1×1 convs (Bi-Real's and ReActNet-18's kind), and
# Real-to-Binary's unscaled weights with attention (the strong baseline's kind); the trained
# ReActNet-18 below.
@pytest.mark.parametrize("recipe", ["irnet_r18", "reactnet_a_step2", "real_to_binary_step2"])
def test_packed_model_logits_match_the_float_model(recipe):
  config = shrink(load_config(recipe))
  model = build_model(config.model)
  variables = trained_like(random_variables(abstract_variables(model, (1, 32, 32, 3))))
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  logits = packed.packed_model(model, variables, images.shape)(images)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("recipe, halves", [("reactnet_r18_step1", "approx_sign and weights real"),
                                            ("real_to_binary_fp", "tanh and weights real")])
def test_a_model_with_a_real_half_in_a_binary_layer_is_refused(recipe, halves):
  config = shrink(load_config(recipe))
  model = build_model(config.model)
  variables = random_variables(abstract_variables(model, (1, 32, 32, 3)))
  with pytest.raises(ConfigError, match=f"fully binary convolutions; backbone/layer1.0/conv1 has "
                                        f"activations {halves}"):
    packed.packed_model(model, variables, (1, 32, 32, 3))


def test_packed_evaluation_and_exported_file_reproduce_the_trained_model(digits_run, tmp_path):
  config, workdir, trained = digits_run  # the fully binary quickstart network, trained
  metrics = evaluate_checkpoint(config, workdir, bit_packed=True)
  assert metrics["top1"] == pytest.approx(trained["top1"]) and metrics["num_examples"] == 360
  assert metrics["loss"] == pytest.approx(trained["loss"], rel=1e-5)
  out = str(tmp_path / "model.npz")
  sizes = export(config, workdir, out)
  assert sizes["binary_layers"] == 16 and sizes["file_bytes"] < sizes["float_variables_bytes"]
  with np.load(out) as file:  # readable without Flax; binary kernels only as bits
    assert "packed/backbone/layer1.0/conv1/bits" in file.files
    assert "params/backbone/layer1.0/conv1/kernel" not in file.files
    assert "params/backbone/conv1/kernel" in file.files  # the real stem
  experiment, variables, _ = restore_checkpoint(config, workdir)
  images = jax.random.normal(jax.random.key(4), (16,) + tuple(experiment.input_shape[1:]))
  expected = jax.jit(lambda v, x: experiment.model.apply(v, x, train=False))(variables, images)
  np.testing.assert_allclose(packed.load(out)(images), expected, rtol=1e-4, atol=1e-4)
