"""Every architecture: full-size parameter counts (eval_shape only) and parity fixtures."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax.convert import StateDictMismatch, torch_to_flax
from bnn_jax.errors import ConfigError
from bnn_jax.models import build_model
from bnn_jax.parity import check_fixture

from conftest import KEYS_DIR, PARITY_DIR

# The original's full-size ImageNet models, in our config terms.
FULL_SIZE = {
    "irnet_r18": dict(arch="IRNet-18", stem_act="hardtanh", neck="gap_bn"),
    "irnet_r34": dict(arch="IRNet-34", stem_act="hardtanh", neck="gap_bn"),
    "birealnet_r18": dict(arch="BiRealNet-18", avg_down=True),
    "reactnet_r18": dict(arch="ReActNet-18", avg_down=True),
    "reactnet_r34": dict(arch="ReActNet-34", avg_down=True),
    "reactnet_a": dict(backbone="MobileArch", arch="ReActNet-A"),
    "strong_baseline": dict(arch="StrongBaseline", stem_act="prelu"),
    "real2bi": dict(arch="Real2Bi", stem_act="prelu"),
    "real2bi_fp": dict(arch="Real2BiFP", stem_act="prelu"),
}


def full_size_template(name):
  model = build_model(dict(num_classes=1000, **FULL_SIZE[name]))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


def torch_keys(name):
  rows = (line.split("\t") for line in (KEYS_DIR / f"{name}.keys.txt").read_text().splitlines())
  return {key: tuple(json.loads(shape.replace("(", "[").replace(",)", "]").replace(")", "]")))
          for key, shape in rows}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_count_equals_original(name, shared_dir):
  counts = json.loads((KEYS_DIR / "param_counts.json").read_text())
  template = full_size_template(name)
  assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(template["params"])) == counts[name]


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_state_dict_keys_map_one_to_one(name, shared_dir):
  # Zeros shaped like the original's full state dict convert with nothing missing or left over.
  state_dict = {k: np.zeros(shape, np.float32) for k, shape in torch_keys(name).items()}
  variables = torch_to_flax(state_dict, full_size_template(name))
  assert sum(np.size(v) for v in jax.tree_util.tree_leaves(variables)) == sum(
      np.size(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))


def test_real_resnet34_teacher_matches_torchvision_layout():
  model = build_model(dict(arch="ResNet-34", stem_act="relu", num_classes=1000))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(np.size(p) for p in jax.tree_util.tree_leaves(template["params"])) == 21797672
  keys = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512), "fc.bias": (1000,),
          "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.running_var": (128,)}
  with pytest.raises(StateDictMismatch) as error:
    torch_to_flax({k: np.zeros(s, np.float32) for k, s in keys.items()}, template)
  assert not error.value.unexpected and not error.value.misshaped  # torchvision names all recognised


def test_mismatched_state_dict_lists_missing_unexpected_and_misshaped(shared_dir):
  state_dict = {k: np.zeros(s, np.float32) for k, s in torch_keys("irnet_r18").items()}
  del state_dict["backbone.layer1.0.bn1.weight"]
  state_dict["backbone.layer9.conv.weight"] = np.zeros(3, np.float32)
  state_dict["head.fc.weight"] = np.zeros((10, 512), np.float32)
  with pytest.raises(StateDictMismatch) as error:
    torch_to_flax(state_dict, full_size_template("irnet_r18"))
  assert error.value.missing == ["backbone.layer1.0.bn1.weight"]
  assert error.value.unexpected == ["backbone.layer9.conv.weight"]
  assert error.value.misshaped == [("head.fc.weight", (10, 512), (1000, 512))]


def test_unknown_arch_and_option_are_one_clear_error():
  with pytest.raises(ConfigError, match="unknown arch 'IRNet-50'.*IRNet-18"):
    build_model(dict(arch="IRNet-50", num_classes=10)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['stem_chanels'\]"):
    build_model(dict(arch="IRNet-18", stem_chanels=8, num_classes=10))


@pytest.mark.parametrize("fixture", ["irnet_r18", "reactnet_r18_step1", "reactnet_r18_step2",
                                     "reactnet_a_small"])
def test_parity_with_original(fixture, shared_dir):
  report = check_fixture(str(PARITY_DIR / f"{fixture}.npz"))
  assert report.passed, "\n".join(report.lines())


def last_feature_map(model, image_size=32):
  """(height, width) of the smallest 4-D output of ``model``'s submodules (the map its global
  pool averages: pools and reshapes are no submodules), from one abstract trace."""
  def forward():
    return model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                      capture_intermediates=True)["intermediates"]
  maps = [leaf.shape for leaf in jax.tree_util.tree_leaves(jax.eval_shape(forward))
          if len(leaf.shape) == 4]
  return min(shape[1:3] for shape in maps)


@pytest.mark.parametrize("backbone", ["QuickNet", "BinaryDenseNet28", "BinaryResNetE", "BiRealNet",
                                      "RealToBinNet", "MeliusNet22"])
def test_larq_zoo_cifar_stem_gives_the_first_stage_the_whole_32x32_image(backbone):
  from helpers import LARQ_ZOO_REDUCED
  options = dict(backbone=backbone, num_classes=10, **LARQ_ZOO_REDUCED[backbone])
  # three halvings after the stem, as 56×56 → 7×7 after the ImageNet stem (224 → 56)
  assert last_feature_map(build_model(dict(options, cifar_stem=True))) == (4, 4)
  if backbone in ("QuickNet", "BinaryDenseNet28", "BinaryResNetE"):  # an ImageNet stem at 32×32:
    # larq-zoo's for QuickNet, asked for where larq-zoo picks its CIFAR stem below 50 pixels
    assert last_feature_map(build_model(dict(options, cifar_stem=False))) == (1, 1)


def test_larq_zoo_models_without_a_cifar_stem_refuse_one_in_one_line():
  with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['cifar_stem'\] for XNORNet"):
    build_model(dict(backbone="XNORNet", num_classes=10, cifar_stem=True))
