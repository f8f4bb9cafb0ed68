"""larq-zoo's models (larq-zoo 2.4), by the names of shared/reference/larq/larq_zoo_counts.json:

    python -m bnn_jax.evaluate --config configs/larq_zoo.py:quicknet --workdir DIR

``DIR`` from ``python -m bnn_jax.convert --config configs/larq_zoo.py:quicknet --keras-weights
quicknet_weights.h5 --out DIR`` (README, "Larq Zoo"). ImageNet, 224×224, 1000 classes, evaluated
as larq-zoo evaluates (``dataset.eval_preprocess="larq_zoo"``: the central 224/256 of the shorter
side, TensorFlow's legacy bicubic resize to 224, ImageNet mean/std on 0-255 values; its models
have no normalisation layer of their own).

The QuickNet family's configs also train as larq-zoo trains them (``sota_experiments.py``
``TrainQuickNet``, :data:`QUICKNET_RECIPE`): ``python -m bnn_jax.train --config
configs/larq_zoo.py:quicknet --workdir DIR``. larq's ``CaseOptimizer((Bop.is_binary_variable,
Adam(CosineDecayWithWarmup(1e-2, ...))), default_optimizer=SGD(CosineDecayWithWarmup(0.1, ...),
momentum=0.9))``: Keras' Adam (eps 1e-7) at 1e-2 on the binary kernels (the residual blocks'
binarized 3×3 kernels, larq's precision-1 variables), Keras' SGD with momentum 0.9 at 0.1 on
everything else (stem, transition and head kernels, the head's bias, BatchNorm's gamma and beta);
both on larq-zoo's cosine with a warmup from 0 over 5 epochs, per step; the binary kernels clipped
to [-1.25, 1.25] after each update (their WeightClip kernel_constraint); 600 epochs of 2048, no
weight decay, no label smoothing (plain sparse categorical cross-entropy). larq-zoo computes its
schedule with floor(N / batch) steps per epoch (625) while Keras runs ceil(N / batch) (626): here
``train.drop_last=True`` runs the 625 steps per epoch its schedule counts, so every step's learning
rate equals larq-zoo's; its 600 further steps at learning rate 0, which only move BatchNorm's
moving statistics, are not run. What differs, README ("Porting a larq recipe"): the training
augmentation (torchvision's RandomResizedCrop here; larq-zoo's EfficientNet-style
``sample_distorted_bounding_box`` crop, area 0.08-1 as its ``_decode_and_random_crop`` passes it,
resized bicubic), and BatchNorm over the global batch where larq-zoo's MirroredStrategy normalised
each GPU's share (set ``model.bn_group_size`` to 2048 / its GPU count, which its code does not
record).
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


# larq-zoo's TrainQuickNet (sota_experiments.py), for QuickNetSmall, QuickNet and QuickNetLarge.
QUICKNET_RECIPE = dict(
    optimizer=dict(name="keras_sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
                   binary=dict(name="keras_adam", lr=1e-2, b1=0.9, b2=0.999, eps=1e-7,
                               clip=1.25)),
    schedule=dict(name="keras_cosine", warmup_epochs=5.0),
    train=dict(epochs=600, batch_size=2048, drop_last=True))
RECIPES = {"quicknet_small": QUICKNET_RECIPE, "quicknet": QUICKNET_RECIPE,
           "quicknet_large": QUICKNET_RECIPE}


def get_config(name: str = "quicknet"):
  if name not in MODELS:
    raise ConfigError(f"unknown Larq Zoo model {name!r}; valid: {sorted(MODELS)}")
  c = default_config()
  c.model.update(arch=None, neck=None, num_classes=1000, **MODELS[name])
  c.dataset.eval_preprocess = "larq_zoo"  # its evaluation crop and bicubic resize
  for section, fields in RECIPES.get(name, {}).items():
    c[section].update(fields)
  return c
