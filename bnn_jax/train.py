"""``python -m bnn_jax.train --config configs/irnet_r18.py --workdir DIR``: the training loop.

Rerunning the same command resumes from the workdir's latest checkpoint; a changed config is
refused where it would change the run (``--allow_config_change`` continues with it, logged).
SIGTERM (a scheduler's pre-emption notice) saves a checkpoint and exits cleanly; Ctrl-C saves
one too and exits with status 1 (a second Ctrl-C stops at once); a NaN/Inf loss stops the run
and keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bnn_jax import cli, data, durations, parallel
from bnn_jax.checkpoint import (RESUME_EXEMPT, RUNTIME_MODEL_FIELDS, STAGE_MODEL_FIELDS,
                                CheckpointError, Checkpoints, config_json, describe, differences,
                                model_check, partial_load, swap_layer_prefix, unmatched_paths)
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.models import load_transform
from bnn_jax.report import Reporter
from bnn_jax.step import TrainState, fetch, make_eval_step, summarize
from bnn_jax.workdir import claim


class NonFiniteLoss(RuntimeError):
  """The loss or the parameters became NaN/Inf; the last good checkpoint is kept."""


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every value of ``tree`` is finite: one reduction on device, fetched at saves only."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


class Interrupted(RuntimeError):
  """Ctrl-C stopped the run (after saving a checkpoint, or at once when pressed twice)."""


# What ends a run in one line (``error: …``, exit status 1) rather than a traceback.
USER_ERRORS = (ConfigError, NonFiniteLoss, Interrupted)


class _StopRequests:
  """SIGTERM (a scheduler's pre-emption) and Ctrl-C (SIGINT) ask the loop to checkpoint at the
  next step and stop; Ctrl-C while a request is pending stops at once (KeyboardInterrupt). The
  previous handlers are back when the ``with`` block ends."""

  def __enter__(self):
    self.requested: Optional[str] = None  # "SIGTERM" or "Ctrl-C"
    self._previous = {signum: signal.signal(signum, self._handle)
                      for signum in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = self.requested or ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")


def _load_from(experiment: Experiment, state: TrainState, path: str, reporter: Reporter):
  """Initialises params and batch_stats from another run's latest checkpoint (step 2 from step 1):
  refused when the model configurations differ beyond what a later stage changes
  (``STAGE_MODEL_FIELDS``, which are logged, and ``RUNTIME_MODEL_FIELDS``). A Larq Zoo stage
  reads another ``model_name``'s variables under its own layer names (:func:`_renamed_for_stage`)."""
  model = config_json(experiment.config.model)
  check = model_check(model, f"this config's ({model.get('arch') or model.get('backbone')})",
                      RUNTIME_MODEL_FIELDS + STAGE_MODEL_FIELDS,
                      advice=f"train.load_from may change only model.{', model.'.join(STAGE_MODEL_FIELDS)}")
  step_loaded, saved, meta = Checkpoints(path, read_only=True).saved_tree(
      None, parallel.replicated(experiment.mesh), check)
  saved_model = meta.get("config", {}).get("model")
  stage_changes = differences(saved_model, model, RUNTIME_MODEL_FIELDS) if saved_model else {}
  saved = _renamed_for_stage(saved, saved_model, model, state, path)
  params, restored, fresh, unused = partial_load(state.params, saved["params"])
  if experiment.config.train.load_transform:  # a registered change of the loaded parameters
    params = load_transform(experiment.config.train.load_transform)(params)
  batch_stats, restored_bs, fresh_bs, unused_bs = partial_load(state.batch_stats,
                                                                saved.get("batch_stats", {}))
  reporter.log(f"load_from {path} (step {step_loaded}): restored {len(restored)} parameter and "
               f"{len(restored_bs)} statistic tensors; initialised fresh: {fresh + fresh_bs or 'none'}; "
               f"in the checkpoint but not in this model, not loaded: {unused + unused_bs or 'none'}"
               + (f"; model changed: {describe(stage_changes, 'model.')}" if stage_changes else ""))
  return state.replace(params=params, batch_stats=batch_stats)


def _renamed_for_stage(saved, saved_model: Optional[Dict[str, Any]], model: Dict[str, Any],
                       state: TrainState, path: str):
  """A checkpoint of another ``model.model_name`` (a Larq Zoo stage: larq-zoo begins every layer
  name with it) under this model's names, the prefix swapped (r2b_ban_… -> r2b_bnn_…); refused
  in one line where the two models still name other tensors (another architecture)."""
  old, new = (saved_model or {}).get("model_name"), model.get("model_name")
  if not old or not new or old == new:
    return saved
  parts = ("params", "batch_stats")
  saved = dict(saved, **{part: swap_layer_prefix(saved.get(part, {}), f"{old}_", f"{new}_")
                         for part in parts})
  missing, extra = unmatched_paths({"params": state.params, "batch_stats": state.batch_stats},
                                   {part: saved[part] for part in parts})
  if missing or extra:
    some = lambda paths: (f"{len(paths)} tensor(s) ({', '.join(paths[:3])}"  # noqa: E731
                          f"{', …' if len(paths) > 3 else ''})" if paths else "none")
    raise CheckpointError(
        f"train.load_from {path}: model.model_name {old!r} -> {new!r} is another architecture, "
        f"not another stage of this one: with the layer prefix {old}_ read as {new}_, "
        f"{some(missing)} of this model are not in the checkpoint and {some(extra)} of the "
        "checkpoint are not in this model")
  return saved


def _resume_check(config: Dict[str, Any], allow_config_change: bool):
  """A restore check refusing to resume a run whose checkpoint was saved with a config that
  differs from ``config`` in anything but :data:`RESUME_EXEMPT` (unless ``allow_config_change``):
  such a resume would silently mix two runs."""

  def check(where: str, meta: Dict[str, Any]) -> None:
    changed = differences(meta.get("config", {}), config, RESUME_EXEMPT)
    if changed and not allow_config_change:
      raise CheckpointError(
          f"checkpoint {where} was saved with another config, and resuming would mix two runs; "
          f"checkpoint -> this config: {describe(changed)}; rerun with the run's config, use a new "
          "--workdir, or pass --allow_config_change to continue with the change")

  return check


def write_config(workdir: str, config: Dict[str, Any], step: int,
                 saved: Optional[Dict[str, Any]], reporter: Reporter) -> None:
  """Writes ``config.json``. Resuming at ``step`` with a config that differs from the one the run
  was saved with (``saved``) logs every difference and keeps that one as ``config.step<step>.json``."""
  if jax.process_index() != 0:
    return
  changed = differences(saved, config) if saved is not None else {}
  if changed:
    kept = os.path.join(workdir, f"config.step{step}.json")
    if not os.path.exists(kept):  # a later resume at the same step keeps the first version
      with open(kept, "w") as f:
        json.dump(saved, f, indent=1)
    reporter.log(f"config changed at step {step}: {describe(changed)}; the run's config up to "
                 f"step {step} is kept in {kept}")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def itstime(step: int, every: int, last: int) -> bool:
  """Whether a periodic action (log, evaluate, checkpoint) is due after ``step``: every
  ``every`` steps, and at the run's last step."""
  return step == last or (every > 0 and step % every == 0)


class Throughput:
  """Training images per second, over each log window (``lap``) and since the last ``restart``
  (an epoch); restarted after evaluations and checkpoints, which are not training."""

  def __init__(self, batch_size: int, step: int):
    self.batch_size = batch_size
    self.restart(step)

  def restart(self, step: int) -> None:
    self.start = self.lap_start = (step, time.perf_counter())

  def _rate(self, since, step: int, now: float) -> float:
    return (step - since[0]) * self.batch_size / max(now - since[1], 1e-9)

  def lap(self, step: int) -> float:
    """Since the last lap (call after a fetch, when the device has finished ``step``)."""
    now = time.perf_counter()
    rate, self.lap_start = self._rate(self.lap_start, step, now), (step, now)
    return rate

  def since_restart(self) -> float:
    """From the restart to the last lap."""
    return self._rate(self.start, *self.lap_start)


def restore_or_init(experiment: Experiment, tx, checkpoints: Checkpoints, reporter: Reporter,
                    allow_config_change: bool = False) -> Tuple[TrainState, dict, Optional[dict]]:
  """The run's state, best evaluation so far and the config it was saved with: resumed from the
  workdir's newest checkpoint that restores (damaged later ones set aside; a changed config
  refused, see :func:`_resume_check`), else fresh, from ``train.load_from`` if set (config None)."""
  config = experiment.config
  state = experiment.init_state(tx)
  best = {"top1": -1.0, "step": None}
  if checkpoints.steps():
    state, meta = checkpoints.restore(state, parallel.replicated(experiment.mesh),
                                      model_name=f"the config's ({config.model.arch})",
                                      check=_resume_check(config_json(config), allow_config_change))
    moved = checkpoints.set_aside_skipped()
    reporter.log(f"resuming from step {int(state.step)} in {checkpoints.directory}"
                 + (f"; damaged later steps set aside, not deleted: {moved}" if moved else ""))
    return state, meta.get("best", best), meta.get("config", {})
  if config.train.load_from:
    state = _load_from(experiment, state, config.train.load_from, reporter)
  return state, best, None


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains as ``config`` says in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: a whole config: :func:`bnn_jax.config.default_config` with a recipe's changes.
    workdir: where checkpoints, ``config.json``, ``metrics.jsonl``, TensorBoard events and
      ``curves.png`` go; locked for the run (:mod:`bnn_jax.workdir`).
    allow_config_change: resume even where ``config`` differs from the run's in what shapes
      its trajectory (each difference is logged, the earlier config kept: :func:`write_config`).
  Returns:
    The last evaluation's ``loss``, ``top1``, ``top5`` and ``num_examples``; ``{}`` when SIGTERM
    stopped the run before any evaluation.
  Raises:
    ConfigError: a bad config value, a checkpoint of another model or a resume with another
      config (CheckpointError).
    NonFiniteLoss: the loss or the parameters became NaN/Inf (the last good checkpoint is kept).
    Interrupted: Ctrl-C (a checkpoint saved first, unless pressed twice).
  """
  with claim(workdir) as lock, _StopRequests() as stop:
    if lock is not None and lock.took_over is not None:
      print(f"{workdir}: took over the lock of {lock.took_over}", flush=True)
    try:
      return _train_and_evaluate(config, workdir, allow_config_change, stop)
    except KeyboardInterrupt:
      raise Interrupted("Ctrl-C twice: stopped at once, nothing saved since the last "
                        "checkpoint") from None


def _train_and_evaluate(config, workdir: str, allow_config_change: bool,
                        stop: _StopRequests) -> dict:
  experiment = Experiment.from_config(config)
  mesh, batch_size = experiment.mesh, config.train.batch_size
  local_batch = parallel.local_batch_size(batch_size)
  parallel.local_batch_size(experiment.eval_batch_size, "eval batch size")
  train_source = experiment.source(config.dataset.train_split)
  eval_source = experiment.source(config.dataset.eval_split)
  steps_per_epoch, total_steps = durations.run_steps(config, train_source.num_examples)
  last_step = min(total_steps, config.train.max_steps or total_steps)
  reporter = Reporter(workdir, steps_per_epoch, config.train.epochs, config.train.progress)

  tx, schedules = experiment.make_optimizer(steps_per_epoch, total_steps)
  teacher, teacher_variables, teacher_record = experiment.load_teacher()
  if teacher is not None:
    reporter.log(f"teacher: {config.teacher.model.arch} from {teacher_record['checkpoint']} "
                 f"(step {teacher_record['step']}), BatchNorm on {config.teacher.batchnorm} "
                 "statistics, inside the train step")
  train_step = experiment.make_train_step(tx, schedules, teacher)
  eval_step = parallel.jit_eval_step(make_eval_step(experiment.model), mesh)
  checkpoints = Checkpoints(workdir, config.train.max_to_keep)
  state, best, saved_config = restore_or_init(experiment, tx, checkpoints, reporter,
                                              allow_config_change)
  first_step = int(state.step)
  reporter.truncate_history(first_step)
  write_config(workdir, config_json(config), first_step, saved_config, reporter)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  reporter.log(f"{config.model.arch or config.model.backbone}: {n_params:,} parameters | "
               f"{config.dataset.name}: {train_source.num_examples} train images, "
               f"{steps_per_epoch} steps/epoch of {batch_size} | {jax.device_count()} "
               f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), "
               f"{config.parallel.mode}")

  def save(at_step: int) -> None:
    if not bool(all_finite((state.params, state.batch_stats))):  # never a non-finite "last good"
      raise NonFiniteLoss(f"parameters became non-finite by step {at_step}; not saved; "
                          f"{checkpoints.last_good()}")
    checkpoints.save(at_step, state, {
        "config": config_json(config), "step": at_step, "epoch": at_step / steps_per_epoch,
        "best": best, "teacher": teacher_record})

  def fresh_sums():  # a new buffer each time: the step donates the sums it is given
    return jax.device_put(experiment.train_sums(), parallel.replicated(mesh))

  batches = parallel.prefetch_to_devices(
      data.train_batches(train_source, config.dataset, local_batch, config.train.seed,
                         steps_per_epoch, first_step), mesh)
  throughput = Throughput(batch_size, first_step)
  sums, train_summary, eval_metrics = fresh_sums(), {}, {}
  if first_step >= last_step:  # rerun of a finished run (e.g. a recipe stage): report, train nothing
    reporter.log(f"{workdir} already finished at step {first_step}; evaluating its last checkpoint")
    eval_metrics = experiment.evaluate(state, eval_step, eval_source)
  for step in range(first_step + 1, last_step + 1):
    batch = next(batches)  # already on the devices (prefetched)
    with jax.transfer_guard("disallow"):  # an implicit host transfer here would stall every step
      state, sums, scheduled = train_step(state, batch, sums, teacher_variables)
    reporter.advance(step)
    epoch_done = itstime(step, steps_per_epoch, last_step)

    if itstime(step, config.train.log_every, last_step) or epoch_done:
      fetched = fetch(sums | scheduled)  # one transfer; the names do not overlap
      train_summary = summarize(fetched) | {name: fetched[name] for name in scheduled}
      if not math.isfinite(train_summary["loss"]):
        raise NonFiniteLoss(f"loss became {train_summary['loss']} by step {step}; stopping; "
                            f"{checkpoints.last_good()}")
      train_summary["images_per_s"] = throughput.lap(step)
      reporter.scalars(step, "train", train_summary)
      reporter.show(loss=train_summary["loss"], top1=train_summary["top1"],
                    img_s=train_summary["images_per_s"])
      sums = fresh_sums()

    if stop.requested:
      reporter.end_epoch()
      reporter.log(f"{stop.requested}: saving step {step}, then stopping"
                   + (" (Ctrl-C again stops at once)" if stop.requested == "Ctrl-C" else ""))
      save(step)
      saved = f"saved step {step} to {checkpoints.directory}; rerun the same command to resume"
      if stop.requested == "Ctrl-C":
        raise Interrupted(f"Ctrl-C: {saved}")
      reporter.log(f"SIGTERM: {saved}")
      break
    if not epoch_done:
      continue

    reporter.end_epoch()
    evaluated = itstime(step, config.train.eval_every_epochs * steps_per_epoch, last_step)
    if evaluated:
      eval_metrics = experiment.evaluate(state, eval_step, eval_source)
      reporter.scalars(step, "eval", eval_metrics)
      if eval_metrics["top1"] > best["top1"]:
        best = {"top1": eval_metrics["top1"], "step": step}
    if itstime(step, config.train.checkpoint_every_epochs * steps_per_epoch, last_step):
      save(step)
    reporter.epoch_line(step, train_summary, eval_metrics if evaluated else None,
                        throughput.since_restart())
    throughput.restart(step)

  if stop.requested:
    return eval_metrics
  if config.train.plot and (path := reporter.plot()):
    reporter.log(f"curves: {path}")
  if eval_metrics:
    reporter.log(f"final: eval top-1 {eval_metrics['top1']:.2%}, top-5 {eval_metrics['top5']:.2%}, "
                 f"loss {eval_metrics['loss']:.4f} on {eval_metrics['num_examples']} images "
                 f"(best top-1 {best['top1']:.2%} at step {best['step']})")
  return eval_metrics


def main():
  config = cli.config_flag("Training config file (get_config()).")
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")

  allow_config_change = flags.DEFINE_bool(
      "allow_config_change", False, "Resume even where the config differs from the run's in what "
      "shapes its trajectory (logged; the earlier config is kept as config.step<N>.json).")

  def body():
    parallel.initialize_distributed(config.value.parallel)
    train_and_evaluate(config.value, workdir.value, allow_config_change.value)

  cli.run(body, required=(config, workdir), errors=USER_ERRORS)


if __name__ == "__main__":
  main()
