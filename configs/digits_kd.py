"""Knowledge distillation end to end on the embedded digits (offline, CPU): a real ResNet-18
teacher, then ReActNet-18's two steps, each distilled from it.

The objective is Hinton's, CE + KD at temperature 4: on these 1,437 images ReActNet's KD alone
(only_kd, T = 1) ended below the same student trained on labels (92.50% vs 95.28% top-1,
seed 166), while CE + KD at T = 4 did not (README: "Knowledge distillation").

    python scripts/run_recipe.py digits_kd --workdir /tmp/digits-kd

Stages (the argument): ``teacher``, ``step1`` (binary activations, real weights), ``step2``
(fully binary, from step 1). The recipe runner points ``teacher.checkpoint`` and
``train.load_from`` at the sibling stages' workdirs.
"""
from bnn_jax.config import default_config, digits

# The quickstart's network: CIFAR stem for 8×8 inputs, width 16, last stage unstrided.
LAYOUT = dict(backbone="ResArch", num_classes=10, stem_channels=16, base_channels=16,
              strides=(1, 2, 2, 1), cifar_stem=True)
TEACHER = dict(arch="ResNet-18", stem_act="relu", **LAYOUT)


def get_config(stage="step1"):
  if stage not in ("teacher", "step1", "step2"):
    raise ValueError(f"digits_kd stages are teacher, step1, step2; not {stage!r}")
  c = default_config()
  c.dataset = digits()
  c.optimizer.update(name="adam", lr=2e-3)
  c.schedule.update(name="cosine", by_epoch=False)
  c.train.update(epochs=15, batch_size=64, eval_batch_size=360, log_every=5, eval_every_epochs=5,
                 checkpoint_every_epochs=5, max_to_keep=1)
  if stage == "teacher":
    c.model.update(**TEACHER)
    c.train.epochs = 10
    return c
  c.model.update(arch="ReActNet-18", binary_type=(True, stage == "step2"), **LAYOUT)
  c.loss.update(ce_weight=1.0, kd_weight=1.0, temperature=4.0)
  c.teacher.model.update(**TEACHER)
  c.teacher.checkpoint = "workdirs/digits_kd/teacher"
  if stage == "step2":
    c.train.load_from = "workdirs/digits_kd/step1"
  return c
