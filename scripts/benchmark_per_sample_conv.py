"""Per-sample convolutions (HCEBNN's expert convs): XLA's grouped convolution against im2col + matmul.

    python scripts/benchmark_per_sample_conv.py [--repeats 5]

Times forward + backward (jitted, median of --repeats after a warm-up call) of each sample
convolved with its own kernel, written two ways: ``vmap`` of a convolution, which JAX lowers to
one convolution with batch·groups feature groups (the official code's formulation), and
:func:`bnn_jax.layers.per_sample_conv2d` (im2col and a batched matmul, what the model uses).
Both are checked equal first. Prints one row per shape.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bnn_jax import cli  # noqa: E402
from bnn_jax.layers import conv2d, per_sample_conv2d  # noqa: E402
from benchmark_packed import median_seconds  # noqa: E402  (scripts/, this script's folder)

# (batch, size, in channels, out channels, groups, kernel, stride): HCEBNN-like layers
SHAPES = ((64, 8, 32, 32, 2, 3, 1), (32, 14, 256, 256, 8, 3, 1), (32, 28, 128, 256, 4, 3, 2),
          (32, 14, 256, 256, 1, 1, 1))


def grouped_conv(x, kernels, strides, groups):
  pad = kernels.shape[1] // 2
  return jax.vmap(lambda xi, wi: conv2d(xi[None], wi, strides, pad, groups, jnp.float32)[0])(x, kernels)


def im2col_conv(x, kernels, strides, groups):
  return per_sample_conv2d(x, kernels, strides, kernels.shape[1] // 2, groups, jnp.float32)


def seconds(conv, x, kernels, strides, groups, repeats):
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(conv(x, w, strides, groups))),
                          argnums=(0, 1)))
  return median_seconds(step, x, kernels, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}")
  print("batch size in->out groups k stride | vmap (B·g groups) s | im2col + matmul s | ratio")
  for batch, size, cin, cout, groups, k, strides in SHAPES:
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    kernels = jax.random.normal(jax.random.key(1), (batch, k, k, cin // groups, cout))
    np.testing.assert_allclose(grouped_conv(x, kernels, strides, groups),
                               im2col_conv(x, kernels, strides, groups), rtol=1e-4, atol=1e-3)
    slow = seconds(grouped_conv, x, kernels, strides, groups, args.repeats)
    fast = seconds(im2col_conv, x, kernels, strides, groups, args.repeats)
    print(f"{batch} {size}x{size} {cin}->{cout} g{groups} {k}x{k} s{strides} | {slow:.4f} | "
          f"{fast:.4f} | {slow / fast:.0f}x", flush=True)


if __name__ == "__main__":
  cli.script(main)
