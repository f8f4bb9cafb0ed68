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

larq's quantizers keep larq's names, forward and gradient (ties included): ``ste_sign``,
``approx_sign``, ``swish_sign``, ``ste_heaviside``, ``magnitude_aware_sign``, ``ste_tern`` and
``dorefa`` (larq's ``DoReFa``), and larq-zoo's ``xnor_weight_scale`` (XNORNet) and
``magnitude_aware_sign_unclipped`` (DoReFaNet). larq's ``clip_value`` is ``clip`` here
(``None``, as in larq, clips nothing).
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
  sign_forward: bool = False  # its output is sign(x) itself (bit-packing packs x as it is)

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


def register(name: Optional[str] = None, *, uses_ede: bool = False, binary: bool = True,
             sign_forward: bool = False):
  """Decorator filing ``f(x, **params)`` (``f(x, ede, **params)`` with ``uses_ede``) as ``name``
  (default: the function's name); returns ``f`` unchanged.

  Args:
    name: the name configs use; registering another function under a taken name is an error
      (the same function again, as when a config file is loaded twice, replaces it).
    uses_ede: ``f`` reads IR-Net's current EDE value, passed as ``ede``.
    binary: the output is ±1 up to a per-output-channel scale (bit-packed inference and the
      BOPs report treat the conv as binary); False for smooth stand-ins such as ``tanh``.
    sign_forward: the output is exactly :func:`sign` of ``x`` (only the gradient differs), so
      bit-packed inference packs ``x >= 0`` straight from the layer's input.
  """
  def decorate(function):
    key = name or function.__name__
    taken = REGISTRY.get(key)
    if taken is not None and _origin(taken.function) != _origin(function):
      raise ValueError(f"binarizer {key!r} is already registered ({_origin(taken.function)})")
    REGISTRY[key] = Binarizer(key, function, (), uses_ede, binary, sign_forward)
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


# --- Straight-through estimators --------------------------------------------


@jax.custom_vjp
def straight_through(x, quantized, passes):
  """``quantized`` forward; backward the upstream gradient to ``x`` where ``passes``, 0 elsewhere.

  The one backward of every clipped STE here (``passes`` is the clip mask) and of larq's rounding
  with identity gradient (``passes=True``); ``quantized`` itself gets no gradient.
  """
  return quantized


def _straight_through_fwd(x, quantized, passes):
  return quantized, passes


def _straight_through_bwd(passes, g):
  return jnp.where(passes, g, jnp.zeros_like(g)), None, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def within_clip(x: jax.Array, clip: Optional[float], closed: bool = True):
  """Where a clipped STE passes the gradient: |x| ≤ clip (|x| < clip unless ``closed``);
  everywhere for ``clip=None`` (larq's ``clip_value=None``)."""
  if clip is None:
    return True
  return jnp.abs(x) <= clip if closed else jnp.abs(x) < clip


def clip_closed(x: jax.Array, low: float, high: float) -> jax.Array:
  """clip(x, low, high) with gradient 1 on [low, high], both ties included, as
  ``tf.clip_by_value``'s (jnp.clip's autodiff halves the gradient at a tie)."""
  return straight_through(x, jnp.clip(x, low, high), (x >= low) & (x <= high))


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


@register("ede_sign", uses_ede=True, sign_forward=True)
def _ede_sign_now(x, ede: EDE):
  """IR-Net's activations (and standardised weights): EDE sign at the current k, t."""
  return ede_sign(x, ede.k, ede.t)


@register(sign_forward=True)
@jax.custom_vjp
def approx_sign(x):
  """Bi-Real Net's ApproxSign: grad = 2 + 2x on [−1, 0), 2 − 2x on [0, 1), 0 elsewhere.

  larq's ``approx_sign`` exactly: its 2·(1 − |x|) on |x| ≤ 1 is the same number (doubling is
  exact), 0 at x = ±1 in both, 2 at x = 0, and sign(0) = +1.
  """
  return sign(x)


def _approx_sign_fwd(x):
  return sign(x), x


def _approx_sign_bwd(x, g):
  slope = jnp.where(x < 0, 2 + 2 * x, 2 - 2 * x)
  inside = (x >= -1) & (x < 1)
  return (jnp.where(inside, slope, 0).astype(x.dtype) * g,)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@register(sign_forward=True)
def ste_sign(x, clip: Optional[float] = 1.0, closed: bool = True):
  """Clipped straight-through sign: grad passes unchanged where |x| ≤ clip (``closed``), or where
  |x| < clip (HCEBNN's ``SignActivation``, which zeroes it at ±clip); ``clip=None`` everywhere.

  With ``closed`` (the default) it is larq's ``ste_sign`` / ``SteSign(clip_value=clip)`` exactly,
  ties included (gradient 1 at |x| = clip, sign(0) = +1). Real-to-Binary, ResNetE and QuickNet use
  clip 1.25, BinaryDenseNet and MeliusNet 1.3.
  """
  return straight_through(x, sign(x), within_clip(x, clip, closed))


@register(sign_forward=True)
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def swish_sign(x, beta: float = 5.0):
  """BNN+'s SwishSign (larq's ``swish_sign``): grad = β·(2 − βx·tanh(βx/2)) / (1 + cosh(βx)),
  the derivative of 2σ(βx)·(1 + βx·(1 − σ(βx))) − 1, a sign-like curve that sharpens with β
  (β at x = 0)."""
  return sign(x)


def _swish_sign_fwd(x, beta):
  return sign(x), x


def _swish_sign_bwd(beta, x, g):
  bx = beta * x
  return (g * beta * (2 - bx * jnp.tanh(bx / 2)) / (1 + jnp.cosh(bx)),)


swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


@register(binary=False)
def ste_heaviside(x, clip: Optional[float] = 1.0):
  """larq's ``SteHeaviside``: 1 for x > 0, else 0 (0 at x = 0: {0, 1}, so not binary), with
  the clipped STE of ``ste_sign``."""
  return straight_through(x, (x > 0).astype(x.dtype), within_clip(x, clip))


@register(binary=False)
def ste_tern(x, threshold_value: float = 0.05, ternary_weight_networks: bool = False,
             clip: Optional[float] = 1.0):
  """larq's ``SteTern``: sign(sign(x − Δ) + sign(x + Δ)) ∈ {−1, 0, +1} (±Δ itself goes to ±1),
  with the clipped STE of ``ste_sign``.

  Δ is ``threshold_value``, or with ``ternary_weight_networks`` TWN's 0.7·Σ|x| / size over the
  whole tensor, in larq's order of operations; no gradient flows through Δ.
  """
  if ternary_weight_networks:
    threshold = 0.7 * jnp.sum(jnp.abs(x)) / x.size
  else:
    threshold = threshold_value
  ternary = jnp.sign(jnp.sign(x - threshold) + jnp.sign(x + threshold))
  return straight_through(x, ternary, within_clip(x, clip))


@register(binary=False)
def dorefa(x, k_bit: int = 2, mode: str = "activations"):
  """DoReFa-Net's k-bit quantizer (larq's ``DoReFa``): round(u·n)/n, n = 2^k_bit − 1, of u ∈ [0, 1],
  the rounding straight-through (banker's rounding, as tf.round's).

  ``"activations"``: u = x clipped to [0, 1] (gradient 1 on [0, 1], ties included).
  ``"weights"``: u = tanh(x) / (2·max|tanh(x)|) + ½ over the whole tensor, the max detached
  (u = ½ for an all-zero tensor, with no gradient), and the result mapped back to 2q − 1 ∈ [−1, 1].
  """
  levels = 2 ** k_bit - 1
  if mode == "activations":
    unit = clip_closed(x, 0.0, 1.0)
  elif mode == "weights":
    unit = _dorefa_unit_weights(x)
  else:
    raise ConfigError(f"dorefa mode {mode!r} is unknown; valid: ['activations', 'weights']")
  quantized = straight_through(unit, jnp.round(unit * levels) / levels, True)
  return quantized if mode == "activations" else 2 * quantized - 1


def _dorefa_unit_weights(w: jax.Array) -> jax.Array:
  """tanh(w) / (2·max|tanh(w)|) + ½, the max detached; ½ where the max is 0 (tf.divide_no_nan)."""
  limited = jnp.tanh(w)
  peak = jax.lax.stop_gradient(jnp.max(jnp.abs(limited)))
  nonzero = peak > 0
  return jnp.where(nonzero, limited / (2 * jnp.where(nonzero, peak, 1)), 0) + 0.5


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
@register("magnitude_aware_sign")
def scaled_ste_sign(w: jax.Array, clip: Optional[float] = 1.0) -> jax.Array:
  """ReActNet / Bi-Real weights: clipped STE sign times detached mean|W| per output channel.

  Registered also as ``magnitude_aware_sign``: larq's ``MagnitudeAwareSign(clip_value=clip)``
  (larq-zoo BiRealNet's kernels) is this exactly, its scale averaging every axis but the last.
  """
  return ste_sign(w, clip) * jax.lax.stop_gradient(_per_out_channel_mean(absolute(w)))


magnitude_aware_sign = scaled_ste_sign


@register()
def xnor_weight_scale(w: jax.Array) -> jax.Array:
  """XNOR-Net's weights as larq-zoo's XNORNet binarizes them: α·ste_sign(W_c), W_c = W clipped
  to [−1, 1] and α = mean|W_c| per output channel.

  α is not detached: the gradient reaches W through the sign's STE and through α (|·|'s
  derivative 0 at 0, as tf.abs's), both inside the clip's [−1, 1] (ties included) and 0 outside.
  larq-zoo averages axes (0, 1, 2) of its conv kernels; all axes but the last is the same there
  and also serves (in, out) dense kernels.
  """
  clipped = clip_closed(w, -1.0, 1.0)
  return _per_out_channel_mean(absolute(clipped)) * ste_sign(clipped)


@register()
def magnitude_aware_sign_unclipped(w: jax.Array) -> jax.Array:
  """larq-zoo DoReFaNet's weights: sign(W) times the detached mean|W| of the whole layer (one
  scale for all channels); backward the identity, neither scaled nor clipped."""
  scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
  return straight_through(w, sign(w) * scale, True)
