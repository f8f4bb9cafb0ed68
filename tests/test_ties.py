"""Derivatives at exact ties and kinks, against PyTorch's own autograd at those points.

Binary convolutions without a weight scale give integer outputs, so exact zeros and exact
±1 are common in a BNN's activations: every op with a kink must take PyTorch's derivative
there, or gradients drift from the original's from the first step on. The forward sign(0)
= +1 (torch.sign gives 0) is the one documented difference, and only gradients are compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax.binarize import absolute, approx_sign, ste_sign
from bnn_jax.layers import PReLU, hardtanh, max_pool_3x3_s2
from bnn_jax.losses import attention_map

torch = pytest.importorskip("torch")

TIES = np.array([-1.5, -1.25, -1.0, -0.5, 0.0, 0.5, 1.0, 1.25, 1.5], np.float32)


def torch_grad(fn, x, upstream):
  """d(sum(fn(x) · upstream))/dx in PyTorch."""
  xt = torch.tensor(x, requires_grad=True)
  (fn(xt) * torch.tensor(upstream)).sum().backward()
  return xt.grad.numpy()


def jax_grad(fn, x, upstream):
  return np.asarray(jax.grad(lambda v: jnp.sum(fn(v) * upstream))(jnp.asarray(x)))


def upstream_like(x, seed=0):
  return np.random.default_rng(seed).uniform(0.5, 1.5, np.shape(x)).astype(np.float32)


def torch_clip_ste(clip):
  """The original's straight-through sign: sign forward, clamp's gradient (inclusive at ±clip)."""
  def fn(x):
    clipped = torch.clamp(x, -clip, clip)
    return torch.sign(x).detach() - clipped.detach() + clipped
  return fn


def torch_approx_sign(x):
  """Bi-Real's ApproxSign written as PyTorch autograd sees it: a piecewise polynomial."""
  below, negative, inside = (x < -1).float(), (x < 0).float(), (x < 1).float()
  left = -below + (x * x + 2 * x) * (1 - below)
  middle = left * negative + (-x * x + 2 * x) * (1 - negative)
  smooth = middle * inside + (1 - inside)
  return torch.sign(x).detach() - smooth.detach() + smooth


@pytest.mark.parametrize("name, ours, theirs", [
    ("relu", jax.nn.relu, torch.relu),
    ("hardtanh", hardtanh, torch.nn.Hardtanh()),
    ("abs", absolute, torch.abs),
    ("ste_sign clip 1", lambda x: ste_sign(x, 1.0), torch_clip_ste(1.0)),
    ("ste_sign clip 1.25", lambda x: ste_sign(x, 1.25), torch_clip_ste(1.25)),
    ("approx_sign", approx_sign, torch_approx_sign),
])
def test_elementwise_derivative_at_every_tie_point(name, ours, theirs):
  upstream = upstream_like(TIES)
  # atol 0: where PyTorch's derivative is 0, ours must be exactly 0 (rtol allows the last bit
  # of polynomials that autograd evaluates in another order).
  np.testing.assert_allclose(jax_grad(ours, TIES, upstream), torch_grad(theirs, TIES, upstream),
                             rtol=1e-6, atol=0, err_msg=name)


def test_maximum_and_minimum_split_ties_as_pytorch():
  a, b = np.array([1.0, 2.0, 3.0], np.float32), np.array([1.0, 1.0, 4.0], np.float32)
  upstream = upstream_like(a)
  for ours, theirs in ((jnp.maximum, torch.maximum), (jnp.minimum, torch.minimum)):
    np.testing.assert_allclose(jax_grad(lambda x: ours(x, b), a, upstream),
                               torch_grad(lambda x: theirs(x, torch.tensor(b)), a, upstream))


def test_prelu_takes_the_slope_at_zero():
  x = np.array([[[[-1.0, 0.0], [0.0, 2.0], [0.0, -3.0]]]], np.float32)  # NHWC, 2 channels
  slope = np.array([0.25, 0.1], np.float32)
  upstream = upstream_like(x)
  module = PReLU()
  params = {"params": {"weight": jnp.asarray(slope)}}
  ours_x, ours_w = jax.grad(lambda v, p: jnp.sum(module.apply(p, v) * upstream), argnums=(0, 1))(
      jnp.asarray(x), params)
  prelu = torch.nn.PReLU(2)
  prelu.weight.data = torch.tensor(slope)
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  (prelu(xt) * torch.tensor(upstream.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_array_equal(ours_x, xt.grad.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours_w["params"]["weight"], prelu.weight.grad.numpy(), rtol=1e-6)


def test_max_pool_sends_the_gradient_to_the_first_maximum_of_each_window():
  # After a hardtanh stem most values are exactly ±1: windows full of ties.
  rng = np.random.default_rng(0)
  x = np.clip(rng.integers(-2, 3, (2, 9, 10, 3)), -1, 1).astype(np.float32)
  upstream = upstream_like(np.zeros((2, 5, 5, 3)))
  ours = jax_grad(max_pool_3x3_s2, x, upstream)
  pool = lambda v: torch.nn.functional.max_pool2d(v.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)  # noqa: E731
  np.testing.assert_array_equal(ours, torch_grad(pool, x, upstream))
  np.testing.assert_array_equal(max_pool_3x3_s2(jnp.asarray(x)),
                                pool(torch.tensor(x)).numpy())


def test_attention_map_normalises_by_the_first_maximum():
  features = np.zeros((2, 2, 3, 4), np.float32)
  features[:, 0, 0] = features[:, 1, 2] = 1.0  # two equal maxima per example
  features[1, 0, 1] = 0.5
  upstream = upstream_like(np.zeros((2, 6)))

  def torch_attention(f):
    q = f.pow(2).mean(dim=-1).reshape(f.shape[0], -1)
    return q / q.max(dim=-1)[0][:, None]

  np.testing.assert_allclose(jax_grad(attention_map, features, upstream),
                             torch_grad(torch_attention, features, upstream), atol=1e-7)
