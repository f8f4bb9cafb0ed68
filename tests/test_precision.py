"""Mixed precision: ``model.dtype = "bfloat16"`` computes in bfloat16 and keeps float32 where it
matters (parameters, optimizer state, BatchNorm statistics, binary dot products, the loss)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import data, parallel, step
from bnn_jax.errors import ConfigError
from bnn_jax.experiment import Experiment
from bnn_jax.layers import BinaryConv
from bnn_jax.models import abstract_variables, blocks, build_model

from helpers import compiled_fast, load_config, random_state, random_variables, shrink, trained_like

BF16 = jnp.bfloat16


def test_binary_dot_products_are_summed_in_float32_and_rounded_once():
  # 3×3×65 = 585 products of ±1: odd sums above 256, which bfloat16 (8 significant bits) cannot hold.
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 65)) + 1.0  # mostly +1 after the sign
  conv = BinaryConv(8, activation_binarizer="ste_sign", weight_binarizer="ste_sign")
  variables = jax.tree_util.tree_map(jnp.abs, conv.init(jax.random.key(1), x))  # all +1
  exact = np.asarray(conv.apply(variables, x))
  mixed = BinaryConv(8, activation_binarizer="ste_sign", weight_binarizer="ste_sign", dtype=BF16)
  out = mixed.apply(variables, x)
  assert out.dtype == BF16
  assert np.abs(exact).max() > 256 and np.any(exact != exact.astype(BF16).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(out), exact.astype(BF16))  # the exact sum, rounded


REAL_BLOCKS = (blocks.BasicBlock, blocks.RealToBinaryFPBlock)


@pytest.mark.parametrize("block", [blocks.IRNetBlock, blocks.BiRealNetBlock, blocks.ReActNetBlockA,
                                   blocks.RealToBinaryBlock, blocks.StrongBaselineBlock,
                                   blocks.ReActNetBlockB, *REAL_BLOCKS])
def test_every_block_in_bfloat16_matches_float32_to_bfloat16_rounding(block):
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 16))
  kwargs = dict(features=32, strides=2, **({} if block is blocks.ReActNetBlockB else
                                            dict(downsample=True)))
  variables = trained_like(block(**kwargs).init(jax.random.key(1), x, train=False))

  @functools.partial(jax.jit, static_argnums=0)
  def apply(dtype):  # a block of a bfloat16 model receives bfloat16 activations
    return block(**kwargs, dtype=dtype).apply(variables, x.astype(dtype), train=True,
                                              mutable=["batch_stats"])

  (out32, _), (out16, stats16) = apply(jnp.float32), apply(BF16)
  assert out16.dtype == BF16
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(stats16)} == {jnp.dtype(jnp.float32)}
  error = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)) / np.sqrt(np.mean(out32 ** 2))
  # Most elements agree to bfloat16's rounding (8 significant bits). In a binary block, an input
  # that rounding moved across zero flips a sign, which moves every dot product that reads it by
  # 2·|w|: a tail, not rounding-sized, and why whole binary networks are compared in training.
  assert np.median(error) < 2 ** -7
  if block in REAL_BLOCKS:
    assert np.quantile(error, 0.99) < 2 ** -5


def conv_dtypes(jaxpr):
  """(lhs, rhs, out) dtypes of every convolution in ``jaxpr``, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.append(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += conv_dtypes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += conv_dtypes(sub)
  return found


@pytest.mark.parametrize("recipe", ["reactnet_r18_step2", "reactnet_a_step2"])
def test_bfloat16_model_convolves_in_bfloat16_with_float32_variables_and_logits(recipe):
  config = shrink(load_config(recipe))
  config.model.dtype = "bfloat16"
  model = build_model(config.model)
  variables = random_variables(abstract_variables(model, (1, 32, 32, 3)))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  images = jnp.zeros((8, 32, 32, 3))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))(
      variables)
  convs = conv_dtypes(jaxpr.jaxpr)
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(variables["params"]) if leaf.ndim == 4]
  # Every convolution: bfloat16 operands, summed in float32 (then rounded to bfloat16).
  assert len(convs) == len(kernels) and set(convs) == {("bfloat16", "bfloat16", "float32")}
  logits, updates = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))(
      variables)
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_real_valued_resnet_logits_within_bfloat16_tolerance():
  config = shrink(load_config("resnet18"))
  model32 = build_model(config.model)
  config.model.dtype = "bfloat16"
  variables = trained_like(random_variables(abstract_variables(model32, (1, 32, 32, 3))))
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  exact = jax.jit(lambda v: model32.apply(v, images, train=False))(variables)
  mixed = jax.jit(lambda v: build_model(config.model).apply(v, images, train=False))(variables)
  assert float(jnp.linalg.norm(mixed - exact) / jnp.linalg.norm(exact)) < 3e-2


def test_bfloat16_train_step_keeps_float32_state():
  config = shrink(load_config("birealnet_r18"))
  config.model.dtype = "bfloat16"
  experiment = Experiment.from_config(config)
  tx, schedules = experiment.make_optimizer(steps_per_epoch=10, total_steps=100)
  state = random_state(experiment, tx)
  train_step = compiled_fast(experiment.make_train_step(tx, schedules))
  batch = parallel.to_global(next(data.synthetic_batches(8, 32, 3, config.model.num_classes)),
                             experiment.mesh)
  sums = jax.device_put(step.zero_sums(), parallel.replicated(experiment.mesh))
  for _ in range(2):
    state, sums, _ = train_step(state, batch, sums, {})
  assert np.isfinite(float(sums["loss_sum"])) and int(state.step) == 2
  for tree in (state.params, state.batch_stats, state.opt_state):
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_unknown_compute_dtype_is_a_clear_error():
  config = shrink(load_config("birealnet_r18"))
  config.model.dtype = "float8"
  with pytest.raises(ConfigError,
                     match=r"unknown model.dtype 'float8'; valid: \['float32', 'bfloat16', 'float64'\]"):
    build_model(config.model)
