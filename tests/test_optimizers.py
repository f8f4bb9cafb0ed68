"""Per-variable optimizers (larq's CaseOptimizer), Bop, WeightClip, Keras' SGD and Adam, larq-zoo's
cosine schedule and the flip ratio, by hand; the routing of every architecture's variables, from
shapes alone."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bnn_jax import bops, optim, step
from bnn_jax.config import default_config, load_config
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.models import build_model
from bnn_jax.parallel import run_once_compiler_options
from bnn_jax.variables import BINARY, KINDS, NORM, REAL, variable_kinds

from helpers import random_variables, shrink


def kind_optimizer(params, kinds, steps_per_epoch=10, total_steps=100, **sections):
  """make_kind_optimizer of a default config whose optimizer sections are updated by
  ``sections`` (``top=dict(...)`` for the top-level fields)."""
  config = default_config()
  config.optimizer.update(sections.pop("top", {}))
  config.schedule.update(sections.pop("schedule", {}))
  config.optimizer.update(sections)
  return optim.make_kind_optimizer(config.optimizer, config.schedule, steps_per_epoch, total_steps,
                                   params, {}, kinds)


# --- Bop ---------------------------------------------------------------------------------

def test_bop_flips_where_the_gradient_average_times_the_weight_reaches_the_threshold():
  """γ 0.5, τ 0.25, m from 0: m = g/2. A weight flips where w·m ≥ τ (at the threshold too:
  sign(0) = +1), else keeps its sign."""
  w = jnp.array([1., 1., 1., 1., -1., -1., -1., -1.])
  g = jnp.array([1., .5, 0., -1., -1., -.5, 0., 1.])
  # w·m:        .5  .25  0  -.5   .5  .25   0  -.5
  expected = [-1., -1., 1., 1., 1., 1., -1., -1.]
  tx = optim.bop(threshold=0.25, gamma=0.5)
  updates, state = tx.update(g, tx.init(w), w)
  np.testing.assert_array_equal(optax.apply_updates(w, updates), expected)
  np.testing.assert_array_equal(state.m, g / 2)
  assert int(state.count) == 1
  # τ = 0 and no gradient yet: w·m = 0 = τ, so every weight flips (larq sets them all to +1).
  zero = optim.bop(threshold=0.0, gamma=0.5)
  updates, _ = zero.update(jnp.zeros(2), zero.init(jnp.zeros(2)), jnp.array([1., -1.]))
  np.testing.assert_array_equal(jnp.array([1., -1.]) + updates, [-1., 1.])


def test_bop_follows_its_gamma_and_threshold_schedules_over_two_steps():
  """Step 0: γ 0.5, τ 0.25; step 1: γ 0.25, τ 0.5 (schedules read at the step, from 0)."""
  tx = optim.bop(threshold=lambda count: jnp.where(count == 0, 0.25, 0.5),
                 gamma=lambda count: jnp.where(count == 0, 0.5, 0.25))
  w = jnp.array([1., 1., 1.])
  state = tx.init(w)
  g0, g1 = jnp.array([.25, 1., .5]), jnp.array([3., 1., .5])
  updates, state = tx.update(g0, state, w)
  w = optax.apply_updates(w, updates)
  # m = .125, .5, .25; w·m vs τ .25: keep, flip, flip (at the threshold).
  np.testing.assert_array_equal(w, [1., -1., -1.])
  updates, state = tx.update(g1, state, w)
  w = optax.apply_updates(w, updates)
  # m = .125 + .25·2.875 = .84375, .5 + .25·.5 = .625, .25 + .25·.25 = .3125; w·m vs τ .5:
  # .84375 flips; −.625 and −.3125 keep.
  np.testing.assert_array_equal(state.m, [.84375, .625, .3125])
  np.testing.assert_array_equal(w, [-1., -1., -1.])


def test_bop_from_the_config_starts_at_the_sign_and_reports_its_schedules():
  params = {"conv": {"kernel": jnp.array([0.3, -0.2, 0.0, -1e-9])}, "fc": {"bias": jnp.ones(2)}}
  kinds = {"conv": {"kernel": BINARY}, "fc": {"bias": REAL}}
  tx, reported = kind_optimizer(params, kinds, binary=dict(
      name="bop", threshold=1e-3, gamma=0.1, schedule=dict(name="step", by_epoch=False,
                                                           milestones=(5,), gamma=0.5)))
  assert sorted(reported) == ["gamma/binary", "lr", "threshold/binary"]
  assert [float(reported["gamma/binary"](s)) for s in (0, 4, 5)] == pytest.approx([.1, .1, .05])
  assert float(reported["threshold/binary"](50)) == pytest.approx(1e-3)
  start = optim.prepare_params(tx, params)
  np.testing.assert_array_equal(start["conv"]["kernel"], [1., -1., 1., -1.])
  np.testing.assert_array_equal(start["fc"]["bias"], params["fc"]["bias"])  # not Bop's


# --- Clipping, Keras' optimizers, larq-zoo's schedule ------------------------------------

def test_binary_clip_projects_binary_kernels_after_each_update_and_nothing_else():
  params = {"conv": {"kernel": jnp.array([-2., -1.3, .5, 1.2])}, "fc": {"kernel": jnp.array([3.])}}
  kinds = {"conv": {"kernel": BINARY}, "fc": {"kernel": REAL}}
  tx, _ = kind_optimizer(params, kinds, top=dict(name="sgd", lr=1.0, momentum=0.0),
                         binary=dict(clip=1.25))
  grads = {"conv": {"kernel": jnp.array([.1, -.1, -1., -.1])}, "fc": {"kernel": jnp.array([-1.])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optim.apply_updates(tx, params, updates)
  # w − g = −2.1, −1.2, 1.5, 1.3 -> clipped to [−1.25, 1.25]; the real kernel 3 + 1 unclipped.
  inside = np.float32(-1.3) - np.float32(-.1)  # −1.2 in float32's rounding
  np.testing.assert_array_equal(new["conv"]["kernel"], np.float32([-1.25, inside, 1.25, 1.25]))
  np.testing.assert_array_equal(new["fc"]["kernel"], [4.])
  # Not at initialisation (Keras applies constraints after updates only).
  np.testing.assert_array_equal(optim.prepare_params(tx, params)["conv"]["kernel"],
                                params["conv"]["kernel"])


def test_keras_sgd_and_adam_are_keras_legacy_formulas():
  config = ml_collections.ConfigDict(dict(name="keras_sgd", momentum=0.9, nesterov=False,
                                          weight_decay=0.0))
  lr = lambda count: jnp.where(count == 0, 0.1, 0.2)  # noqa: E731
  tx = optim.make_optimizer(config, lr, {}, {})
  w, g = jnp.array([1.0]), jnp.array([0.5])
  state = tx.init(w)
  u0, state = tx.update(g, state, w)
  u1, state = tx.update(g, state, w)
  # Keras: v = 0.9 v − lr g; w += v: v0 = −0.05, v1 = −0.045 − 0.1 = −0.145 (the lr inside v).
  np.testing.assert_allclose([float(u0[0]), float(u1[0])], [-0.05, -0.145], rtol=1e-6)
  config.update(name="keras_adam", b1=0.9, b2=0.999, eps=1e-3)
  tx = optim.make_optimizer(config, 0.01, {}, {})
  u, _ = tx.update(g, tx.init(w), w)
  # t = 1: m = 0.05, v = 0.00025; lr·√(1 − b2)/(1 − b1) · m / (√v + eps), eps on the raw √v.
  expected = 0.01 * np.sqrt(0.001) / 0.1 * 0.05 / (np.sqrt(0.00025) + 1e-3)
  np.testing.assert_allclose(-float(u[0]), expected, rtol=1e-5)


def test_keras_cosine_is_larq_zoos_cosine_decay_with_warmup():
  lr = optim.keras_cosine(1.0, warmup_steps=4, total_steps=12)
  # Warmup from 0 reaching the peak at step W − 1 = 3; then cosine over D − W − 1 = 7 steps.
  warm = [float(lr(s)) for s in range(4)]
  assert warm == pytest.approx([0, 1 / 3, 2 / 3, 1])
  assert float(lr(4)) == pytest.approx(1.0)
  assert float(lr(4 + 7 / 2)) == pytest.approx(0.5, abs=1e-6)  # half way (a fraction of a step)
  assert [float(lr(s)) for s in (11, 12, 20)] == pytest.approx([0, 0, 0], abs=1e-7)
  with pytest.raises(ConfigError, match="its own warmup"):
    optim.make_lr_schedule(ml_collections.ConfigDict(dict(
        name="keras_cosine", lr=1.0, warmup="linear", warmup_steps=4)), 10, 100)


def test_quicknet_recipe_is_larq_zoos():
  config = load_config("larq_zoo:quicknet")
  optimizer = config.optimizer
  assert (optimizer.name, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (
      "keras_sgd", 0.1, 0.9, 0.0)
  assert (optimizer.binary.name, optimizer.binary.lr, optimizer.binary.eps,
          optimizer.binary.clip) == ("keras_adam", 1e-2, 1e-7, 1.25)
  assert (config.train.epochs, config.train.batch_size, config.loss.label_smoothing) == (600, 2048, 0)
  experiment = Experiment(config, None, build_model(config.model))
  # ImageNet: 1,281,167 images -> 625 steps per epoch (drop_last), 375,000 steps.
  tx, schedules = experiment.make_optimizer(625, 375_000)
  for at, sgd in [(0, 0.0), (3124, 0.1), (3125, 0.1), (3125 + 371_874 // 2, 0.05), (374_999, 0.0)]:
    assert float(schedules.lr(at)) == pytest.approx(sgd, abs=1e-7)
    assert float(schedules.others["lr/binary"](at)) == pytest.approx(sgd / 10, abs=1e-8)
  assert load_config("larq_zoo:quicknet_large").optimizer.binary.clip == 1.25
  assert load_config("larq_zoo:birealnet").optimizer.binary.name is None  # only QuickNet's


def test_single_optimizer_configs_build_the_same_transformation_as_before():
  """No per-kind section: a plain optax chain (the same state, so old checkpoints resume)."""
  config = load_config("birealnet_r18")
  experiment = Experiment(shrink(config), None, build_model(shrink(config).model))
  tx, schedules = experiment.make_optimizer(10, 100)
  assert not isinstance(tx, optim.Optimizer) and schedules.others == {}
  assert optim.kind_groups(config.optimizer, config.schedule) is None


def test_kind_section_errors_are_one_line():
  params, kinds = {"w": jnp.ones(2)}, {"w": REAL}
  with pytest.raises(ConfigError, match="optimizer.binary is set but the model has no binary"):
    kind_optimizer(params, kinds, binary=dict(lr=0.1))
  with pytest.raises(ConfigError, match=r"the real parameters would get it \(optimizer.real"):
    kind_optimizer(params, kinds, real=dict(name="bop"))
  with pytest.raises(ConfigError, match="clip does nothing with bop"):
    kind_optimizer({"w": jnp.ones(2)}, {"w": BINARY}, binary=dict(name="bop", clip=1.0))
  with pytest.raises(ConfigError, match="set optimizer.binary.name='bop'"):
    kind_optimizer(params, kinds, top=dict(name="bop"), real=dict(name="adam"))
  with pytest.raises(ConfigError, match="set optimizer.binary.name='bop'"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(name="bop")), 0.1, {}, {})


# --- Routing --------------------------------------------------------------------------------

# One of each method's models (fully binary; step 1's real weights; a real teacher; the quickstart).
# HCEBNN below; the Larq Zoo models in test_larq_zoo.py's full-size counts.
ARCHITECTURES = ("irnet_r18", "birealnet_r18", "reactnet_r18_step1", "reactnet_r18_step2",
                 "reactnet_a_step2", "strong_baseline_step2", "real_to_binary_step2", "resnet18",
                 "quickstart")


def _routing(model, shape):
  kinds = variable_kinds(model, shape)
  report = bops.analyze_model(model, shape)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  leaves = jax.tree_util.tree_leaves(template["params"])
  labels = jax.tree_util.tree_leaves(kinds.kinds)
  assert len(labels) == len(leaves) and set(labels) <= set(KINDS)
  # Binary kernels are exactly what the jaxpr walk finds binarized (independently, from signs).
  assert sum(leaf.size for leaf, kind in zip(leaves, labels) if kind == BINARY) == report.binary_params
  # Normalisation parameters are exactly those of modules that hold batch statistics.
  norms = jax.tree_util.tree_leaves(optim.norm_params_mask(template["params"],
                                                            template.get("batch_stats", {})))
  assert [kind == NORM for kind in labels] == norms
  return kinds, template


@pytest.mark.parametrize("recipe", ARCHITECTURES)
def test_every_methods_variables_go_where_their_kind_says(recipe):
  config = shrink(load_config(recipe), 8 if recipe == "quickstart" else 32)
  model = build_model(config.model)
  kinds, _ = _routing(model, (1, config.dataset.image_size, config.dataset.image_size,
                              len(config.dataset.mean)))
  binary_weights = recipe not in ("reactnet_r18_step1", "resnet18")
  assert (kinds.count(BINARY) > 0) == binary_weights
  assert kinds.count(NORM) > 0 and kinds.count(REAL) > 0


def test_hcebnn_experts_are_binary_kernels_and_its_gates_real():
  config = shrink(load_config("hcebnn"))
  kinds, _ = _routing(build_model(config.model), (1, 32, 32, 3))
  flat = {jax.tree_util.keystr(p): k for p, k in jax.tree_util.tree_flatten_with_path(kinds.kinds)[0]}
  expert_kernels = [p for p, k in flat.items() if k == BINARY]
  assert expert_kernels and all(p.endswith("['kernel']") for p in expert_kernels)
  assert flat["['backbone']['layer1.0']['conv1']['fc']['kernel']"] == REAL  # the gate
  assert kinds.stage_names == ("stage1", "stage2", "stage3", "stage4")


def test_each_variable_is_trained_by_its_kinds_optimizer_alone():
  """binary: SGD lr 1, real: lr 10, norm: lr 100, gradients 1: each update says which optimizer
  (exactly one) trained the variable; none is left out."""
  config = shrink(load_config("quickstart"), 8)
  experiment = Experiment(config, None, build_model(config.model))
  template = experiment.variables_template()
  params = random_variables(template)["params"]
  config.optimizer.update(name="sgd", momentum=0.0, lr=10.0, binary=dict(lr=1.0),
                          norm=dict(lr=100.0))
  config.schedule.update(name="constant", warmup=None)
  tx, reported = experiment.make_optimizer(10, 100)
  assert sorted(reported.others) == ["lr/binary", "lr/norm"] and reported.lr is not None
  update = jax.jit(tx.update, compiler_options=run_once_compiler_options())
  updates, _ = update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
  expected = {BINARY: -1.0, REAL: -10.0, NORM: -100.0}
  for kind, update in zip(jax.tree_util.tree_leaves(experiment.variable_kinds.kinds),
                          jax.tree_util.tree_leaves(updates)):
    np.testing.assert_allclose(update, expected[kind], rtol=1e-6)
  counts = {kind: experiment.variable_kinds.count(kind) for kind in KINDS}
  assert all(counts.values()), counts


# --- Flip ratio -----------------------------------------------------------------------------

def test_flip_ratio_counts_sign_changes_by_stage_with_sign_of_zero_plus_one():
  old = {"a": jnp.array([1., -1., 0., 2.]), "b": jnp.array([[.5, -.5]]), "c": jnp.array([1., 1.])}
  new = {"a": jnp.array([-1., -1., -0.1, 0.]), "b": jnp.array([[.5, .5]]), "c": jnp.array([-1., -1.])}
  stages = {"a": "stage1", "b": "stage2", "c": ""}  # c is not a binary kernel
  ratios = step.flip_ratios(old, new, stages)
  # a: 1 -> −1 flips, −1 stays, 0 (= +1) -> −0.1 flips, 2 -> 0 (= +1) stays: 2 of 4. b: 1 of 2.
  assert {k: float(v) for k, v in ratios.items()} == pytest.approx(
      {"flip_ratio": 3 / 6, "flip_ratio/stage1": 0.5, "flip_ratio/stage2": 0.5})
  assert step.train_sums(stages)[4:] == ("steps", "flip_ratio", "flip_ratio/stage1",
                                         "flip_ratio/stage2")
  assert step.train_sums({"c": ""}) == step.SUMS


def test_flip_ratio_of_two_steps_equals_a_count_by_hand_with_no_host_transfer(digits_run):
  """The digits run's model and Bop optimizer (the shared run's compiled step): two steps under
  jax.transfer_guard("disallow"); the summed flip ratios equal the sign changes counted here."""
  from bnn_jax import parallel
  config = digits_run[0]
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(23, 46)
  train_step = experiment.make_train_step(tx, schedules)
  state = experiment.init_state(tx)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(64, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 64).astype(np.int32)}
  batch = parallel.to_global(batch, experiment.mesh)
  sums = jax.device_put(experiment.train_sums(), parallel.replicated(experiment.mesh))
  stages = experiment.variable_kinds.stages
  snapshots = [jax.device_get(state.params)]
  for _ in range(2):
    with jax.transfer_guard("disallow"):
      state, sums, _ = train_step(state, batch, sums, {})
    snapshots.append(jax.device_get(state.params))
  by_hand = {}
  for before, after in zip(snapshots, snapshots[1:]):
    flipped, total = {}, {}
    for old, new, stage in zip(*(jax.tree_util.tree_leaves(t) for t in (before, after, stages))):
      if stage:
        flipped[stage] = flipped.get(stage, 0) + int(np.sum((old >= 0) != (new >= 0)))
        total[stage] = total.get(stage, 0) + old.size
    by_hand["flip_ratio"] = by_hand.get("flip_ratio", 0) + sum(flipped.values()) / sum(total.values())
    for stage in flipped:
      key = f"flip_ratio/{stage}"
      by_hand[key] = by_hand.get(key, 0) + flipped[stage] / total[stage]
  fetched = step.fetch(sums)
  assert fetched["steps"] == 2
  assert {k: fetched[k] for k in by_hand} == pytest.approx(by_hand, rel=1e-6)
  assert by_hand["flip_ratio"] > 0  # Bop flipped some weights
  summary = step.summarize(fetched)
  assert summary["flip_ratio"] == pytest.approx(by_hand["flip_ratio"] / 2, rel=1e-6)
