"""High-Capacity Expert Binary Networks, trained in stages as the official code (``main.py``) runs.

    python scripts/run_recipe.py hcebnn --workdir workdirs/hcebnn            # ImageNet
    python scripts/run_recipe.py hcebnn_cifar10 --workdir workdirs/hcebnn_cifar10
    python -m bnn_jax.train --config configs/hcebnn.py:binary --workdir DIR \
        --config.train.load_from=EXPANSION_DIR --config.teacher.checkpoint=REAL_DIR  # one stage

The argument is ``STAGE`` or ``STAGE,DATASET``:

- ``real``: real activations and weights (every expert conv uses expert 0);
- ``binary_activations``: binary activations, real weights, expert 0 only (``--use-only-first``);
- ``expansion``: expert 0 copied into every expert (``train.load_transform``), gate trained;
- ``binary``: binary activations and weights, the final model; weight decay 0 (main.py sets it
  to 0 whenever weights are binary);
- ``released``: the released ImageNet inference model (softmax gate; its checkpoint converts
  with ``python -m bnn_jax.convert``), for evaluation.

DATASET is ``imagenet`` (default: the released configuration, 224×224), ``cifar10`` (32×32,
widths 64 to 512, 100 epochs) or ``digits`` (8×8, widths 32 to 128 after a 3×3/1 stem: the
reduced recipe that runs on a CPU in minutes).

main.py's defaults: AdamW, lr 1e-3, weight decay 1e-2, 90 epochs of 256 (8 GPUs under DDP:
BatchNorm over 32), learning rate ×0.1 at epochs 40, 70 and 80 of MultiStepLR, which main.py
steps at the *start* of each epoch, so each decay reaches one epoch earlier: milestones 39, 69,
79 here. From the second stage on, KD from the ``real`` stage, whose BatchNorm stays in train
mode (the teacher is never put in eval mode): the logit match 1000·KL(teacher ‖ student) with
``reduction="mean"`` (over examples *and* classes: kd_weight = 1000 / classes, the same
gradients, a loss lower by the teacher's constant entropy) and attention matching 1000·Σ over
stages 2–4 of the mean squared difference of L2-normalised attention maps (at_weight = 3·1000
over the mean of three maps). The paper's exact per-stage schedules are not in the code.
"""
from bnn_jax import durations
from bnn_jax.config import cifar10, default_config, digits

STAGES = ("real", "binary_activations", "expansion", "binary", "released")
DATASETS = ("imagenet", "cifar10", "digits")
# The released model (test/test.py) and its training-code equivalent.
IMAGENET_MODEL = dict(backbone="EBResNet", arch="HCEBNN", num_classes=1000,
                      structure=(1, 2, 6, 2), groups=(4, 8, 8, 16), expansion=(2, 2, 2, 2),
                      num_experts=4, gate="sigmoid", use_se=True, g_layer=True, downsample_ratio=4,
                      stem="dabnn", bn_group_size=32)
SMALL_MODELS = {
    "cifar10": dict(num_classes=10, structure=(1, 1, 2, 1), expansion=(1, 1, 1, 1),
                    groups=(2, 4, 4, 8)),
    "digits": dict(num_classes=10, structure=(1, 1, 1, 1), expansion=(0.5, 0.5, 0.25, 0.25),
                   groups=(2, 4, 4, 8), stem="cifar", stem_channels=32, bn_group_size=None),
}
KD_WEIGHT, AT_WEIGHT = 1000.0, 1000.0  # main.py's --lab-match-w, --att-transfer-weighting


def _stage_model(c, stage: str) -> None:
  binary_weights = stage in ("binary", "released")
  c.model.update(binary_type=(stage != "real", binary_weights),
                 use_only_first=stage == "binary_activations")
  if stage == "released":
    c.model.update(gate="softmax", released_form=True)


def get_config(argument="binary"):
  stage, _, dataset = argument.partition(",")
  dataset = dataset or "imagenet"
  if stage not in STAGES or dataset not in DATASETS:
    raise ValueError(f"configs/hcebnn.py takes STAGE[,DATASET] with STAGE in {STAGES} and "
                     f"DATASET in {DATASETS}, not {argument!r}")
  c = default_config()
  c.model.update(**IMAGENET_MODEL)
  c.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.0 if stage in ("binary", "released")
                     else 1e-2)
  c.schedule.update(name="step", milestones=(39, 69, 79), gamma=0.1)
  c.train.update(epochs=90, batch_size=256)
  if dataset == "cifar10":  # 100 epochs, the milestones the same fractions of the run (43, 76, 87)
    durations.rescale_run(c, cifar10(), epochs=100, batch_size=256)
    c.model.update(**SMALL_MODELS["cifar10"])
    c.train.log_every = 50
  elif dataset == "digits":
    c.dataset = digits()
    c.model.update(**SMALL_MODELS["digits"])
    c.schedule.update(name="cosine", by_epoch=False)
    c.optimizer.lr = 2e-3
    # 8 epochs per stage; 16 for the fully binary one (90.00% top-1 against 82.50% after 8).
    c.train.update(epochs=16 if stage == "binary" else 8, batch_size=64, eval_batch_size=360,
                   log_every=5, eval_every_epochs=4, checkpoint_every_epochs=4, max_to_keep=1)
  _stage_model(c, stage)
  if stage == "expansion":
    c.train.load_transform = "expand_experts"
  if stage in ("binary_activations", "expansion", "binary"):
    c.teacher.model = c.model.copy_and_resolve_references()
    _stage_model(c.teacher, "real")
    c.teacher.batchnorm = "batch"
    stages = ("layer2", "layer3", "layer4")  # their outputs (last blocks): main.py's indicator 0 1 1 1
    c.loss.update(kd_weight=KD_WEIGHT / c.model.num_classes, at_weight=AT_WEIGHT * len(stages),
                  attention_blocks=stages, attention_norm="l2")
  return c
