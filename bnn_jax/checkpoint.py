"""Orbax checkpoints: save, resume, partial ``load_from``, restore on any device count.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/`` with two items:
``state`` (the TrainState) and ``meta`` (JSON: config, epoch, best eval
metrics). Restores build the target from the *current* model and mesh, so a
checkpoint saved on 8 devices restores on 1 or 2.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bnn_jax.errors import ConfigError, one_line


class CheckpointError(ConfigError):
  """A checkpoint that is missing, unreadable, unwritable or of another model."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def abstract_like(tree: Any, sharding) -> Any:
  """Shape/dtype stand-ins for ``tree`` with ``sharding``: what a restore fills in."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                tree)


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoints in {workdir} (looked for {self.directory})")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    self.skipped: List[int] = []  # damaged steps that a restore fell back past

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def steps(self) -> List[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as step ``step`` and waits for the write, so that a failure
    (a full disk) stops the run here, with the last good checkpoint intact."""
    previous = self.latest_step()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - whatever the file system or Orbax raised
      kept = f"the last good checkpoint, step {previous}, is intact" if previous is not None else (
          "no earlier checkpoint")
      raise CheckpointError(f"saving step {step} to {self.directory} failed ({one_line(error)}); "
                            f"{kept}") from None

  def _check_step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {self.steps()}")
    return step

  def _newest_restorable(self, step: Optional[int], restore: Callable[[int], Any]) -> Tuple[int, Any]:
    """(step, restore(step)) for ``step``; without one, for the newest step that restores: a
    damaged step is skipped with one line saying why (and kept on disk, listed in ``skipped``)."""
    candidates = [self._check_step(step)] if step is not None else sorted(self.steps(), reverse=True)
    if not candidates:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    for candidate in candidates:
      try:
        return candidate, restore(candidate)
      except CheckpointError:  # another model's checkpoint: not damage, nothing to fall back to
        raise
      except Exception as error:  # noqa: BLE001 - any way a step can be damaged
        reason = f"checkpoint step {candidate} in {self.directory} cannot be restored " \
                 f"({one_line(error)[:300]})"
        if step is not None:  # the step asked for: no other will do
          raise CheckpointError(reason) from None
        self.skipped.append(candidate)
        if jax.process_index() == 0:
          print(f"skipping {reason}", flush=True)
    raise CheckpointError(f"no checkpoint in {self.directory} can be restored (steps {candidates})")

  def meta(self, step: Optional[int] = None) -> Dict[str, Any]:
    """The metadata saved with ``step`` (default: the latest)."""
    step = self._check_step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, state_template: Any, sharding, step: Optional[int] = None,
              model_name: str = "this config's model",
              model_config: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict[str, Any]]:
    """The state at ``step`` (default: the newest that restores), shaped like ``state_template``,
    and its metadata. With ``model_config`` (a config's ``model`` section as JSON), a checkpoint
    saved with another one is refused too, even when every shape fits (other binarizers)."""

    def restore_step(s):
      self._check_fits(s, state_template, model_name)
      if model_config is not None:
        self._check_model_config(s, model_config)
      restored = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(state_template, sharding)),
          meta=ocp.args.JsonRestore()))
      return restored["state"], restored["meta"]

    return self._newest_restorable(step, restore_step)[1]

  def restore_variables(self, variables_template: Dict[str, Any], sharding,
                        step: Optional[int] = None, model_name: str = "this config's model"
                        ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Only ``params`` and ``batch_stats`` (for evaluation, teachers), whatever else was saved.
    A checkpoint with tensors the model lacks, or without some it has, is refused."""

    def restore_step(s):
      self._check_fits(s, variables_template, model_name)
      saved, meta = self._restore_saved_tree(s, sharding)
      return {k: saved[k] for k in variables_template}, meta

    return self._newest_restorable(step, restore_step)[1]

  def saved_tree(self, step: Optional[int], sharding) -> Tuple[int, Any, Dict[str, Any]]:
    """(step, whatever state tree was saved there as arrays with ``sharding``, its metadata):
    for partial loads; without ``step``, the newest that restores."""
    step, (tree, meta) = self._newest_restorable(
        step, lambda s: self._restore_saved_tree(s, sharding))
    return step, tree, meta

  def _restore_saved_tree(self, step: int, sharding) -> Tuple[Any, Dict[str, Any]]:
    tree = self.manager.item_metadata(step)["state"].tree
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def set_aside_skipped(self) -> List[str]:
    """Renames the damaged steps that restores skipped to ``<step>.damaged`` (nothing is deleted),
    so that a resumed run can save those steps again; returns the new paths."""
    moved = []
    for step in self.skipped:
      source = os.path.join(self.directory, str(step))
      target = f"{source}.damaged"
      if os.path.isdir(source) and not os.path.exists(target):
        os.rename(source, target)
        moved.append(target)
    self.skipped = []
    self.manager.reload()
    return moved

  def _saved_model_name(self, step: int) -> str:
    try:
      return self.meta(step)["config"]["model"]["arch"]
    except Exception:  # noqa: BLE001 - a converted or damaged checkpoint may not say
      return "unknown"

  def _check_model_config(self, step: int, model_config: Dict[str, Any]) -> None:
    saved = self.meta(step).get("config", {}).get("model")
    if saved is not None and saved != model_config:
      differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
      raise CheckpointError(f"{self.directory} holds checkpoints of another model configuration "
                            f"(model.{', model.'.join(differ)} differ); use a new --workdir")

  def _check_fits(self, step: int, template: Any, model_name: str) -> None:
    """One clear line, before any restore, when the checkpoint was saved by another model: any
    tensor missing, unexpected (under the template's top-level names) or of another shape."""
    saved = self.manager.item_metadata(step)["state"].tree
    want = {_normalise_key(jax.tree_util.keystr(p)): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
    tops = {key.split(".")[1] for key in want}
    have = {_normalise_key(jax.tree_util.keystr(p)): tuple(m.shape)
            for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    have = {key: shape for key, shape in have.items() if key.split(".")[1] in tops}
    problems = [(what, sorted(keys)) for what, keys in (
        ("missing", set(want) - set(have)), ("unexpected", set(have) - set(want)),
        ("shapes differ at", {k for k in set(want) & set(have) if want[k] != have[k]}))]
    problems = [(what, keys) for what, keys in problems if keys]
    if problems:
      detail = "; ".join(f"{what} {len(keys)}: {keys[:3]}{' …' if len(keys) > 3 else ''}"
                         for what, keys in problems)
      raise CheckpointError(f"checkpoint {self.directory}/{step} holds another model "
                            f"({self._saved_model_name(step)}) than {model_name}: {detail}")


def partial_load(fresh: Any, loaded: Any):
  """``fresh`` with every leaf that ``loaded`` has at the same path and shape replaced.

  Returns (tree, restored paths, freshly initialised paths, paths of ``loaded`` left unused).
  """
  available = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  restored, fresh_paths = [], []

  def pick(path, value):
    key = jax.tree_util.keystr(path)
    other = available.get(key)
    if other is not None and np.shape(other) == np.shape(value):
      restored.append(key)
      return jnp.asarray(other, value.dtype)
    fresh_paths.append(key)
    return value

  tree = jax.tree_util.tree_map_with_path(pick, fresh)
  unused = sorted(set(available) - set(restored))
  return tree, restored, fresh_paths, unused


def _normalise_key(key: str) -> str:
  # Orbax reports dataclass fields and dict keys alike as ['name']; jax as .name or ['name'].
  return key.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
