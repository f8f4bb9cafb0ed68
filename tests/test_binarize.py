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


BINARY = sorted(name for name, b in binarize.REGISTRY.items() if b.binary)


@pytest.mark.parametrize("name", BINARY)
def test_every_binary_binarizer_outputs_a_per_channel_scaled_sign_with_sign0_plus1(name):
  x = jnp.tile(GRID[:, None], (1, 3)) * jnp.array([1.0, 0.5, 2.0])  # 3 "output channels"
  out = np.asarray(binarize.get(name)(x, EDE(jnp.float32(3.0), jnp.float32(0.3))))
  scale = np.abs(out).max(0)
  assert np.all(scale > 0)
  # IR-Net's weight binarizer standardises first: its sign is that of x − mean over the channel.
  centre = np.asarray(x).mean(0) if name == "irnet_weight" else 0.0
  np.testing.assert_array_equal(out / scale, np.where(np.asarray(x) - centre >= 0, 1.0, -1.0))


@pytest.mark.parametrize("name", sorted(binarize.REGISTRY))
def test_every_binarizer_has_a_gradient_and_is_jit_and_vmap_safe(name):
  binarizer = binarize.get(name)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(binarizer(x, EDE.initial()) * GRID[:, None])))(
      jnp.tile(GRID[:, None], (1, 2)))
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
  batched = jax.vmap(lambda x: binarizer(x, EDE.initial()))(jnp.tile(GRID[None, :, None], (2, 1, 2)))
  assert batched.shape == (2, GRID.shape[0], 2)


def test_a_dict_binds_parameters_and_a_callable_is_taken_as_is():
  clip125 = binarize.get({"name": "ste_sign", "clip": 1.25})
  assert clip125.params == (("clip", 1.25),)
  np.testing.assert_array_equal(grad_of(lambda x: clip125(x), GRID),
                                (np.abs(np.asarray(GRID)) <= 1.25).astype(np.float32))
  strict = binarize.get({"name": "ste_sign", "closed": False})
  np.testing.assert_array_equal(grad_of(lambda x: strict(x), GRID),
                                (np.abs(np.asarray(GRID)) < 1.0).astype(np.float32))
  mine = binarize.get(lambda x: binarize.sign(x) * 2.0)
  np.testing.assert_array_equal(mine(GRID), np.where(np.asarray(GRID) >= 0, 2.0, -2.0))
  with pytest.raises(ValueError, match="binarizer 'ste_sign' has no parameter \\['clap'\\]; valid: \\['clip', 'closed'\\]"):
    binarize.get({"name": "ste_sign", "clap": 1.0})
  with pytest.raises(ValueError, match="has no 'name'"):
    binarize.get({"clip": 1.0})


def test_a_user_registered_estimator_with_a_parameter_from_config():
  """What README's "how to extend" shows: an estimator defined outside the package."""
  from bnn_jax.config import model_section
  from bnn_jax.layers import BinaryConv
  from bnn_jax.models import abstract_variables, build_model

  scales_seen = []

  @binarize.register("test_scaled_sign")
  def scaled_sign(x, scale: float = 1.0):
    scales_seen.append(scale)
    return scale * binarize.ste_sign(x)

  try:
    binarize.register("test_scaled_sign")(scaled_sign)  # the same function again: a reloaded file
    with pytest.raises(ValueError, match="'test_scaled_sign' is already registered"):
      binarize.register("test_scaled_sign")(lambda x: x)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    plain = BinaryConv(5, activation_binarizer="ste_sign")
    variables = plain.init(jax.random.key(1), x)
    doubled = BinaryConv(5, activation_binarizer={"name": "test_scaled_sign", "scale": 2.0})
    np.testing.assert_allclose(doubled.apply(variables, x), 2 * plain.apply(variables, x), rtol=1e-6)
    # From a model config: every binary conv of the network calls it with the configured scale.
    config = model_section(arch="BiRealNet-18", num_classes=4, stem_channels=8, base_channels=8,
                           cifar_stem=True, binarizers=({"name": "test_scaled_sign", "scale": 0.5},
                                                        "scaled_ste_sign"))
    scales_seen.clear()
    abstract_variables(build_model(config), (1, 8, 8, 3))  # traced, not compiled
    assert scales_seen == [0.5] * 16  # 8 blocks × 2 convs
  finally:
    del binarize.REGISTRY["test_scaled_sign"]


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
  out = binarize.scaled_ste_sign(w)
  alpha = np.abs(np.asarray(w)).mean((0, 1, 2))
  np.testing.assert_allclose(out, np.where(np.asarray(w) >= 0, 1.0, -1.0) * alpha, rtol=1e-6)
  cot = jax.random.normal(jax.random.key(4), w.shape)
  got = jax.vjp(binarize.scaled_ste_sign, w)[1](cot)[0]
  # The scale is detached: the gradient is alpha · 1[|w| ≤ 1] · upstream, nothing through alpha.
  np.testing.assert_allclose(got, alpha * (np.abs(np.asarray(w)) <= 1) * np.asarray(cot), rtol=1e-6)


def test_unknown_binarizer_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown binarizer 'sgn'.*approx_sign"):
    binarize.get("sgn")


def test_sign_forward_binarizers_output_exactly_sign():
  """Bit-packing packs the input itself for these: their forward must be sign(x), ties included."""
  flagged = sorted(n for n, b in binarize.REGISTRY.items() if b.sign_forward)
  assert {"ste_sign", "approx_sign", "swish_sign", "ede_sign"} <= set(flagged)
  x = jnp.concatenate([jax.random.normal(jax.random.key(0), (1000,)), jnp.array([0.0, -0.0])])
  for name in flagged:
    np.testing.assert_array_equal(binarize.get(name)(x), binarize.sign(x), err_msg=name)
