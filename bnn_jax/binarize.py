"""Sign estimators and weight binarizers: pure functions, registered by name as larq's quantizers.

Every sign estimator is a ``jax.custom_vjp`` whose forward is ``sign`` with
sign(0) = +1 and whose backward is the published formula of its method.
Weight binarizers receive kernels in Flax layout (HWIO: output channels last).

A binarizer is a function ``f(x, **params)``; :func:`register` files it under a
name, saying whether it reads IR-Net's current :class:`EDE` value (it then also
takes ``ede``) and whether its output is ±1 (up to a per-channel scale: what
bit-packed inference needs). :func:`get` turns what a config names into a
:class:`Binarizer`: a registered name, a dict ``{"name": ..., **params}`` (e.g.
``{"name": "ste_sign", "clip": 1.25}``) or a callable ``f(x)``. A user adds an
estimator in their own code with ``@binarize.register("my_sign")``.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, Union

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


# --- Registry ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Binarizer:
  """A binarizer with its parameters bound: ``binarizer(x, ede)``."""
  name: str
  function: Callable[..., jax.Array]
  params: Tuple[Tuple[str, Any], ...] = ()
  uses_ede: bool = False  # the function takes the current EDE value as ``ede``
  binary: bool = True  # its output is ±1, up to a per-output-channel scale

  def __call__(self, x: jax.Array, ede: Optional[EDE] = None) -> jax.Array:
    kwargs = dict(self.params)
    if self.uses_ede:
      kwargs["ede"] = EDE.initial() if ede is None else ede
    return self.function(x, **kwargs)

  def with_params(self, params: Mapping[str, Any]) -> "Binarizer":
    """This binarizer with ``params`` bound; a parameter its function lacks is a ConfigError."""
    valid = [n for n in list(inspect.signature(self.function).parameters)[1:] if n != "ede"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
      raise ConfigError(f"binarizer {self.name!r} has no parameter {unknown}; valid: {valid}")
    return dataclasses.replace(self, params=tuple(sorted({**dict(self.params), **params}.items())))


REGISTRY: Dict[str, Binarizer] = {}

BinarizerSpec = Union[str, Mapping[str, Any], Callable[..., jax.Array], Binarizer]
# (activations, weights); None leaves that operand real
BinarizerPair = Tuple[Optional[BinarizerSpec], Optional[BinarizerSpec]]


def register(name: Optional[str] = None, *, uses_ede: bool = False, binary: bool = True):
  """Decorator filing ``f(x, **params)`` (``f(x, ede, **params)`` with ``uses_ede``) as ``name``
  (default: the function's name); returns ``f`` unchanged.

  Args:
    name: the name configs use; registering another function under a taken name is an error
      (the same function again, as when a config file is loaded twice, replaces it).
    uses_ede: ``f`` reads IR-Net's current EDE value, passed as ``ede``.
    binary: the output is ±1 up to a per-output-channel scale (bit-packed inference and the
      BOPs report treat the conv as binary); False for smooth stand-ins such as ``tanh``.
  """
  def decorate(function):
    key = name or function.__name__
    taken = REGISTRY.get(key)
    if taken is not None and _origin(taken.function) != _origin(function):
      raise ValueError(f"binarizer {key!r} is already registered ({_origin(taken.function)})")
    REGISTRY[key] = Binarizer(key, function, (), uses_ede, binary)
    return function

  return decorate


def _origin(function) -> str:
  return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def get(spec: BinarizerSpec) -> Binarizer:
  """The :class:`Binarizer` that ``spec`` names.

  Args:
    spec: a registered name; a dict ``{"name": name, **params}`` binding parameters of that
      binarizer (``{"name": "ste_sign", "clip": 1.25}``); a callable ``f(x)`` (taken as binary;
      register it to say otherwise or to read EDE); or a Binarizer.
  Returns:
    A Binarizer, called as ``binarizer(x, ede)``.
  Raises:
    ConfigError: an unknown name or parameter, naming the valid ones.
  """
  if isinstance(spec, Binarizer):
    return spec
  if isinstance(spec, str):
    return _registered(spec)
  if isinstance(spec, Mapping):
    params = dict(spec)
    if "name" not in params:
      raise ConfigError(f"binarizer {params} has no 'name'; valid names: {sorted(REGISTRY)}")
    return _registered(params.pop("name")).with_params(params)
  if callable(spec):
    return Binarizer(getattr(spec, "__name__", repr(spec)), spec)
  raise ConfigError(f"a binarizer is a name, a dict with a name or a callable, not {spec!r}")


def _registered(name: str) -> Binarizer:
  try:
    return REGISTRY[name]
  except KeyError:
    raise ConfigError(f"unknown binarizer {name!r}; valid: {sorted(REGISTRY)}") from None


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


@register("ede_sign", uses_ede=True)
def _ede_sign_now(x, ede: EDE):
  """IR-Net's activations (and standardised weights): EDE sign at the current k, t."""
  return ede_sign(x, ede.k, ede.t)


@register()
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


@register()
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def ste_sign(x, clip: float = 1.0, closed: bool = True):
  """Clipped straight-through sign (larq's ``ste_sign``): grad passes unchanged where |x| ≤ clip
  (``closed``), or where |x| < clip (HCEBNN's ``SignActivation``, which zeroes it at ±clip).
  Real-to-Binary uses clip 1.25."""
  return sign(x)


def _ste_sign_fwd(x, clip, closed):
  return sign(x), x


def _ste_sign_bwd(clip, closed, x, g):
  inside = jnp.abs(x) <= clip if closed else jnp.abs(x) < clip
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@register(binary=False)
def tanh(x):
  """Real-to-Binary's FP stage: the smooth stand-in for sign (not binary)."""
  return jnp.tanh(x)


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


@register(uses_ede=True)
def irnet_weight(w: jax.Array, ede: EDE) -> jax.Array:
  """IR-Net Libra-PB: standardise per output channel (unbiased std), EDE sign,
  times the detached power-of-two scale 2^round(log2(mean|Ŵ|))."""
  axes = tuple(range(w.ndim - 1))
  centred = w - jnp.mean(w, axis=axes, keepdims=True)
  standardised = centred / jnp.std(centred, axis=axes, keepdims=True, ddof=1)
  scale = 2.0 ** jnp.round(jnp.log2(_per_out_channel_mean(absolute(standardised))))
  return ede_sign(standardised, ede.k, ede.t) * jax.lax.stop_gradient(scale)


@register()
def scaled_ste_sign(w: jax.Array, clip: float = 1.0) -> jax.Array:
  """ReActNet / Bi-Real weights: clipped STE sign times detached mean|W| per output channel."""
  return ste_sign(w, clip) * jax.lax.stop_gradient(_per_out_channel_mean(absolute(w)))
