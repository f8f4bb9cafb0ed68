"""Orbax checkpoints: save, resume, partial ``load_from``, restore on any device count.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/`` with two items:
``state`` (the TrainState) and ``meta`` (JSON: config, epoch, best eval
metrics). Restores build the target from the *current* model and mesh, so a
checkpoint saved on 8 devices restores on 1 or 2, and read the saved config first: a checkpoint
of another model configuration (:func:`model_check`) or, on resume, of another run's config is
refused before anything is restored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bnn_jax.errors import ConfigError, one_line


class CheckpointError(ConfigError):
  """A checkpoint that is missing, unreadable, unwritable or of another model."""


# A restore's ``check(where, meta)``: reads a step's metadata before its state and may refuse
# it with a CheckpointError (another model, another run: not damage, so no older step is tried).
Check = Callable[[str, Dict[str, Any]], None]

# Model fields that say how a model computes, not what its weights are: a checkpoint serves any
# value of them (evaluation in bfloat16, a teacher normalising over the student's ghost batches).
RUNTIME_MODEL_FIELDS = ("dtype", "bn_group_size")
# What a later stage of one method changes on the same weights (``train.load_from``): how they
# are binarised, HCEBNN's expert-0-only stage, the head (fresh for another number of classes)
# and a Larq Zoo model's stage by larq-zoo's ``model_name`` (r2b_ban -> r2b_bnn), which prefixes
# its layer names (:func:`swap_layer_prefix`).
STAGE_MODEL_FIELDS = ("binary_type", "binarizers", "use_only_first", "num_classes", "model_name")
# What a resumed run may change without changing what it computes: when it stops, how often it
# logs, evaluates and checkpoints, what it shows and evaluates on (the split, its preprocessing:
# not the training), how its processes meet, and what only a fresh start reads. Any other
# difference is refused unless allowed (train --allow_config_change).
RESUME_EXEMPT = ("train.max_steps", "train.log_every", "train.eval_every_epochs",
                 "train.checkpoint_every_epochs", "train.max_to_keep", "train.eval_batch_size",
                 "train.progress", "train.plot", "train.load_from", "train.load_transform",
                 "dataset.eval_split", "dataset.eval_preprocess", "parallel.distributed",
                 "parallel.coordinator_address", "parallel.num_processes", "parallel.process_id")


def config_json(config) -> Dict[str, Any]:
  """A config as JSON (tuples as lists): how ``config.json`` and a checkpoint's metadata hold it."""
  return json.loads(config.to_json_best_effort())


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Sequence[str] = ()
                ) -> Dict[str, Tuple[Any, Any]]:
  """{dotted field: (saved value, current value)} where two configs as JSON differ, but for the
  fields in ``ignore``. A field one of them lacks (added to bnn_jax since) counts as None."""
  saved, current = _flatten(saved), _flatten(current)
  return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
          if saved.get(key) != current.get(key) and key not in ignore}


def describe(changes: Dict[str, Tuple[Any, Any]], prefix: str = "") -> str:
  """``field saved -> current`` for each difference, on one line, values as a config writes them."""
  return "; ".join(f"{prefix}{key} {_as_python(old)!r} -> {_as_python(new)!r}"
                   for key, (old, new) in changes.items())


def model_check(model_config: Mapping[str, Any], model_name: str,
                ignore: Sequence[str] = RUNTIME_MODEL_FIELDS, advice: str = "") -> Check:
  """A restore check refusing a checkpoint saved with another model configuration than
  ``model_config`` (a ``model`` section as JSON), even where every tensor fits (other binarizers,
  ``binary_type``); the fields in ``ignore`` may differ. A checkpoint that records no config passes."""

  def check(where: str, meta: Dict[str, Any]) -> None:
    saved = meta.get("config", {}).get("model")
    changed = differences(saved, model_config, ignore) if saved is not None else {}
    if changed:
      raise CheckpointError(f"checkpoint {where} holds another model configuration than "
                            f"{model_name}; checkpoint -> config: {describe(changed, 'model.')}"
                            + (f"; {advice}" if advice else ""))

  return check


def _drop_closed_loop_callbacks() -> None:
  """When a write or read fails, the file store's late callbacks reach the event loops Orbax has
  closed, and Python prints each as an unraisable ``RuntimeError('Event loop is closed')``
  (hundreds of tracebacks, harmless): a process that uses checkpoints drops those, and only those."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _not_orbax(record: logging.LogRecord) -> bool:
  return f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _orbax_quiet():
  """Drops Orbax's log records for the ``with`` block: a failed write's tracebacks, logged from its
  writer threads (the error that reaches us says it in one line), and the warnings that every
  read-only manager logs. After a failure they stay dropped: its other threads may log it later."""
  logger = logging.getLogger("absl")  # where absl.logging, which Orbax uses, writes
  logger.addFilter(_not_orbax)
  yield  # an exception leaves the filter in place
  logger.removeFilter(_not_orbax)


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
    _drop_closed_loop_callbacks()
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                           save_interval_steps=0 if read_only else 1,
                                           create=not read_only, read_only=read_only)
    with _orbax_quiet():
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
    previous = self.latest_step()  # before Orbax counts the step it is writing
    try:
      with _orbax_quiet():
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - whatever the file system or Orbax raised
      reason = one_line(error).rsplit(": ", 1)[-1]  # the OS's words, after Orbax's file paths
      raise CheckpointError(f"saving step {step} to {self.directory} failed ({reason}); "
                            f"{_kept(self.directory, previous)}") from None

  def last_good(self) -> str:
    """What a run that stops now leaves to resume from, in words."""
    return _kept(self.directory, self.latest_step())

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
              model_name: str = "this config's model", check: Optional[Check] = None
              ) -> Tuple[Any, Dict[str, Any]]:
    """The state at ``step`` (default: the newest that restores), shaped like ``state_template``,
    and its metadata; ``check`` (see :data:`Check`) may refuse a step before it is read."""

    def restore_step(s):
      self._check_fits(s, state_template, model_name)
      self._run_check(s, check)
      restored = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(state_template, sharding)),
          meta=ocp.args.JsonRestore()))
      return restored["state"], restored["meta"]

    return self._newest_restorable(step, restore_step)[1]

  def restore_variables(self, variables_template: Dict[str, Any], sharding,
                        step: Optional[int] = None, model_name: str = "this config's model",
                        check: Optional[Check] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Only ``params`` and ``batch_stats`` (for evaluation, teachers), whatever else was saved.
    A checkpoint with tensors the model lacks, or without some it has, is refused, and so is one
    that ``check`` refuses (:func:`model_check`: another model configuration)."""

    def restore_step(s):
      self._check_fits(s, variables_template, model_name)
      self._run_check(s, check)
      saved, meta = self._restore_saved_tree(s, sharding)
      return {k: saved[k] for k in variables_template}, meta

    return self._newest_restorable(step, restore_step)[1]

  def saved_tree(self, step: Optional[int], sharding, check: Optional[Check] = None
                 ) -> Tuple[int, Any, Dict[str, Any]]:
    """(step, whatever state tree was saved there as arrays with ``sharding``, its metadata):
    for partial loads; without ``step``, the newest that restores (and passes ``check``)."""

    def restore_step(s):
      self._run_check(s, check)
      return self._restore_saved_tree(s, sharding)

    step, (tree, meta) = self._newest_restorable(step, restore_step)
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

  def _run_check(self, step: int, check: Optional[Check]) -> None:
    if check is not None:
      check(f"{self.directory}/{step}", self.meta(step))

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


def swap_layer_prefix(tree: Any, old: str, new: str) -> Any:
  """``tree`` (nested dicts) with every key that begins with ``old`` beginning with ``new``
  instead: a Larq Zoo model names its layers ``<model_name>_…`` as larq-zoo does
  (``r2b_ban_block_2a_conv2d``), so the variables of one stage are another's under its prefix."""
  if not isinstance(tree, Mapping):
    return tree
  return {(new + key[len(old):] if key.startswith(old) else key): swap_layer_prefix(value, old, new)
          for key, value in tree.items()}


def unmatched_paths(template: Any, loaded: Any) -> Tuple[List[str], List[str]]:
  """(paths of ``template`` that ``loaded`` lacks, paths of ``loaded`` that ``template`` lacks),
  each as ``a/b/c``, sorted: whether two variable trees name the same tensors (shapes aside)."""
  def paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  ours, theirs = paths(template), paths(loaded)
  return sorted(ours - theirs), sorted(theirs - ours)


def _kept(directory: str, step: Optional[int]) -> str:
  return (f"the last good checkpoint, step {step}, is intact in {directory}" if step is not None
          else "no checkpoint was saved, so there is nothing to resume")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _as_python(value: Any) -> Any:
  """A JSON value as a config writes it (lists as tuples)."""
  return tuple(map(_as_python, value)) if isinstance(value, list) else value


def _normalise_key(key: str) -> str:
  # Orbax reports dataclass fields and dict keys alike as ['name']; jax as .name or ['name'].
  return key.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
