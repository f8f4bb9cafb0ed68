"""Train-step, eval-step and input-pipeline throughput of a config, on whatever devices JAX sees.

    python scripts/benchmark.py --config configs/reactnet_r18_step2.py --batch-size 256 --image-size 224
    python scripts/benchmark.py --config configs/irnet_r18.py --batch-size 16 --float-twin --json
    python scripts/benchmark.py --config configs/quickstart.py --data      # also time tf.data

Synthetic batches feed the steps (the model's speed alone); --data also times the config's real
input pipeline on the host, so the two can be compared: a pipeline slower than the step starves
the devices. --float-twin times the identical network with real-valued convolutions
(binary_type=(False, False)) too: the ratio is the cost of binarization. Prints the hardware,
compile time, median step times, images/s and, on accelerators, peak device memory; --json
prints one object with all of them as the last line. Numbers only mean something against
others from one run.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnn_jax import cli, data, parallel, step  # noqa: E402
from bnn_jax.config import load_config  # noqa: E402
from bnn_jax.experiment import Experiment  # noqa: E402
from bnn_jax.models import build_model, init_variables  # noqa: E402
from bnn_jax.recipes import apply_override  # noqa: E402


def timed(run, steps, warmup):
  """(seconds of the first call, median seconds of the next ``steps`` after ``warmup``) of
  ``run(index)``, which must block until its result is ready."""
  start = time.perf_counter()
  run(0)
  first = time.perf_counter() - start
  times = []
  for index in range(1, 1 + warmup + steps):
    start = time.perf_counter()
    run(index)
    if index > warmup:
      times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def time_model(config, steps, warmup):
  """Compile and median seconds of the jitted train and eval steps of ``config`` on synthetic
  batches of ``config.train.batch_size``."""
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(steps_per_epoch=1000, total_steps=100_000)
  teacher, teacher_variables = None, {}
  if experiment.objective.needs_teacher:  # random weights: the cost, not the result, matters
    teacher = build_model(config.teacher.model)
    teacher_variables = init_variables(teacher, experiment.input_shape, seed=1)
  train_step = experiment.make_train_step(tx, schedules, teacher)
  eval_step = parallel.jit_eval_step(step.make_eval_step(experiment.model), experiment.mesh)
  batch_size = config.train.batch_size
  synthetic = data.synthetic_batches(batch_size, config.dataset.image_size, len(config.dataset.mean),
                                     config.model.num_classes)
  batches = [parallel.to_global(dict(next(synthetic), mask=np.ones(batch_size, np.float32)),
                                experiment.mesh) for _ in range(2)]
  rep = parallel.replicated(experiment.mesh)
  carry = {"state": experiment.init_state(tx), "train_sums": jax.device_put(step.zero_sums(), rep),
           "sums": jax.device_put(step.zero_sums(), rep)}

  def train(index):
    carry["state"], carry["train_sums"], _ = train_step(carry["state"], batches[index % 2],
                                                        carry["train_sums"], teacher_variables)
    jax.block_until_ready(carry["train_sums"])

  def evaluate(index):
    carry["sums"] = eval_step(carry["state"], batches[index % 2], carry["sums"])
    jax.block_until_ready(carry["sums"])

  train_compile, train_s = timed(train, steps, warmup)
  eval_compile, eval_s = timed(evaluate, steps, warmup)
  return {"compile_s": train_compile, "train_step_s": train_s, "train_img_per_s": batch_size / train_s,
          "eval_compile_s": eval_compile, "eval_step_s": eval_s, "eval_img_per_s": batch_size / eval_s}


def time_pipeline(config, batches):
  """Median seconds per batch of the config's training input pipeline (host side only)."""
  experiment = Experiment.from_config(config)
  batch_size = config.train.batch_size // jax.process_count()
  source = experiment.source(config.dataset.train_split)
  steps = data.steps_per_epoch(source.process_examples, batch_size)
  iterator = data.train_batches(source, config.dataset, batch_size, seed=0, steps=steps)
  return timed(lambda _: next(iterator), batches, 1)[1]  # the first: file listing, shuffle buffer


def peak_memory_bytes():
  """Peak bytes in use on the first device, where the backend reports it (not on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
  parser.add_argument("--image-size", type=int, default=None, help="default: the config's")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                      help="override a config field, e.g. model.dtype=bfloat16")
  parser.add_argument("--float-twin", action="store_true",
                      help="also time the same network with real-valued convolutions")
  parser.add_argument("--data", action="store_true", help="also time the real input pipeline")
  parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  args = parser.parse_args()

  config = load_config(args.config)
  for assignment in args.set:
    apply_override(config, assignment)
  config.train.batch_size = args.batch_size or config.train.batch_size
  config.dataset.image_size = args.image_size or config.dataset.image_size
  device = jax.devices()[0]
  result = {"config": args.config, "overrides": args.set, "arch": config.model.arch,
            "device": f"{device.device_kind} ({device.platform})", "device_count": jax.device_count(),
            "host_cpus": os.cpu_count(), "jax": jax.__version__, "dtype": config.model.dtype,
            "batch_size": config.train.batch_size, "image_size": config.dataset.image_size}
  print(f"hardware: {jax.device_count()} x {result['device']}, {os.cpu_count()} host CPUs | "
        f"jax {jax.__version__}")
  print(f"config: {args.config} {' '.join(args.set)} | {config.model.arch} | batch "
        f"{config.train.batch_size} | {config.dataset.image_size}x{config.dataset.image_size} | "
        f"{config.parallel.mode} | dtype {config.model.dtype}")
  result |= time_model(config, args.steps, args.warmup)
  print(f"train step: compile {result['compile_s']:.1f} s, median {result['train_step_s'] * 1e3:.1f} ms, "
        f"{result['train_img_per_s']:,.1f} img/s | eval step: median {result['eval_step_s'] * 1e3:.1f} ms, "
        f"{result['eval_img_per_s']:,.1f} img/s")
  result["peak_memory_bytes"] = peak_memory_bytes()
  if result["peak_memory_bytes"]:
    print(f"peak device memory: {result['peak_memory_bytes'] / 2**30:.2f} GiB")
  if args.float_twin:
    twin = config.copy_and_resolve_references()
    twin.model.binary_type = (False, False)
    float_twin = time_model(twin, args.steps, args.warmup)
    result["float_twin"] = float_twin
    result["binary_over_float_train"] = result["train_step_s"] / float_twin["train_step_s"]
    result["binary_over_float_eval"] = result["eval_step_s"] / float_twin["eval_step_s"]
    print(f"float twin (binary_type=(False, False)): train {float_twin['train_img_per_s']:,.1f} img/s, "
          f"eval {float_twin['eval_img_per_s']:,.1f} img/s | binary / float step time: train "
          f"{result['binary_over_float_train']:.2f}x, eval {result['binary_over_float_eval']:.2f}x")
  if args.data:
    per_batch = time_pipeline(config, args.steps)
    result["input_img_per_s"] = config.train.batch_size / per_batch
    print(f"input pipeline ({config.dataset.name}): median {per_batch * 1e3:.1f} ms per batch, "
          f"{result['input_img_per_s']:,.0f} img/s = {result['train_step_s'] / per_batch:.2f}x the "
          f"step's rate")
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  cli.script(main)
