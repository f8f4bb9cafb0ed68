"""A fixed short protocol on CIFAR-10, the same for every method, trained from scratch on labels.

    python -m bnn_jax.train --config configs/cifar10_short.py:irnet_r18 --workdir DIR \
        --config.dataset.name=image_folder --config.dataset.path=~/.cache/bnn_jax/cifar10_jpeg

Methods: irnet_r18, birealnet_r18, reactnet_r18, strong_baseline: each method's fully binary
ResNet-18 (its blocks, stem activation and neck), with the CIFAR stem (3×3/1 conv, no max-pool),
stem and base width 16, one stage, no teacher. Global batch 256 with one BatchNorm group of 256,
pad-4 random crop + horizontal flip, CIFAR mean/std, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8),
no weight decay, the learning rate decayed linearly to 0 per iteration over the run, plain
cross-entropy; EDE (IR-Net) over the run's epochs. 200 epochs; ``--config.train.epochs=2`` is
the CPU run of the README.

Larq Zoo models: quicknet (larq-zoo's QuickNet) and densenet28 (BinaryDenseNet28), as
configs/larq_zoo.py builds them, on the same protocol, adapted to 32×32 as the ResNets are, with
``model.cifar_stem``: QuickNet's stem runs its two stride-2 convolutions at stride 1, and
BinaryDenseNet28 gets larq-zoo's own stem for small inputs (one 3×3/1 convolution, no pooling), so
the 32×32 image enters the first stage as the 56×56 map after the ImageNet stem does; widths a
quarter of ImageNet's, as the ResNets' 16 for 64: QuickNet's section_filters (16, 32, 64, 128),
BinaryDenseNet28's initial_filters 16 and growth_rate 16 (its transitions then round to 32, 32
and 64 channels, as larq-zoo's rounding to multiples of 32 does). Their BatchNorms normalise over
the whole batch of 256 (one group; larq-zoo's models take no ``bn_group_size``), Keras' momentum
and epsilon as larq-zoo's layers set them.

``<method>_bop`` (e.g. ``birealnet_r18_bop``): the same run with the binary kernels trained by
Bop (larq's ``CaseOptimizer(Bop, default_optimizer=Adam)``; ±1 from the start, no latent
weights): threshold 1e-8, gamma 1e-4, gamma ×0.1 half way (epoch 100 of 200), as Helwegen et
al.'s CIFAR-10 runs (1e-4, ×0.1 every 100 epochs); everything else (real convolutions, BatchNorm,
PReLU, head) keeps the protocol's Adam and schedule.
"""
from bnn_jax.config import cifar10, default_config, load_config

# method -> the recipe whose fully binary model it trains
METHODS = {"irnet_r18": "irnet_r18", "birealnet_r18": "birealnet_r18",
           "reactnet_r18": "reactnet_r18_step2", "strong_baseline": "strong_baseline_step2"}
# Larq Zoo method -> (configs/larq_zoo.py model, its widths on this protocol)
LARQ_ZOO = {"quicknet": ("quicknet", dict(section_filters=(16, 32, 64, 128))),
            "densenet28": ("densenet28", dict(initial_filters=16, growth_rate=16))}


# optimizer variant -> what it changes in the optimizer section
VARIANTS = {"bop": dict(binary=dict(name="bop", threshold=1e-8, gamma=1e-4, schedule=dict(
    name="step", by_epoch=True, milestones=(100,), gamma=0.1, warmup_steps=0)))}


def get_config(method="birealnet_r18"):
  name, variant = method, None
  for suffix in VARIANTS:
    if method.endswith(f"_{suffix}"):
      name, variant = method[:-len(suffix) - 1], suffix
  if name not in METHODS and name not in LARQ_ZOO:
    raise ValueError(f"configs/cifar10_short.py takes one of {sorted(METHODS) + sorted(LARQ_ZOO)}, "
                     f"alone or with a suffix of {[f'_{v}' for v in VARIANTS]} (e.g. "
                     f"birealnet_r18_bop), not {method!r}")
  method = name
  c = default_config()
  if method in LARQ_ZOO:
    model, widths = LARQ_ZOO[method]
    recipe = load_config(f"larq_zoo:{model}")
    c.model = recipe.model
    c.model.update(num_classes=10, cifar_stem=True, **widths)
  else:
    recipe = load_config(METHODS[method])
    c.model = recipe.model
    c.model.update(num_classes=10, cifar_stem=True, stem_channels=16, base_channels=16,
                   binary_type=(True, True), bn_group_size=256)
  c.dataset = cifar10()
  c.optimizer.update(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  c.schedule.update(name="poly", power=1.0, by_epoch=False, min_lr=0.0)
  c.ede.enabled = recipe.ede.enabled  # over the whole run
  c.train.update(epochs=200, batch_size=256, log_every=50)
  if variant:
    c.optimizer.update(VARIANTS[variant])  # nested dicts update the sections field by field
  return c
