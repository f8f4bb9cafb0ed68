"""EDE and learning-rate schedules against hand-computed values; the weight-decay mask."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bnn_jax.config import load_config
from bnn_jax.durations import run_steps
from bnn_jax.ede import ede_schedule
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.optim import make_lr_schedule, make_optimizer, norm_params_mask, weight_decay_mask


def test_ede_schedule_matches_irnet_formula():
  schedule = ede_schedule(total_epochs=100, steps_per_epoch=10)
  for step, epoch in [(0, 0), (9, 0), (10, 1), (505, 50), (999, 99)]:
    k, t = schedule(step)
    t_expected = 0.1 * 10 ** (epoch / 100 * math.log10(10 / 0.1))
    assert float(t) == pytest.approx(t_expected, rel=1e-6)
    assert float(k) == pytest.approx(max(1 / t_expected, 1.0), rel=1e-6)
  # By hand: epoch 0 -> t 0.1, k 10; epoch 50 -> t 1, k 1; k never drops below 1.
  assert [round(float(v), 6) for v in schedule(0)] == [10.0, 0.1]
  assert [round(float(v), 6) for v in schedule(500)] == [1.0, 1.0]
  assert float(schedule(990).k) == 1.0


def schedule(**fields):
  base = dict(lr=0.4, name="step", by_epoch=True, milestones=None, gamma=0.1, power=1.0,
              min_lr=0.0, warmup=None, warmup_steps=0, warmup_ratio=0.1)
  return ml_collections.ConfigDict(base | fields)


def test_step_schedule_with_linear_warmup_as_mmcv():
  # IR-Net: lr 0.4, ×0.1 at epochs 30/60/90, warmup 2500 iterations from 0.25·lr.
  lr = make_lr_schedule(schedule(milestones=(30, 60, 90), warmup="linear", warmup_steps=2500,
                                 warmup_ratio=0.25), steps_per_epoch=1000, total_steps=100_000)
  assert float(lr(0)) == pytest.approx(0.1)  # 0.4 · 0.25
  assert float(lr(1250)) == pytest.approx(0.4 * (1 - 0.5 * 0.75))  # half way: 0.25
  assert float(lr(2500)) == pytest.approx(0.4)
  assert float(lr(29_999)) == pytest.approx(0.4)
  assert float(lr(30_000)) == pytest.approx(0.04)
  assert float(lr(60_000)) == pytest.approx(0.004)
  assert float(lr(99_999)) == pytest.approx(0.0004)


def test_exp_and_constant_warmups_and_step_floor_as_mmcv():
  lr = make_lr_schedule(schedule(lr=1.0, milestones=(1, 2), gamma=0.1, min_lr=0.05, warmup="exp",
                                 warmup_steps=4, warmup_ratio=0.01), steps_per_epoch=10,
                        total_steps=30)
  assert [float(lr(s)) for s in (0, 2, 4, 10, 25)] == pytest.approx([0.01, 0.1, 1.0, 0.1, 0.05])
  lr = make_lr_schedule(schedule(lr=1.0, milestones=(1,), warmup="constant", warmup_steps=4,
                                 warmup_ratio=0.25), steps_per_epoch=10, total_steps=30)
  assert [float(lr(s)) for s in (0, 3, 4)] == pytest.approx([0.25, 0.25, 1.0])


def test_poly_schedule_by_iteration():
  lr = make_lr_schedule(schedule(lr=1e-3, name="poly", by_epoch=False, min_lr=0.0),
                        steps_per_epoch=10, total_steps=1000)
  assert [float(lr(s)) for s in (0, 250, 500, 1000)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 0.0])
  lr = make_lr_schedule(schedule(lr=1.0, name="poly", by_epoch=True, power=2.0, min_lr=0.1),
                        steps_per_epoch=10, total_steps=100)
  assert float(lr(59)) == pytest.approx(0.9 * (1 - 5 / 10) ** 2 + 0.1)  # epoch 5 of 10


def test_cosine_schedule():
  lr = make_lr_schedule(schedule(lr=2.0, name="cosine", by_epoch=False, min_lr=0.0),
                        steps_per_epoch=10, total_steps=100)
  assert [float(lr(s)) for s in (0, 50, 100)] == pytest.approx([2.0, 1.0, 0.0], abs=1e-6)
  assert float(lr(25)) == pytest.approx(1 + math.cos(math.pi / 4))


def test_unknown_schedule_and_optimizer_list_valid_choices():
  with pytest.raises(ConfigError, match="unknown schedule 'linear'.*'poly'"):
    make_lr_schedule(schedule(name="linear"), 10, 100)
  with pytest.raises(ConfigError, match="unknown optimizer 'lamb'.*'adamw'"):
    make_optimizer(ml_collections.ConfigDict(dict(name="lamb")), lambda s: 0.1, {}, {})


def small_reactnet_variables():
  model = build_model(dict(arch="ReActNet-18", stem_channels=8, base_channels=8, num_classes=10,
                           avg_down=True, cifar_stem=True))
  return abstract_variables(model, (1, 16, 16, 3))  # the masks need the tree, not values


def test_norm_decay_mult_zero_excludes_exactly_the_batchnorm_parameters():
  variables = small_reactnet_variables()
  params, stats = variables["params"], variables["batch_stats"]
  mask = weight_decay_mask(ml_collections.ConfigDict(dict(norm_decay_mult=0.0)), params, stats)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  excluded = {k for k, m in flat.items() if not m}
  # Exactly the (scale, bias) of every module that holds (mean, var) statistics.
  norm_modules = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]}
  assert excluded == {m + leaf for m in norm_modules for leaf in ("['scale']", "['bias']")}
  # Conv kernels, PReLU slopes and RPReLU/move biases keep decay (as mmcv's norm_decay_mult=0).
  assert flat["['backbone']['layer1.0']['move1']['bias']"] and flat["['head']['fc']['bias']"]
  everything = weight_decay_mask(ml_collections.ConfigDict(dict(norm_decay_mult=1.0)), params, stats)
  assert all(jax.tree_util.tree_leaves(everything))


def test_sgd_weight_decay_is_pytorch_l2_and_respects_mask():
  params = {"w": jnp.array([1.0, -2.0]), "bn": {"scale": jnp.array([3.0])}}
  mask = {"w": True, "bn": {"scale": False}}
  tx = optax.chain(optax.add_decayed_weights(0.1, mask), optax.sgd(0.5))
  config = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.1,
                                          norm_decay_mult=0.0, grad_clip=None))
  ours = make_optimizer(config, 0.5, params, {"bn": {"mean": jnp.zeros(1)}})
  grads = {"w": jnp.array([0.5, 0.5]), "bn": {"scale": jnp.array([0.5])}}
  updates, _ = ours.update(grads, ours.init(params), params)
  # By hand: w gets -(0.5)(g + 0.1 w); the BN scale gets -(0.5) g only.
  np.testing.assert_allclose(updates["w"], [-0.5 * (0.5 + 0.1), -0.5 * (0.5 - 0.2)], rtol=1e-6)
  np.testing.assert_allclose(updates["bn"]["scale"], [-0.25], rtol=1e-6)
  reference, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], reference["w"], rtol=1e-6)


def test_norm_params_mask_follows_batch_stats():
  variables = small_reactnet_variables()
  mask = norm_params_mask(variables["params"], variables["batch_stats"])
  assert mask["backbone"]["bn1"] == {"scale": True, "bias": True}
  assert mask["backbone"]["layer2.0"]["downsample"]["2"]["scale"]
  assert not mask["backbone"]["layer2.0"]["downsample"]["1"]["kernel"]


def seed_logs(shared_dir):
  return json.loads((shared_dir / "reference" / "seed_logs.json").read_text())


def within_four_significant_digits(ours, logged):
  """|ours − logged| within half a unit of the logged value's 4th significant digit (and float32's
  rounding: a value on the half-unit boundary prints either way)."""
  unit = 10.0 ** (np.floor(np.log10(np.abs(logged))) - 3)
  return np.abs(ours - logged) <= 0.5 * unit + 1e-6 * np.abs(logged)


@pytest.mark.parametrize("recipe", ["birealnet_r18", "irnet_r18", "reactnet_a_step1", "reactnet_a_step2",
                                    "reactnet_r18_step1", "reactnet_r18_step2", "strong_baseline_step1",
                                    "strong_baseline_step2"])
def test_recipe_reproduces_the_original_logged_learning_rate_at_every_logged_iteration(
    shared_dir, recipe):
  log = seed_logs(shared_dir)[recipe]
  config = load_config(recipe)
  # The original keeps the last partial batch: 1,252 / 2,503 / 5,005 iterations per epoch.
  iters, total = run_steps(config)
  assert iters == log["iters_per_epoch"]
  lr = Experiment(config, None, None).lr_schedule(iters, total)
  steps, logged = np.asarray(log["lr"]).T
  ours = np.asarray(jax.vmap(lr)(jnp.asarray(steps, jnp.int32)), np.float64)
  wrong = ~within_four_significant_digits(ours, logged)
  assert not wrong.any(), [(int(s), float(o), float(g)) for s, o, g in
                           zip(steps[wrong], ours[wrong], logged[wrong])][:5]
