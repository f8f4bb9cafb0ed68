"""Small configs for fast tests: any recipe at reduced width and 32×32 (or 8×8) inputs."""
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnn_jax.config import load_config  # noqa: F401 - re-exported for the tests

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


# Larq Zoo models reduced as the larq-zoo fixtures are (their Fields, or width_divisor)
_DENSENET = dict(initial_filters=16, growth_rate=16)  # DenseNet37's transitions need 16
LARQ_ZOO_REDUCED = {
    "QuickNet": dict(section_filters=(8, 16, 32, 64)), "BiRealNet": dict(filters=8),
    "BinaryResNetE": dict(initial_filters=8, spec=((1, 1, 1, 1), (8, 16, 32, 64))),
    "RealToBinNet": dict(width_divisor=8), "MeliusNet22": dict(width_divisor=4),
    "XNORNet": dict(width_divisor=16), "DoReFaNet": dict(width_divisor=16),
    "BinaryAlexNet": dict(width_divisor=16),
    **{name: _DENSENET for name in ("BinaryDenseNet28", "BinaryDenseNet37",
                                    "BinaryDenseNet37Dilated", "BinaryDenseNet45")},
}


def shrink(config: ml_collections.ConfigDict, image_size: int = 32) -> ml_collections.ConfigDict:
  """The same recipe (and its teacher) at base width 8 on small inputs, batch 8 (BatchNorm groups
  of 4 where the recipe has groups): compiles and steps in seconds on a CPU."""
  config = config.copy_and_resolve_references()
  for model in (config.model, config.teacher.model):
    model.bn_group_size = 4 if model.bn_group_size else None
    if model.backbone == "MobileArch":
      model.update(stem_channels=8, layers_cfg=((16, 1, 1), (32, 2, 2), (64, 1, 2)))
    elif model.backbone == "EBResNet":  # the HCEBNN fixtures' sizes (SE needs 8 channels)
      model.update(stem_channels=32, structure=(1, 1, 1, 1), expansion=(0.5, 0.5, 0.25, 0.25))
    elif model.backbone in LARQ_ZOO_REDUCED:
      model.update(**LARQ_ZOO_REDUCED[model.backbone])
    else:
      model.update(stem_channels=8, base_channels=8)
  config.dataset.image_size = image_size
  config.train.update(batch_size=8, progress=False, plot=False)
  return config


def digits_config(**train) -> ml_collections.ConfigDict:
  """The quickstart at width 8: a real (tiny) run on the embedded digits."""
  config = load_config("quickstart")
  config.model.update(stem_channels=8, base_channels=8)
  config.train.update(progress=False, plot=False, **train)
  return config


def trained_like(variables, seed=0):
  """Running statistics and shifts away from their initial values, so that BatchNorm outputs are
  continuous (freshly initialised binary blocks give many exact zeros, whose sign any rounding
  flips)."""
  rng = np.random.default_rng(seed)
  draw = {"['mean']": lambda shape: rng.normal(0, 0.5, shape),
          "['var']": lambda shape: rng.uniform(0.5, 2.0, shape),
          "['bias']": lambda shape: rng.normal(0, 0.3, shape)}

  def perturb(path, x):
    key = jax.tree_util.keystr(path)
    suffix = next((s for s in draw if key.endswith(s)), None)
    return jnp.asarray(draw[suffix](x.shape), x.dtype) if suffix else x

  return jax.tree_util.tree_map_with_path(perturb, variables)


def random_variables(template, seed: int = 0):
  """Variables of ``template``'s shapes (``models.abstract_variables``) drawn on the host: what a
  test that only needs *some* values uses instead of compiling the model's init. Running
  variances are positive; everything else is N(0, 0.1²)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = 0.1 * rng.standard_normal(leaf.shape)
    if getattr(path[-1], "key", None) in ("var", "moving_variance"):
      value = 0.5 + np.abs(value)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, dict(template))


def random_state(experiment, tx, seed: int = 0):
  """A TrainState of ``experiment``'s model with :func:`random_variables` (no init compiled)."""
  from bnn_jax import step
  variables = random_variables(experiment.variables_template(), seed)
  return step.TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                         tx.init(variables["params"]))


def compiled_fast(jitted):
  """``jitted`` compiled at its first call without LLVM's optimisations (for a step a test runs a
  few times on tiny inputs: the compile is the cost); later calls reuse that executable."""
  from bnn_jax.parallel import run_once_compiler_options
  compiled = []

  def call(*args):
    if not compiled:
      compiled.append(jitted.lower(*args).compile(run_once_compiler_options()))
    return compiled[0](*args)

  return call
