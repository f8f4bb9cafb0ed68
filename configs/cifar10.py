"""Any recipe of configs/ on CIFAR-10: CIFAR stem (3×3/1 conv, no max-pool), 32×32 inputs.

    python -m bnn_jax.train --config configs/cifar10.py:reactnet_r18_step1 --workdir DIR

reads CIFAR-10 through TFDS (downloaded when online); an image folder
(``DIR/<split>/<class>/*.jpg``) instead:

    ... --config.dataset.name=image_folder --config.dataset.path=~/.cache/bnn_jax/cifar10_jpeg

Optimizer and method are the recipe's, run for ``EPOCHS`` epochs of ``BATCH`` images: warmup,
milestones and EDE keep their fraction of the run (:func:`bnn_jax.durations.rescale_run`), SGD's
learning rate scales with the batch. The runs a recipe starts or distils from are looked for under
``WORKDIRS`` (``workdirs/cifar10/reactnet_r18_step1``, ``workdirs/cifar10/teachers/resnet34``:
train those teachers with ``configs/cifar10.py:resnet34``).
"""
from bnn_jax import durations
from bnn_jax.config import cifar10, load_config

EPOCHS, BATCH = 200, 256
WORKDIRS = "workdirs/cifar10"


def get_config(recipe="reactnet_r18_step1"):
  if recipe in ("cifar10", "cifar10_short", "quickstart", "digits_kd"):
    raise ValueError(f"configs/cifar10.py takes an ImageNet recipe, not {recipe!r}")
  c = load_config(recipe, workdirs=WORKDIRS)
  if c.optimizer.name == "sgd":  # linear scaling rule for the smaller batch
    c.optimizer.lr = c.optimizer.lr * BATCH / c.train.batch_size
  durations.rescale_run(c, cifar10(), EPOCHS, BATCH)
  c.model.update(num_classes=10, cifar_stem=True)
  c.teacher.model.update(num_classes=10, cifar_stem=True)
  c.train.log_every = 50
  return c
