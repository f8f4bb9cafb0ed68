"""Hand-written CPU kernels through ``jax.ffi``, built on first use with the machine's compiler.

XLA cannot hold a tile of XNOR-popcount accumulators in registers, so bit-packed inference calls
``xnor_conv.cc``'s convolution on the CPU. It is compiled once per machine (``-march=native``:
AVX-512 VPOPCNTDQ where the CPU has it) into ``$BNN_JAX_CACHE/kernels`` (default
``~/.cache/bnn_jax/kernels``) and loaded with ctypes. Without a C++ compiler, or with
``BNN_JAX_NATIVE=0``, :func:`available` is False and bnn_jax.packed runs its pure-JAX path, which
computes the same integers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xnor_conv.cc")
TARGETS = {"bnn_jax_xnor_conv": "XnorConv"}  # FFI target -> the library's handler symbol
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
log = logging.getLogger(__name__)


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    with open("/proc/cpuinfo") as file:
      lines = [line for line in file if line.startswith(("model name", "flags"))][:2]
  except OSError:
    lines = []
  return platform.machine() + "".join(lines)


def _library_path(compiler: str) -> str:
  with open(SOURCE, "rb") as file:
    source = file.read()
  key = hashlib.sha256(b"\0".join([source, " ".join((compiler, *FLAGS)).encode(),
                                   jax.__version__.encode(), _cpu_signature().encode()]))
  cache = os.environ.get("BNN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "bnn_jax"))
  return os.path.join(cache, "kernels", f"xnor_conv-{key.hexdigest()[:16]}.so")


def _build(compiler: str, path: str) -> None:
  """Compiles the kernel to ``path`` (atomically: concurrent builds each write their own file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(handle)
  try:
    subprocess.run([compiler, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", partial],
                   check=True, capture_output=True, text=True)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the native kernel is built and registered (tries once per process)."""
  if os.environ.get("BNN_JAX_NATIVE", "1") == "0":
    return False
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    log.warning("bnn_jax.kernels: no C++ compiler found; bit-packed inference runs pure JAX")
    return False
  path = _library_path(compiler)
  try:
    if not os.path.exists(path):
      _build(compiler, path)
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, subprocess.CalledProcessError) as error:
    lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
    first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
    log.warning("bnn_jax.kernels: building %s failed (%s); bit-packed inference runs pure JAX",
                SOURCE, first_error.strip())
    return False
  return True


def xnor_conv(bits: jax.Array, weight_rows: jax.Array, channels: int, kernel_size: int,
              strides: int, dilation: int, pads, pad_value: float, out_shape,
              groups: int = 1) -> jax.Array:
  """The native XNOR-popcount convolution (call only where :func:`available`).

  Args:
    bits: (N, H, W, groups·words) uint32, the packed activations (unpadded), each group's
      channels packed in its own words.
    weight_rows: (groups·k·k·words, O / groups) uint32: by group, tap-major packed weights.
    channels: input channels of one group before packing (K = k·k·channels).
    kernel_size, strides, dilation: the convolution's.
    pads: ((top, bottom), (left, right)); pad_value: 0 (a tap in the padding adds nothing, as
      in a zero-padded float convolution), 1 or −1.
    out_shape: (H', W').
    groups: the convolution's groups (a depthwise one: one per input channel).
  Returns:
    int32 (N, H', W', O): the exact ±1 dot products, group j's outputs from j·O / groups.
  """
  out = jax.ShapeDtypeStruct((bits.shape[0], *out_shape, groups * weight_rows.shape[1]),
                             jnp.int32)
  call = jax.ffi.ffi_call("bnn_jax_xnor_conv", out, vmap_method="sequential")
  return call(bits, weight_rows, kernel=kernel_size, stride=strides, dilation=dilation,
              channels=channels, pad_top=pads[0][0], pad_left=pads[1][0], pad_value=int(pad_value),
              groups=groups)
