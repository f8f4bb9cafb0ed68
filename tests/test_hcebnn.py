"""HCEBNN: the expert binary convolution, the architecture, conversion, cost and parity with the
official code's fixtures."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import packed
from bnn_jax.binarize import ste_sign, winner_take_all
from bnn_jax.bops import analyze_model
from bnn_jax.convert import (by_torch_key, hcebnn_training_keys, model_config_from_hcebnn,
                             torch_to_flax, with_prefix)
from bnn_jax.errors import ConfigError
from bnn_jax.layers import SOWN, BinaryConv, ExpertBinaryConv, conv2d, select_experts
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.models.hcebnn import STRICT_STE_SIGN, expand_experts, parameters_per_image
from bnn_jax.parallel import run_once_compiler_options
from bnn_jax.parity import check_fixture, read_fixture

from conftest import SHARED
from helpers import random_variables, trained_like

HCEBNN_DIR = SHARED / "reference" / "hcebnn"
FIXTURES = sorted(p.stem for p in HCEBNN_DIR.glob("*.npz"))
BINARY = dict(activation_binarizer=STRICT_STE_SIGN, weight_binarizer=STRICT_STE_SIGN)


def released_reference():
  with open(HCEBNN_DIR / "imagenet_param_counts.json") as f:
    return json.load(f)


def expert_conv(**fields):
  defaults = dict(features=8, kernel_size=3, strides=1, groups=2, num_experts=3, scale=False,
                  use_se=False, **BINARY)
  return ExpertBinaryConv(**{**defaults, **fields})


def run(module, x, variables=None):
  variables = variables or module.init(jax.random.key(0), x)
  y, collections = module.apply(variables, x, mutable=[SOWN])
  return variables, y, np.asarray(collections[SOWN]["expert_choice"][0])


def plain_conv(x, kernel, strides=1, groups=2):
  """A BinaryConv with the same binarizers and a given kernel."""
  conv = BinaryConv(kernel.shape[-1], kernel.shape[0], strides, groups=groups, **BINARY)
  return conv.apply({"params": {"kernel": kernel}}, x)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_official_code(fixture, shared_dir):
  report = check_fixture(str(HCEBNN_DIR / f"{fixture}.npz"))
  assert report.passed, "\n".join(report.lines())
  assert report.outputs["gate_choice_mismatch"] == 0.0


def released_form(key: str) -> str:
  """A training-code key as the released model (``test/model.py``) names it."""
  parts = key.split(".")
  if parts[0] == "conv1" and len(parts) > 2:  # the stem: conv1.conv2_1.0.weight -> conv2_1.0.weight
    parts = parts[1:]
  parts = [f"activation{p[3:]}" if p[:3] == "act" and p[3:].isdigit() else p for p in parts]
  return ".".join(parts).replace("activation_post_process.alpha", "alpha2")


def test_a_released_form_fixture_with_post_step_statistics_is_checked(shared_dir, tmp_path):
  """Whether a fixture is of the released model is decided once, from its state dict (alpha2):
  its statistics after the step, which have no alpha2 to tell, are named as the released model
  names them too. The fixture is made from a training-code one (the released downsample convs
  have a scale and no SE), its statistics computed here by the released model."""
  description, arrays = read_fixture(str(HCEBNN_DIR / "hcebnn_binary.npz"))
  state_dict = with_prefix(arrays, "state_dict/")
  released = {released_form(k): v for k, v in state_dict.items()
              if not (".downsample." in k and ".se_fc." in k)}
  for key in state_dict:
    if ".downsample." in key and key.endswith(".fc.weight"):  # each downsample expert conv
      conv = key[:-len(".fc.weight")]
      released[f"{conv}.alpha2"] = np.ones((1, state_dict[f"{conv}.weight"].shape[1], 1, 1))
  model = build_model(model_config_from_hcebnn(description, released=True))
  images = jnp.asarray(arrays["input_nchw"].transpose(0, 2, 3, 1))
  variables = torch_to_flax(hcebnn_training_keys(released), abstract_variables(model, images.shape))
  _, updates = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]),
                       compiler_options=run_once_compiler_options())(variables)
  statistics = {released_form(k[len("backbone."):]): v
                for k, v in by_torch_key(updates["batch_stats"]).items()}
  np.savez(tmp_path / "released.npz", input_nchw=arrays["input_nchw"], labels=arrays["labels"],
           **{f"state_dict/{k}": v for k, v in released.items()},
           **{f"running_after_train_step/{k}": v for k, v in statistics.items()})
  (tmp_path / "released.json").write_text(json.dumps(description))
  report = check_fixture(str(tmp_path / "released.npz"))
  assert set(report.outputs) == {"running_mean_after_step", "running_var_after_step"}
  assert report.passed, "\n".join(report.lines())


def test_each_sample_is_convolved_with_its_selected_expert_alone():
  x = jax.random.normal(jax.random.key(1), (6, 7, 7, 4))
  variables, y, choice = run(expert_conv(strides=2), x)
  kernels = variables["params"]["kernel"]
  assert choice.shape == (6,) and len(set(choice.tolist())) > 1  # several experts in use
  for b in range(6):  # per-sample selection = a loop over samples, one expert each
    expected = plain_conv(x[b:b + 1], kernels[choice[b]], strides=2)
    np.testing.assert_allclose(y[b:b + 1], expected, rtol=1e-6, atol=1e-6)


def test_all_experts_equal_is_a_plain_binary_conv():
  x = jax.random.normal(jax.random.key(2), (4, 6, 6, 4))
  module = expert_conv()
  variables = module.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"][1]
  variables["params"]["kernel"] = jnp.broadcast_to(kernel, variables["params"]["kernel"].shape)
  _, y, _ = run(module, x, variables)
  np.testing.assert_array_equal(y, plain_conv(x, kernel))


def test_selection_backward_is_the_gated_sum_of_every_expert():
  """∂/∂choice[b, n] = ⟨∂L/∂W_b, W_n⟩ for all n, ∂/∂W_n = Σ_b choice[b, n]·∂L/∂W_b: the
  gradients of Σ_n choice[b, n]·W_n, which the official code computes with a matmul."""
  kernels = jax.random.normal(jax.random.key(3), (3, 2, 2, 4, 5))
  choice = jax.nn.one_hot(jnp.array([2, 0, 2, 1]), 3)
  weights = jax.random.normal(jax.random.key(4), (4, 2, 2, 4, 5))
  loss = lambda select: lambda c, k: jnp.sum(jnp.sin(select(c, k)) * weights)  # noqa: E731
  ours = jax.grad(loss(select_experts), argnums=(0, 1))(choice, kernels)
  matmul = jax.grad(loss(lambda c, k: jnp.einsum("bn,n...->b...", c, k)), argnums=(0, 1))(choice, kernels)
  for a, b in zip(ours, matmul):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ours[0]) != 0)  # every expert's logit learns, not only the chosen one


def test_winner_take_all_is_one_hot_forward_and_identity_backward():
  p = jnp.array([[0.1, 0.7, 0.7], [0.9, 0.2, 0.3]])
  np.testing.assert_array_equal(winner_take_all(p), [[0, 1, 0], [1, 0, 0]])  # first on ties
  g = jax.random.normal(jax.random.key(0), p.shape)
  np.testing.assert_array_equal(jax.vjp(winner_take_all, p)[1](g)[0], g)


def test_gate_and_input_learn_through_the_winner_take_all():
  """Gradients equal those of the official formulation, written here with the gated sum
  Σ_n h_n·W_n; the gate's path adds to the input's gradient (through the global average)."""
  x = jax.random.normal(jax.random.key(5), (4, 6, 6, 4))
  module = expert_conv()
  params = module.init(jax.random.key(0), x)["params"]
  target = jnp.arange(8.0)

  def official(params, x, gate_path=True):
    logits = x.mean((1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]
    h = winner_take_all(jax.nn.sigmoid(logits if gate_path else jax.lax.stop_gradient(logits)))
    kernels = ste_sign(jnp.einsum("bn,n...->b...", h, params["kernel"]), 1.0, False)
    signs = ste_sign(x, 1.0, False)
    y = jnp.concatenate([conv2d(signs[b:b + 1], kernels[b], 1, 1, 2, jnp.float32) for b in range(4)])
    return jnp.sum(y * target)

  ours = jax.grad(lambda p, x: jnp.sum(module.apply({"params": p}, x) * target), argnums=(0, 1))
  expected = jax.grad(official, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(ours(params, x)), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.abs(expected[0]["fc"]["kernel"]).sum() > 0 and np.abs(expected[0]["fc"]["bias"]).sum() > 0
  without_gate = jax.grad(lambda x: official(params, x, gate_path=False))(x)
  assert np.abs(expected[1] - without_gate).max() > 1e-3


@pytest.mark.parametrize("fields", [dict(use_first_expert=True),
                                    dict(activation_binarizer=None, use_first_expert=True)])
def test_expert_zero_forced_gives_the_gate_no_gradient(fields):
  x = jax.random.normal(jax.random.key(6), (4, 6, 6, 4))
  module = expert_conv(**fields)
  variables, y, choice = run(module, x)
  assert np.all(choice == 0)
  activations = fields.get("activation_binarizer", BINARY["activation_binarizer"])
  conv = BinaryConv(8, 3, groups=2, activation_binarizer=activations,
                    weight_binarizer=BINARY["weight_binarizer"])
  np.testing.assert_array_equal(y, conv.apply({"params": {"kernel": variables["params"]["kernel"][0]}}, x))
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2))(variables["params"])
  assert not np.any(grads["fc"]["kernel"]) and not np.any(grads["fc"]["bias"])
  assert not np.any(grads["kernel"][1:]) and np.any(grads["kernel"][0])


def small_model(**fields):
  config = dict(backbone="EBResNet", num_classes=10, structure=(1, 1, 1, 1), groups=(4, 8, 8, 16),
                expansion=(0.5, 0.5, 0.25, 0.25), stem_channels=64)
  return build_model({**config, **fields})


def test_expansion_copies_expert_zero_into_every_gated_expert():
  """The official expansion stage; the downsample convs (always expert 0, and checked so against
  the fixtures' recorded choices by the parity test) are left as they are."""
  template = abstract_variables(small_model(), (1, 32, 32, 3))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda leaf: rng.standard_normal(leaf.shape, np.float32), template)
  block, expanded = params["backbone"]["layer2.0"], expand_experts(params)["backbone"]["layer2.0"]
  for name in ("conv1", "conv2", "conv3"):
    kernels = block[name]["kernel"]
    np.testing.assert_array_equal(expanded[name]["kernel"], np.broadcast_to(kernels[:1], kernels.shape))
  np.testing.assert_array_equal(expanded["downsample"]["1"]["kernel"], block["downsample"]["1"]["kernel"])
  np.testing.assert_array_equal(expanded["bn1"]["scale"], block["bn1"]["scale"])


@pytest.mark.parametrize("form, released", [("released_test_model", True),
                                            ("training_model_equivalent", False)])
def test_imagenet_model_parameters_and_keys_equal_the_official(form, released, shared_dir):
  reference = released_reference()[form]
  model = build_model(model_config_from_hcebnn(reference["config"], released))
  template = abstract_variables(model, (1, 224, 224, 3))
  count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(template["params"]))
  assert count == reference["num_params_requires_grad"]
  state_dict = {}
  for line in (HCEBNN_DIR / reference["keys_file"]).read_text().splitlines():
    key, shape = line.split("\t")
    state_dict[key] = np.zeros(json.loads(shape), np.float32)
  assert len(state_dict) == reference["num_state_dict_entries"]
  torch_to_flax(hcebnn_training_keys(state_dict), template)  # raises on any missing/unexpected key


def test_released_keys_are_renamed_to_the_training_code_names():
  renamed = hcebnn_training_keys({"conv2_1.0.weight": 1, "layer1.0.activation3.weight": 2,
                                  "layer1.0.conv1.alpha2": 3, "fc.weight": 4})
  assert renamed == {"conv1.conv2_1.0.weight": 1, "layer1.0.act3.weight": 2,
                     "layer1.0.conv1.activation_post_process.alpha": 3, "fc.weight": 4}


def test_released_model_bops_count_one_expert_per_image(shared_dir):
  """BOPs by hand: each binary conv once per image with one expert's kernel (grouped 3×3 convs,
  the ungrouped 1×1 g layer); the gate, SE, stem, downsample and classifier are FLOPs."""
  reference = released_reference()["released_test_model"]
  model = build_model(model_config_from_hcebnn(reference["config"], released=True))
  report = analyze_model(model, (1, 224, 224, 3))
  expected, channels, size = 0, 64, 56
  for stage, (depth, groups) in enumerate(zip((1, 2, 6, 2), (4, 8, 8, 16))):
    width = 128 * 2 ** stage
    for index in range(depth):
      size = size // 2 if stage and not index else size
      expected += size * size * width * (channels // groups * 9 + width // groups * 9 + width)
      channels = width
  assert report.bops == expected == 1_706_786_816
  assert report.mixed == 0
  expert_kernels = sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(
      abstract_variables(model, (1, 224, 224, 3))["params"])[0] if leaf.ndim == 5
      and "downsample" not in jax.tree_util.keystr(path))
  assert report.binary_params == expert_kernels
  params = abstract_variables(model, (1, 224, 224, 3))["params"]
  assert parameters_per_image(params) == 13_805_324  # the reference's count


def test_open_clip_ste_has_no_gradient_at_exactly_one():
  x = jnp.array([-1.0, -0.5, 0.999, 1.0, 1.5])
  open_grad = jax.grad(lambda x: jnp.sum(ste_sign(x, 1.0, False)))(x)
  closed_grad = jax.grad(lambda x: jnp.sum(ste_sign(x, 1.0)))(x)
  np.testing.assert_array_equal(open_grad, [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(closed_grad, [1, 1, 1, 1, 0])


def test_configuration_errors_are_clear():
  for fields, message in ((dict(gate="relu"), "unknown gate 'relu'"),
                          (dict(stem_channels=16), "at least 8 output channels"),
                          (dict(stem="vgg"), "unknown stem")):
    with pytest.raises(ConfigError, match=message):
      abstract_variables(small_model(**fields), (1, 32, 32, 3))


def test_bit_packed_inference_equals_the_float_model_and_survives_the_file(tmp_path):
  """Each sample's expert on XNOR-popcount of packed bits, group by group: the same logits."""
  config = dict(backbone="EBResNet", num_classes=10, structure=(1, 1, 1, 1), groups=(4, 8, 8, 16),
                expansion=(0.5, 0.5, 0.25, 0.25), stem_channels=64)
  model = build_model(config)
  variables = trained_like(random_variables(abstract_variables(model, (1, 32, 32, 3))))
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  weights = packed.pack_weights(model, variables, images.shape)
  assert weights["backbone/layer2.0/conv1"]["bits"].shape == (4, 8, 9, 1, 8)  # E, g, k², words, O/g
  assert not any("downsample" in layer for layer in weights)  # real-valued: runs as is
  path = str(tmp_path / "hcebnn.npz")
  packed.save(path, config, images.shape, variables, weights)
  logits = packed.load(path)(images)  # packed once, run from the file
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
