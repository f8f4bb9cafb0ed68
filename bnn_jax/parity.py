"""Numerical parity with the original PyTorch implementation, on its recorded fixtures.

A fixture (``<name>.npz`` + ``<name>.json``, format in shared/reference/README.md)
holds a model's randomised state dict, an input batch, and the original's eval
logits, train-mode logits, loss, gradients and BatchNorm running statistics.
:func:`check_fixture` rebuilds the model from the JSON, converts the state
dict, recomputes all of them here and reports the norm-wise relative errors.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_jax.binarize import EDE
from bnn_jax.convert import (by_torch_key, hcebnn_training_keys, is_released_hcebnn, is_torchvision,
                             model_config_from_hcebnn, model_config_from_original, torch_to_flax,
                             with_prefix)
from bnn_jax.layers import SOWN, expert_choices
from bnn_jax.models import abstract_variables, build_model
from bnn_jax.parallel import run_once_compiler_options

OUTPUT_RTOL = 1e-4  # logits, loss, running means
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-6  # ||Δ|| <= rtol·||g_ref|| + atol, per gradient tensor


def relative_error(value, reference) -> float:
  """||value − reference|| / ||reference|| (norm-wise)."""
  value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-30))


@dataclasses.dataclass
class ParityReport:
  outputs: Dict[str, float]  # relative errors of logits_eval, logits_train, loss, running means
  grads: List[Tuple[str, float, float]]  # (torch key, ||Δ||, ||g_ref||), worst first
  # gradients that tie-breaking decides (shown, not compared): see parity_larq.tie_routed
  tie_routed: Tuple[str, ...] = ()

  def grad_ok(self, delta: float, ref: float) -> bool:
    return delta <= GRAD_RTOL * ref + GRAD_ATOL

  @property
  def passed(self) -> bool:
    return (all(err <= OUTPUT_RTOL for err in self.outputs.values())
            and all(self.grad_ok(d, r) for k, d, r in self.grads if k not in self.tie_routed))

  def lines(self) -> List[str]:
    out = [f"{name:<24} rel err {err:.2e}  {'ok' if err <= OUTPUT_RTOL else 'FAIL'}"
           for name, err in self.outputs.items()]
    if not self.grads:
      return out + [f"{'gradients':<24} none in the fixture"]
    worst_key, worst_delta, worst_ref = self.grads[0]
    failing = [k for k, d, r in self.grads
               if not self.grad_ok(d, r) and k not in self.tie_routed]
    out.append(f"{'gradients':<24} {len(self.grads)} tensors, worst {worst_key}: "
               f"||Δ|| {worst_delta:.2e} vs ||g_ref|| {worst_ref:.2e}  "
               f"{'ok' if not failing else 'FAIL: ' + ', '.join(failing)}")
    if self.tie_routed:
      compared = [(k, d, r) for k, d, r in self.grads if k not in self.tie_routed]
      worst = (f", worst of the compared {compared[0][0]}: ||Δ|| {compared[0][1]:.2e} vs "
               f"||g_ref|| {compared[0][2]:.2e}" if compared else "")
      out.append(f"{'':<24} {len(self.tie_routed)} routed by max-pool ties, not compared"
                 f"{worst}")
    return out


def read_fixture(npz_path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(the ``.json`` beside it, the arrays of ``npz_path``) of a fixture of the original."""
  with open(npz_path[:-len(".npz")] + ".json") as f:
    description = json.load(f)
  with np.load(npz_path) as data:
    return description, {k: data[k] for k in data.files}


def _model_and_state_dict(original: Dict[str, Any], fixture: Dict[str, np.ndarray]):
  """(our model config, the state dict under our model's names, how to rename other state-dict
  keys such as ``grad/…``): an HCEBNN fixture (it has ``num_experts``) or one of the original's."""
  state_dict = with_prefix(fixture, "state_dict/")
  if "num_experts" in original:
    released = is_released_hcebnn(state_dict)  # once: the statistics and gradients cannot tell
    rename = functools.partial(hcebnn_training_keys, released=released)
    return model_config_from_hcebnn(original, released), rename(state_dict), rename
  return model_config_from_original(original), state_dict, dict


def _gate_choice_mismatch(collections: Dict[str, Any], description: Dict[str, Any],
                          reference: np.ndarray) -> float:
  """The fraction of (expert conv, sample) pairs whose chosen expert differs from the fixture's."""
  ours = expert_choices(collections)
  modules = description["gate_choice_train"]["modules"]
  missing = [m for m in modules if m not in ours]
  if missing:
    raise ValueError(f"the fixture records expert choices of {missing}, which the model lacks")
  return float(np.mean(np.stack([np.asarray(ours[m]) for m in modules]) != reference))


def check_fixture(npz_path: str) -> ParityReport:
  """Recomputes a fixture's outputs and gradients here and compares them with the original's
  (those the fixture has, computing only those: a fixture of an inference model may have no
  gradients or eval logits)."""
  original, fixture = read_fixture(npz_path)
  model_config, state_dict, rename = _model_and_state_dict(original, fixture)
  model = build_model(model_config)
  images = jnp.asarray(fixture["input_nchw"].transpose(0, 2, 3, 1))
  labels = jnp.asarray(fixture["labels"])
  ede = EDE(jnp.float32(original["ede"]["k"]), jnp.float32(original["ede"]["t"])) if (
      "ede" in original) else EDE.initial()

  template = abstract_variables(model, images.shape)
  variables = torch_to_flax(state_dict, template)
  torchvision = is_torchvision(state_dict)  # the fixture's other state dicts are named alike
  params, batch_stats = variables["params"], variables.get("batch_stats", {})

  def train_loss(params):
    logits, collections = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, ede=ede,
                                      mutable=["batch_stats", SOWN])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, collections)

  once = run_once_compiler_options()  # each program runs once: compile it fast
  grad_state_dict = rename(with_prefix(fixture, "grad/"))
  if grad_state_dict:
    (loss, (logits_train, collections)), grads = jax.jit(
        jax.value_and_grad(train_loss, has_aux=True), compiler_options=once)(params)
  else:  # an inference model's fixture: no backward to compile
    loss, (logits_train, collections) = jax.jit(train_loss, compiler_options=once)(params)
  computed = {"logits_train": logits_train, "loss_train": loss}
  if "logits_eval" in fixture:
    computed = {"logits_eval": jax.jit(lambda v: model.apply(v, images, train=False, ede=ede),
                                       compiler_options=once)(variables)} | computed
  outputs = {name: relative_error(value, fixture[name])
             for name, value in computed.items() if name in fixture}
  new_stats = by_torch_key(collections["batch_stats"])
  stats_state_dict = rename(with_prefix(fixture, "running_after_train_step/"))
  reference = by_torch_key(torch_to_flax(
      stats_state_dict, {"batch_stats": template["batch_stats"]},
      torchvision=torchvision)["batch_stats"]) if stats_state_dict else {}
  for stat in ("mean", "var"):  # both as PyTorch updates them (the variance unbiased)
    keys = [k for k in new_stats if k.endswith(f".running_{stat}")]
    if keys and reference:
      ours = np.concatenate([np.ravel(new_stats[k]) for k in keys])
      ref = np.concatenate([np.ravel(reference[k]) for k in keys])
      outputs[f"running_{stat}_after_step"] = relative_error(ours, ref)
  if "gate_choice_train" in fixture:
    outputs["gate_choice_mismatch"] = _gate_choice_mismatch(collections, original,
                                                            fixture["gate_choice_train"])

  rows = []
  if grad_state_dict:
    grad_ref = by_torch_key(torch_to_flax(grad_state_dict, {"params": template["params"]},
                                          torchvision=torchvision)["params"])
    for key, ours in by_torch_key(grads).items():
      delta = float(np.linalg.norm(np.asarray(ours, np.float64) - grad_ref[key]))
      rows.append((key, delta, float(np.linalg.norm(grad_ref[key]))))
    rows.sort(key=lambda row: row[1] / (GRAD_RTOL * row[2] + GRAD_ATOL), reverse=True)
  return ParityReport(outputs, rows)


def report_fixtures(paths: List[str], check: Callable[[str], Any]) -> bool:
  """Runs ``check`` (:func:`check_fixture`, :func:`bnn_jax.trajectory.check_trajectory`) on every
  fixture, prints each report; True when all are within tolerance."""
  failed = []
  for path in paths:
    report = check(path)
    print(f"{os.path.basename(path)}: {'PASS' if report.passed else 'FAIL'}")
    for line in report.lines():
      print("  " + line)
    if not report.passed:
      failed.append(path)
  if failed:
    print(f"{len(failed)} of {len(paths)} fixture(s) outside tolerance: {failed}")
  return not failed
