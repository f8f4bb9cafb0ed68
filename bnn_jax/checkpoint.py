"""Orbax checkpoints: save, resume, partial ``load_from``, restore on any device count.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/`` with two items:
``state`` (the TrainState) and ``meta`` (JSON: config, epoch, best eval
metrics). Restores build the target from the *current* model and mesh, so a
checkpoint saved on 8 devices restores on 1 or 2.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from bnn_jax.errors import ConfigError


class CheckpointError(ConfigError):
  """A checkpoint that is missing or belongs to another model."""


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

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def steps(self) -> List[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Saves in the background; call :meth:`wait` before the process exits."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def _check_step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {self.steps()}")
    return step

  def meta(self, step: Optional[int] = None) -> Dict[str, Any]:
    step = self._check_step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, state_template: Any, sharding, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any]]:
    """The state at ``step`` (default: latest), shaped like ``state_template``, and its metadata."""
    step = self._check_step(step)
    self._check_fits(step, state_template)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(state_template, sharding)),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_variables(self, variables_template: Dict[str, Any], sharding,
                        step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Only ``params`` and ``batch_stats`` (for evaluation, teachers), whatever else was saved."""
    step = self._check_step(step)
    self._check_fits(step, variables_template)
    saved = self.saved_tree(step, sharding)
    return {k: saved[k] for k in variables_template}, self.meta(step)

  def saved_tree(self, step: Optional[int], sharding) -> Any:
    """Whatever state tree was saved at ``step``, as arrays with ``sharding`` (for partial loads)."""
    step = self._check_step(step)
    tree = self.manager.item_metadata(step)["state"].tree
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def _check_fits(self, step: int, state_template: Any) -> None:
    """A clear error, before any restore, when the checkpoint was saved by another model."""
    saved = self.manager.item_metadata(step)["state"].tree
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(state_template)[0]}
    have = {jax.tree_util.keystr(p): tuple(m.shape)
            for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    have = {_normalise_key(k): v for k, v in have.items()}
    want = {_normalise_key(k): v for k, v in want.items()}
    missing = sorted(set(want) - set(have))
    misshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or misshaped:
      detail = (missing[:5] and f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}; " or "") + (
          misshaped and "shapes differ at " + ", ".join(
              f"{k} (checkpoint {have[k]}, model {want[k]})" for k in misshaped[:5]) or "")
      raise CheckpointError(f"checkpoint {self.directory}/{step} was saved by a different model: "
                            f"{detail.rstrip('; ')}")


def _normalise_key(key: str) -> str:
  # Orbax reports dataclass fields and dict keys alike as ['name']; jax as .name or ['name'].
  return key.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
