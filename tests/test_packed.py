"""Bit-packed inference: exact XNOR-popcount dot products, padding corrected, whole models."""
import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import kernels, keras_weights, op_profile, packed
from bnn_jax.binarize import sign
from bnn_jax.errors import ConfigError
from bnn_jax.evaluate import evaluate_checkpoint, restore_checkpoint
from bnn_jax.export import export, export_stablehlo
from bnn_jax.layers.quant import QuantConv, QuantDense
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.parity_larq import model_config

from conftest import SHARED
from helpers import compiled_fast, load_config, random_variables, shrink, trained_like

LARQ_DIR = SHARED / "reference" / "larq"
LARQ_FIXTURES = sorted(p.stem for p in LARQ_DIR.glob("*.npz")) if LARQ_DIR.exists() else []


def backend_param(backend):
  """pytest's param of a packed backend; the native one skipped (and said why) where it cannot
  build."""
  reason = "no native kernel here (no C++ compiler, or its build failed: logged)"
  return pytest.param(backend, marks=pytest.mark.skipif(
      backend == "native" and not kernels.available(), reason=reason))


BACKENDS = [backend_param("jax"), backend_param("native")]


def test_pack_puts_element_i_in_bit_i_and_zero_counts_as_plus_one():
  x = np.full((1, 40), -1.0, np.float32)
  x[0, [0, 3, 31, 32, 39]] = 1.0
  x[0, 5] = 0.0  # sign(0) = +1
  words = np.asarray(packed.pack(jnp.asarray(x)))
  assert words.dtype == np.uint32 and words.shape == (1, 2)
  assert words[0, 0] == (1 << 0) | (1 << 3) | (1 << 5) | (1 << 31)
  assert words[0, 1] == (1 << 0) | (1 << 7)  # channels 32 and 39; bits 8..31 unused, 0


@pytest.mark.parametrize("channels", [1, 31, 32, 40, 64, 100])
def test_pack_equals_the_bit_by_bit_definition(channels):
  x = np.array(jax.random.normal(jax.random.key(channels), (3, 5, channels)))
  x.flat[:4] = [0.0, -0.0, np.nan, -np.inf]  # x >= 0 is +1: zeros are, NaN is not
  words = np.zeros((3, 5, -(-channels // 32)), np.uint32)
  for c in range(channels):
    words[..., c // 32] |= (x[..., c] >= 0).astype(np.uint32) << np.uint32(c % 32)
  np.testing.assert_array_equal(jax.jit(packed.pack)(x), words)


SAME_10X11_STRIDE_2 = ((0, 1), (1, 1))  # TensorFlow's "same", stride 2, 10×11: rows pad after only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels, kernel_size, strides, pads, pad_value, dilation", [
    (64, 3, 1, packed.symmetric(1), 0.0, 1), (37, 3, 2, packed.symmetric(1), 0.0, 1),
    (70, 1, 1, packed.NO_PADS, 0.0, 1), (16, 1, 2, packed.NO_PADS, 0.0, 1),
    (33, 3, 1, packed.NO_PADS, 0.0, 1), (8, 5, 2, packed.symmetric(2), 0.0, 1),
    (37, 3, 2, SAME_10X11_STRIDE_2, 0.0, 1), (37, 3, 2, SAME_10X11_STRIDE_2, 1.0, 1),
    (37, 3, 2, SAME_10X11_STRIDE_2, -1.0, 1),
    (40, 3, 1, packed.symmetric(2), 0.0, 2), (40, 3, 1, packed.symmetric(2), 1.0, 2)])
def test_packed_dot_products_equal_the_float_convolution_as_integers(channels, kernel_size, strides,
                                                                       pads, pad_value, dilation,
                                                                       backend):
  keys = jax.random.split(jax.random.key(channels + kernel_size + strides), 2)
  a = sign(jax.random.normal(keys[0], (2, 10, 11, channels)))
  w = sign(jax.random.normal(keys[1], (kernel_size, kernel_size, channels, 24)))
  padded = jnp.pad(a, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
  expected = jax.lax.conv_general_dilated(padded, w, (strides, strides), "VALID",
                                          rhs_dilation=(dilation, dilation),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bits, scale = packed.packed_weights(w)
  np.testing.assert_array_equal(scale, 1.0)
  dots = jax.jit(packed.packed_conv, static_argnums=range(2, 9))(
      packed.pack(a), bits, channels, kernel_size, strides, pads, pad_value, dilation, backend)
  assert dots.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(dots), np.asarray(expected).astype(np.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups, channels, outputs, strides, pads, pad_value", [
    (4, 40, 24, 1, packed.symmetric(1), 0.0), (2, 70, 6, 2, SAME_10X11_STRIDE_2, 1.0),
    (8, 8, 16, 1, packed.symmetric(1), -1.0)])
def test_grouped_dot_products_equal_the_float_convolution_as_integers(groups, channels, outputs,
                                                                      strides, pads, pad_value,
                                                                      backend):
  keys = jax.random.split(jax.random.key(groups), 2)
  a = sign(jax.random.normal(keys[0], (2, 10, 11, channels)))
  w = sign(jax.random.normal(keys[1], (3, 3, channels // groups, outputs)))
  padded = jnp.pad(a, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
  expected = jax.lax.conv_general_dilated(padded, w, (strides, strides), "VALID",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=groups)
  bits, _ = packed.packed_grouped_weights(w, groups)
  dots = jax.jit(packed.packed_grouped_conv, static_argnums=2, static_argnames=(
      "kernel_size", "strides", "pads", "pad_value"))(a, bits, backend, kernel_size=3,
                                                      strides=strides, pads=pads,
                                                      pad_value=pad_value)
  np.testing.assert_array_equal(np.asarray(dots), np.asarray(expected).astype(np.int32))


class OneLayer(nn.Module):
  """A single layer as a model (what packed_model takes: ``apply(variables, x, train=False)``)."""
  layer: nn.Module

  def __call__(self, x, train=False):
    return self.layer(x)


BINARY = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign")


# larq's layers with ±1 weights, so that their float outputs are the integer dot products (plus
# the bias): each equals the packed one exactly.
@pytest.mark.parametrize("layer, input_shape", [
    (QuantConv(24, 3, strides=2, padding="same", **BINARY), (2, 10, 11, 37)),
    (QuantConv(24, 3, strides=2, padding="same", pad_values=1.0, **BINARY), (2, 10, 11, 37)),
    (QuantConv(16, 3, padding="same", dilation=2, pad_values=1.0, **BINARY), (2, 10, 11, 40)),
    (QuantConv(16, 3, strides=2, padding="valid", use_bias=True, **BINARY), (2, 10, 11, 40)),
    (QuantConv(2, 3, strides=2, padding="same", depthwise=True, **BINARY), (2, 10, 11, 5)),
    (QuantConv(1, 3, padding="same", depthwise=True, pad_values=1.0, **BINARY), (2, 10, 11, 5)),
    (QuantDense(10, **BINARY), (3, 70))],
    ids=["same_s2_pad0", "same_s2_pad+1", "dilation2_pad+1", "valid_s2_bias", "depthwise_s2_pad0",
         "depthwise_pad+1", "dense_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_larq_layers_equal_their_float_outputs_exactly(layer, input_shape, backend):
  model = OneLayer(layer)
  variables = random_variables(abstract_variables(model, input_shape))
  x = jax.random.normal(jax.random.key(5), input_shape)
  np.testing.assert_array_equal(packed.packed_model(model, variables, input_shape, backend)(x),
                                model.apply(variables, x))


def test_a_dorefa_like_layer_is_refused_in_one_line():
  model = OneLayer(QuantConv(8, 3, padding="same", input_quantizer="dorefa",
                             kernel_quantizer="magnitude_aware_sign_unclipped"))
  variables = random_variables(abstract_variables(model, (1, 8, 8, 4)))
  with pytest.raises(ConfigError, match=r"^bit-packed inference needs fully binary layers; layer "
                                        r"has activations dorefa and weights "
                                        r"magnitude_aware_sign_unclipped \(binary: \[") as error:
    packed.pack_weights(model, variables, (1, 8, 8, 4))
  assert "\n" not in str(error.value)


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
  with pytest.raises(ConfigError, match=f"fully binary layers; backbone/layer1.0/conv1 has "
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


# What a user runs with jax and numpy alone (bnn_jax/stablehlo.py's docstring), in a process
# that never imports bnn_jax or Flax: one program, batches of two sizes.
STANDALONE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    with np.load(sys.argv[1]) as file:
      program = jax.export.deserialize(bytearray(file["program"]))
      weights = [file[f"weights/{i}"] for i in range(int(file["num_weights"]))]
    with np.load(sys.argv[2]) as batches:
      logits = {name: np.asarray(program.call(weights, batches[name])) for name in batches.files}
    assert not any(m.split(".")[0] in ("bnn_jax", "flax") for m in sys.modules), "imported"
    np.savez(sys.argv[3], **logits)
""")


def test_stablehlo_artifact_runs_with_jax_alone_and_equals_the_packed_model(digits_run, tmp_path):
  config, workdir, _ = digits_run
  out, images_file, logits_file = (str(tmp_path / name) for name in
                                   ("model.npz", "images.npz", "logits.npz"))
  sizes = export_stablehlo(config, workdir, out)
  assert sizes["binary_layers"] == 16 and "cpu" in sizes["platforms"]
  experiment, variables, _ = restore_checkpoint(config, workdir)
  image_shape = tuple(experiment.input_shape[1:])
  batches = {f"b{n}": np.asarray(jax.random.normal(jax.random.key(n), (n,) + image_shape))
             for n in (3, 5)}
  np.savez(images_file, **batches)
  subprocess.run([sys.executable, "-c", STANDALONE, out, images_file, logits_file], check=True)
  weights = packed.pack_weights(experiment.model, variables, experiment.input_shape)
  with np.load(logits_file) as logits:  # the pure-JAX path it serialises, and the native one
    for (name, images), backend in zip(batches.items(), ("jax", "auto")):
      run = packed.PackedClassifier(experiment.model, weights, backend).bind(variables)
      np.testing.assert_array_equal(logits[name], run(images))


def _larq_fixture(name):
  """A fixture's model, its larq-zoo weights, config, input; skips a model not built here yet."""
  description = json.loads((LARQ_DIR / f"{name}.json").read_text())
  try:
    config = model_config(description)
    model = build_model(config)
  except ConfigError as error:
    pytest.skip(f"not built here yet: {error}")
  shape = tuple(description["input_shape"])
  variables, missing = keras_weights.keras_to_flax(
      keras_weights.read_h5(str(LARQ_DIR / f"{name}.h5")), model, shape,
      abstract_variables(model, shape))
  assert missing == []
  with np.load(LARQ_DIR / f"{name}.npz") as fixture:
    images = jnp.asarray(fixture["input_nhwc"])
  return model, jax.tree.map(jnp.asarray, variables), config, images


@pytest.mark.parametrize("name", LARQ_FIXTURES)
def test_packed_larq_zoo_model_from_its_file_matches_the_float_model(name, tmp_path):
  """Every fixture whose model is fully binary (the model decides: a partly binary layer is
  refused), with larq-zoo's weights, exported and run from the file."""
  model, variables, config, images = _larq_fixture(name)
  try:
    weights = packed.pack_weights(model, variables, images.shape)
  except ConfigError as error:
    if "needs fully binary layers" not in str(error):
      raise
    pytest.skip(f"not fully binary: {error}")
  assert weights, "no binary layer"
  path = str(tmp_path / "model.npz")
  packed.save(path, config, images.shape, variables, weights)
  with np.load(path) as file:  # binary kernels only as bits
    assert not {f"params/{layer}/{leaf}" for layer in weights
                for leaf in packed.KERNEL_LEAVES} & set(file.files)
  expected = compiled_fast(jax.jit(lambda v, x: model.apply(v, x, train=False)))(variables, images)
  run = packed.load(path)  # the jitted apply with the file's variables bound: compiled once, fast
  logits = compiled_fast(run.func)(*run.args, images)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_op_profile_attributes_each_op_to_its_module_and_custom_call():
  """What benchmark_packed.py --layers tabulates: self times by emitting module, the native
  kernel's calls named by their target."""
  model = OneLayer(QuantConv(64, 3, padding="same", pad_values=1.0, **BINARY))
  shape = (1, 16, 16, 64)
  variables = random_variables(abstract_variables(model, shape))
  weights = packed.pack_weights(model, variables, shape)
  classifier = packed.PackedClassifier(model, weights)
  apply = jax.jit(lambda v, w, x: classifier.apply(v, x, weights=w))
  ops = op_profile.profile(apply, variables, weights, jnp.ones(shape), repeats=2)
  assert ops and all(op.seconds >= 0 for op in ops)
  assert ops == sorted(ops, key=lambda op: -op.seconds)
  assert {op.module for op in ops} >= {"layer"}
  if packed.native("auto"):
    assert "bnn_jax_xnor_conv" in {op.target for op in ops if op.module == "layer"}
