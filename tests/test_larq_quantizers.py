"""larq's quantizers (and larq-zoo's weight binarizers) against their formulas, ties included."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binarize
from bnn_jax.errors import ConfigError

f32 = np.float32
# Every tie of the estimators below: 0, ±1 (clip, ApproxSign, DoReFa's range), ±1.25 / ±1.3 (the
# clips larq-zoo uses), ±0.05 (SteTern's default Δ), 0.5 (a rounding tie at k = 1, 2, 3), and beside.
X = np.array([-3.0, -1.3, -1.25, -1.0, -0.999, -0.5, -0.05, -1e-3, 0.0, 1e-3, 0.05, 0.25, 0.5,
              0.999, 1.0, 1.25, 1.3, 3.0], f32)


def forward_backward(fn, x, cotangent):
  """fn(x) and the vjp of ``cotangent``."""
  y, vjp = jax.vjp(fn, x)
  return y, vjp(cotangent)[0]


def value_and_grad(fn, x, cotangent=None):
  """fn(x) and the vjp of ``cotangent`` (all ones: the elementwise derivative), in one jit."""
  cotangent = np.ones_like(x) if cotangent is None else cotangent
  return tuple(map(np.asarray, jax.jit(functools.partial(forward_backward, fn))(x, cotangent)))


def at(x, values, point):
  """The entry of ``values`` at the point of ``x`` equal to float32(point)."""
  (index,) = np.flatnonzero(x == f32(point))
  return values[index]


def sign(x):
  return np.where(x >= 0, f32(1), f32(-1))


def kernel(seed=0, shape=(3, 3, 4, 5)):
  """An HWIO kernel whose first rows hold the ties 0, ±1 and a value beyond the clip."""
  w = np.random.default_rng(seed).normal(size=shape).astype(f32) * 0.9
  w[0, 0, 0, :] = [0.0, 1.0, -1.0, 1.5, -0.5]
  return w


def test_registry_names_and_which_are_binary():
  expected = {"ste_sign": True, "approx_sign": True, "swish_sign": True,
              "magnitude_aware_sign": True, "xnor_weight_scale": True,
              "magnitude_aware_sign_unclipped": True,
              "ste_heaviside": False, "ste_tern": False, "dorefa": False}
  assert {name: binarize.REGISTRY[name].binary for name in expected} == expected


@pytest.mark.parametrize("clip", [1.0, 1.25, 1.3])
def test_ste_sign_is_larqs_with_clip_for_clip_value(clip):
  y, g = value_and_grad(lambda x: binarize.ste_sign(x, clip), X)
  np.testing.assert_array_equal(y, sign(X))  # sign(0) = +1
  np.testing.assert_array_equal(g, (np.abs(X) <= f32(clip)).astype(f32))  # 1 at |x| = clip
  assert at(X, g, 0.0) == 1


def test_ste_sign_clip_none_passes_every_gradient():
  _, g = value_and_grad(lambda x: binarize.ste_sign(x, None), X)
  np.testing.assert_array_equal(g, np.ones_like(X))


def test_approx_sign_is_larqs_2_minus_2_abs_x_on_the_closed_unit_interval():
  y, g = value_and_grad(binarize.approx_sign, X)
  np.testing.assert_array_equal(y, sign(X))
  np.testing.assert_array_equal(g, np.where(np.abs(X) <= 1, (1 - np.abs(X)) * 2, 0).astype(f32))
  assert [at(X, g, p) for p in (0.0, 1.0, -1.0, 0.5)] == [2.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("beta", [5.0, 2.0])
def test_swish_sign_gradient_is_the_derivative_of_bnn_plus_swish(beta):
  y, g = value_and_grad(lambda x: binarize.swish_sign(x, beta), X)
  np.testing.assert_array_equal(y, sign(X))
  bx = beta * X.astype(np.float64)
  np.testing.assert_allclose(g, beta * (2 - bx * np.tanh(bx / 2)) / (1 + np.cosh(bx)),
                             rtol=1e-6, atol=1e-7)
  assert at(X, g, 0.0) == beta

  def smooth(x):  # BNN+'s SS_β (float64), whose derivative the backward is
    s = 1 / (1 + np.exp(-beta * x))
    return 2 * s * (1 + beta * x * (1 - s)) - 1

  h = 1e-6
  slope = (smooth(X.astype(np.float64) + h) - smooth(X.astype(np.float64) - h)) / (2 * h)
  np.testing.assert_allclose(g, slope, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [1.0, 1.3])
def test_ste_heaviside_is_zero_one_with_heaviside0_zero(clip):
  y, g = value_and_grad(lambda x: binarize.ste_heaviside(x, clip), X)
  np.testing.assert_array_equal(y, (X > 0).astype(f32))
  assert at(X, y, 0.0) == 0
  np.testing.assert_array_equal(g, (np.abs(X) <= f32(clip)).astype(f32))


@pytest.mark.parametrize("threshold", [0.05, 0.5])
def test_ste_tern_sends_plus_minus_threshold_to_plus_minus_one(threshold):
  y, g = value_and_grad(lambda x: binarize.ste_tern(x, threshold, clip=1.25), X)
  t = f32(threshold)
  np.testing.assert_array_equal(y, np.where(X >= t, 1, np.where(X <= -t, -1, 0)).astype(f32))
  np.testing.assert_array_equal(g, (np.abs(X) <= f32(1.25)).astype(f32))
  if threshold == 0.05:  # the ties ±Δ are in X
    assert [at(X, y, p) for p in (0.05, -0.05, 0.0, 1e-3, -1e-3)] == [1, -1, 0, 0, 0]


def test_ste_tern_twn_threshold_is_0_7_mean_abs_of_the_whole_tensor():
  x = np.array([[0.0, 0.2, -0.2], [1.0, -2.0, 0.5]], f32)  # Δ = 0.7 · 3.9 / 6 = 0.455
  y, g = value_and_grad(lambda x: binarize.ste_tern(x, ternary_weight_networks=True), x)
  np.testing.assert_array_equal(y, [[0, 0, 0], [1, -1, 1]])
  np.testing.assert_array_equal(g, (np.abs(x) <= 1).astype(f32))  # nothing through Δ


@pytest.mark.parametrize("k_bit", [1, 2, 3])
def test_dorefa_activations_round_on_the_unit_interval(k_bit):
  n = f32(2 ** k_bit - 1)
  y, g = value_and_grad(lambda x: binarize.dorefa(x, k_bit), X)
  np.testing.assert_array_equal(y, np.round(np.clip(X, 0, 1) * n) / n)
  np.testing.assert_array_equal(g, ((X >= 0) & (X <= 1)).astype(f32))  # 1 at 0 and 1 (tf's clip)
  # 0.5·n is a tie: banker's rounding, as tf.round: k=1 -> 0, k=2 -> 2/3, k=3 -> 4/7.
  assert at(X, y, 0.5) == {1: 0, 2: f32(2) / f32(3), 3: f32(4) / f32(7)}[k_bit]


def test_dorefa_weights_norm_by_the_detached_max_of_tanh():
  w = kernel(1)
  y, g = value_and_grad(lambda w: binarize.dorefa(w, 2, "weights"), w)
  peak = np.abs(np.tanh(w.astype(np.float64))).max()
  unit = np.tanh(w.astype(np.float64)) / (2 * peak) + 0.5
  np.testing.assert_allclose(y, 2 * np.round(unit * 3) / 3 - 1, atol=1e-6)
  assert set(np.round(np.unique(y) * 3).astype(int)) <= {-3, -1, 1, 3}
  assert y.flat[np.abs(w).argmax()] == np.sign(w.flat[np.abs(w).argmax()])  # the max goes to ±1
  np.testing.assert_allclose(g, (1 - np.tanh(w.astype(np.float64)) ** 2) / peak, rtol=1e-5)
  # An all-zero tensor: u = ½ (round(1.5) = 2: 2·⅔ − 1), no gradient, no NaN.
  y0, g0 = value_and_grad(lambda w: binarize.dorefa(w, 2, "weights"), np.zeros((2, 3), f32))
  np.testing.assert_array_equal(y0, np.full((2, 3), 2 * (f32(2) / f32(3)) - 1))
  np.testing.assert_array_equal(g0, np.zeros((2, 3)))


def test_dorefa_refuses_an_unknown_mode():
  with pytest.raises(ConfigError, match="dorefa mode 'kernel' is unknown; "
                     "valid: \\['activations', 'weights'\\]"):
    binarize.dorefa(jnp.zeros(3), mode="kernel")


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (36, 5)])  # HWIO conv and (in, out) dense kernels
def test_magnitude_aware_sign_is_scaled_ste_sign_with_a_detached_per_channel_scale(shape):
  assert binarize.magnitude_aware_sign is binarize.scaled_ste_sign
  assert binarize.REGISTRY["magnitude_aware_sign"].function is binarize.scaled_ste_sign
  w = kernel(2).reshape(shape)
  cot = np.random.default_rng(3).normal(size=shape).astype(f32)
  y, g = value_and_grad(lambda w: binarize.magnitude_aware_sign(w, 1.25), w, cot)
  alpha = np.abs(w).reshape(-1, 5).mean(0)
  np.testing.assert_allclose(y, sign(w) * alpha, rtol=1e-6)
  np.testing.assert_allclose(g, alpha * (np.abs(w) <= f32(1.25)) * cot, rtol=1e-6)


def test_xnor_weight_scale_lets_the_gradient_through_its_scale():
  w = kernel(4)
  cot = np.random.default_rng(5).normal(size=w.shape).astype(f32)
  y, g = value_and_grad(binarize.xnor_weight_scale, w, cot)
  clipped = np.clip(w, -1, 1).astype(np.float64)
  flat, g_out = clipped.reshape(-1, 5), cot.reshape(-1, 5).astype(np.float64)
  alpha = np.abs(flat).mean(0)
  np.testing.assert_allclose(y.reshape(-1, 5), sign(flat) * alpha, rtol=1e-6)
  # d/dw_i = 1[|w_i| ≤ 1] · (α·g_i + sign(w_i)/N · Σ_j g_j·sign(w_j)), sign(0) = 0 for |·|'s
  # derivative (tf.abs's) and +1 for the forward; the clip passes ±1 itself (tf.clip_by_value's).
  through_alpha = np.sign(flat) / flat.shape[0] * (g_out * sign(flat)).sum(0)
  expected = (np.abs(w.reshape(-1, 5)) <= 1) * (alpha * g_out + through_alpha)
  np.testing.assert_allclose(g.reshape(-1, 5), expected, rtol=1e-5, atol=1e-7)
  ties = g[0, 0, 0]  # w = 0, 1, −1, 1.5, −0.5
  assert ties[3] == 0 and ties[0] == pytest.approx(alpha[0] * cot[0, 0, 0, 0], rel=1e-6)
  assert ties[1] != pytest.approx(alpha[1] * cot[0, 0, 0, 1], rel=1e-3)  # not detached


def test_magnitude_aware_sign_unclipped_has_one_scale_and_the_identity_gradient():
  w = kernel(6)
  cot = np.random.default_rng(7).normal(size=w.shape).astype(f32)
  y, g = value_and_grad(binarize.magnitude_aware_sign_unclipped, w, cot)
  np.testing.assert_allclose(y, sign(w) * np.abs(w).mean(), rtol=1e-6)
  np.testing.assert_array_equal(g, cot)  # unscaled, and past |w| > 1


LARQ = ["ste_sign", "approx_sign", "swish_sign", "ste_heaviside", "ste_tern", "dorefa",
        "magnitude_aware_sign", "xnor_weight_scale", "magnitude_aware_sign_unclipped"]


@pytest.mark.parametrize("name", LARQ)
def test_vmap_under_jit_gives_each_kernels_values_and_gradients(name):
  quantize = binarize.get(name)
  w = np.stack([kernel(8), kernel(9)])  # a batch of two kernels
  y, g = jax.jit(jax.vmap(functools.partial(forward_backward, quantize)))(w, np.cos(w))
  for i, one in enumerate(w):  # each on its own (per-tensor statistics stay per kernel)
    one_y, one_g = value_and_grad(quantize, one, np.cos(one))
    np.testing.assert_array_equal(y[i], one_y)
    np.testing.assert_allclose(g[i], one_g, rtol=1e-6, atol=1e-7)


def test_specs_as_dicts_bind_parameters():
  tern = binarize.get({"name": "ste_tern", "threshold_value": 0.1})
  assert tern.params == (("threshold_value", 0.1),)
  t = f32(0.1)
  np.testing.assert_array_equal(tern(X), np.where(X >= t, 1, np.where(X <= -t, -1, 0)))
  weights3 = binarize.get({"name": "dorefa", "k_bit": 3, "mode": "weights"})
  np.testing.assert_array_equal(weights3(X), binarize.dorefa(X, 3, "weights"))
  np.testing.assert_array_equal(binarize.get({"name": "swish_sign", "beta": 2.0})(X), sign(X))
  _, g = value_and_grad(binarize.get({"name": "ste_heaviside", "clip": 0.5}), X)
  np.testing.assert_array_equal(g, (np.abs(X) <= 0.5).astype(f32))
  _, g = value_and_grad(binarize.get({"name": "magnitude_aware_sign", "clip": None}), kernel())
  assert np.all(g > 0)
  with pytest.raises(ConfigError, match="binarizer 'ste_tern' has no parameter \\['clip_value'\\]; "
                     "valid: \\['threshold_value', 'ternary_weight_networks', 'clip'\\]"):
    binarize.get({"name": "ste_tern", "clip_value": 1.0})
