"""Whole short runs of the original's recipes, step by step (shared/reference/trajectory), and the
translation of mmcv recipes into our configs."""
import pytest

from bnn_jax.errors import ConfigError
from bnn_jax.trajectory import (FINAL_RTOL, LOSS_RTOL, check_trajectory, config_from_mmcv,
                                optimizer_from_mmcv, schedule_from_mmcv)

from conftest import SHARED

TRAJECTORIES = sorted((SHARED / "reference" / "trajectory").glob("*.npz"))


@pytest.mark.parametrize("fixture", TRAJECTORIES, ids=[p.stem for p in TRAJECTORIES])
def test_trajectory_of_the_original_is_reproduced_step_by_step(fixture):
  report = check_trajectory(str(fixture))
  assert report.passed, "\n".join(report.lines())
  assert max(report.loss_errors) <= LOSS_RTOL and report.final_error <= FINAL_RTOL


def test_mmcv_optimizers_translate_with_pytorch_defaults():
  assert optimizer_from_mmcv(dict(type="SGD", lr=0.4, momentum=0.9, weight_decay=1e-4, nesterov=True)) == (
      dict(name="sgd", lr=0.4, weight_decay=1e-4, momentum=0.9, nesterov=True))
  adam = optimizer_from_mmcv(dict(type="Adam", lr=1e-3, weight_decay=1e-5,
                                  paramwise_cfg=dict(norm_decay_mult=0)))
  assert adam == dict(name="adam", lr=1e-3, weight_decay=1e-5, norm_decay_mult=0.0, b1=0.9, b2=0.999,
                      eps=1e-8)
  assert optimizer_from_mmcv(dict(type="AdamW", lr=1e-3))["weight_decay"] == 0.01  # PyTorch's
  with pytest.raises(ConfigError, match="bias_decay_mult"):
    optimizer_from_mmcv(dict(type="SGD", lr=0.1, paramwise_cfg=dict(bias_decay_mult=0)))
  with pytest.raises(ConfigError, match="'RMSprop'"):
    optimizer_from_mmcv(dict(type="RMSprop", lr=0.1))


def test_mmcv_lr_configs_translate_with_mmcv_defaults():
  # by_epoch defaults to True, as mmcv's LrUpdaterHook.
  assert schedule_from_mmcv(dict(policy="poly", min_lr=0), 1e-3, 256, 2503) == dict(
      name="poly", by_epoch=True, power=1.0, min_lr=0.0)
  assert schedule_from_mmcv(dict(policy="step", warmup="linear", warmup_iters=2500, warmup_ratio=0.25,
                                 step=[30, 60, 90]), 0.4, 100, 1252) == dict(
      name="step", by_epoch=True, warmup="linear", warmup_steps=2500, warmup_ratio=0.25,
      milestones=(30, 60, 90), gamma=0.1, min_lr=0.0)
  assert schedule_from_mmcv(dict(policy="step", step=30), 0.1, 90, 10)["milestones"] == (30, 60)
  assert schedule_from_mmcv(dict(policy="CosineAnnealing", min_lr_ratio=0.01), 0.5, 10, 10)["min_lr"] == 0.005
  with pytest.raises(ConfigError, match="'cubic'"):
    schedule_from_mmcv(dict(policy="step", step=[1], warmup="cubic"), 0.1, 3, 4)


def test_distill_sections_translate_to_the_objective_and_the_teacher():
  base = dict(model=dict(backbone="ResArch", arch="ReActNet-18", num_classes=10, binary_type=[True, False]),
              optimizer=dict(type="Adam", lr=1e-3), lr_config=dict(policy="poly", by_epoch=False),
              epochs=2, batch=8, iters_per_epoch=4)
  teacher = dict(depth=34, stem_channels=8, base_channels=8, num_classes=10)
  config = config_from_mmcv(dict(base, distill=dict(teacher=teacher, loss_weight=1.0, only_kdloss=True)))
  assert config.loss.only_kd and config.loss.kd_weight == 1.0 and config.loss.at_weight == 0.0
  assert config.teacher.model.arch == "ResNet-34" and config.teacher.batchnorm == "batch"
  assert config.model.binary_type == (True, False)
  # ATKDImageClassifier: ce_weight only switches the head's cross-entropy on.
  config = config_from_mmcv(dict(base, distill=dict(teacher=teacher, kd_weight=3, at_weight=30.0,
                                                    ce_weight=0.5, teacher_batchnorm="eval")))
  assert (config.loss.ce_weight, config.loss.kd_weight, config.loss.at_weight) == (1.0, 3.0, 30.0)
  assert config.teacher.batchnorm == "running"
