"""larq-zoo's Real-to-Binary multi-stage recipe (``multi_stage_experiments.py`` ``TrainR2B``), one
config per stage, by larq-zoo's model names:

    python scripts/run_recipe.py larq_zoo_real_to_binary --workdir DIR

- ``resnet_fp``: the real ResNet-18 teacher, Keras' SGD (no momentum) at 0.1 on larq-zoo's cosine
  with a 5-epoch warmup from 0, 100 epochs of 512;
- ``r2b_fp`` (teacher ``resnet_fp``) and ``r2b_ban`` (teacher ``r2b_fp``): Keras' Adam at 1e-3 on
  ``R2BStepSchedule`` (``schedule.name="keras_step"``: 5 warmup epochs, ×0.3 after epochs 40, 60
  and 70), 75 epochs of 256; cross-entropy + 3 · output matching + 30 · attention matching of
  the outputs of blocks 2 to 9;
- ``r2b_bnn`` (teacher ``r2b_ban``, initialised from it): ``TrainR2BBNNAlternative``, the stage
  ``TrainR2B`` runs: Adam at 2e-4 on the cosine with a 10-epoch warmup, cross-entropy + 0.8 ·
  output matching (temperature 1), no attention matching, the binary kernels clipped to [-1, 1]
  (larq's ``WeightClip``).

Output matching is Keras' KL divergence of clipped probabilities (``loss.kd_loss="keras_kl"``),
attention matching divides by the maximum with TensorFlow's tie gradient (``"max_tf"``); the
teacher runs in inference mode (its layers are frozen, so Keras' BatchNorm uses its moving
statistics). larq-zoo's L2(1e-5) kernel regularizer of the resnet_fp, r2b_fp and r2b_ban models is
weight decay 2e-5 added to the gradient (Keras' L2 is 1e-5·Σw², not halved), here on every
parameter but BatchNorm's, so also on the PReLU slopes, the conv biases of resnet_fp and the
classifier, which larq-zoo leaves out. As QuickNet's recipe (configs/larq_zoo.py),
``train.drop_last`` runs the floor(N / batch) steps per epoch larq-zoo's schedules count.
larq-zoo's file calls these steps an example of its multi-stage machinery, not how its released
RealToBinaryNet weights (65.01%) were trained.
"""
from bnn_jax.config import load_config
from bnn_jax.errors import ConfigError

ATTENTION_VOLUMES = tuple(f"block_{b}_out" for b in range(2, 10))
L2_AS_DECAY = dict(weight_decay=2e-5, norm_decay_mult=0.0)
KERAS_ADAM = dict(name="keras_adam", b1=0.9, b2=0.999, eps=1e-7)
R2B_STEP = dict(name="keras_step", warmup_epochs=5.0, milestones=(40, 60, 70), gamma=0.3)
MATCHING = dict(ce_weight=1.0, kd_weight=3.0, at_weight=30.0, temperature=1.0,
                attention_blocks=ATTENTION_VOLUMES, attention_norm="max_tf", kd_loss="keras_kl")

# stage -> (configs/larq_zoo.py model, teacher stage, the sections larq-zoo's phase sets)
STAGES = {
    "resnet_fp": ("resnet18_fp", None, dict(
        optimizer=dict(name="keras_sgd", lr=0.1, momentum=0.0, nesterov=False, **L2_AS_DECAY),
        schedule=dict(name="keras_cosine", warmup_epochs=5.0),
        train=dict(epochs=100, batch_size=512))),
    "r2b_fp": ("real_to_binary_fp", "resnet_fp", dict(
        optimizer=dict(lr=1e-3, **KERAS_ADAM, **L2_AS_DECAY), schedule=R2B_STEP, loss=MATCHING,
        train=dict(epochs=75, batch_size=256))),
    "r2b_ban": ("real_to_binary_ban", "r2b_fp", dict(
        optimizer=dict(lr=1e-3, **KERAS_ADAM, **L2_AS_DECAY), schedule=R2B_STEP, loss=MATCHING,
        train=dict(epochs=75, batch_size=256))),
    "r2b_bnn": ("real_to_binary", "r2b_ban", dict(
        optimizer=dict(lr=2e-4, weight_decay=0.0, binary=dict(clip=1.0), **KERAS_ADAM),
        schedule=dict(name="keras_cosine", warmup_epochs=10.0),
        loss=dict(MATCHING, kd_weight=0.8, at_weight=0.0),
        train=dict(epochs=75, batch_size=256))),
}


def get_config(stage: str = "r2b_fp"):
  if stage not in STAGES:
    raise ConfigError(f"unknown Real-to-Binary stage {stage!r}; valid: {list(STAGES)}")
  model, teacher, sections = STAGES[stage]
  c = load_config(f"larq_zoo:{model}")
  if teacher:
    c.teacher.model = load_config(f"larq_zoo:{STAGES[teacher][0]}").model
  for section, fields in sections.items():
    c[section].update(fields)
  c.train.drop_last = True
  return c
