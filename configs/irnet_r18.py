"""IR-Net ResNet-18 on ImageNet (Qin et al., CVPR 2020), the original's recipe: 8 GPUs × 128
images (BatchNorm over each GPU's 128), OpenCV resizing.

EDE is on, as the paper and the original's README describe. The original's code never
registers its EDE hook, so its logged run most likely trained with k = 10, t = 0.1 fixed:
``--config.ede.enabled=False`` reproduces that.
"""
from bnn_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(backbone="ResArch", arch="IRNet-18", stem_act="hardtanh", neck="gap_bn",
                 bn_group_size=128)
  c.optimizer.update(name="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=1e-4)
  c.schedule.update(name="step", milestones=(30, 60, 90), warmup="linear", warmup_steps=2500,
                    warmup_ratio=0.25)
  c.ede.update(enabled=True, span_epochs=100)
  c.train.update(epochs=100, batch_size=1024)
  return c
