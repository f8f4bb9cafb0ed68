"""larq-zoo's Real-to-Binary multi-stage recipe: its loss terms against larq-zoo's formulas written
out in numpy, its R2BStepSchedule, the stages' teacher/student chain, one KD step of reduced models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import data, parallel, step
from bnn_jax.checkpoint import CheckpointError, Checkpoints, config_json
from bnn_jax.experiment import Experiment
from bnn_jax.losses import attention_map, attention_transfer, keras_kl_divergence
from bnn_jax.models import BLOCK_OUTPUTS, block_outputs, build_model, init_variables
from bnn_jax.models.backbones import requesting_layers
from bnn_jax.optim import make_lr_schedule
from bnn_jax.recipes import stage_configs
from bnn_jax.report import Reporter
from bnn_jax.train import _load_from

from helpers import compiled_fast, load_config, random_state

VOLUMES = tuple(f"block_{b}_out" for b in range(2, 10))


def larq_zoo_attention_loss(students, teachers, weight=1.0):
  """AttentionMatchingLossLayer: per volume the mean over positions of the squared difference of
  mean(A², channels) / its maximum; the mean over volumes and examples, times the weight."""
  def attention(a):
    area = np.mean(np.square(a), axis=-1).reshape(len(a), -1)
    return area / area.max(axis=-1, keepdims=True)
  per_layer = [np.mean(np.square(attention(s) - attention(t)), axis=-1)
               for s, t in zip(students, teachers)]
  return weight * np.mean(np.stack(per_layer, axis=-1))


def larq_zoo_output_loss(student_logits, teacher_logits, weight=1.0, temperature=1.0):
  """OutputDistributionMatchingLossLayer: the batch mean of weight · T² · Keras' KL divergence."""
  def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
  p = np.clip(softmax(teacher_logits / temperature), 1e-7, 1.0)
  q = np.clip(softmax(student_logits / temperature), 1e-7, 1.0)
  return np.mean(weight * temperature ** 2 * np.sum(p * np.log(p / q), axis=-1))


def test_attention_matching_is_larq_zoos():
  rng = np.random.default_rng(0)
  students = [rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 2, 2, 7))]
  teachers = [rng.normal(size=(3, 4, 4, 6)), rng.normal(size=(3, 2, 2, 3))]
  ours = attention_transfer({"a": jnp.asarray(students[0]), "b": jnp.asarray(students[1])},
                            {"a": jnp.asarray(teachers[0]), "b": jnp.asarray(teachers[1])},
                            "max_tf")
  assert float(30.0 * ours.mean()) == pytest.approx(
      larq_zoo_attention_loss(students, teachers, 30.0), rel=1e-5)


def test_max_tf_shares_the_gradient_of_a_tied_maximum():
  # Areas (4, 4, 1) on a 1×3 map of one channel: the maximum 4 is reached twice.
  features = jnp.array([[[[2.0], [-2.0], [1.0]]]])
  weights = jnp.array([1.0, 2.0, 3.0])
  loss = lambda norm: lambda x: jnp.sum(weights * attention_map(x, norm))  # noqa: E731
  area = np.array([4.0, 4.0, 1.0])
  # d/dq_i Σ w·q/m = w_i/m − (Σ w·q)/m² · ∂m/∂q_i, with ∂m/∂q_i = 1/2 at each tied maximum
  # (TensorFlow's reduce_max), then through q = x² (one channel): × 2x.
  share = np.array([0.5, 0.5, 0.0])
  grad_q = weights / 4.0 - np.sum(weights * area) / 16.0 * share
  expected = grad_q * 2 * np.array([2.0, -2.0, 1.0])
  np.testing.assert_allclose(jax.grad(loss("max_tf"))(features).ravel(), expected, rtol=1e-6)
  assert not np.allclose(jax.grad(loss("max"))(features).ravel(), expected)  # PyTorch's: first


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_output_matching_is_larq_zoos(temperature):
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
  student[0, 0] = -40.0  # a student probability below Keras' clip at 1e-7
  ours = keras_kl_divergence(jnp.asarray(student), jnp.asarray(teacher), temperature)
  assert float(3.0 * ours.mean()) == pytest.approx(
      larq_zoo_output_loss(student, teacher, 3.0, temperature), rel=1e-5)
  grad_teacher = jax.grad(lambda t: keras_kl_divergence(jnp.asarray(student), t).sum())(
      jnp.asarray(teacher))
  assert not np.any(grad_teacher)


def test_keras_step_is_r2b_step_schedule():
  spe = 10
  config = load_config("larq_zoo_r2b:r2b_fp").schedule
  config.lr = 1e-3
  schedule = make_lr_schedule(config, spe, 75 * spe)

  def r2b(step):  # R2BStepSchedule(1e-3, steps_per_epoch=10, decay_fraction=0.3)
    if step <= 5 * spe:
      return 1e-3 * step / (5 * spe)
    return 1e-3 * 0.3 ** sum(step > b * spe for b in (40, 60, 70))

  for s in (0, 1, 25, 50, 51, 400, 401, 600, 601, 700, 701, 749):
    assert float(schedule(s)) == pytest.approx(r2b(s), rel=1e-6), s


def test_stages_chain_as_larq_zoo_declares(tmp_path):
  planned = {stage.name: (stage, config) for stage, _, config in
             stage_configs("larq_zoo_real_to_binary", str(tmp_path))}
  assert list(planned) == ["resnet_fp", "r2b_fp", "r2b_ban", "r2b_bnn"]
  # stage: (student, teacher, student initialised from, CE, output matching, attention matching)
  expected = {"resnet_fp": ("resnet_fp", None, None, 1.0, 0.0, 0.0),
              "r2b_fp": ("r2b_fp", "resnet_fp", None, 1.0, 3.0, 30.0),
              "r2b_ban": ("r2b_ban", "r2b_fp", None, 1.0, 3.0, 30.0),
              "r2b_bnn": ("r2b_bnn", "r2b_ban", "r2b_ban", 1.0, 0.8, 0.0)}
  for name, (student, teacher, init, ce, kd, at) in expected.items():
    _, config = planned[name]
    assert config.model.model_name == student
    assert config.loss.ce_weight == ce and config.loss.kd_weight == kd
    assert config.loss.at_weight == at and config.loss.temperature == 1.0
    assert config.train.load_from == (init and str(tmp_path / init))
    if teacher is None:
      assert not config.teacher.checkpoint
      continue
    assert config.teacher.checkpoint == str(tmp_path / teacher)
    # the teacher's model section is the one its stage trained (the checkpoint check passes)
    assert config.teacher.model.to_dict() == planned[teacher][1].model.to_dict()
    assert config.loss.kd_loss == "keras_kl"
  assert planned["r2b_fp"][1].loss.attention_blocks == VOLUMES
  assert planned["r2b_fp"][1].loss.attention_norm == "max_tf"
  assert [planned[n][1].optimizer.name for n in expected] == ["keras_sgd"] + ["keras_adam"] * 3
  assert [planned[n][1].schedule.name for n in expected] == [
      "keras_cosine", "keras_step", "keras_step", "keras_cosine"]


def test_kd_step_of_reduced_r2b_fp_with_a_reduced_resnet_fp_teacher():
  config = load_config("larq_zoo_r2b:r2b_fp")
  for model in (config.model, config.teacher.model):
    model.update(width_divisor=8, num_classes=10)
  config.dataset.image_size = 32
  config.train.update(batch_size=4, progress=False, plot=False)
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(steps_per_epoch=10, total_steps=100)
  teacher = build_model(config.teacher.model)
  teacher_variables = init_variables(teacher, (1, 32, 32, 3), seed=7)
  state = random_state(experiment, tx)
  batch = next(data.synthetic_batches(4, 32, 3, 10))

  def outputs(images):  # the two models' logits and requested layers, in one cheap program
    with requesting_layers(VOLUMES):
      logits, student = experiment.model.apply(
          {"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats", BLOCK_OUTPUTS])
      teacher_logits, teacher_out = teacher.apply(teacher_variables, images, train=False,
                                                  mutable=[BLOCK_OUTPUTS])
    return logits, block_outputs(student), teacher_logits, block_outputs(teacher_out)

  # larq-zoo's objective, term by term, from those outputs
  logits, student, teacher_logits, teacher_out = compiled_fast(jax.jit(outputs))(batch["image"])
  assert sorted(student) == sorted(teacher_out) == sorted(VOLUMES)
  logits, teacher_logits = np.asarray(logits, np.float64), np.asarray(teacher_logits, np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  ce = -np.mean(log_probs[np.arange(4), np.asarray(batch["label"])])
  expected = ce + larq_zoo_output_loss(logits, teacher_logits, 3.0) + larq_zoo_attention_loss(
      [np.asarray(student[v]) for v in VOLUMES], [np.asarray(teacher_out[v]) for v in VOLUMES],
      30.0)

  train_step = compiled_fast(experiment.make_train_step(tx, schedules, teacher))
  sums = jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh))
  new_state, sums, _ = train_step(state, parallel.to_global(batch, experiment.mesh), sums,
                                  teacher_variables)
  assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(expected, rel=1e-4)
  assert int(new_state.step) == 1


def reduced_stage(name):
  """A stage of the recipe at width / 8 on 32×32, 10 classes, its optimizer for 75 epochs of 10."""
  config = load_config(f"larq_zoo_r2b:{name}")
  config.model.update(width_divisor=8, num_classes=10)
  config.dataset.image_size = 32
  config.train.update(batch_size=4, progress=False, plot=False)
  experiment = Experiment.from_config(config)
  return config, experiment, experiment.make_optimizer(steps_per_epoch=10, total_steps=750)[0]


def by_path(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_r2b_bnn_loads_r2b_ban_by_its_layer_names_and_refuses_another_architecture(tmp_path, capsys):
  # larq-zoo's model_name begins every layer name (r2b_ban_block_2a_conv2d): r2b_bnn reads
  # r2b_ban's variables with the prefix swapped, every one of them.
  for name, seed in (("r2b_ban", 0), ("resnet_fp", 1)):
    config, experiment, tx = reduced_stage(name)
    Checkpoints(str(tmp_path / name)).save(1, random_state(experiment, tx, seed),
                                           {"config": config_json(config)})
  _, experiment, tx = reduced_stage("r2b_bnn")
  state = random_state(experiment, tx, seed=2)
  reporter = Reporter(str(tmp_path), 10, 10, progress=False)
  loaded = _load_from(experiment, state, str(tmp_path / "r2b_ban"), reporter)
  log = capsys.readouterr().out
  assert "initialised fresh: none" in log and "not loaded: none" in log
  assert "model changed: model.model_name 'r2b_ban' -> 'r2b_bnn'" in log
  saved = Checkpoints(str(tmp_path / "r2b_ban"), read_only=True).saved_tree(None, None)[1]
  for part in ("params", "batch_stats"):
    ours, theirs = by_path(getattr(loaded, part)), by_path(saved[part])
    assert len(ours) == len(theirs) and all("r2b_bnn_" in key for key in ours)
    for key, value in ours.items():
      np.testing.assert_array_equal(value, theirs[key.replace("r2b_bnn_", "r2b_ban_")])
  # resnet_fp's real blocks (biased convs, no gates, a shortcut per block, not per half block)
  # are another architecture: one line naming what does not fit
  with pytest.raises(CheckpointError, match=r"model.model_name 'resnet_fp' -> 'r2b_bnn' is another "
                                            r"architecture.*, 64 tensor\(s\) \(batch_stats/backbone/"
                                            r"r2b_bnn_block_4a_shortcut_batch_norm/moving_mean, .* of "
                                            r"this model are not in the checkpoint and 31 tensor"):
    _load_from(experiment, state, str(tmp_path / "resnet_fp"), reporter)
