"""Multi-stage recipes: each stage a config, trained in its own workdir under a parent workdir.

A stage may start from an earlier stage's parameters (``train.load_from``) and distil from
an earlier stage (``teacher.checkpoint``); the runner points both at the sibling workdirs.
Rerunning resumes: finished stages are only evaluated, an interrupted one continues.
Stages whose teacher is not in the recipe (ReActNet's ResNet-34, Real-to-Binary's ResNet-18)
read the path their config names (README: "Teachers").
"""
from __future__ import annotations

import ast
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections

from bnn_jax.config import load_config
from bnn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # its workdir under the parent
  config: str  # a load_config spec: "reactnet_r18_step1", "digits_kd:step1"
  load_from: Optional[str] = None  # an earlier stage's name
  teacher: Optional[str] = None  # an earlier stage's name
  overrides: Tuple[str, ...] = ()  # "a.b=value" applied to this stage's config


# The digits student trained on labels alone, for comparison with digits_kd under the same budget.
_NO_KD = ("loss.kd_weight=0.0", "teacher.checkpoint=''")

def _hcebnn_stages(dataset: str) -> List[Stage]:
  """HCEBNN's four stages (configs/hcebnn.py), each from the one before, distilled from the first."""
  spec = lambda stage: f"hcebnn:{stage},{dataset}"  # noqa: E731
  return [Stage("real", spec("real")),
          Stage("binary_activations", spec("binary_activations"), load_from="real", teacher="real"),
          Stage("expansion", spec("expansion"), load_from="binary_activations", teacher="real"),
          Stage("binary", spec("binary"), load_from="expansion", teacher="real")]


RECIPES: Dict[str, List[Stage]] = {
    "reactnet_r18": [Stage("step1", "reactnet_r18_step1"),
                     Stage("step2", "reactnet_r18_step2", load_from="step1")],
    "reactnet_a": [Stage("step1", "reactnet_a_step1"),
                   Stage("step2", "reactnet_a_step2", load_from="step1")],
    "strong_baseline": [Stage("step1", "strong_baseline_step1"),
                        Stage("step2", "strong_baseline_step2", load_from="step1")],
    "real_to_binary": [Stage("fp", "real_to_binary_fp"),
                       Stage("step1", "real_to_binary_step1", teacher="fp"),
                       Stage("step2", "real_to_binary_step2", load_from="step1", teacher="step1")],
    # larq-zoo's TrainR2B (configs/larq_zoo_r2b.py); as larq-zoo, r2b_ban starts afresh
    "larq_zoo_real_to_binary": [
        Stage("resnet_fp", "larq_zoo_r2b:resnet_fp"),
        Stage("r2b_fp", "larq_zoo_r2b:r2b_fp", teacher="resnet_fp"),
        Stage("r2b_ban", "larq_zoo_r2b:r2b_ban", teacher="r2b_fp"),
        Stage("r2b_bnn", "larq_zoo_r2b:r2b_bnn", load_from="r2b_ban", teacher="r2b_ban")],
    "digits_kd": [Stage("teacher", "digits_kd:teacher"),
                  Stage("step1", "digits_kd:step1", teacher="teacher"),
                  Stage("step2", "digits_kd:step2", load_from="step1", teacher="teacher")],
    **{name: _hcebnn_stages(dataset) for name, dataset in
       (("hcebnn", "imagenet"), ("hcebnn_cifar10", "cifar10"), ("hcebnn_digits", "digits"))},
    "digits_no_kd": [Stage("step1", "digits_kd:step1", overrides=_NO_KD),
                     Stage("step2", "digits_kd:step2", load_from="step1", overrides=_NO_KD)],
}


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """``"train.epochs=3"`` -> config.train.epochs = 3 (the value parsed as a Python literal)."""
  key, sep, text = assignment.partition("=")
  if not sep:
    raise ConfigError(f"override {assignment!r} is not of the form a.b.c=value")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a bare string
  *parents, leaf = key.split(".")
  section = config
  for name in parents:
    if name not in section:
      raise ConfigError(f"override {assignment!r}: no section {name!r}; has {sorted(section)}")
    section = section[name]
  if leaf not in section:
    raise ConfigError(f"override {assignment!r}: no field {leaf!r}; has {sorted(section)}")
  section[leaf] = value


def _for_stage(assignment: str, stage: str, stages: Sequence[str]) -> Optional[str]:
  """``"a.b=v"`` applies to every stage, ``"step1:a.b=v"`` to stage ``step1`` only."""
  key = assignment.partition("=")[0]
  if ":" not in key:
    return assignment
  target, _, rest = assignment.partition(":")
  if target not in stages:
    raise ConfigError(f"override {assignment!r} names no stage of this recipe; stages: {list(stages)}")
  return rest if target == stage else None


def stage_configs(recipe: str, workdir: str, overrides: Sequence[str] = ()
                  ) -> List[tuple]:
  """[(stage, its workdir, its config)] of ``recipe`` under ``workdir``, overrides applied."""
  if recipe not in RECIPES:
    raise ConfigError(f"unknown recipe {recipe!r}; valid: {sorted(RECIPES)}")
  names = [stage.name for stage in RECIPES[recipe]]
  planned = []
  for stage in RECIPES[recipe]:
    config = load_config(stage.config)
    for assignment in (*stage.overrides, *overrides):
      assignment = _for_stage(assignment, stage.name, names)
      if assignment is not None:
        apply_override(config, assignment)
    if stage.load_from:
      config.train.load_from = os.path.join(workdir, stage.load_from)
    if stage.teacher:
      config.teacher.checkpoint = os.path.join(workdir, stage.teacher)
    planned.append((stage, os.path.join(workdir, stage.name), config))
  return planned


def run_recipe(recipe: str, workdir: str, overrides: Sequence[str] = ()) -> Dict[str, dict]:
  """Trains every stage in order; returns {stage name: final eval metrics}."""
  from bnn_jax.train import train_and_evaluate

  results = {}
  for stage, stage_dir, config in stage_configs(recipe, workdir, overrides):
    print(f"=== {recipe}: stage {stage.name} ({stage.config}) in {stage_dir}", flush=True)
    results[stage.name] = train_and_evaluate(config, stage_dir)
  return results
