"""BOPs / FLOPs / parameters read off the jaxpr, against hand-computed counts."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bnn_jax.binarize import ste_sign
from bnn_jax.bops import analyze, analyze_model, format_report
from bnn_jax.layers import BinaryConv
from bnn_jax.models import build_model

from conftest import REPO

BINARY = dict(activation_binarizer="approx_sign", weight_binarizer="scaled_ste_sign")


class ConvZoo(nn.Module):
  """Each layer reads its own slice of the one input, so every count below is for a known shape."""

  @nn.compact
  def __call__(self, x):  # (1, 16, 16, 4)
    x8, x10, x6 = x[:, :8, :8, :], x[:, :10, :10, :3], x[:, :6, :6, :2]
    return (BinaryConv(8, 3, strides=2, **BINARY, name="strided")(x),  # 8·8·8 out, 4·9 each
            BinaryConv(8, 3, groups=2, **BINARY, name="grouped")(x8),  # 8·8·8 out, (4/2)·9 each
            nn.Conv(6, (3, 3), kernel_dilation=2, padding="SAME", use_bias=False,
                    name="dilated")(x10),  # real: 10·10·6 out, 3·9 each
            BinaryConv(16, 1, **BINARY, name="pointwise")(x8),  # 8·8·16 out, 4 each
            BinaryConv(4, 3, padding=2, **BINARY, name="padded")(x6),  # (6+4−3+1)² · 4 out, 2·9 each
            nn.Dense(10, name="dense")(x[:, 0, :8, :].reshape(1, 32)))  # 32 · 10


def zoo_report():
  model = ConvZoo()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 4))))
  report = analyze(model.apply, variables, (1, 16, 16, 4))
  return {layer.name: layer for layer in report.layers}, report


def test_conv_and_dense_macs_by_hand():
  layers, report = zoo_report()
  assert layers["strided"].macs == 8 * 8 * 8 * 4 * 9 == 18432
  assert layers["grouped"].macs == 8 * 8 * 8 * 2 * 9 == 9216
  assert layers["dilated"].macs == 10 * 10 * 6 * 3 * 9 == 16200
  assert layers["pointwise"].macs == 8 * 8 * 16 * 4 == 4096
  assert layers["padded"].output_shape == (1, 8, 8, 4) and layers["padded"].macs == 8 * 8 * 4 * 2 * 9
  assert layers["dense"].kind == "dense" and layers["dense"].macs == 320
  binary = ("strided", "grouped", "pointwise", "padded")
  assert all(layers[n].counted_as == "bops" for n in binary)
  assert layers["dilated"].counted_as == "flops" and layers["dense"].counted_as == "flops"
  assert report.bops == 18432 + 9216 + 4096 + 4608
  assert report.flops == 16200 + 320
  assert report.ops == report.bops / 64 + report.flops
  # Binary parameters: exactly the four binarized kernels; the rest at 32 bits.
  kernels = 3 * 3 * 4 * 8 + 3 * 3 * 2 * 8 + 4 * 16 + 3 * 3 * 2 * 4
  assert report.binary_params == kernels
  assert report.params == kernels + 3 * 3 * 3 * 6 + 32 * 10 + 10
  assert report.size_bytes == (kernels + 32 * (report.params - kernels)) / 8
  # Per layer, as larq's summary: each kernel's parameters and its storage (1 or 32 bits each).
  assert {n: (layers[n].params, layers[n].bits) for n in layers} == {
      "strided": (288, 288), "grouped": (144, 144), "pointwise": (64, 64), "padded": (72, 72),
      "dilated": (162, 162 * 32), "dense": (320, 320 * 32)}
  assert "params       bits" in format_report(report)


def test_step1_model_counts_mixed_and_real_model_has_no_bops():
  step1 = analyze_model(build_model(dict(arch="ReActNet-18", stem_channels=8, base_channels=8,
                                         num_classes=10, cifar_stem=True,
                                         binary_type=(True, False))), (1, 32, 32, 3))
  assert step1.bops == 0 and step1.mixed > 0 and step1.binary_params == 0
  assert {l.counted_as for l in step1.layers if "/conv" in l.name and "layer" in l.name} == {"mixed"}
  real = analyze_model(build_model(dict(arch="ResNet-18", stem_act="relu", num_classes=10)),
                       (1, 32, 32, 3))
  assert real.bops == 0 and real.mixed == 0 and real.binary_params == 0 and real.flops > 0


def test_walks_into_scan_remat_and_cond():
  def fn(v, x):
    body = lambda carry, _: (ste_sign(carry) @ ste_sign(v["b"]), None)  # noqa: E731
    y, _ = jax.lax.scan(body, x, None, length=3)  # 3 binary 1×4·4×4 matmuls
    y = jax.checkpoint(lambda a: a @ v["w"])(y)  # one real 1×4·4×2 matmul
    return jax.lax.cond(y.sum() > 0, lambda a: a @ jnp.ones((2, 8)), lambda a: jnp.tile(a, 4), y)

  report = analyze(fn, {"b": jax.ShapeDtypeStruct((4, 4), jnp.float32),
                        "w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}, (1, 4))
  assert report.bops == 3 * 16
  assert report.flops == 8 + 16
  assert report.binary_params == 16


def test_full_size_bireal_counts_match_the_architecture():
  # By hand: binary 3×3 convs of ResNet-18 at 224 (stages at 56, 28, 14, 7):
  # 4·(56²·64·64·9) + 3 × [first strided conv + 3·(s²·C·C·9)] = 1,676,279,808 BOPs;
  # FLOPs: 7×7 stem 112²·64·3·49 + three 1×1 shortcuts 6,422,528 each + fc 512·1000.
  result = subprocess.run([sys.executable, "-m", "bnn_jax.bops", "--config",
                           "configs/birealnet_r18.py", "--json"],
                          cwd=REPO, capture_output=True, text=True, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["bops"] == 1_676_279_808
  assert report["flops"] == 112 * 112 * 64 * 3 * 49 + 3 * 6_422_528 + 512 * 1000
  assert report["ops"] == pytest.approx(1_676_279_808 / 64 + report["flops"])
  assert report["params"] == 11_689_512 and report["binary_params"] == 10_985_472
  assert {"mixed", "size_bytes", "layers"} <= set(report) and len(report["layers"]) == 21
