"""Train-step and input-pipeline throughput of a config, on whatever devices JAX sees.

    python scripts/benchmark.py --config configs/reactnet_r18_step2.py --batch 256 --image-size 224
    python scripts/benchmark.py --config configs/quickstart.py --data      # also time tf.data

Synthetic batches feed the step (the model's speed alone); --data also times the config's
real input pipeline on the host, so the two can be compared: a pipeline slower than the step
starves the devices. Prints the hardware, compile time, median step time, images/s and, for
accelerators, peak device memory. Numbers only mean something against others from one run.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bnn_jax import data, parallel, step  # noqa: E402
from bnn_jax.config import load_config  # noqa: E402
from bnn_jax.experiment import Experiment  # noqa: E402
from bnn_jax.models import build_model  # noqa: E402
from bnn_jax.recipes import apply_override  # noqa: E402


def time_steps(experiment, batch_size, steps, warmup):
  """(compile seconds, per-step seconds) of the jitted train step on synthetic batches."""
  config = experiment.config
  tx, lr = experiment.make_optimizer(steps_per_epoch=1000, total_steps=100_000)
  teacher, teacher_variables = None, {}
  if experiment.objective.needs_teacher:  # random weights: the cost, not the result, matters
    teacher = build_model(config.teacher.model)
    teacher_variables = jax.jit(lambda: teacher.init(
        jax.random.key(1), jax.numpy.zeros(experiment.input_shape), train=False))()
  ede = experiment.make_ede(1000, config.train.epochs)
  train_step = experiment.make_train_step(tx, lr, ede, teacher)
  state = experiment.init_state(tx)
  channels = len(config.dataset.mean)
  batches = [parallel.to_global(b, experiment.mesh) for b, _ in zip(
      data.synthetic_batches(batch_size, config.dataset.image_size, channels,
                             config.model.num_classes), range(2))]
  metrics = jax.device_put(step.zero_metrics(), parallel.replicated(experiment.mesh))
  start = time.perf_counter()
  state, metrics = train_step(state, batches[0], metrics, teacher_variables)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for index in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batches[index % 2], metrics, teacher_variables)
    jax.block_until_ready(metrics)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  return compile_s, times


def time_pipeline(experiment, batch_size, batches):
  """Per-batch seconds of the config's training input pipeline (host side only)."""
  source = experiment.source(experiment.config.dataset.train_split)
  steps = data.steps_per_epoch(source.process_examples, batch_size)
  iterator = data.train_batches(source, experiment.config.dataset, batch_size, seed=0, steps=steps)
  next(iterator)  # start-up: file listing, the first shuffle buffer
  times = []
  for _ in range(batches):
    start = time.perf_counter()
    next(iterator)
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  parser.add_argument("--image-size", type=int, default=None, help="default: the config's")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                      help="override a config field, e.g. model.base_channels=16")
  parser.add_argument("--data", action="store_true", help="also time the real input pipeline")
  args = parser.parse_args()

  config = load_config(args.config)
  for assignment in args.set:
    apply_override(config, assignment)
  batch = args.batch or config.train.batch_size
  if args.image_size:
    config.dataset.image_size = args.image_size
  config.train.batch_size = batch
  experiment = Experiment.from_config(config)
  device = jax.devices()[0]
  print(f"hardware: {jax.device_count()} x {device.device_kind} ({device.platform}), "
        f"{os.cpu_count()} host CPUs | jax {jax.__version__}")
  print(f"config: {args.config} {' '.join(args.set)} | {config.model.arch} | batch {batch} | "
        f"{config.dataset.image_size}x{config.dataset.image_size} | {config.parallel.mode} | "
        f"dtype {config.model.dtype}")
  compile_s, times = time_steps(experiment, batch, args.steps, args.warmup)
  median = statistics.median(times)
  print(f"train step: compile {compile_s:.1f} s, median {median * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {len(times)} steps, "
        f"{batch / median:,.0f} img/s")
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  if args.data:
    per_batch = statistics.median(time_pipeline(experiment, batch // jax.process_count(), args.steps))
    print(f"input pipeline ({config.dataset.name}): median {per_batch * 1e3:.1f} ms per batch, "
          f"{batch / per_batch:,.0f} img/s = {median / per_batch:.2f}x the step's rate")


if __name__ == "__main__":
  main()
