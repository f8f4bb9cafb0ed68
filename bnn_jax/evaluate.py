"""``python -m bnn_jax.evaluate --config CONFIG --workdir DIR [--step N] [--packed] [--json]``.

Prints top-1, top-5 and loss over the whole eval split of the config's data
set, from the workdir's latest checkpoint (or ``--step``), on however many
devices this process sees. ``--packed`` runs the binary convolutions on packed
bits (XNOR-popcount, :mod:`bnn_jax.packed`). ``--json`` prints one JSON object as the last line.
"""
from __future__ import annotations

import json

import jax
from absl import flags

from bnn_jax import cli, packed, parallel, report
from bnn_jax.checkpoint import Checkpoints, config_json, model_check
from bnn_jax.experiment import Experiment
from bnn_jax.step import TrainState, make_eval_step


def restore_checkpoint(config, workdir: str, step=None):
  """(experiment, variables, step) of a workdir's checkpoint (latest, or ``step``), refused when
  it holds another model configuration than ``config.model`` (:func:`checkpoint.model_check`)."""
  experiment = Experiment.from_config(config)
  checkpoints = Checkpoints(workdir, read_only=True)
  name = f"the config's ({config.model.arch})"
  variables, meta = checkpoints.restore_variables(
      experiment.variables_template(), parallel.replicated(experiment.mesh), step, model_name=name,
      check=model_check(config_json(config.model), name, advice="give --config the run's config"))
  return experiment, variables, int(meta["step"])


def evaluate_checkpoint(config, workdir: str, step=None, bit_packed: bool = False) -> dict:
  """Evaluates a checkpoint on the config's eval split, every example once.

  Args:
    config: the config the run was trained with (its model and data set).
    workdir: the run's workdir (or ``bnn_jax.convert``'s output).
    step: the checkpoint step; default the newest that restores.
    bit_packed: compute the binary convolutions on packed bits (:mod:`bnn_jax.packed`).
  Returns:
    ``top1`` and ``top5`` (fractions), ``loss`` (mean cross-entropy), ``num_examples``, ``step``.
  Raises:
    CheckpointError: no checkpoint, or one of another model than ``config.model``.
  """
  experiment, variables, step = restore_checkpoint(config, workdir, step)
  state = TrainState(jax.numpy.asarray(step), variables["params"], variables["batch_stats"], None)
  eval_step = None
  if bit_packed:
    model = packed.PackedClassifier(experiment.model, packed.pack_weights(
        experiment.model, variables, experiment.input_shape))
    eval_step = parallel.jit_eval_step(make_eval_step(model), experiment.mesh)
  return experiment.evaluate(state, eval_step) | {"step": step}


def print_report(metrics: dict, as_json: bool) -> None:
  """The metrics' line and ``--json``'s (a non-finite value as null); a non-finite metric ends in
  one error line: it is no result to compare or record."""
  print(f"step {metrics['step']}: top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}  "
        f"loss {metrics['loss']:.4f}  ({metrics['num_examples']} images, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s))")
  clean, bad = report.finite(metrics)
  if as_json:
    print(json.dumps(clean, allow_nan=False))
  if bad:
    cli.fail(f"eval {', '.join(bad)} not finite ({metrics[bad[0]]}) at step {metrics['step']}: "
             "some logits are NaN or infinite, so this is no valid result")


def main():
  config = cli.config_flag("The run's config file.")
  workdir = flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
  as_json = flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
  bit_packed = flags.DEFINE_bool("packed", False, "Binary convolutions on packed bits (XNOR-popcount).")

  def body():
    parallel.initialize_distributed(config.value.parallel)
    metrics = evaluate_checkpoint(config.value, workdir.value, step.value, bit_packed.value)
    print_report(metrics, as_json.value)

  cli.run(body, required=(config, workdir))


if __name__ == "__main__":
  main()
