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

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bnn_jax import cli, data, parallel, step
from bnn_jax.checkpoint import CheckpointError, Checkpoints, partial_load
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.models import load_transform
from bnn_jax.report import Reporter
from bnn_jax.workdir import claim

class NonFiniteLoss(RuntimeError):
  pass


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


def _load_from(experiment: Experiment, state: step.TrainState, path: str, reporter: Reporter):
  """Initialises params and batch_stats from another run's latest checkpoint (step 2 from step 1)."""
  step_loaded, saved, meta = Checkpoints(path, read_only=True).saved_tree(
      None, parallel.replicated(experiment.mesh))
  model = experiment.config.model
  saved_model = meta.get("config", {}).get("model", {})
  if saved_model and (saved_model.get("backbone"), saved_model.get("arch")) != (model.backbone, model.arch):
    raise CheckpointError(f"train.load_from {path} holds another model ({saved_model.get('arch')}) "
                          f"than this config's ({model.arch})")
  params, restored, fresh, unused = partial_load(state.params, saved["params"])
  if experiment.config.train.load_transform:  # e.g. HCEBNN's expansion: expert 0 into every expert
    params = load_transform(experiment.config.train.load_transform)(params)
  batch_stats, restored_bs, fresh_bs, unused_bs = partial_load(state.batch_stats,
                                                                saved.get("batch_stats", {}))
  reporter.log(f"load_from {path} (step {step_loaded}): restored {len(restored)} parameter and "
               f"{len(restored_bs)} statistic tensors; initialised fresh: {fresh + fresh_bs or 'none'}; "
               f"in the checkpoint but not in this model, not loaded: {unused + unused_bs or 'none'}")
  return state.replace(params=params, batch_stats=batch_stats)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains as ``config`` says, checkpointing into ``workdir`` (locked for the run: see
  :mod:`bnn_jax.workdir`); returns the final eval metrics."""
  with claim(workdir) as lock:
    if lock is not None and lock.took_over:
      print(f"{workdir}: took over the lock of a run that is gone (pid {lock.took_over.get('pid')} "
            f"on {lock.took_over.get('host')})", flush=True)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  reporter = Reporter(workdir, config.train.progress)
  experiment = Experiment.from_config(config)
  mesh = experiment.mesh
  local_batch = parallel.check_batch_size(config.train.batch_size)
  parallel.check_batch_size(experiment.eval_batch_size, "eval batch size")
  train_source = experiment.source(config.dataset.train_split)
  eval_source = experiment.source(config.dataset.eval_split)
  steps_per_epoch = data.steps_per_epoch(train_source.num_examples, config.train.batch_size,
                                         config.train.drop_last)
  total_steps = config.train.epochs * steps_per_epoch
  last_step = min(total_steps, config.train.max_steps or total_steps)

  tx, lr_schedule = experiment.make_optimizer(steps_per_epoch, total_steps)
  ede = experiment.make_ede(steps_per_epoch, config.train.epochs)
  teacher, teacher_variables, teacher_record = experiment.load_teacher()
  if teacher is not None:
    reporter.log(f"teacher: {config.teacher.model.arch} from {teacher_record['checkpoint']} "
                 f"(step {teacher_record['step']}), BatchNorm on {config.teacher.batchnorm} "
                 "statistics, inside the train step")
  train_step = experiment.make_train_step(tx, lr_schedule, ede, teacher)
  eval_step = parallel.jit_eval_step(step.make_eval_step(experiment.model), mesh)
  state = experiment.init_state(tx)

  checkpoints = Checkpoints(workdir, config.train.max_to_keep)
  best = {"top1": -1.0, "step": None}
  if checkpoints.steps():
    state, meta = checkpoints.restore(state, parallel.replicated(mesh),
                                      model_name=f"the config's ({config.model.arch})")
    saved_model = meta.get("config", {}).get("model")
    if saved_model is not None and saved_model != _config_json(config)["model"]:
      raise CheckpointError(f"{workdir} holds checkpoints of a different model "
                            f"({saved_model.get('arch')} vs {config.model.arch}); use a new --workdir")
    best = meta.get("best", best)
    moved = checkpoints.set_aside_skipped()
    reporter.log(f"resuming from step {int(state.step)} in {checkpoints.directory}"
                 + (f"; damaged later steps set aside, not deleted: {moved}" if moved else ""))
  elif config.train.load_from:
    state = _load_from(experiment, state, config.train.load_from, reporter)
  start_step = int(state.step)
  reporter.truncate_history(start_step)
  if jax.process_index() == 0:
    with open(f"{workdir}/config.json", "w") as f:
      json.dump(_config_json(config), f, indent=1)

  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  reporter.log(f"{config.model.arch}: {n_params:,} parameters | {config.dataset.name}: "
               f"{train_source.num_examples} train images, {steps_per_epoch} steps/epoch of "
               f"{config.train.batch_size} | {jax.device_count()} {jax.devices()[0].platform} device(s) "
               f"in {jax.process_count()} process(es), {config.parallel.mode}")

  def save(current_step: int) -> None:
    if not bool(all_finite((state.params, state.batch_stats))):  # never a non-finite "last good"
      raise NonFiniteLoss(f"parameters became non-finite by step {current_step}; not saved. The last "
                          f"good checkpoint (step {checkpoints.latest_step()}) is intact in "
                          f"{checkpoints.directory}")
    checkpoints.save(current_step, state, {
        "config": _config_json(config), "step": current_step,
        "epoch": current_step / steps_per_epoch, "best": best, "teacher": teacher_record})

  preemption = _Preemption()
  batches = parallel.prefetch_to_devices(
      data.train_batches(train_source, config.dataset, local_batch, config.train.seed,
                         steps_per_epoch, start_step), mesh)
  zero = lambda: jax.device_put(step.zero_metrics(), parallel.replicated(mesh))  # noqa: E731
  metrics, eval_metrics = zero(), {}
  current = start_step
  if current >= last_step:  # rerun of a finished run (e.g. a recipe stage): report, train nothing
    reporter.log(f"{workdir} already finished at step {current}; evaluating its last checkpoint")
    eval_metrics = experiment.evaluate(state, eval_step, eval_source)
  while current < last_step:
    epoch = current // steps_per_epoch
    epoch_end = min((epoch + 1) * steps_per_epoch, last_step)
    reporter.start_epoch(epoch, config.train.epochs, steps_per_epoch, current - epoch * steps_per_epoch)
    epoch_start, epoch_time = current, time.perf_counter()
    window_start, window_time = epoch_start, epoch_time
    while current < epoch_end:
      state, metrics = train_step(state, next(batches), metrics, teacher_variables)
      current += 1
      reporter.advance()
      if current % config.train.log_every == 0 or current == epoch_end:
        fetched = {k: float(v) for k, v in jax.device_get(metrics).items()}
        summary = step.summarize(fetched)
        if not ede:
          del summary["ede_k"], summary["ede_t"]
        if not math.isfinite(summary["loss"]):
          raise NonFiniteLoss(f"loss became {summary['loss']} by step {current}; stopping. The last "
                              f"good checkpoint (step {checkpoints.latest_step()}) is intact in "
                              f"{checkpoints.directory}")
        now = time.perf_counter()
        summary["images_per_s"] = (current - window_start) * config.train.batch_size / (now - window_time)
        window_start, window_time = current, now
        reporter.scalars(current, "train", summary)
        reporter.show(loss=summary["loss"], top1=summary["top1"], img_s=summary["images_per_s"])
        metrics = zero()
      if preemption.requested:
        reporter.end_epoch()
        save(current)
        reporter.log(f"SIGTERM: saved step {current} to {checkpoints.directory}; rerun the same "
                     "command to resume")
        return eval_metrics
    reporter.end_epoch()
    epoch_images_per_s = (current - epoch_start) * config.train.batch_size / (window_time - epoch_time)
    finished = current == last_step
    evaluated = finished or (epoch + 1) % config.train.eval_every_epochs == 0
    if evaluated:
      eval_metrics = experiment.evaluate(state, eval_step, eval_source)
      reporter.scalars(current, "eval", eval_metrics)
      if eval_metrics["top1"] > best["top1"]:
        best = {"top1": eval_metrics["top1"], "step": current}
    if finished or (epoch + 1) % config.train.checkpoint_every_epochs == 0:
      save(current)
    reporter.log(
        f"epoch {current / steps_per_epoch:.4g}/{config.train.epochs} step {current}: "
        f"train loss {summary['loss']:.4f} "
        f"top-1 {summary['top1']:.2%} lr {summary['lr']:.3g}"
        + (f" | EDE k {summary['ede_k']:.3g} t {summary['ede_t']:.3g}" if ede else "")
        + (f" | eval loss {eval_metrics['loss']:.4f} top-1 {eval_metrics['top1']:.2%} "
           f"top-5 {eval_metrics['top5']:.2%}" if evaluated else "")
        + f" | {epoch_images_per_s:.0f} img/s")
  if config.train.plot:
    path = reporter.plot()
    if path:
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
