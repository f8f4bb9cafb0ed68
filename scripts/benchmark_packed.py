"""Bit-packed inference against float inference: single convolutions, whole models, per layer.

    python scripts/benchmark_packed.py                  # conv shapes of ResNet-18 / ReActNet-A
    python scripts/benchmark_packed.py --models all     # every fully binary model, end to end
    python scripts/benchmark_packed.py --models larq_zoo:quicknet birealnet_r18 --layers
    python scripts/benchmark_packed.py --models all --lce-python ~/lce-venv/bin/python
    ... --json                                          # one JSON object as the last line

Conv rows time, on whatever device JAX sees, a float convolution of ±1 tensors against the packed
one on the same inputs (packing included), on both packed backends (bnn_jax.packed: "native", the
hand-written CPU kernel; "jax", the portable path), checked equal as integers.

``--models`` times each model (a config spec: ``birealnet_r18``, ``hcebnn``,
``larq_zoo:quicknet``; ``all`` for every fully binary one) at 224×224, float (XLA) against
packed, at batch 1 on one core and on all cores and at batch 32 on all cores, each in a fresh
process, one after the other. "One core": the process pinned to CPU 0 and XLA told to use one
thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``). ``--layers``
adds, per model, where the packed model's time goes at batch 1 on one core (XLA's trace,
bnn_jax.op_profile): each binary convolution's time next to its popcount bound (binary MACs / 512
per cycle, one 512-bit XOR + VPOPCNT + ADD per cycle at the clock of ``--ghz``, default
/proc/cpuinfo's), the packing of its input and scaling of its output (with whatever XLA fused into
them), and the rest by kind. ``--lce-python`` times Larq Compute
Engine's flatbuffers (``--lce-dir``) of the same Larq Zoo models with that interpreter (a
virtualenv with larq-compute-engine; its best x86 configuration: indirect BGEMM + XNNPACK) in the
same run.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "--worker" in sys.argv and "--one-core" in sys.argv:  # before jax starts its threads
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnn_jax import bops, cli, kernels, op_profile, packed  # noqa: E402
from bnn_jax.binarize import sign  # noqa: E402
from bnn_jax.config import load_config  # noqa: E402
from bnn_jax.errors import ConfigError  # noqa: E402
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

# Every model of bnn_jax and the Larq Zoo that may be fully binary (``--models all``; a model
# with a partly binary layer is reported as refused).
ALL_MODELS = ["irnet_r18", "birealnet_r18", "reactnet_r18_step2", "reactnet_a_step2",
              "real_to_binary_step2", "strong_baseline_step2", "hcebnn"] + [
    f"larq_zoo:{name}" for name in (
        "quicknet_small", "quicknet", "quicknet_large", "birealnet", "resnet_e18", "densenet28",
        "densenet37", "densenet37_dilated", "densenet45", "meliusnet22", "real_to_binary",
        "xnornet", "dorefanet", "binary_alexnet")]

# Larq Zoo config name -> reference/lce flatbuffer
LCE_FILES = {"larq_zoo:quicknet_small": "QuickNetSmall", "larq_zoo:quicknet": "QuickNet",
             "larq_zoo:quicknet_large": "QuickNetLarge", "larq_zoo:birealnet": "BiRealNet",
             "larq_zoo:resnet_e18": "BinaryResNetE18", "larq_zoo:densenet28": "BinaryDenseNet28",
             "larq_zoo:meliusnet22": "MeliusNet22"}

# Run by --lce-python: LCE's interpreter on one flatbuffer, median milliseconds as JSON.
LCE_SNIPPET = """
import json, os, statistics, sys, time
import numpy as np
path, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads == 1:
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from larq_compute_engine.tflite.python.interpreter import Interpreter
interpreter = Interpreter(open(path, "rb").read(), num_threads=threads, use_indirect_bgemm=True,
                          use_xnnpack=True)
x = np.random.RandomState(0).randn(1, 224, 224, 3).astype(np.float32)
for _ in range(3):
  interpreter.predict(x)
times = []
for _ in range(repeats):
  start = time.perf_counter()
  interpreter.predict(x)
  times.append(time.perf_counter() - start)
print(json.dumps({"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}))
"""


def call_seconds(fn, *args, repeats):
  """Every timed call's seconds, after one call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn, *args, repeats):
  return statistics.median(call_seconds(fn, *args, repeats=repeats))


def packed_backends():
  return ["native", "jax"] if packed.native("auto") else ["jax"]


def time_shape(size, channels, features, kernel, strides, batch, repeats):
  """{"float": s, <backend>: s} for one convolution shape, after checking equality."""
  keys = jax.random.split(jax.random.key(0))
  activations = jax.random.normal(keys[0], (batch, size, size, channels))
  weights = sign(jax.random.normal(keys[1], (kernel, kernel, channels, features)))
  pads = packed.symmetric(kernel // 2)

  @jax.jit
  def float_conv(x, w):
    return jax.lax.conv_general_dilated(sign(x), w, (strides, strides), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  bits, _ = packed.packed_weights(weights)
  expected = np.asarray(float_conv(activations, weights)).astype(np.int32)
  seconds = {"float": median_seconds(float_conv, activations, weights, repeats=repeats)}
  for backend in packed_backends():
    conv = jax.jit(lambda x, b, backend=backend: packed.packed_conv(
        packed.pack(x), b, channels, kernel, strides, pads, backend=backend))
    np.testing.assert_array_equal(np.asarray(conv(activations, bits)), expected)
    seconds[backend] = median_seconds(conv, activations, bits, repeats=repeats)
  return seconds


def geometric_mean(values):
  return math.exp(sum(math.log(v) for v in values) / len(values))


def conv_rows(batches, repeats):
  rows, summary = [], {}
  for batch in batches:
    for name, size, channels, features, kernel, strides in SHAPES:
      seconds = time_shape(size, channels, features, kernel, strides, batch, repeats)
      row = {"shape": name, "batch": batch, **{f"{k}_ms": v * 1e3 for k, v in seconds.items()}}
      row["speedup"] = seconds["float"] / min(v for k, v in seconds.items() if k != "float")
      rows.append(row)
      times = "  ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in seconds.items())
      print(f"batch {batch:3d} {name:28s} {times}  speed-up {row['speedup']:5.2f}x")
    resnet = [r["speedup"] for r in rows if r["batch"] == batch and r["shape"].startswith("resnet")]
    summary[f"geomean_speedup_batch{batch}"] = geometric_mean(resnet)
    print(f"batch {batch}: geometric mean speed-up over the ResNet-18 shapes "
          f"{geometric_mean(resnet):.2f}x")
  return rows, summary


# --- Whole models, each measurement in its own process ---------------------------------------

def clock_ghz() -> float:
  """The CPU clock /proc/cpuinfo reports (its first "cpu MHz"), in GHz; 0 if unknown."""
  try:
    with open("/proc/cpuinfo") as file:
      return next(float(line.split(":")[1]) / 1e3 for line in file if line.startswith("cpu MHz"))
  except (OSError, StopIteration, ValueError):
    return 0.0


def build(spec):
  config = load_config(spec)
  model = build_model(config.model)
  return model, init_variables(model, (1, 224, 224, 3))


def owner(module: str, layers) -> str:
  """The binary layer an op's module path belongs to: the one whose path is a subsequence of it
  (name scopes, such as a Larq Zoo block's, sit between a layer's module scopes); "" if none."""
  parts = module.split("/")

  def within(layer):
    rest = iter(parts)
    return all(part in rest for part in layer.split("/"))
  return max((layer for layer in layers if within(layer)), key=len, default="")


def layer_table(model, variables, images, weights, ghz):
  """Per binary layer: conv and packing times, binary MACs, popcount bound; the rest by kind."""
  classifier = packed.PackedClassifier(model, weights)
  apply = jax.jit(lambda v, w, x: classifier.apply(v, x, weights=w))
  ops = op_profile.profile(apply, variables, weights, images, repeats=20)
  walked = bops.analyze_model(model, images.shape).layers  # in the model's order
  macs = {layer.name: layer.macs for layer in walked}
  order = {layer.name: index for index, layer in enumerate(walked)}
  layers = {name: {"layer": name, "macs": macs.get(name, 0), "conv_ms": 0.0, "pack_ms": 0.0}
            for name in sorted(weights, key=lambda name: order.get(name, len(order)))}
  kinds = {"binary convolutions": 0.0, "packing and scaling": 0.0,
           "real convolutions and dense": 0.0,
           "pooling": 0.0, "the rest (BatchNorm, activations, adds, shortcuts)": 0.0}
  for op in ops:
    ms = op.seconds * 1e3
    layer = layers.get(owner(op.module, layers))
    if layer is not None:  # the kernel; the rest: packing its input, scaling its output
      convolving = op.target == "bnn_jax_xnor_conv" or not packed.native("auto")
      layer["conv_ms" if convolving else "pack_ms"] += ms
      kinds["binary convolutions" if convolving else "packing and scaling"] += ms
    elif op.primitive in ("conv_general_dilated", "dot_general") or "depthwise_conv" in op.module:
      kinds["real convolutions and dense"] += ms
    elif "pool" in op.module or "reduce_window" in op.primitive:
      kinds["pooling"] += ms
    else:
      kinds["the rest (BatchNorm, activations, adds, shortcuts)"] += ms
  for layer in layers.values():
    layer["bound_ms"] = layer["macs"] / 512 / (ghz * 1e9) * 1e3 if ghz else None
    layer["of_bound"] = layer["bound_ms"] / layer["conv_ms"] if ghz and layer["conv_ms"] else None
  return list(layers.values()), kinds


def record(result, name, seconds):
  """``name``_ms: the median call; ``name``_min_ms: the fastest (on a shared machine, the one
  least disturbed)."""
  result[f"{name}_ms"] = statistics.median(seconds) * 1e3
  result[f"{name}_min_ms"] = min(seconds) * 1e3


def worker(spec, batch, repeats, layers, ghz):
  """One model at one batch size in this process: float and packed milliseconds (+ layers)."""
  model, variables = build(spec)
  images = jax.random.normal(jax.random.key(1), (batch, 224, 224, 3))
  float_model = jax.jit(lambda v, x: model.apply(v, x, train=False))
  result = {}
  record(result, "float", call_seconds(float_model, variables, images, repeats=repeats))
  try:
    weights = packed.pack_weights(model, variables, images.shape)
  except ConfigError as error:
    return {"refused": str(error)}
  for backend in packed_backends():
    run = packed.PackedClassifier(model, weights, backend).bind(variables)
    record(result, f"packed_{backend}", call_seconds(run, images, repeats=repeats))
  if layers:
    result["layers"], result["kinds"] = layer_table(model, variables, images, weights, ghz)
  return result


def in_process(args, spec, batch, one_core, layers=False):
  """:func:`worker`'s result from a fresh process (one core: pinned, XLA on one thread)."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--batch", str(batch),
             "--repeats", str(args.repeats), "--ghz", str(args.ghz)]
  command += ["--one-core"] * one_core + ["--layers"] * layers
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def lce_times(args, spec, threads):
  """LCE's {"ms": median, "min_ms": fastest} for a Larq Zoo model's flatbuffer (None: none, or
  no LCE)."""
  if not args.lce_python or spec not in LCE_FILES:
    return None
  path = os.path.join(args.lce_dir, f"{LCE_FILES[spec]}.tflite")
  done = subprocess.run([args.lce_python, "-c", LCE_SNIPPET, path, str(threads),
                         str(args.repeats)], capture_output=True, text=True)
  if done.returncode:
    print(f"  LCE failed on {path}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])


def print_layers(name, result, ghz):
  print(f"  {name}, batch 1, one core: where the packed model's time goes (XLA's trace)")
  print(f"    {'binary layer':44s} {'binary MACs':>13s} {'conv ms':>8s} {'bound ms':>9s} "
        f"{'of bound':>8s} {'pack+scale ms':>13s}")
  for layer in result["layers"]:
    bound = f"{layer['bound_ms']:9.3f}" if layer["bound_ms"] else f"{'?':>9s}"
    share = f"{layer['of_bound']:8.0%}" if layer["of_bound"] else f"{'?':>8s}"
    print(f"    {layer['layer'][:44]:44s} {layer['macs']:13,d} {layer['conv_ms']:8.3f} {bound} "
          f"{share} {layer['pack_ms']:13.3f}")
  conv = sum(layer["conv_ms"] for layer in result["layers"])
  bound = sum(layer["bound_ms"] or 0 for layer in result["layers"])
  if ghz and conv:
    print(f"    binary convolutions: {conv:.3f} ms, popcount bound at {ghz:.2f} GHz {bound:.3f} ms "
          f"({bound / conv:.0%} of it)")
  for kind, ms in result["kinds"].items():
    print(f"    {kind:52s} {ms:8.3f} ms")


def model_rows(args):
  specs = ALL_MODELS if args.models == ["all"] else args.models
  rows, layers = [], {}
  for spec in specs:
    for batch, one_core in ((1, True), (1, False), (32, False)):
      if batch not in args.model_batches:
        continue
      result = in_process(args, spec, batch, one_core, layers=args.layers and batch == 1
                          and one_core)
      cores = "1 core" if one_core else "all cores"
      if "refused" in result or "error" in result:
        print(f"{spec:32s} {'refused' if 'refused' in result else 'failed'}: "
              f"{result.get('refused') or result.get('error')}")
        break
      row = {"model": spec, "batch": batch, "cores": cores,
             **{k: v for k, v in result.items() if k.endswith("_ms")}}
      medians = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and "_min" not in k}
      best = min(v for k, v in medians.items() if k.startswith("packed_"))
      row["speedup"] = row["float_ms"] / best
      lce = lce_times(args, spec, 1 if one_core else os.cpu_count()) if batch == 1 else None
      if lce:
        row.update(lce_ms=lce["ms"], lce_min_ms=lce["min_ms"], vs_lce=lce["ms"] / best,
                   vs_lce_min=lce["min_ms"] / min(v for k, v in row.items()
                                                  if k.startswith("packed_") and "_min" in k))
        medians["LCE"] = lce["ms"]
      rows.append(row)
      print(f"{spec:32s} batch {batch:2d} {cores:9s} " + "  ".join(
          f"{name.replace('_', ' ')} {ms:7.2f}" for name, ms in medians.items()) +
          f" ms (median)  speed-up {row['speedup']:5.2f}x" +
          (f"  vs LCE {row['vs_lce']:.2f}x (fastest calls {row['vs_lce_min']:.2f}x)" if lce
           else ""), flush=True)
      if "layers" in result:
        layers[spec] = {"layers": result["layers"], "kinds": result["kinds"]}
        print_layers(spec, result, args.ghz)
  return rows, layers


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="conv rows' batches")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
  parser.add_argument("--models", nargs="+", help="model config specs, or 'all'")
  parser.add_argument("--model-batches", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--layers", action="store_true", help="per-layer table (batch 1, 1 core)")
  parser.add_argument("--ghz", type=float, default=clock_ghz(), help="clock of the bound")
  parser.add_argument("--lce-python", help="a Python with larq-compute-engine, to time LCE")
  parser.add_argument("--lce-dir", default=os.path.join(ROOT, "..", "shared", "reference", "lce"))
  parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.batch, args.repeats, args.layers, args.ghz)))
    return
  device = jax.devices()[0]
  print(f"hardware: {device.device_kind} ({device.platform}), {os.cpu_count()} host CPUs, clock "
        f"{args.ghz:.2f} GHz | jax {jax.__version__} | packed backends {packed_backends()}"
        + ("" if kernels.available() else " (no native kernel: see the log above)"))
  result = {"device": f"{device.device_kind} ({device.platform})", "ghz": args.ghz}
  if args.models:
    result["models"], result["layers"] = model_rows(args)
  else:
    result["rows"], summary = conv_rows(args.batches, args.repeats)
    result.update(summary)
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  cli.script(main)
