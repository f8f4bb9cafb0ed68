"""Any recipe of configs/ on CIFAR-10: CIFAR stem (3×3/1 conv, no max-pool), 32×32 inputs.

    python -m bnn_jax.train --config configs/cifar10.py:reactnet_r18_step1 --workdir DIR

reads CIFAR-10 through TFDS (downloaded when online); an image folder
(``DIR/<split>/<class>/*.jpg``) instead:

    ... --config.dataset.name=image_folder --config.dataset.path=~/.cache/bnn_jax/cifar10_jpeg

Optimizer and method are the recipe's; epochs, batch size, milestones, warmup
and EDE are rescaled to ``EPOCHS`` epochs of ``BATCH`` images.
"""
import importlib.util
import os

from bnn_jax.config import cifar10

EPOCHS, BATCH, TRAIN_IMAGES = 200, 256, 50000


def load_recipe(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  if not os.path.exists(path):
    recipes = sorted(f[:-3] for f in os.listdir(os.path.dirname(path))
                     if f.endswith(".py") and f not in ("cifar10.py", "quickstart.py"))
    raise ValueError(f"unknown recipe {name!r}; valid: {recipes}")
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(recipe="reactnet_r18_step1"):
  c = load_recipe(recipe)
  old_steps = c.train.epochs * (1281167 // c.train.batch_size)
  new_steps = EPOCHS * (TRAIN_IMAGES // BATCH)
  if c.schedule.milestones:
    c.schedule.milestones = tuple(m * EPOCHS // c.train.epochs for m in c.schedule.milestones)
  c.schedule.warmup_iters = c.schedule.warmup_iters * new_steps // old_steps
  if c.optimizer.name == "sgd":  # linear scaling rule for the smaller batch
    c.optimizer.lr = c.optimizer.lr * BATCH / c.train.batch_size
  c.ede.epochs = EPOCHS if c.ede.enabled else None
  c.model.update(num_classes=10, cifar_stem=True)
  c.dataset = cifar10()
  c.train.update(epochs=EPOCHS, batch_size=BATCH, log_every=50)
  if c.train.load_from:
    c.train.load_from = c.train.load_from.replace("workdirs/", "workdirs/cifar10_")
  return c
