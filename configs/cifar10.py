"""Any recipe of configs/ on CIFAR-10: CIFAR stem (3×3/1 conv, no max-pool), 32×32 inputs.

    python -m bnn_jax.train --config configs/cifar10.py:reactnet_r18_step1 --workdir DIR

reads CIFAR-10 through TFDS (downloaded when online); an image folder
(``DIR/<split>/<class>/*.jpg``) instead:

    ... --config.dataset.name=image_folder --config.dataset.path=~/.cache/bnn_jax/cifar10_jpeg

Optimizer and method are the recipe's; epochs, batch size, milestones, warmup
and EDE are rescaled to ``EPOCHS`` epochs of ``BATCH`` images.
"""
from bnn_jax.config import TEACHER_RESNET18, TEACHER_RESNET34, cifar10, load_config
from bnn_jax.data import IMAGENET_TRAIN_IMAGES, steps_per_epoch

EPOCHS, BATCH, TRAIN_IMAGES = 200, 256, 50000
# ImageNet teachers have no CIFAR-10 weights: the CIFAR-10 recipes use ResNets trained here
# (configs/cifar10.py:resnet18 / :resnet34).
CIFAR_TEACHERS = {TEACHER_RESNET18: "workdirs/cifar10_resnet18",
                  TEACHER_RESNET34: "workdirs/cifar10_resnet34"}


def get_config(recipe="reactnet_r18_step1"):
  if recipe in ("cifar10", "quickstart", "digits_kd"):
    raise ValueError(f"configs/cifar10.py takes an ImageNet recipe, not {recipe!r}")
  c = load_config(recipe)
  old_steps = c.train.epochs * steps_per_epoch(IMAGENET_TRAIN_IMAGES, c.train.batch_size)
  new_steps = EPOCHS * (TRAIN_IMAGES // BATCH)
  if c.schedule.milestones:
    c.schedule.milestones = tuple(m * EPOCHS // c.train.epochs for m in c.schedule.milestones)
  c.schedule.warmup_iters = c.schedule.warmup_iters * new_steps // old_steps
  if c.optimizer.name == "sgd":  # linear scaling rule for the smaller batch
    c.optimizer.lr = c.optimizer.lr * BATCH / c.train.batch_size
  c.ede.epochs = EPOCHS if c.ede.enabled else None
  c.model.update(num_classes=10, cifar_stem=True)
  c.teacher.model.update(num_classes=10, cifar_stem=True)
  c.dataset = cifar10()
  c.train.update(epochs=EPOCHS, batch_size=BATCH, log_every=50)
  if c.train.load_from:
    c.train.load_from = c.train.load_from.replace("workdirs/", "workdirs/cifar10_")
  if c.teacher.checkpoint:
    c.teacher.checkpoint = CIFAR_TEACHERS.get(
        c.teacher.checkpoint, c.teacher.checkpoint.replace("workdirs/", "workdirs/cifar10_"))
  return c
