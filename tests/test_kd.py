"""Knowledge distillation: the losses by hand, the teacher inside the step, only_kd, the recipe runner."""
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import data, parallel, step
from bnn_jax.checkpoint import Checkpoints
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.losses import attention_map, attention_transfer, distribution_loss
from bnn_jax.models import build_model, init_variables
from bnn_jax.recipes import apply_override, stage_configs

from conftest import REPO, RUN_ONCE_FLAGS
from helpers import compiled_fast, load_config, random_state, shrink


def test_distribution_loss_by_hand():
  teacher = jnp.array([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
  student = jnp.array([[0.0, 0.0]])  # log-softmax (−ln 2, −ln 2)
  assert float(distribution_loss(student, teacher)[0]) == pytest.approx(math.log(2.0))
  student = jnp.array([[math.log(1.0), math.log(4.0)]])  # softmax (1/5, 4/5)
  expected = -(0.25 * math.log(0.2) + 0.75 * math.log(0.8))
  assert float(distribution_loss(student, teacher)[0]) == pytest.approx(expected, rel=1e-6)
  # Temperature 2: teacher (1, √3)/(1 + √3), student (1, 2)/3, times T² = 4.
  p = np.array([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
  expected = -4 * (p[0] * math.log(1 / 3) + p[1] * math.log(2 / 3))
  assert float(distribution_loss(student, teacher, 2.0)[0]) == pytest.approx(expected, rel=1e-6)
  grad_teacher = jax.grad(lambda t: distribution_loss(student, t).sum())(teacher)
  assert not np.any(grad_teacher)


def test_attention_loss_by_hand():
  # One example, a 1×2 map with 2 channels: A² channel means (1+9)/2 = 5 and (4+0)/2 = 2.
  student = jnp.array([[[[1.0, 3.0], [2.0, 0.0]]]])
  np.testing.assert_allclose(attention_map(student), [[1.0, 0.4]], rtol=1e-6)  # / max 5
  teacher = jnp.array([[[[2.0, 0.0], [2.0, 0.0]]]])  # means 2, 2 -> (1, 1)
  # MSE over positions: ((1 − 1)² + (0.4 − 1)²) / 2 = 0.18 per compared map; the original
  # averages over maps (torch.mean of the stacked per-block losses), so two maps give 0.18, and
  # a third map with zero loss gives 0.12, not the sum 0.36.
  loss = attention_transfer({"a": student, "b": student}, {"a": teacher, "b": teacher})
  np.testing.assert_allclose(loss, [0.18], rtol=1e-6)
  loss = attention_transfer({"a": student, "b": student, "c": teacher},
                            {"a": teacher, "b": teacher, "c": teacher})
  np.testing.assert_allclose(loss, [0.12], rtol=1e-6)
  grad_teacher = jax.grad(lambda t: attention_transfer({"a": student}, {"a": t}).sum())(teacher)
  assert not np.any(grad_teacher)


def kd_setup(recipe="reactnet_r18_step1", teacher_batchnorm="running", **loss):
  """A width-8 KD recipe on 32×32 inputs with a randomly initialised ResNet-18 teacher; built
  (and its step compiled) once per set of arguments."""
  return _kd_setup(recipe, teacher_batchnorm, tuple(sorted(loss.items())))


@functools.cache
def _kd_setup(recipe, teacher_batchnorm, loss):
  loss = dict(loss)
  config = shrink(load_config(recipe))
  config.teacher.model.arch = "ResNet-18"  # compiles faster than ReActNet's ResNet-34
  config.teacher.batchnorm = teacher_batchnorm
  config.loss.update(loss)
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(steps_per_epoch=10, total_steps=100)
  teacher = build_model(config.teacher.model)
  teacher_variables = _teacher_variables(teacher)
  train_step = compiled_fast(experiment.make_train_step(tx, schedules, teacher))
  return experiment, tx, train_step, teacher_variables


@functools.cache
def _teacher_variables(teacher):
  """The teacher's initial variables (seed 7), initialised once per teacher model."""
  return init_variables(teacher, (1, 32, 32, 3), seed=7)


def run_steps(experiment, tx, train_step, teacher_variables, batches):
  state = random_state(experiment, tx)
  sums = jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh))
  for batch in batches:
    state, sums, _ = train_step(state, parallel.to_global(batch, experiment.mesh), sums,
                                teacher_variables)
  return state


CE_KD_AT = dict(only_kd=False, kd_weight=3.0, at_weight=30.0)  # CE + 3·KD + 30·AT


def test_teacher_is_untouched_and_absent_from_the_optimizer_state():
  experiment, tx, train_step, teacher_variables = kd_setup(**CE_KD_AT)
  before = jax.tree_util.tree_map(np.array, teacher_variables)
  batches = list(zip(range(3), data.synthetic_batches(8, 32, 3, 10)))
  state = run_steps(experiment, tx, train_step, teacher_variables, [b for _, b in batches])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(teacher_variables))
  # The optimizer state holds exactly the student's parameter shapes (twice, for Adam), nothing else.
  student = sorted(p.shape for p in jax.tree_util.tree_leaves(state.params))
  moments = sorted(x.shape for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  assert moments == sorted(student * 2)
  assert int(state.step) == 3


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_teacher_batchnorm_mode_is_the_recipes(mode):
  experiment, tx, train_step, teacher_variables = kd_setup(teacher_batchnorm=mode)  # only KD
  # A confident teacher (mmcls' head init N(0, 0.01) gives near-uniform logits).
  teacher_variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 300 if "head" in jax.tree_util.keystr(path) else x, teacher_variables)
  batch = next(data.synthetic_batches(8, 32, 3, 10))
  state = experiment.init_state(tx)
  # Each model's logits once, compiled without LLVM's optimisations.
  student_logits, _ = compiled_fast(jax.jit(lambda v, x: experiment.model.apply(
      v, x, train=True, mutable=["batch_stats"])))(
          {"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
  teacher = build_model(experiment.config.teacher.model)
  on_batch, _ = compiled_fast(jax.jit(lambda v, x: teacher.apply(
      v, x, train=True, mutable=["batch_stats"])))(teacher_variables, batch["image"])
  on_running = compiled_fast(jax.jit(lambda v, x: teacher.apply(v, x, train=False)))(
      teacher_variables, batch["image"])
  sums = jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh))
  _, sums, _ = train_step(state, parallel.to_global(batch, experiment.mesh), sums, teacher_variables)
  loss = float(sums["loss_sum"] / sums["count"])
  expected = {name: float(distribution_loss(student_logits, logits).mean())
              for name, logits in (("batch", on_batch), ("running", on_running))}
  assert loss == pytest.approx(expected[mode], rel=1e-5)
  assert abs(expected["batch"] - expected["running"]) > 1e-3 * loss  # the modes really differ
  np.testing.assert_array_equal(teacher_variables["batch_stats"]["backbone"]["bn1"]["mean"], 0.0)


def test_only_kd_gradient_ignores_labels():
  experiment, tx, train_step, teacher_variables = kd_setup()  # ReActNet's only_kd
  batch = next(data.synthetic_batches(8, 32, 3, 10))
  relabelled = dict(batch, label=(batch["label"] + 3) % 10)
  a = run_steps(experiment, tx, train_step, teacher_variables, [batch])
  b = run_steps(experiment, tx, train_step, teacher_variables, [relabelled])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a.params),
                         jax.device_get(b.params))
  # …whereas with cross-entropy the labels do change the step.
  experiment, tx, train_step, teacher_variables = kd_setup(**CE_KD_AT)
  a = run_steps(experiment, tx, train_step, teacher_variables, [batch])
  b = run_steps(experiment, tx, train_step, teacher_variables, [relabelled])
  assert not np.array_equal(jax.device_get(a.params["head"]["fc"]["bias"]),
                            jax.device_get(b.params["head"]["fc"]["bias"]))


def test_attention_blocks_must_exist_on_both_sides():
  with pytest.raises(ConfigError, match=r"\['layer9.0'\] are not blocks of both"):
    experiment, tx, train_step, teacher_variables = kd_setup(at_weight=1.0,
                                                             attention_blocks=("layer9.0",))
    run_steps(experiment, tx, train_step, teacher_variables, [next(data.synthetic_batches(8, 32, 3, 10))])


def test_kd_without_teacher_checkpoint_is_a_clear_error():
  config = shrink(load_config("reactnet_r18_step1"))
  config.teacher.checkpoint = None
  with pytest.raises(ConfigError, match="need teacher.checkpoint"):
    Experiment.from_config(config).load_teacher()


# The recipe run twice in one process, printing both runs' {stage: metrics} as JSON.
RECIPE_TWICE = ("import json, sys; from bnn_jax.recipes import run_recipe; print(json.dumps("
                "[run_recipe('digits_kd', sys.argv[1], sys.argv[2:]) for _ in range(2)]))")


@pytest.mark.slow
def test_digits_recipe_runs_teacher_then_two_distilled_steps(tmp_path):
  """In a subprocess with RUN_ONCE_FLAGS: its three train steps compile in a third of the time
  (it runs 12 steps of 8 images and 6 evaluations); the rerun loads the first run's programs
  from its compilation cache."""
  overrides = [f"{section}.{field}=8" for section in ("model", "teacher.model")
               for field in ("stem_channels", "base_channels")]
  overrides += ["train.max_steps=4", "train.batch_size=8", "train.progress=False",
                "train.plot=False"]
  workdir = tmp_path / "recipe"
  env = dict(os.environ, XLA_FLAGS=RUN_ONCE_FLAGS, PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  run = subprocess.run([sys.executable, "-c", RECIPE_TWICE, str(workdir), *overrides], cwd=REPO,
                       env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  results, again = json.loads(run.stdout.strip().splitlines()[-1])
  assert list(results) == ["teacher", "step1", "step2"]
  assert all(r["num_examples"] == 360 for r in results.values())
  student = Checkpoints(str(workdir / "step2"), read_only=True)
  meta = student.meta()
  assert meta["teacher"]["checkpoint"] == str(workdir / "teacher")
  assert meta["teacher"]["model"]["arch"] == "ResNet-18"
  _, saved, _ = student.saved_tree(None, None)
  assert set(saved) == {"step", "params", "batch_stats", "opt_state"}
  assert "layer1.0" in saved["params"]["backbone"] and "move1" in saved["params"]["backbone"]["layer1.0"]
  # Rerunning the recipe resumes: every stage is already finished and only evaluated.
  assert run.stdout.count("already finished at step 4; evaluating its last checkpoint") == 3
  assert list(again) == ["teacher", "step1", "step2"]
  assert again["step2"]["top1"] == pytest.approx(results["step2"]["top1"])


def test_overrides_apply_to_every_stage_or_one_and_name_bad_fields(tmp_path):
  planned = stage_configs("digits_kd", str(tmp_path), ["train.epochs=3", "step1:loss.temperature=2.0"])
  assert [config.train.epochs for _, _, config in planned] == [3, 3, 3]
  assert [config.loss.temperature for _, _, config in planned] == [1.0, 2.0, 4.0]
  assert planned[2][2].train.load_from == str(tmp_path / "step1")
  assert planned[2][2].teacher.checkpoint == str(tmp_path / "teacher")
  with pytest.raises(ConfigError, match="no field 'epoch'"):
    apply_override(load_config("quickstart"), "train.epoch=3")
  with pytest.raises(ConfigError, match="names no stage"):
    stage_configs("digits_kd", str(tmp_path), ["step3:train.epochs=3"])
