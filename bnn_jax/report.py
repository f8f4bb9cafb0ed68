"""What a person sees of a run: progress bar, epoch lines, TensorBoard, metrics.jsonl, a PNG.

Only process 0 writes. ``metrics.jsonl`` in the workdir keeps the whole history
across resumes; the PNG is redrawn from it at the end of a run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax


def is_writer() -> bool:
  return jax.process_index() == 0


# What every train summary has besides the values of the step's schedules.
TRAIN_MEANS = ("loss", "top1", "top5", "images_per_s")


def finite(values: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
  """``values`` with each NaN or infinite number as None (JSON has neither), and their names:
  what a report must say instead of printing them silently."""
  bad = [name for name, value in values.items()
         if isinstance(value, float) and not math.isfinite(value)]
  return {name: None if name in bad else value for name, value in values.items()}, bad


class Reporter:
  """Process 0's view of a run of ``epochs`` epochs of ``steps_per_epoch`` steps."""

  def __init__(self, workdir: str, steps_per_epoch: int, epochs: int, progress: bool = True):
    self.workdir = workdir
    self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
    self.progress = progress and is_writer()
    self.bar = None
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if is_writer():
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def log(self, message: str) -> None:
    if not is_writer():
      return
    if self.bar is not None:
      self.bar.write(message)
    else:
      print(message, flush=True)

  def advance(self, step: int) -> None:
    """Step ``step`` is done: moves the epoch's progress bar (opened at the epoch's first step)."""
    if not self.progress:
      return
    if self.bar is None:
      from tqdm import tqdm
      epoch, done = divmod(step - 1, self.steps_per_epoch)
      self.bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}",
                      unit="step", dynamic_ncols=True, leave=False, file=sys.stdout)
    self.bar.update(1)

  def show(self, **values) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

  def end_epoch(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def epoch_line(self, step: int, train: Dict[str, float], evaluation: Optional[Dict[str, float]],
                 images_per_s: float) -> None:
    """One line per epoch: train loss and top-1, every scheduled value by name, the evaluation
    when there was one, the epoch's training throughput."""
    scheduled = "".join(f" {name} {value:.3g}" for name, value in train.items()
                        if name not in TRAIN_MEANS)
    line = (f"epoch {step / self.steps_per_epoch:.4g}/{self.epochs} step {step}: train loss "
            f"{train['loss']:.4f} top-1 {train['top1']:.2%}{scheduled}")
    if evaluation:
      line += (f" | eval loss {evaluation['loss']:.4f} top-1 {evaluation['top1']:.2%} "
               f"top-5 {evaluation['top5']:.2%}")
    self.log(f"{line} | {images_per_s:.0f} img/s")

  def scalars(self, step: int, prefix: str, values: Dict[str, float]) -> None:
    """TensorBoard scalars and one line of metrics.jsonl (a non-finite value as null, and said)."""
    if not is_writer():
      return
    for name, value in values.items():
      self.writer.add_scalar(f"{prefix}/{name}", value, global_step=step)
    self.writer.flush()
    clean, bad = finite(values)
    if bad:
      self.log(f"step {step}: {prefix} {', '.join(bad)} not finite ({values[bad[0]]}); "
               "written as null to metrics.jsonl")
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")

  def history(self) -> List[dict]:
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_history(self, step: int) -> None:
    """Drops records past ``step``: what a resumed run will log again."""
    if is_writer() and os.path.exists(self.metrics_path):
      kept = [r for r in self.history() if r["step"] <= step]
      with open(self.metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def plot(self, filename: str = "curves.png") -> Optional[str]:
    """Loss, accuracy, learning rates, the flip ratios (where the model has binary kernels) and
    the other scheduled values (EDE's k and t, Bop's gamma and threshold) against step, as a PNG
    in the workdir."""
    records = self.history()
    if not is_writer() or not records:
      return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split, key):
      rows = [(r["step"], r[key]) for r in records if r["split"] == split and r.get(key) is not None]
      return [s for s, _ in rows], [v for _, v in rows]

    train_keys = {key for r in records if r["split"] == "train" for key in r}
    rates = sorted(k for k in train_keys if k == "lr" or k.startswith("lr/"))
    flips = sorted(k for k in train_keys if k.startswith("flip_ratio"))
    others = sorted(train_keys - set(TRAIN_MEANS) - {"step", "split"} - set(rates) - set(flips))
    fig, axes = plt.subplots(1, 5 if flips else 4, figsize=(22 if flips else 18, 4))
    for split in ("train", "eval"):
      axes[0].plot(*series(split, "loss"), label=split, marker="o" if split == "eval" else None)
      axes[1].plot(*series(split, "top1"), label=f"{split} top-1", marker="o" if split == "eval" else None)
    for key in rates:
      axes[2].plot(*series("train", key), label=key if len(rates) > 1 else None)
    for key in flips:  # the share of binary weights flipped per step, on a log scale
      axes[4].plot(*series("train", key), label=key, linewidth=2 if key == "flip_ratio" else 1)
    if flips:
      axes[4].set_yscale("log")
    for key in others:
      axes[3].plot(*series("train", key), label=key)
    if not others:
      axes[3].text(0.5, 0.5, "nothing else scheduled", ha="center", va="center",
                   transform=axes[3].transAxes)
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate", "other scheduled values",
                                "flip ratio (per step)")):
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    for ax in axes:
      if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(self.workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
