"""``python -m bnn_jax.train --config configs/irnet_r18.py --workdir DIR``: the training loop.

Rerunning the same command resumes from the workdir's latest checkpoint.
SIGTERM (a scheduler's pre-emption notice) saves a checkpoint and exits
cleanly; a NaN/Inf loss stops the run and keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import signal
import time
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bnn_jax import cli, data, durations, parallel
from bnn_jax.checkpoint import CheckpointError, Checkpoints, partial_load
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


class _Preemption:
  """Records SIGTERM so the loop can checkpoint at the next step boundary."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _load_from(experiment: Experiment, state: TrainState, path: str, reporter: Reporter):
  """Initialises params and batch_stats from another run's latest checkpoint (step 2 from step 1)."""
  step_loaded, saved, meta = Checkpoints(path, read_only=True).saved_tree(
      None, parallel.replicated(experiment.mesh))
  model = experiment.config.model
  saved_model = meta.get("config", {}).get("model", {})
  if saved_model and (saved_model.get("backbone"), saved_model.get("arch")) != (model.backbone, model.arch):
    raise CheckpointError(f"train.load_from {path} holds another model ({saved_model.get('arch')}) "
                          f"than this config's ({model.arch})")
  params, restored, fresh, unused = partial_load(state.params, saved["params"])
  if experiment.config.train.load_transform:  # a registered change of the loaded parameters
    params = load_transform(experiment.config.train.load_transform)(params)
  batch_stats, restored_bs, fresh_bs, unused_bs = partial_load(state.batch_stats,
                                                                saved.get("batch_stats", {}))
  reporter.log(f"load_from {path} (step {step_loaded}): restored {len(restored)} parameter and "
               f"{len(restored_bs)} statistic tensors; initialised fresh: {fresh + fresh_bs or 'none'}; "
               f"in the checkpoint but not in this model, not loaded: {unused + unused_bs or 'none'}")
  return state.replace(params=params, batch_stats=batch_stats)


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


def restore_or_init(experiment: Experiment, tx, checkpoints: Checkpoints, reporter: Reporter
                    ) -> Tuple[TrainState, dict]:
  """The run's state and best evaluation so far: resumed from the workdir's newest checkpoint
  that restores (damaged later ones set aside), else fresh, from ``train.load_from`` if set."""
  config = experiment.config
  state = experiment.init_state(tx)
  best = {"top1": -1.0, "step": None}
  if checkpoints.steps():
    state, meta = checkpoints.restore(state, parallel.replicated(experiment.mesh),
                                      model_name=f"the config's ({config.model.arch})",
                                      model_config=_config_json(config)["model"])
    moved = checkpoints.set_aside_skipped()
    reporter.log(f"resuming from step {int(state.step)} in {checkpoints.directory}"
                 + (f"; damaged later steps set aside, not deleted: {moved}" if moved else ""))
    return state, meta.get("best", best)
  if config.train.load_from:
    state = _load_from(experiment, state, config.train.load_from, reporter)
  return state, best


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains as ``config`` says in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: a whole config: :func:`bnn_jax.config.default_config` with a recipe's changes.
    workdir: where checkpoints, ``config.json``, ``metrics.jsonl``, TensorBoard events and
      ``curves.png`` go; locked for the run (:mod:`bnn_jax.workdir`).
  Returns:
    The last evaluation's ``loss``, ``top1``, ``top5`` and ``num_examples``; ``{}`` when SIGTERM
    stopped the run before any evaluation.
  Raises:
    ConfigError: a bad config value, or a checkpoint of another model (CheckpointError).
    NonFiniteLoss: the loss or the parameters became NaN/Inf (the last good checkpoint is kept).
  """
  with claim(workdir) as lock:
    if lock is not None and lock.took_over:
      print(f"{workdir}: took over the lock of a run that is gone (pid {lock.took_over.get('pid')} "
            f"on {lock.took_over.get('host')})", flush=True)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
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
  state, best = restore_or_init(experiment, tx, checkpoints, reporter)
  first_step = int(state.step)
  reporter.truncate_history(first_step)
  if jax.process_index() == 0:
    with open(f"{workdir}/config.json", "w") as f:
      json.dump(_config_json(config), f, indent=1)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  reporter.log(f"{config.model.arch}: {n_params:,} parameters | {config.dataset.name}: "
               f"{train_source.num_examples} train images, {steps_per_epoch} steps/epoch of "
               f"{batch_size} | {jax.device_count()} {jax.devices()[0].platform} device(s) "
               f"in {jax.process_count()} process(es), {config.parallel.mode}")

  def save(at_step: int) -> None:
    if not bool(all_finite((state.params, state.batch_stats))):  # never a non-finite "last good"
      raise NonFiniteLoss(f"parameters became non-finite by step {at_step}; not saved. The last "
                          f"good checkpoint (step {checkpoints.latest_step()}) is intact in "
                          f"{checkpoints.directory}")
    checkpoints.save(at_step, state, {
        "config": _config_json(config), "step": at_step, "epoch": at_step / steps_per_epoch,
        "best": best, "teacher": teacher_record})

  def fresh_sums():  # a new buffer each time: the step donates the sums it is given
    return jax.device_put(experiment.train_sums(), parallel.replicated(mesh))

  preemption = _Preemption()
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
        raise NonFiniteLoss(f"loss became {train_summary['loss']} by step {step}; stopping. The "
                            f"last good checkpoint (step {checkpoints.latest_step()}) is intact in "
                            f"{checkpoints.directory}")
      train_summary["images_per_s"] = throughput.lap(step)
      reporter.scalars(step, "train", train_summary)
      reporter.show(loss=train_summary["loss"], top1=train_summary["top1"],
                    img_s=train_summary["images_per_s"])
      sums = fresh_sums()

    if preemption.requested:
      reporter.end_epoch()
      save(step)
      reporter.log(f"SIGTERM: saved step {step} to {checkpoints.directory}; rerun the same "
                   "command to resume")
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

  if preemption.requested:
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

  def body():
    parallel.initialize_distributed(config.value.parallel)
    train_and_evaluate(config.value, workdir.value)

  cli.run(body, required=(config, workdir), errors=(ConfigError, NonFiniteLoss))


if __name__ == "__main__":
  main()
