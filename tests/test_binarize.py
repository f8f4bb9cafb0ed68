"""Sign estimators and weight binarizers against their published formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binarize
from bnn_jax.binarize import EDE

# A grid that contains every breakpoint: ±1, 0, ±1.25 and points beside them.
GRID = jnp.array([-3.0, -1.5, -1.25, -1.2, -1.0, -0.999, -0.5, -1e-3, 0.0, 1e-3, 0.5,
                  0.999, 1.0, 1.2, 1.25, 1.5, 3.0], jnp.float32)


def grad_of(fn, x):
  """Elementwise derivative of an elementwise fn (vjp with an all-ones cotangent)."""
  _, vjp = jax.vjp(fn, x)
  return vjp(jnp.ones_like(x))[0]


@pytest.mark.parametrize("name", ["ede_sign", "approx_sign", "ste_sign", "ste_sign_clip1.25"])
def test_forward_is_exactly_plus_minus_one_with_sign0_plus1(name):
  out = binarize.get_binarizer(name)(GRID, EDE.initial())
  np.testing.assert_array_equal(out, np.where(np.asarray(GRID) >= 0, 1.0, -1.0))


@pytest.mark.parametrize("k,t", [(10.0, 0.1), (2.5, 0.4), (1.0, 10.0)])
def test_ede_sign_gradient_is_k_t_sech2(k, t):
  grad = grad_of(lambda x: binarize.ede_sign(x, k, t), GRID)
  expected = k * t * (1 - np.tanh(t * np.asarray(GRID, np.float64)) ** 2)
  # float32 1 − tanh² rounds to 0 below ~1e-7, as in the original.
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_ede_sign_passes_no_gradient_to_k_and_t():
  gk, gt = jax.grad(lambda k, t: binarize.ede_sign(GRID, k, t).sum() * 3.0, argnums=(0, 1))(
      jnp.float32(2.0), jnp.float32(0.5))
  assert gk == 0.0 and gt == 0.0


def test_approx_sign_gradient_is_piecewise_linear():
  grad = grad_of(binarize.approx_sign, GRID)
  x = np.asarray(GRID)
  expected = np.where((x >= -1) & (x < 0), 2 + 2 * x, np.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0))
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)
  # The breakpoints by hand: slope 0 at -1, 2 at 0, 0 at ±1 and beyond.
  at = dict(zip(x.tolist(), np.asarray(grad).tolist()))
  assert at[-1.0] == 0.0 and at[0.0] == 2.0 and at[1.0] == 0.0 and at[-0.5] == 1.0 and at[0.5] == 1.0


@pytest.mark.parametrize("clip", [1.0, 1.25])
def test_clipped_ste_passes_gradient_inside_clip_inclusive(clip):
  grad = grad_of(lambda x: binarize.ste_sign(x, clip), GRID)
  np.testing.assert_array_equal(grad, (np.abs(np.asarray(GRID)) <= clip).astype(np.float32))


def _kernel(seed=0, shape=(3, 3, 4, 6)):
  return jax.random.normal(jax.random.key(seed), shape) * 0.8


def test_irnet_weight_output_is_scaled_sign_of_standardised_kernel():
  w = np.asarray(_kernel(), np.float64)
  ede = EDE(jnp.float32(3.0), jnp.float32(0.3))
  out = np.asarray(binarize.irnet_weight(jnp.asarray(w, jnp.float32), ede))
  flat = w.reshape(-1, w.shape[-1])  # per output channel (last axis, HWIO)
  standardised = (flat - flat.mean(0)) / flat.std(0, ddof=1)
  scale = 2.0 ** np.round(np.log2(np.abs(standardised).mean(0)))
  expected = np.where(standardised >= 0, 1.0, -1.0) * scale
  np.testing.assert_allclose(out.reshape(-1, w.shape[-1]), expected, rtol=1e-6)
  assert set(np.unique(np.abs(out) / scale)) == {1.0}


def test_irnet_weight_gradient_is_ede_through_standardisation_with_detached_scale():
  # Surrogate with the same backward: k·tanh(t·x) has derivative k·t·(1 − tanh²(t·x)).
  w = _kernel(1)
  ede = EDE(jnp.float32(2.5), jnp.float32(0.4))
  cot = jax.random.normal(jax.random.key(2), w.shape)

  def surrogate(w):
    centred = w - w.mean((0, 1, 2), keepdims=True)
    s = centred / jnp.std(centred, axis=(0, 1, 2), keepdims=True, ddof=1)
    scale = jax.lax.stop_gradient(2.0 ** jnp.round(jnp.log2(jnp.abs(s).mean((0, 1, 2)))))
    return ede.k * jnp.tanh(ede.t * s) * scale

  got = jax.vjp(lambda w: binarize.irnet_weight(w, ede), w)[1](cot)[0]
  want = jax.vjp(surrogate, w)[1](cot)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scaled_ste_sign_output_and_gradient():
  w = _kernel(3)
  out = binarize.scaled_ste_sign(w, EDE.initial())
  alpha = np.abs(np.asarray(w)).mean((0, 1, 2))
  np.testing.assert_allclose(out, np.where(np.asarray(w) >= 0, 1.0, -1.0) * alpha, rtol=1e-6)
  cot = jax.random.normal(jax.random.key(4), w.shape)
  got = jax.vjp(lambda w: binarize.scaled_ste_sign(w, EDE.initial()), w)[1](cot)[0]
  # The scale is detached: the gradient is alpha · 1[|w| ≤ 1] · upstream, nothing through alpha.
  np.testing.assert_allclose(got, alpha * (np.abs(np.asarray(w)) <= 1) * np.asarray(cot), rtol=1e-6)


def test_unknown_binarizer_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown binarizer 'sgn'.*approx_sign"):
    binarize.get_binarizer("sgn")
