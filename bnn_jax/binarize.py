"""Sign estimators and weight binarizers: pure functions, looked up by name.

Every sign estimator is a ``jax.custom_vjp`` whose forward is ``sign`` with
sign(0) = +1 and whose backward is the published formula of its method.
A binarizer has the signature ``f(x, ede) -> x_binary`` where ``ede`` is the
current :class:`EDE` value (only IR-Net's binarizers read it). Weight
binarizers receive kernels in Flax layout (HWIO: output channels last).

Adding an estimator is one function here plus its name in ``BINARIZERS``.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bnn_jax.errors import ConfigError


class EDE(NamedTuple):
  """IR-Net's Error Decay Estimator state: backward is k·t·(1 − tanh²(t·x)).

  Both are traced arrays during training, so changing them never recompiles.
  """
  k: jax.Array
  t: jax.Array

  @classmethod
  def initial(cls) -> "EDE":
    """The values the original uses before its first EDE update (t = 0.1, k = 10)."""
    return cls(jnp.float32(10.0), jnp.float32(0.1))


def sign(x: jax.Array) -> jax.Array:
  """Exactly ±1, with sign(0) = +1."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def absolute(x: jax.Array) -> jax.Array:
  """|x| whose derivative is 0 at x = 0, as torch.abs's (jnp.abs takes 1 there)."""
  return x * jax.lax.stop_gradient(jnp.sign(x))


# --- Sign estimators -------------------------------------------------------


@jax.custom_vjp
def ede_sign(x, k, t):
  """IR-Net sign: grad = k·t·(1 − tanh²(t·x)) · upstream; no gradient to k, t."""
  return sign(x)


def _ede_sign_fwd(x, k, t):
  return sign(x), (x, k, t)


def _ede_sign_bwd(res, g):
  x, k, t = res
  k_c, t_c = jnp.asarray(k, x.dtype), jnp.asarray(t, x.dtype)
  grad = k_c * t_c * (1 - jnp.tanh(t_c * x) ** 2) * g
  return grad, jnp.zeros_like(k), jnp.zeros_like(t)


ede_sign.defvjp(_ede_sign_fwd, _ede_sign_bwd)


@jax.custom_vjp
def approx_sign(x):
  """Bi-Real Net's ApproxSign: grad = 2 + 2x on [−1, 0), 2 − 2x on [0, 1), 0 elsewhere."""
  return sign(x)


def _approx_sign_fwd(x):
  return sign(x), x


def _approx_sign_bwd(x, g):
  slope = jnp.where(x < 0, 2 + 2 * x, 2 - 2 * x)
  inside = (x >= -1) & (x < 1)
  return (jnp.where(inside, slope, 0).astype(x.dtype) * g,)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def ste_sign(x, clip: float = 1.0, closed: bool = True):
  """Clipped straight-through sign: grad passes unchanged where |x| ≤ clip (``closed``), or
  where |x| < clip (HCEBNN's ``SignActivation``, which zeroes it at ±clip)."""
  return sign(x)


def _ste_sign_fwd(x, clip, closed):
  return sign(x), x


def _ste_sign_bwd(clip, closed, x, g):
  inside = jnp.abs(x) <= clip if closed else jnp.abs(x) < clip
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def winner_take_all(p: jax.Array) -> jax.Array:
  """One-hot of the largest entry along the last axis (the first on ties); backward the identity.

  HCEBNN's expert selection: the forward picks one expert, the straight-through backward lets
  the gate (and through it the block input) learn which.
  """
  return jax.nn.one_hot(jnp.argmax(p, axis=-1), p.shape[-1], dtype=p.dtype)


winner_take_all.defvjp(lambda p: (winner_take_all(p), None), lambda _, g: (g,))


# --- Weight binarizers ------------------------------------------------------


def _per_out_channel_mean(w: jax.Array) -> jax.Array:
  return jnp.mean(w, axis=tuple(range(w.ndim - 1)), keepdims=True)


def irnet_weight(w: jax.Array, ede: EDE) -> jax.Array:
  """IR-Net Libra-PB: standardise per output channel (unbiased std), EDE sign,
  times the detached power-of-two scale 2^round(log2(mean|Ŵ|))."""
  axes = tuple(range(w.ndim - 1))
  centred = w - jnp.mean(w, axis=axes, keepdims=True)
  standardised = centred / jnp.std(centred, axis=axes, keepdims=True, ddof=1)
  scale = 2.0 ** jnp.round(jnp.log2(_per_out_channel_mean(absolute(standardised))))
  return ede_sign(standardised, ede.k, ede.t) * jax.lax.stop_gradient(scale)


def scaled_ste_sign(w: jax.Array, ede: EDE) -> jax.Array:
  """ReActNet / Bi-Real weights: clipped STE sign (c = 1) times detached mean|W| per output channel."""
  del ede
  return ste_sign(w, 1.0) * jax.lax.stop_gradient(_per_out_channel_mean(absolute(w)))


# --- Registry ----------------------------------------------------------------

Binarizer = Callable[[jax.Array, EDE], jax.Array]

BINARIZERS: dict[str, Binarizer] = {
    # activations (and standardised weights) of IR-Net
    "ede_sign": lambda x, ede: ede_sign(x, ede.k, ede.t),
    # activations of Bi-Real Net and ReActNet
    "approx_sign": lambda x, ede: approx_sign(x),
    # plain clipped STE, c = 1 (larq's ste_sign)
    "ste_sign": lambda x, ede: ste_sign(x, 1.0),
    # HCEBNN activations and weights: no gradient at exactly ±1
    "ste_sign_open": lambda x, ede: ste_sign(x, 1.0, False),
    # Real-to-Binary activations and weights (c = 1.25, no scale)
    "ste_sign_clip1.25": lambda x, ede: ste_sign(x, 1.25),
    # Real-to-Binary FP stage: the smooth stand-in for sign
    "tanh": lambda x, ede: jnp.tanh(x),
    # weights
    "irnet_weight": irnet_weight,
    "scaled_ste_sign": scaled_ste_sign,
}

# Binarizers whose output is exactly ±1 (up to a per-channel scale): what the
# BOPs counter and bit-packed inference treat as binary.
BINARY_OUTPUT = frozenset(BINARIZERS) - {"tanh"}


def get_binarizer(name: str) -> Binarizer:
  """The binarizer registered as ``name``; a clear error lists the valid names."""
  try:
    return BINARIZERS[name]
  except KeyError:
    raise ConfigError(f"unknown binarizer {name!r}; valid: {sorted(BINARIZERS)}") from None
