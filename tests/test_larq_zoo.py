"""larq-zoo's models: parity with larq-zoo's own fixtures, full-size counts, weight files."""
import json

import h5py
import jax
import numpy as np
import pytest

from bnn_jax import bops, keras_weights
from bnn_jax.config import load_config
from bnn_jax.errors import ConfigError
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.models.larq_zoo.functional import recording
from bnn_jax.optim import norm_params_mask
from bnn_jax.parity_larq import check_larq_fixture, model_config
from bnn_jax.variables import BINARY, NORM, variable_kinds
from conftest import SHARED

LARQ_DIR = SHARED / "reference" / "larq"
COUNTS = LARQ_DIR / "larq_zoo_counts.json"
FIXTURES = sorted(p.name for p in LARQ_DIR.glob("*.npz")) if LARQ_DIR.exists() else []
COUNT_NAMES = sorted(json.loads(COUNTS.read_text())) if COUNTS.exists() else []


@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_larq_zoo(fixture):
  """Every output strictly; gradients upstream of a max pool whose window ties to float rounding
  are shown, not compared (``parity_larq.tie_routed``: TensorFlow's own kernels route them
  differently, README "Larq Zoo")."""
  report = check_larq_fixture(str(LARQ_DIR / fixture))
  assert report.passed, "\n".join(report.lines())


def _fixture_model(fixture):
  description = json.loads((LARQ_DIR / fixture.replace(".npz", ".json")).read_text())
  model = build_model(model_config(description))
  return model, tuple(description["input_shape"])


@pytest.mark.parametrize("fixture", FIXTURES)
def test_h5_round_trip_is_bit_identical(fixture, tmp_path):
  """larq-zoo's file -> our variables -> a file: the same layers, in the same order, with the same
  weight names and bit-identical values (what larq-zoo's weights=path then loads)."""
  model, shape = _fixture_model(fixture)
  source = keras_weights.read_h5(str(LARQ_DIR / fixture.replace(".npz", ".h5")))
  variables, missing = keras_weights.keras_to_flax(source, model, shape,
                                                   abstract_variables(model, shape))
  assert missing == []
  keras_weights.write_h5(str(tmp_path / "out.h5"), keras_weights.flax_to_keras(variables, model, shape))
  written = keras_weights.read_h5(str(tmp_path / "out.h5"))
  assert [name for name, _ in written] == [name for name, _ in source]
  for (_, ours), (_, theirs) in zip(written, source):
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
      assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", COUNT_NAMES)
def test_full_size_counts(name):
  """Trainable = our params; non-trainable = BatchNorm statistics plus fixed kernels (QuickNet's
  blur pool), as Keras' count_params() counts them; BOPs from our jaxpr walk = larq's ModelProfile
  binary MACs (within 1%) and its FLOPs the float MACs (depthwise convolutions included), all
  from shapes alone."""
  expected = json.loads(COUNTS.read_text())[name]
  model = build_model(load_config(f"larq_zoo:{name}").model)
  shape = (1, 224, 224, 3)
  with recording() as layers:  # one trace: the variables and the fixed kernels
    variables = abstract_variables(model, shape)
  fixed = sum(np.prod(value.shape) for layer in layers for value in layer.constants.values())
  report = bops.analyze_model(model, shape)
  assert (report.params, _count(variables["batch_stats"]) + fixed) == (
      expected["params_trainable"], expected["params_non_trainable"])
  assert report.bops == pytest.approx(expected["binary_macs"], rel=0.01)
  if not report.mixed:  # larq counts a mixed layer's MACs as float (BinaryAlexNet's first) or
    assert report.flops == expected["float_macs"]  # apart (DoReFa's 2-bit inputs)
  # What the per-kind optimizers route (bnn_jax.variables, from module types): the binary kernels
  # are what the walk finds binarized, the normalisation parameters those with statistics.
  kinds = jax.tree.leaves(variable_kinds(model, shape).kinds)
  leaves = jax.tree.leaves(variables["params"])
  assert sum(leaf.size for leaf, kind in zip(leaves, kinds) if kind == BINARY) == report.binary_params
  assert [kind == NORM for kind in kinds] == jax.tree.leaves(
      norm_params_mask(variables["params"], variables["batch_stats"]))


def test_full_size_file_of_another_session_and_notop_file_convert(tmp_path):
  """A full-size QuickNet file as larq-zoo lays it out, its layers named as in a session that
  built other models first (quant_conv2d_40, ...: Keras loads by position, so do we), converts;
  without its classifier (a notop file) everything but the classifier is filled; a file of
  another model is one error naming both layer counts."""
  model = build_model(load_config("larq_zoo:quicknet").model)
  shape = (1, 224, 224, 3)
  template = abstract_variables(model, shape)
  rng = np.random.default_rng(0)
  values = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), template)
  layers = keras_weights.flax_to_keras(values, model, shape)
  def offset(name):  # quant_conv2d -> quant_conv2d_40, quant_conv2d_3 -> quant_conv2d_43
    layer, _, rest = name.partition("/")
    number = int(layer[len(keras_weights.kind(layer)) + 1:] or 0)
    return f"{keras_weights.kind(layer)}_{number + 40}" + (f"/{rest}" if rest else "")

  renamed = [(offset(name), [(offset(w), v) for w, v in weights]) for name, weights in layers]
  path = str(tmp_path / "quicknet_weights.h5")
  keras_weights.write_h5(path, renamed)
  with h5py.File(path, "r") as f:
    assert f.attrs["layer_names"][1] == b"quant_conv2d_40"
  converted, missing = keras_weights.keras_to_flax(keras_weights.read_h5(path), model, shape,
                                                   template)
  assert missing == []
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(values)):
    np.testing.assert_array_equal(a, b)
  notop = [layer for layer in renamed if not layer[0].startswith("quant_dense")]
  initial = jax.tree.map(np.zeros_like, values)
  partial, missing = keras_weights.keras_to_flax(notop, model, shape, initial)
  assert missing == ["quant_dense"]
  np.testing.assert_array_equal(partial["params"]["backbone"]["quant_dense"]["kernel"], 0)
  with pytest.raises(ConfigError, match="layers with weights"):
    keras_weights.keras_to_flax(notop[:40], model, shape, initial)


@pytest.mark.skipif(not (LARQ_DIR / "quicknet.json").exists(), reason="no shared larq fixtures")
def test_convert_then_export_keras_h5_gives_larq_zoos_file_back(tmp_path):
  """larq-zoo's file -> ``convert --keras-weights`` (an Orbax workdir) -> ``export --format
  keras-h5``: the same file, layer for layer and bit for bit (what larq-zoo's weights=path loads)."""
  from bnn_jax.convert import convert_keras_weights
  from bnn_jax.export import export_keras

  fixture = "quicknet"
  description = json.loads((LARQ_DIR / f"{fixture}.json").read_text())
  config = load_config(f"larq_zoo:{fixture}")
  config.model.update(model_config(description))
  config.dataset.image_size = description["input_shape"][1]
  source = str(LARQ_DIR / f"{fixture}.h5")
  convert_keras_weights(config, source, str(tmp_path / "run"))
  sizes = export_keras(config, str(tmp_path / "run"), str(tmp_path / "back.h5"))
  assert sizes["step"] == 0
  text = lambda values: [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # noqa: E731
  with h5py.File(source, "r") as a, h5py.File(str(tmp_path / "back.h5"), "r") as b:
    assert text(a.attrs["layer_names"]) == text(b.attrs["layer_names"])
    for layer in text(a.attrs["layer_names"]):
      names = text(a[layer].attrs["weight_names"])
      assert names == text(b[layer].attrs["weight_names"])
      for name in names:
        assert a[layer][name][()].tobytes() == b[layer][name][()].tobytes()
