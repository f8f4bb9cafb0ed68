"""The training system end to end on small models: resume, pre-emption, NaN, every config, evaluation."""
import os
import signal

import jax
import numpy as np
import pytest

from bnn_jax import data, durations, parallel, step
from bnn_jax.checkpoint import Checkpoints
from bnn_jax.errors import ConfigError
from bnn_jax.evaluate import evaluate_checkpoint
from bnn_jax.experiment import Experiment
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.report import Reporter
from bnn_jax.train import NonFiniteLoss, itstime, train_and_evaluate

from helpers import (CONFIGS, compiled_fast, digits_config, load_config, random_state,
                     random_variables, shrink)

RECIPES = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("cifar10", "quickstart", "digits_kd"))


def final_params(workdir):
  checkpoints = Checkpoints(workdir, read_only=True)
  return jax.device_get(checkpoints.saved_tree(None, None)[1]["params"])


def assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_resume_mid_epoch_gives_identical_parameters(digits_run, tmp_path):
  config, reference_dir, _ = digits_run
  workdir = str(tmp_path)
  stopped = config.copy_and_resolve_references()
  stopped.train.max_steps = 30  # stop mid-epoch: the last step is checkpointed too
  train_and_evaluate(stopped, workdir)
  assert Checkpoints(workdir, read_only=True).steps() == [23, 30]
  train_and_evaluate(config, workdir)  # the same command again: resumes at step 30
  assert Checkpoints(workdir, read_only=True).latest_step() == 46
  assert_trees_equal(final_params(workdir), final_params(reference_dir))


def test_sigterm_checkpoints_at_the_next_step_and_returns(digits_run, tmp_path, monkeypatch, capsys):
  """Pre-emption: saved mid-epoch, exit status 0 (that such a step resumes exactly, the test
  above shows)."""
  config, _, _ = digits_run
  real_batches = data.train_batches

  def preempted_after_30(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index == 30:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(data, "train_batches", preempted_after_30)
  assert train_and_evaluate(config, str(tmp_path)) == {}  # no evaluation yet
  step = Checkpoints(str(tmp_path), read_only=True).latest_step()
  assert 23 < step < 46
  assert f"SIGTERM: saved step {step} to " in capsys.readouterr().out


def test_evaluate_cli_path_reports_training_accuracy(digits_run):
  config, workdir, train_metrics = digits_run
  metrics = evaluate_checkpoint(config, workdir)
  assert metrics["step"] == 46 and metrics["num_examples"] == 360
  assert metrics["top1"] == pytest.approx(train_metrics["top1"])
  assert metrics["loss"] == pytest.approx(train_metrics["loss"], rel=1e-5)


def test_non_finite_loss_before_any_checkpoint_stops_and_says_so(digits_run, tmp_path):
  """(After a checkpoint: test_reliability's resume with another config.)"""
  config = digits_run[0].copy_and_resolve_references()  # its compiled steps
  config.dataset.std = (0.0,)  # every input ±inf
  with pytest.raises(NonFiniteLoss, match=r"loss became nan by step 5; stopping; no checkpoint was "
                                          r"saved, so there is nothing to resume$"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # a run that saved nothing leaves nothing


def test_checkpoint_of_another_model_is_refused(digits_run):
  config, workdir, _ = digits_run
  other = config.copy_and_resolve_references()
  other.model.base_channels = 16
  with pytest.raises(ConfigError, match="another model"):
    train_and_evaluate(other, workdir)


def test_checkpoint_of_another_model_configuration_with_the_same_shapes_is_refused(digits_run):
  config, workdir, _ = digits_run
  other = config.copy_and_resolve_references()
  other.model.binarizers = ("ste_sign", "scaled_ste_sign")  # every tensor still fits
  with pytest.raises(ConfigError, match=r"another config, .* model.binarizers None -> "
                                        r"\('ste_sign', 'scaled_ste_sign'\);"):
    train_and_evaluate(other, workdir)


def test_an_implicit_host_transfer_in_the_step_loop_is_an_error(digits_run, tmp_path, monkeypatch):
  """The step runs under jax.transfer_guard("disallow"): a host batch (here: prefetching undone)
  fails at the first step instead of silently copying every step."""
  config = digits_run[0]  # its compiled step
  monkeypatch.setattr(parallel, "prefetch_to_devices", lambda batches, mesh: iter(batches))
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train_and_evaluate(config, str(tmp_path))


def test_itstime_is_every_n_steps_and_the_last():
  assert [s for s in range(1, 24) if itstime(s, 5, 23)] == [5, 10, 15, 20, 23]
  assert [s for s in range(1, 24) if itstime(s, 0, 23)] == [23]


def test_the_epoch_line_reports_whatever_the_step_schedules(tmp_path, capsys):
  reporter = Reporter(str(tmp_path), steps_per_epoch=10, epochs=3, progress=False)
  train = {"loss": 1.5, "top1": 0.25, "top5": 0.75, "images_per_s": 9.0, "lr": 0.01,
           "my_temperature": 4.0}
  reporter.epoch_line(20, train, None, 123.0)
  reporter.epoch_line(30, train, {"loss": 1.25, "top1": 0.5, "top5": 0.875}, 99.0)
  assert capsys.readouterr().out.splitlines() == [
      "epoch 2/3 step 20: train loss 1.5000 top-1 25.00% lr 0.01 my_temperature 4 | 123 img/s",
      "epoch 3/3 step 30: train loss 1.5000 top-1 25.00% lr 0.01 my_temperature 4 | eval loss "
      "1.2500 top-1 50.00% top-5 87.50% | 99 img/s"]


def test_eval_covers_every_example_once_when_batch_does_not_divide_split():
  config = digits_config()
  source = data.open_source(config.dataset, "test")
  batches = list(data.eval_batches(source, config.dataset, batch_size=64))
  assert len(batches) == 6 and all(len(b["label"]) == 64 for b in batches)  # 360 = 5·64 + 40
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
  labels = np.concatenate([b["label"] for b in batches])[:360]
  np.testing.assert_array_equal(np.sort(labels), np.sort(data.digits_arrays("test")[1]))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_builds_and_takes_one_step(recipe):
  config = shrink(load_config(recipe))
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(steps_per_epoch=10, total_steps=100)
  objective = experiment.objective
  teacher, teacher_variables = None, {}
  if objective.needs_teacher:  # a random teacher at reduced width
    teacher = build_model(config.teacher.model)
    teacher_variables = random_variables(abstract_variables(teacher, (1, 32, 32, 3)), seed=1)
  train_step = experiment.make_train_step(tx, schedules, teacher)
  state = random_state(experiment, tx)  # drawn on the host: one compile per recipe (the step)
  batch = next(data.synthetic_batches(8, 32, 3, config.model.num_classes))
  state, sums, scheduled = compiled_fast(train_step)(  # the step runs once
      state, parallel.to_global(batch, experiment.mesh),
      jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh)), teacher_variables)
  assert int(state.step) == 1 and np.isfinite(float(sums["loss_sum"]))
  # per-kind optimizers schedule their own values: "lr/binary", "gamma/binary", ...
  assert {name.split("/")[0] for name in scheduled} - {"gamma", "threshold"} == (
      {"lr", "ede_k", "ede_t"} if config.ede.enabled else {"lr"})


@pytest.mark.parametrize("method, widths", [("quicknet", dict(section_filters=(16, 32, 64, 128))),
                                            ("densenet28", dict(initial_filters=16, growth_rate=16))])
def test_cifar10_short_larq_zoo_rows_keep_the_protocol(method, widths):
  config, protocol = load_config(f"cifar10_short:{method}"), load_config("cifar10_short:birealnet_r18")
  assert config.model.backbone == load_config(f"larq_zoo:{method}").model.backbone
  assert config.model.cifar_stem and config.model.num_classes == 10
  assert config.model.bn_group_size is None  # one group: the whole batch of 256
  assert {field: config.model[field] for field in widths} == widths
  for section in ("dataset", "optimizer", "schedule", "ede", "loss", "teacher", "train"):
    assert config[section].to_dict() == protocol[section].to_dict(), section


@pytest.mark.parametrize("recipe", ["irnet_r18", "reactnet_a_step1", "real_to_binary_step2",
                                    "real_to_binary_step1"])
def test_cifar10_variants_keep_every_duration_as_a_fraction_of_the_run(recipe):
  imagenet, config = load_config(recipe), load_config(f"cifar10:{recipe}")
  assert config.model.cifar_stem and config.model.num_classes == 10
  assert config.dataset.image_size == 32 and config.train.epochs == 200
  per_epoch, total = durations.run_steps(config)
  assert (per_epoch, total) == (196, 39200)  # ceil(50,000 / 256) steps per epoch
  imagenet_per_epoch, imagenet_total = durations.run_steps(imagenet)
  if config.ede.enabled:  # IR-Net's EDE spans its whole run
    assert durations.steps(config.ede, "span", per_epoch, total) == total
  warmup = durations.steps(imagenet.schedule, "warmup", imagenet_per_epoch, imagenet_total)
  if warmup:  # IR-Net: 2,500 of 125,200 steps; Real-to-Binary 25,025 of 375,375
    assert config.schedule.warmup_steps == warmup * total // imagenet_total
    assert config.schedule.warmup_steps == {"irnet_r18": 782, "real_to_binary_step1": 2613}[recipe]
  if imagenet.schedule.milestones:
    assert config.schedule.milestones == tuple(m * 200 // imagenet.train.epochs
                                               for m in imagenet.schedule.milestones)
  # The runs it starts or distils from are its CIFAR-10 siblings, not the ImageNet ones.
  for path in (config.train.load_from, config.teacher.checkpoint):
    assert path is None or path.startswith("workdirs/cifar10/")


def test_a_duration_is_set_in_one_unit():
  schedule = load_config("irnet_r18").schedule
  assert durations.steps(schedule, "warmup", 1252, 125200) == 2500
  schedule.update(warmup_steps=None, warmup_epochs=1.5)
  assert durations.steps(schedule, "warmup", 1252, 125200) == 1878
  schedule.update(warmup_epochs=None, warmup_fraction=0.25)
  assert durations.steps(schedule, "warmup", 1252, 125200) == 31300
  schedule.warmup_steps = 10
  with pytest.raises(ConfigError, match=r"warmup is set twice \(warmup_steps=10, warmup_fraction=0.25\)"):
    durations.steps(schedule, "warmup", 1252, 125200)


def test_config_errors_are_clear():
  with pytest.raises(ConfigError, match="not divisible by the 1 devices") if jax.device_count() > 1 else \
      pytest.raises(ConfigError, match="exceeds"):
    config = digits_config()
    config.train.batch_size = 4096
    train_and_evaluate(config, "/tmp/never-written")
  with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
    config = digits_config()
    config.dataset.name = "mnist"
    train_and_evaluate(config, "/tmp/never-written")
