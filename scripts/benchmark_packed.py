"""Bit-packed binary convolutions against float convolutions of the same ±1 tensors.

    python scripts/benchmark_packed.py            # ResNet-18 and ReActNet-A shapes, batch 1 and 32
    python scripts/benchmark_packed.py --json     # one JSON object as the last line

Each row times, on whatever device JAX sees, a float convolution of ±1 activations and ±1 weights
against the packed path on the same inputs: packing the float activations (what a layer receives
from the BatchNorm before it) and the XNOR-popcount convolution with weights packed ahead of time.
Both are checked to give the same integers. Then a whole fully binary model (ReActNet-18 step 2
layout at 224×224) end to end at batch 1, float against packed. Speed-ups are float time / packed
time; the geometric means summarise the rows.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnn_jax import cli, packed  # noqa: E402
from bnn_jax.binarize import sign  # noqa: E402
from bnn_jax.config import load_config  # noqa: E402
from bnn_jax.models import build_model, init_variables  # noqa: E402

# (name, feature map, input channels, output channels, kernel, stride)
SHAPES = [
    ("resnet18 56² 64→64", 56, 64, 64, 3, 1),
    ("resnet18 56² 64→128 /2", 56, 64, 128, 3, 2),
    ("resnet18 28² 128→128", 28, 128, 128, 3, 1),
    ("resnet18 28² 128→256 /2", 28, 128, 256, 3, 2),
    ("resnet18 14² 256→256", 14, 256, 256, 3, 1),
    ("resnet18 14² 256→512 /2", 14, 256, 512, 3, 2),
    ("resnet18 7² 512→512", 7, 512, 512, 3, 1),
    ("reactnet-a 56² 128 3×3", 56, 128, 128, 3, 1),
    ("reactnet-a 28² 256 1×1", 28, 256, 256, 1, 1),
    ("reactnet-a 14² 512 1×1", 14, 512, 512, 1, 1),
    ("reactnet-a 7² 1024 3×3", 7, 1024, 1024, 3, 1),
]


def median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_shape(size, channels, features, kernel, strides, batch, repeats):
  """(float seconds, packed seconds) for one convolution shape, after checking equality."""
  keys = jax.random.split(jax.random.key(0))
  activations = jax.random.normal(keys[0], (batch, size, size, channels))
  weights = sign(jax.random.normal(keys[1], (kernel, kernel, channels, features)))
  pads = packed.symmetric(kernel // 2)

  @jax.jit
  def float_conv(x, w):
    return jax.lax.conv_general_dilated(sign(x), w, (strides, strides), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  bits, _ = packed.packed_weights(weights)

  @jax.jit
  def packed_conv(x, bits):
    return packed.packed_conv(packed.pack(x), bits, channels, kernel, strides, pads)

  np.testing.assert_array_equal(np.asarray(packed_conv(activations, bits)),
                                np.asarray(float_conv(activations, weights)).astype(np.int32))
  return (median_seconds(float_conv, activations, weights, repeats=repeats),
          median_seconds(packed_conv, activations, bits, repeats=repeats))


def time_model(repeats):
  """(float seconds, packed seconds) of ReActNet-18 step 2 at batch 1, 224×224."""
  config = load_config("configs/reactnet_r18_step2.py")
  model = build_model(config.model)
  variables = init_variables(model, (1, 224, 224, 3))
  images = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
  float_model = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return (median_seconds(float_model, variables, images, repeats=repeats),
          median_seconds(packed.packed_model(model, variables, images.shape), images, repeats=repeats))


def geometric_mean(values):
  return math.exp(sum(math.log(v) for v in values) / len(values))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"hardware: {device.device_kind} ({device.platform}), {os.cpu_count()} host CPUs | "
        f"jax {jax.__version__}")
  rows, result = [], {"device": f"{device.device_kind} ({device.platform})"}
  for batch in args.batches:
    speedups = []
    for name, size, channels, features, kernel, strides in SHAPES:
      float_s, packed_s = time_shape(size, channels, features, kernel, strides, batch, args.repeats)
      speedups.append(float_s / packed_s)
      rows.append({"shape": name, "batch": batch, "float_ms": float_s * 1e3,
                   "packed_ms": packed_s * 1e3, "speedup": speedups[-1]})
      print(f"batch {batch:3d} {name:28s} float {float_s * 1e3:8.2f} ms  packed "
            f"{packed_s * 1e3:8.2f} ms  speed-up {speedups[-1]:5.2f}x")
    resnet = [r["speedup"] for r in rows if r["batch"] == batch and r["shape"].startswith("resnet")]
    result[f"geomean_speedup_batch{batch}"] = geometric_mean(resnet)
    print(f"batch {batch}: geometric mean speed-up over the ResNet-18 shapes "
          f"{geometric_mean(resnet):.2f}x, over all {geometric_mean(speedups):.2f}x")
  float_s, packed_s = time_model(args.repeats)
  result["model_speedup_batch1"] = float_s / packed_s
  print(f"ReActNet-18 step 2, batch 1, 224×224: float {float_s * 1e3:.1f} ms, packed "
        f"{packed_s * 1e3:.1f} ms, speed-up {float_s / packed_s:.2f}x")
  result["rows"] = rows
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  cli.script(main)
