"""Failures a user meets, and what each does: another model's checkpoint, two runs in one workdir,
a damaged latest checkpoint, a non-finite state, a failed save, and user errors as one line."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnn_jax.checkpoint import CheckpointError, Checkpoints
from bnn_jax.evaluate import evaluate_checkpoint
from bnn_jax.experiment import Experiment
from bnn_jax.train import NonFiniteLoss, train_and_evaluate
from bnn_jax.workdir import LOCK_NAME, Lock, WorkdirInUse

from conftest import REPO
from helpers import digits_config


def other_model(config, arch="BiRealNet-18"):
  other = config.copy_and_resolve_references()
  other.model.arch = arch  # Bi-Real's parameters are a subset of ReActNet's
  return other


def test_evaluate_teacher_and_load_from_refuse_another_models_checkpoint(digits_run, tmp_path):
  config, workdir, _ = digits_run
  with pytest.raises(CheckpointError, match=r"another model \(ReActNet-18\) than the config's "
                                            r"\(BiRealNet-18\): unexpected"):
    evaluate_checkpoint(other_model(config), workdir)
  student = digits_config()
  student.loss.kd_weight = 1.0
  student.teacher.model = other_model(config).model
  student.teacher.checkpoint = workdir
  with pytest.raises(CheckpointError, match=r"than the teacher \(BiRealNet-18\)"):
    Experiment.from_config(student).load_teacher()
  follower = other_model(config)
  follower.train.load_from = workdir
  with pytest.raises(CheckpointError, match="load_from .* holds another model"):
    train_and_evaluate(follower, str(tmp_path / "follower"))
  assert not (tmp_path / "follower").exists()  # a failed start leaves no workdir behind


def test_a_second_run_in_a_locked_workdir_is_refused_and_a_dead_owners_lock_taken_over(tmp_path):
  first = Lock(str(tmp_path))
  first.acquire()
  with pytest.raises(WorkdirInUse, match=f"pid {os.getpid()} on {socket.gethostname()}"):
    Lock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / LOCK_NAME).exists()
  # A crashed run on this host: its process is gone.
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
  lock_file = tmp_path / LOCK_NAME
  lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(finished.stdout),
                                   "started": time.time()}))
  second = Lock(str(tmp_path))
  second.acquire()
  assert second.took_over["pid"] == int(finished.stdout)
  second.release()
  # Another host (a shared file system): alive while it beats, stale once silent.
  lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
  with pytest.raises(WorkdirInUse, match="on elsewhere"):
    Lock(str(tmp_path)).acquire()
  os.utime(lock_file, (time.time() - 600, time.time() - 600))
  third = Lock(str(tmp_path))
  third.acquire()
  assert third.took_over["host"] == "elsewhere"
  third.release()


def damage_latest(workdir) -> pathlib.Path:
  """A copy of ``workdir`` whose latest step lost its state's data files."""
  copy = pathlib.Path(workdir).parent / (pathlib.Path(workdir).name + "_damaged")
  shutil.copytree(workdir, copy)
  state = copy / "checkpoints" / "46" / "state"
  for path in state.rglob("*"):
    if path.is_file() and "metadata" not in path.name.lower():
      path.unlink()
  return copy


def test_resume_and_evaluate_fall_back_past_a_damaged_latest_step(digits_run, capsys):
  config, workdir, _ = digits_run
  damaged = damage_latest(workdir)
  metrics = evaluate_checkpoint(config, str(damaged))
  assert metrics["step"] == 23
  assert capsys.readouterr().out.count("skipping checkpoint step 46") == 1
  assert (damaged / "checkpoints" / "46").is_dir()  # evaluation changes nothing
  with pytest.raises(CheckpointError, match="checkpoint step 46 .* cannot be restored"):
    evaluate_checkpoint(config, str(damaged), step=46)  # that step, asked for: one line
  resumed = train_and_evaluate(config, str(damaged))  # resumes at 23, trains to 46 again
  assert (damaged / "checkpoints" / "46.damaged").is_dir()  # set aside, not deleted
  assert Checkpoints(str(damaged), read_only=True).steps() == [23, 46]
  assert resumed["top1"] == pytest.approx(digits_run[2]["top1"])


def test_a_non_finite_state_is_never_saved(tmp_path):
  config = digits_config(max_steps=1)
  config.optimizer.update(name="sgd", lr=float("inf"), momentum=0.0)  # the first update is inf
  config.schedule.name = "constant"
  with pytest.raises(NonFiniteLoss, match="non-finite by step 1; not saved"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints" / "1").exists()


def test_a_failed_save_stops_the_run_at_once(tmp_path, monkeypatch):
  def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
  config = digits_config(epochs=3, checkpoint_every_epochs=1)
  with pytest.raises(CheckpointError, match="saving step 23 .* No space left on device"):
    train_and_evaluate(config, str(tmp_path / "run"))  # at the first save, not after the run


NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000")  # TensorFlow's and XLA's start-up


def cli_error(*args):
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  lines = [line for line in result.stderr.splitlines() if line and not line.startswith(NOISE)]
  return result.returncode, lines


@pytest.mark.parametrize("args, expected", [
    (["--config.train.epoch=3"], "Did you mean \"epochs\""),
    (["--config.train.batch_size=0"], "must be positive, not 0"),
    (["--config.dataset.name=image_folder", "--config.dataset.path={flat}"], "no images in class folders"),
    (["--workdir={file}"], "is a file, not a directory"),
])
def test_train_user_errors_end_in_one_line(tmp_path, args, expected):
  (tmp_path / "flat" / "train").mkdir(parents=True)
  (tmp_path / "flat" / "train" / "0.jpg").write_bytes(b"\xff\xd8\xff")
  (tmp_path / "a_file").write_text("")
  places = {"flat": tmp_path / "flat", "file": tmp_path / "a_file"}
  args = [a.format(**places) for a in args]
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'run'}"]
  code, lines = cli_error("bnn_jax.train", "--config=configs/quickstart.py", *workdir, *args)
  assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert not (tmp_path / "run").exists()


def test_other_tools_user_errors_end_in_one_line(tmp_path):
  cases = [(["bnn_jax.train", "--config=configs/no_such_recipe.py", f"--workdir={tmp_path}"],
            "No such file"),
           (["bnn_jax.bops", "--config=configs/birealnet_r18.py", "--shape=-5"], "not a positive"),
           (["bnn_jax.bops", "--config=configs/birealnet_r18.py", "--shape=0"], "not a positive")]
  (tmp_path / "garbage.pth").write_bytes(os.urandom(300))
  saved = tmp_path / "real.npz"
  np.savez(saved, w=np.zeros(3))
  (tmp_path / "truncated.npz").write_bytes(saved.read_bytes()[:100])
  for name in ("garbage.pth", "truncated.npz"):
    cases.append((["bnn_jax.convert", "--config=configs/resnet18.py",
                   f"--torch-checkpoint={tmp_path / name}", f"--out={tmp_path / 'out'}"],
                  "not a readable checkpoint"))
  for args, expected in cases:
    code, lines = cli_error(*args)
    assert code == 1 and len(lines) == 1 and expected in lines[0], (args, lines)
    assert "weights_only=False" not in lines[0]


def image_folder_with_bad_files(root: pathlib.Path, truncated: bool = True) -> pathlib.Path:
  """train/<class>/ with 8 good PNGs, one garbage file and (``truncated``) a truncated PNG."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for index in range(8):
    folder = root / "train" / f"class{index % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{index}.png")
  (root / "train" / "class0" / "garbage.jpg").write_bytes(b"this is no image")
  good = (root / "train" / "class1" / "1.png").read_bytes()
  if truncated:
    (root / "train" / "class1" / "truncated.png").write_bytes(good[:40])
  return root


def bad_images_config(root, policy):
  config = digits_config()
  config.dataset.update(name="image_folder", path=str(root), image_size=8, augment="none",
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bad_images=policy)
  return config.dataset


def test_bad_images_are_skipped_and_named_once(tmp_path, capsys):
  from bnn_jax import data
  dataset = bad_images_config(image_folder_with_bad_files(tmp_path), "skip")
  source = data.open_source(dataset, "train")
  assert source.num_examples == 10
  stream = data.train_batches(source, dataset, 4, seed=0, steps=3)
  batches = [next(stream) for _ in range(6)]  # two epochs of 3 full batches
  assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
  epoch = np.concatenate([b["image"] for b in batches[:3]])
  assert len({x.tobytes() for x in epoch}) == 8  # the 8 good images, the fill repeats them
  out = capsys.readouterr().out
  assert out.count("skipping an undecodable image") == 1 and "garbage.jpg" in out  # once, not per epoch


def test_bad_images_fail_at_once_naming_the_file(tmp_path):
  from bnn_jax import data
  dataset = bad_images_config(image_folder_with_bad_files(tmp_path / "a", truncated=False), "fail")
  source = data.open_source(dataset, "train")
  with pytest.raises(data.DataError, match=r"^undecodable image \S*garbage\.jpg \(dataset.bad_images"):
    list(data.eval_batches(source, dataset, 4))
  # A file that starts as a PNG but is cut short: TensorFlow's reason, in one line.
  (tmp_path / "a" / "train" / "class0" / "garbage.jpg").unlink()
  (tmp_path / "a" / "train" / "class1" / "cut.png").write_bytes(
      (tmp_path / "a" / "train" / "class1" / "1.png").read_bytes()[:40])
  source = data.open_source(dataset, "train")
  with pytest.raises(data.DataError, match=r"^an image could not be decoded \(Invalid PNG"):
    list(data.train_batches(source, dataset, 4, seed=0, steps=2))
