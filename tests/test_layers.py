"""BinaryConv's binary_type switches, the learnable pieces, and EDE without recompiles."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnn_jax
from bnn_jax import layers
from bnn_jax.binarize import EDE, sign
from bnn_jax.errors import ConfigError
from bnn_jax.layers import AttentionScale, BatchNorm, BinaryConv, LearnableScale, avg_pool_ceil
from bnn_jax.models import blocks

X = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _apply(act, weight):
  conv = BinaryConv(5, activation_binarizer=act, weight_binarizer=weight)
  variables = conv.init(jax.random.key(1), X)
  return conv.apply(variables, X), variables["params"]["kernel"]


def test_binary_type_switches_each_half():
  out, w = _apply(None, None)
  np.testing.assert_allclose(out, _conv(X, w), rtol=1e-5)
  out, w = _apply("approx_sign", None)  # step 1: binary activations, real weights
  np.testing.assert_allclose(out, _conv(sign(X), w), rtol=1e-5)
  out, w = _apply(None, "scaled_ste_sign")
  alpha = jnp.abs(w).mean((0, 1, 2))
  np.testing.assert_allclose(out, _conv(X, sign(w) * alpha), rtol=1e-5)
  out, w = _apply("approx_sign", "scaled_ste_sign")  # step 2: both binary
  np.testing.assert_allclose(out, _conv(sign(X), sign(w) * alpha), rtol=1e-5)


def test_block_binary_type_selects_binarizers():
  assert blocks.ReActNetBlockA(8, binary_type=(True, False)).conv_binarizers() == ("approx_sign", None)
  assert blocks.IRNetBlock(8).conv_binarizers() == ("ede_sign", "irnet_weight")
  assert blocks.IRNetBlock(8, binary_type=(False, True)).conv_binarizers() == (None, "irnet_weight")
  assert blocks.RealToBinaryFPBlock(8, binary_type=(False, False)).conv_binarizers() == ("tanh", None)
  custom = blocks.BiRealNetBlock(8, binarizers=("ste_sign", "scaled_ste_sign"))
  assert custom.conv_binarizers() == ("ste_sign", "scaled_ste_sign")


def test_changing_ede_between_jitted_calls_does_not_recompile():
  conv = BinaryConv(5, activation_binarizer="ede_sign", weight_binarizer="irnet_weight")
  variables = conv.init(jax.random.key(1), X)
  traces = []

  @jax.jit
  def loss_and_grad(params, ede):
    traces.append(1)
    return jax.grad(lambda p: conv.apply({"params": p}, X, ede).sum())(params)

  grads = [loss_and_grad(variables["params"], EDE(jnp.float32(k), jnp.float32(t)))
           for k, t in [(10.0, 0.1), (5.0, 0.2), (1.0, 3.0), (1.0, 10.0)]]
  assert len(traces) == 1
  assert loss_and_grad._cache_size() == 1
  # …and the new values do reach the backward pass.
  assert not np.allclose(grads[0]["kernel"], grads[-1]["kernel"])


def test_learnable_scale_takes_feature_map_size_at_init():
  x = jnp.ones((1, 7, 5, 3))
  params = LearnableScale().init(jax.random.key(0), x)["params"]
  assert (params["alpha"].shape, params["beta"].shape, params["gamma"].shape) == ((3,), (7,), (5,))
  scaled = LearnableScale().apply({"params": {"alpha": jnp.array([1., 2., 3.]),
                                              "beta": jnp.arange(7.), "gamma": jnp.ones(5)}}, x)
  np.testing.assert_allclose(scaled[0, 4, 2], [4.0, 8.0, 12.0])


def test_attention_scale_gates_with_sigmoid_of_two_dense_layers():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  module = AttentionScale()
  params = module.init(jax.random.key(1), x)["params"]
  assert params["fc1"]["kernel"].shape == (16, 2) and params["fc2"]["kernel"].shape == (2, 16)
  gate = jax.nn.sigmoid(jax.nn.relu(x.mean((1, 2)) @ params["fc1"]["kernel"] + params["fc1"]["bias"])
                        @ params["fc2"]["kernel"] + params["fc2"]["bias"])
  np.testing.assert_allclose(module.apply({"params": params}, x), x * gate[:, None, None], rtol=1e-5)


def test_avg_pool_ceil_mode_averages_partial_windows_over_valid_cells():
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  out = avg_pool_ceil(x, 2)[0, :, :, 0]
  np.testing.assert_allclose(out, [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]])


def test_ghost_batchnorm_normalises_each_group_and_averages_pytorch_updates():
  x = jax.random.normal(jax.random.key(3), (6, 2, 2, 3)) * 2 + 1
  bn = BatchNorm(use_running_average=False, group_size=3)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  means, variances = [], []
  for part in (slice(0, 3), slice(3, 6)):  # each group's examples and positions, by hand
    group = x[part]
    mean, var = group.mean((0, 1, 2)), group.var((0, 1, 2))
    np.testing.assert_allclose(y[part], (group - mean) / jnp.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    means.append(mean)
    variances.append(var * 12 / 11)  # PyTorch's running variance: unbiased (n = 3·2·2)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.mean(variances, 0), rtol=1e-5)
  whole, _ = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
  assert not np.allclose(whole, y, atol=1e-3)  # one group of 6 is not two of 3


def test_batchnorm_backward_is_pytorch_s_per_group_and_the_derivative_of_its_forward():
  torch = pytest.importorskip("torch")
  keys = jax.random.split(jax.random.key(4), 6)
  x = jax.random.normal(keys[0], (6, 3, 2, 4)) * 2 + 1
  scale, bias = jax.random.normal(keys[1], (4,)), jax.random.normal(keys[2], (4,))
  upstream = jax.random.normal(keys[3], x.shape)
  bn = BatchNorm(use_running_average=False, group_size=3)
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {
      "mean": jnp.zeros(4), "var": jnp.ones(4)}}
  grads = jax.grad(lambda x, params: jnp.sum(upstream * bn.apply(
      {**variables, "params": params}, x, mutable=["batch_stats"])[0]), argnums=(0, 1))(
          x, variables["params"])
  want_x, want_scale, want_bias = [], 0, 0
  for part in (slice(0, 3), slice(3, 6)):  # PyTorch's BatchNorm2d on each group
    xt = torch.tensor(np.asarray(x[part]).transpose(0, 3, 1, 2), requires_grad=True)
    wt, bt = (torch.tensor(np.asarray(v), requires_grad=True) for v in (scale, bias))
    out = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    (out * torch.tensor(np.asarray(upstream[part]).transpose(0, 3, 1, 2))).sum().backward()
    want_x.append(xt.grad.numpy().transpose(0, 2, 3, 1))
    want_scale, want_bias = want_scale + wt.grad.numpy(), want_bias + bt.grad.numpy()
  np.testing.assert_allclose(grads[0], np.concatenate(want_x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[1]["scale"], want_scale, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[1]["bias"], want_bias, rtol=1e-5, atol=1e-5)

  def plain(groups, scale, bias):  # the forward, differentiated by JAX (mean and var outputs too)
    mean = groups.mean((1, 2, 3), keepdims=True)
    var = jnp.square(groups - mean).mean((1, 2, 3), keepdims=True)
    return (groups - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var
  groups = x.reshape((2, 3) + x.shape[1:])
  outputs, ours = jax.vjp(lambda *a: layers.normalize_batch(*a, 1e-5), groups, scale, bias)
  cotangents = (upstream.reshape(groups.shape), jax.random.normal(keys[4], outputs[1].shape),
                jax.random.normal(keys[5], outputs[2].shape))
  for got, want in zip(ours(cotangents), jax.vjp(plain, groups, scale, bias)[1](cotangents)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ghost_batchnorm_refuses_a_batch_that_does_not_split():
  with pytest.raises(ConfigError, match="groups of 4"):
    BatchNorm(use_running_average=False, group_size=4).init(jax.random.key(0), X[:, :, :, :])


@pytest.mark.parametrize("shape, kernel_size, strides, pad", [
    ((2, 9, 7, 3), 3, 1, 1),  # not square
    ((3, 57, 57, 4), 3, 2, 1),  # odd size, strided
    ((2, 8, 8, 4), 1, 2, 0),  # a shortcut's 1×1/2: the weight gradient crops its padding
    ((2, 16, 16, 3), 7, 2, 3),  # the stem's 7×7/2
    ((1, 5, 5, 2), 3, 1, 0)])
def test_cpu_conv2d_equals_the_plain_convolution_and_its_gradients_bit_for_bit(shape, kernel_size,
                                                                               strides, pad):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, shape[-1], 5))
  plain = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (strides, strides), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y, plain_vjp = jax.vjp(plain, x, kernel)
  ours, ours_vjp = jax.vjp(lambda x, w: layers.cpu_conv2d(x, w, strides, pad), x, kernel)
  cotangent = jax.random.normal(jax.random.key(2), y.shape)
  np.testing.assert_array_equal(ours, y)
  for got, want in zip(ours_vjp(cotangent), plain_vjp(cotangent)):
    np.testing.assert_array_equal(got, want)


def test_large_float32_convolutions_on_cpu_take_the_stored_input_backward():
  def takes_it(shape, groups=1):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, shape[-1] // groups, 8), jnp.float32)
    return "custom_vjp_call" in str(jax.make_jaxpr(
        lambda x, w: layers.conv2d(x, w, 1, 1, groups, jnp.float32))(x, w))

  large = (16, 64, 64, 64)  # 2^22 values
  assert takes_it(large) == (jax.default_backend() == "cpu")
  assert not takes_it(large, groups=2) and not takes_it((2, 8, 8, 16))
  assert not takes_it((16, 224, 224, 3))  # an image: no elementwise producer to recompute


def test_importing_bnn_jax_keeps_convolutions_out_of_ynnpack_unless_the_user_set_the_flag():
  show = "import bnn_jax, os; print(os.environ['XLA_FLAGS'])"
  flag = bnn_jax.CPU_LIBRARY_FUSIONS.split("=")[0]
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  ours = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True)
  assert ours.stdout.strip() == bnn_jax.CPU_LIBRARY_FUSIONS
  users = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                         env=dict(env, XLA_FLAGS=f"--xla_cpu_use_onednn=false {flag}="))
  assert users.stdout.strip() == f"--xla_cpu_use_onednn=false {flag}="


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU flag")
def test_cpu_convolutions_compile_to_xla_s_own_kernels():
  conv = jax.jit(lambda x, w: layers.conv2d(x, w, 1, 1, 1, jnp.float32))
  x, w = jax.ShapeDtypeStruct((16, 56, 56, 64), jnp.float32), jax.ShapeDtypeStruct((3, 3, 64, 64),
                                                                                  jnp.float32)
  compiled = conv.lower(x, w).compile().as_text()  # XLA hands YNNPACK only convolutions this large
  assert "convolution(" in compiled and "__ynn_fusion" not in compiled
