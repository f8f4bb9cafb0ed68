"""larq-zoo's models (larq-zoo 2.4), by the names of shared/reference/larq/larq_zoo_counts.json:

    python -m bnn_jax.evaluate --config configs/larq_zoo.py:quicknet --workdir DIR

``DIR`` from ``python -m bnn_jax.convert --config configs/larq_zoo.py:quicknet --keras-weights
quicknet_weights.h5 --out DIR`` (README, "Larq Zoo"). ImageNet, 224×224, 1000 classes.
"""
from bnn_jax.config import default_config
from bnn_jax.errors import ConfigError

# name -> model section (backbone and larq-zoo Fields as larq-zoo's factories set them)
MODELS = {
    "quicknet_small": dict(backbone="QuickNet", section_filters=(32, 64, 256, 512)),
    "quicknet": dict(backbone="QuickNet"),
    "quicknet_large": dict(backbone="QuickNet", section_blocks=(6, 8, 12, 6)),
    "xnornet": dict(backbone="XNORNet"),
    "dorefanet": dict(backbone="DoReFaNet"),
    "binary_alexnet": dict(backbone="BinaryAlexNet"),
    "densenet28": dict(backbone="BinaryDenseNet28"),
    "densenet37": dict(backbone="BinaryDenseNet37"),
    "densenet37_dilated": dict(backbone="BinaryDenseNet37Dilated"),
    "densenet45": dict(backbone="BinaryDenseNet45"),
    "meliusnet22": dict(backbone="MeliusNet22"),
    "resnet_e18": dict(backbone="BinaryResNetE", num_layers=18),
    "birealnet": dict(backbone="BiRealNet"),
    # RealToBinaryNet, and the earlier stages of its multi-stage recipe by larq-zoo's model_name
    "real_to_binary": dict(backbone="RealToBinNet", model_name="r2b_bnn"),
    "real_to_binary_ban": dict(backbone="RealToBinNet", model_name="r2b_ban"),
    "real_to_binary_fp": dict(backbone="RealToBinNet", model_name="r2b_fp"),
    "strong_baseline_bnn": dict(backbone="RealToBinNet", model_name="baseline_bnn"),
    "strong_baseline_ban": dict(backbone="RealToBinNet", model_name="baseline_ban"),
    "resnet18_fp": dict(backbone="RealToBinNet", model_name="resnet_fp"),
}


def get_config(name: str = "quicknet"):
  if name not in MODELS:
    raise ConfigError(f"unknown Larq Zoo model {name!r}; valid: {sorted(MODELS)}")
  c = default_config()
  c.model.update(arch=None, neck=None, num_classes=1000, **MODELS[name])
  return c
