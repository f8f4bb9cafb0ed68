"""Failures a user meets, and what each does: another model's (or model configuration's)
checkpoint, a resume with another config, two runs in one workdir, a damaged latest checkpoint, a
non-finite state or metric, a failed save, labels outside the model's classes, Ctrl-C, and user
errors as one line."""
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnn_jax import data, packed
from bnn_jax.checkpoint import CheckpointError, Checkpoints, config_json, differences, model_check
from bnn_jax.config import default_config, load_config
from bnn_jax.errors import ConfigError
from bnn_jax.evaluate import evaluate_checkpoint, print_report
from bnn_jax.experiment import Experiment
from bnn_jax.export import export, written_atomically
from bnn_jax.losses import topk_correct
from bnn_jax.report import Reporter
from bnn_jax.train import Interrupted, NonFiniteLoss, _load_from, train_and_evaluate
from bnn_jax.workdir import LOCK_NAME, Lock, WorkdirInUse

from conftest import REPO
from helpers import digits_config, random_state


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
  with pytest.raises(CheckpointError, match=r"holds another model configuration than this config's "
                                            r"\(BiRealNet-18\); checkpoint -> config: model.arch "
                                            r"'ReActNet-18' -> 'BiRealNet-18'; train.load_from may"):
    train_and_evaluate(follower, str(tmp_path / "follower"))
  assert not (tmp_path / "follower").exists()  # a failed start leaves no workdir behind


def half_binary(config):
  other = config.copy_and_resolve_references()
  other.model.binary_type = (True, False)  # every tensor fits: only what the weights mean differs
  return other


def test_evaluate_export_and_a_teacher_refuse_another_model_configuration(digits_run, tmp_path):
  config, workdir, _ = digits_run
  differs = (r"another model configuration than {}; checkpoint -> config: model.binary_type "
             r"\(True, True\) -> \(True, False\)")
  with pytest.raises(CheckpointError, match=differs.format(r"the config's \(ReActNet-18\)")):
    evaluate_checkpoint(half_binary(config), workdir)
  with pytest.raises(CheckpointError, match=differs.format(r"the config's \(ReActNet-18\)")):
    export(half_binary(config), workdir, str(tmp_path / "model.npz"))
  assert not any(tmp_path.iterdir())  # nothing written, no temporary file left
  student = digits_config()
  student.loss.kd_weight = 1.0
  student.teacher.model = half_binary(config).model
  student.teacher.checkpoint = workdir
  with pytest.raises(CheckpointError, match=differs.format(r"the teacher \(ReActNet-18\)")):
    Experiment.from_config(student).load_teacher()
  runtime = config.copy_and_resolve_references()
  runtime.model.update(dtype="bfloat16", bn_group_size=4)  # how it computes, not what it is
  model_check(config_json(runtime.model), "bfloat16")("46", Checkpoints(workdir, read_only=True).meta())


def test_load_from_takes_another_binarisation_and_refuses_another_layout(digits_run, tmp_path, capsys):
  """A later stage binarises the same weights otherwise (logged); strides change what they mean."""
  config, workdir, _ = digits_run
  follower = half_binary(config)
  follower.optimizer.binary = default_config().optimizer.binary  # real weights: no Bop
  experiment = Experiment.from_config(follower)
  tx, _ = experiment.make_optimizer(23, 46)
  state = random_state(experiment, tx)  # drawn on the host: no init compiled
  reporter = Reporter(str(tmp_path), 23, 2, progress=False)
  loaded = _load_from(experiment, state, workdir, reporter)
  assert "model changed: model.binary_type (True, True) -> (True, False)" in capsys.readouterr().out
  np.testing.assert_array_equal(loaded.params["head"]["fc"]["kernel"],
                                Checkpoints(workdir, read_only=True).saved_tree(None, None)[1]
                                ["params"]["head"]["fc"]["kernel"])
  follower.model.strides = (1, 2, 2, 2)
  with pytest.raises(CheckpointError, match=r"model.strides \(1, 2, 2, 1\) -> \(1, 2, 2, 2\); "
                                            r"train.load_from may change only model.binary_type"):
    _load_from(Experiment.from_config(follower), state, workdir, reporter)


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
  assert second.took_over == f"a run that is gone (pid {finished.stdout.strip()} on {socket.gethostname()})"
  second.release()
  # Another host (a shared file system): alive while it beats, stale once silent.
  lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
  with pytest.raises(WorkdirInUse, match="on elsewhere"):
    Lock(str(tmp_path)).acquire()
  os.utime(lock_file, (time.time() - 600, time.time() - 600))
  third = Lock(str(tmp_path))
  third.acquire()
  assert third.took_over == "a run that is gone (pid 1 on elsewhere)"
  third.release()


@pytest.mark.parametrize("content", ["", "garbage", "[1, 2]", '{"pid": "abc", "host": 1}',
                                     '{"pid": -1, "host": "h", "started": 0}'])
def test_a_lock_that_names_no_owner_is_refused_while_new_and_taken_over_once_old(tmp_path, content):
  """What a crash between the lock's creation and its write leaves (or any garbage)."""
  lock_file = tmp_path / LOCK_NAME
  lock_file.write_text(content)
  with pytest.raises(WorkdirInUse, match=r"in use by another run \(one that is starting: its lock "
                                         r"is not written yet\)"):
    Lock(str(tmp_path)).acquire()
  os.utime(lock_file, (time.time() - 60, time.time() - 60))
  lock = Lock(str(tmp_path))
  lock.acquire()
  assert lock.took_over == "a run that is gone (its lock names no owner: empty or garbage)"
  lock.release()
  assert not lock_file.exists()


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


def test_a_failed_save_stops_the_run_at_once(digits_run, tmp_path, monkeypatch):
  def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
  config = digits_run[0]  # its compiled steps
  with pytest.raises(CheckpointError, match=r"saving step 23 .* \(\[Errno 28\] No space left on "
                                            r"device\); no checkpoint was saved, so there is "
                                            r"nothing to resume"):
    train_and_evaluate(config, str(tmp_path / "run"))  # at the first save, not after the run
  assert not (tmp_path / "run").exists()


def test_reading_checkpoints_logs_nothing(digits_run, caplog):
  """Orbax warns three times about every read-only manager; evaluate and export make one."""
  Checkpoints(digits_run[1], read_only=True).meta()
  assert not caplog.records


NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000")  # TensorFlow's and XLA's start-up


def cli_env():
  """A tool's environment: this repository, and this session's compilation cache (a tool that
  trains or evaluates the digits run loads its compiled steps instead of compiling them)."""
  return dict(os.environ, PYTHONPATH=str(REPO),
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def error_lines(stderr: str):
  return [line for line in stderr.splitlines() if line and not line.startswith(NOISE)]


def cli_error(*args, env=None, shell=""):
  """(exit status, stderr lines but start-up noise) of a tool (a module) or a script (a .py);
  ``shell`` runs first in a bash that then runs the tool (``ulimit …``)."""
  command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]
  if shell:
    command = ["bash", "-c", f'{shell} && exec "$@"', "bash", *command]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env or cli_env())
  return result.returncode, error_lines(result.stderr)


def digits_flags(config):
  """The flags that make ``configs/quickstart.py`` the digits run's config."""
  changed = differences(config_json(load_config("quickstart")), config_json(config))
  return [f"--config.{field}={value if isinstance(value, str) else repr(value)}"
          for field, (_, value) in changed.items()]


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
            "no config file"),
           (["bnn_jax.bops", "--config=configs/birealnet_r18.py", "--shape=-5"], "not a positive"),
           (["bnn_jax.bops", "--config=configs/birealnet_r18.py", "--shape=0"], "not a positive"),
           (["bnn_jax.export", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
             f"--out={tmp_path / 'no' / 'model.npz'}"], "No such file or directory"),
           (["scripts/benchmark.py", "--config", "configs/no_such_recipe.py"], "no config file")]
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
  from bnn_jax import data, packed
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
  from bnn_jax import data, packed
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


def resumable_copy(workdir, tmp_path) -> pathlib.Path:
  """A copy of the digits run as it was after its first epoch (its checkpoint at step 23)."""
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "46")
  return copy


def test_a_resume_with_another_config_is_refused_unless_allowed_and_the_old_one_kept(
    digits_run, tmp_path, capsys):
  config, workdir, _ = digits_run
  run = resumable_copy(workdir, tmp_path)
  bigger = config.copy_and_resolve_references()
  bigger.train.batch_size, bigger.optimizer.lr = 32, 1e-3
  with pytest.raises(CheckpointError, match=r"another config, and resuming would mix two runs; "
                                            r"checkpoint -> this config: optimizer.lr 0.002 -> 0.001; "
                                            r"train.batch_size 64 -> 32; .* --allow_config_change"):
    train_and_evaluate(bigger, str(run))
  # Allowed: logged, the run's config kept. This change (a standard deviation of 0: every input
  # ±inf) keeps the compiled step and stops the run at its first log, after the checkpoint.
  infinite = config.copy_and_resolve_references()
  infinite.dataset.std = (0.0,)
  with pytest.raises(NonFiniteLoss, match=r"loss became nan by step 25; stopping; the last good "
                                          r"checkpoint, step 23, is intact in "):
    train_and_evaluate(infinite, str(run), allow_config_change=True)
  assert "config changed at step 23: dataset.std (127.5,) -> (0.0,)" in capsys.readouterr().out
  assert json.loads((run / "config.step23.json").read_text()) == config_json(config)
  assert json.loads((run / "config.json").read_text()) == config_json(infinite)
  assert Checkpoints(str(run), read_only=True).steps() == [23]


def test_ctrl_c_saves_at_the_next_step_and_exits_with_one_line(digits_run, tmp_path):
  config, workdir, _ = digits_run
  run = resumable_copy(workdir, tmp_path)
  process = subprocess.Popen(
      [sys.executable, "-m", "bnn_jax.train", "--config=configs/quickstart.py", f"--workdir={run}",
       *digits_flags(config)], cwd=REPO, env=cli_env(), text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE)
  lines = []
  for line in process.stdout:  # the handler is in place before the run says where it resumes
    lines.append(line)
    if line.startswith("resuming from step 23"):
      process.send_signal(signal.SIGINT)
  out, err = "".join(lines), process.stderr.read()  # a few lines: its pipe never fills
  assert process.wait(timeout=60) == 1, out + err
  assert "Ctrl-C: saving step 24, then stopping (Ctrl-C again stops at once)" in out, err
  assert error_lines(err) == [f"error: Ctrl-C: saved step 24 to {run}/checkpoints; rerun the same "
                              "command to resume"]
  assert Checkpoints(str(run), read_only=True).steps() == [23, 24]


def test_ctrl_c_twice_stops_at_once_without_saving(digits_run, tmp_path, monkeypatch):
  config, workdir, _ = digits_run
  run = resumable_copy(workdir, tmp_path)
  real_batches = data.train_batches

  def interrupted_twice(*args, **kwargs):
    for index, batch in enumerate(real_batches(*args, **kwargs)):
      if index == 3:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
      yield batch

  monkeypatch.setattr(data, "train_batches", interrupted_twice)
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(Interrupted, match="Ctrl-C twice: stopped at once, nothing saved"):
    train_and_evaluate(config, str(run))
  assert Checkpoints(str(run), read_only=True).steps() == [23]
  assert signal.getsignal(signal.SIGINT) is handler  # the run's handlers are gone with it


def test_a_full_disk_during_training_is_one_line(digits_run, tmp_path):
  """Orbax logs the failed write's tracebacks from its threads; the user sees one line."""
  env = cli_env() | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}  # reads, never writes
  # Files of at most 256 KiB: a checkpoint's data file is larger, its write fails as on a full disk
  # (at the run's last step, its first).
  code, lines = cli_error("bnn_jax.train", "--config=configs/quickstart.py",
                          f"--workdir={tmp_path / 'run'}", *digits_flags(digits_run[0]),
                          "--config.train.max_steps=1", env=env, shell="ulimit -f 256")
  assert code == 1 and len(lines) == 1, lines
  assert re.match(r"error: saving step 1 to \S+ failed \(File too large.*\); no checkpoint was "
                  r"saved, so there is nothing to resume$", lines[0]), lines
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("syntax", "def get_config(:\n", r"syntax\.py, line 1: invalid syntax"),
    ("raises", "def get_config():\n  raise ValueError('no such stage')\n",
     r"raises\.py: get_config\(\) raised ValueError: no such stage"),
    ("none", "def get_config():\n  pass\n", r"none\.py: get_config\(\) returned None, not an"),
    ("dict", "def get_config():\n  return {}\n", r"dict\.py: get_config\(\) returned dict, not an"),
    ("empty", "", r"empty\.py has no get_config\(\)")])
def test_a_bad_config_file_is_one_line(tmp_path, name, text, expected):
  path = tmp_path / f"{name}.py"
  path.write_text(text)
  with pytest.raises(ConfigError, match=expected):
    load_config(str(path))
  if name in ("syntax", "none"):  # the two ways ml_collections fails: its parse, and its value
    code, lines = cli_error("bnn_jax.train", f"--config={path}", f"--workdir={tmp_path / 'run'}")
    assert code == 1 and len(lines) == 1 and re.search(expected, lines[0]), lines


def image_folder(root: pathlib.Path, classes_per_split) -> pathlib.Path:
  """``root/<split>/<class>/0.png``: one small RGB image per class."""
  from PIL import Image
  for split, classes in classes_per_split.items():
    for name in classes:
      (root / split / name).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / name / "0.png")
  return root


def test_data_that_does_not_fit_the_config_is_one_line(tmp_path):
  config = digits_config()
  config.dataset.update(name="image_folder", path=str(image_folder(
      tmp_path / "a", {"train": ["cat", "dog"], "test": ["cat", "dog", "owl"]})))
  with pytest.raises(data.DataError, match=r"different class folders \(train lacks \['owl'\]\); "
                                           "labels are numbered over all of them"):
    data.open_source(config.dataset, "test")
  config.dataset.path = str(image_folder(tmp_path / "b", {"train": ["cat", "dog", "owl"]}))
  with pytest.raises(ConfigError, match=r"image_folder images have 3 channel\(s\), but dataset.mean "
                                        r"has 1 value\(s\) and dataset.std 1: give each 3"):
    data.open_source(config.dataset, "train")  # the quickstart's grayscale normalisation
  config.dataset.update(mean=(0.0,) * 3, std=(1.0,) * 3)
  config.model.num_classes = 2
  with pytest.raises(data.DataError, match=r"split 'train' has 3 classes \(labels 0-2\), more than "
                                           r"the model's model.num_classes=2"):
    Experiment.from_config(config).source("train")


def test_top_k_never_counts_a_label_outside_the_classes_or_a_nan_logit():
  logits = jnp.array([[1.0, 2.0, 3.0]] * 4 + [[3.0, jnp.nan, 1.0]])
  labels = jnp.array([2, 5, -1, 3, 1])
  np.testing.assert_array_equal(topk_correct(logits, labels, 1), [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(topk_correct(logits, labels, 3), [1, 0, 0, 0, 0])


def test_a_non_finite_metric_is_null_in_json_and_said(tmp_path, capsys):
  metrics = {"loss": math.nan, "top1": 0.25, "top5": 0.5, "num_examples": 8, "step": 46}
  with pytest.raises(SystemExit) as stopped:
    print_report(metrics, as_json=True)
  assert stopped.value.code == 1
  out, err = capsys.readouterr()
  assert json.loads(out.splitlines()[-1]) == metrics | {"loss": None}
  assert err.splitlines() == ["error: eval loss not finite (nan) at step 46: some logits are NaN or "
                              "infinite, so this is no valid result"]
  reporter = Reporter(str(tmp_path), 23, 2, progress=False)
  reporter.scalars(46, "eval", {"loss": math.inf, "top1": 0.25})
  assert "step 46: eval loss not finite (inf); written as null" in capsys.readouterr().out
  assert reporter.history() == [{"step": 46, "split": "eval", "loss": None, "top1": 0.25}]


def test_export_writes_a_whole_file_or_none(tmp_path):
  out = tmp_path / "model.npz"
  out.write_bytes(b"an earlier export")
  with pytest.raises(ConfigError, match=r"^cannot write \S+model.npz: No space left on device$"):
    with written_atomically(str(out)) as temporary:
      with open(temporary, "wb") as f:
        f.write(b"half a file")
        raise OSError(28, "No space left on device")
  assert out.read_bytes() == b"an earlier export" and os.listdir(tmp_path) == ["model.npz"]
  with written_atomically(str(out)) as temporary:
    pathlib.Path(temporary).write_bytes(b"a new export")
  assert out.read_bytes() == b"a new export" and os.listdir(tmp_path) == ["model.npz"]


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory nothing can be written to: chmod, and for root (whom chmod does not stop) chattr."""
  path = tmp_path / "read_only"
  path.mkdir()
  path.chmod(0o555)
  immutable = bool(shutil.which("chattr")) and subprocess.run(
      ["chattr", "+i", str(path)], capture_output=True).returncode == 0
  try:
    (path / "probe").touch()
  except OSError:
    pass
  else:
    pytest.skip("no way to make a read-only directory here")
  yield path
  if immutable:
    subprocess.run(["chattr", "-i", str(path)], check=True)
  path.chmod(0o755)


def test_export_to_a_read_only_directory_is_one_line(digits_run, read_only_dir):
  with pytest.raises(ConfigError, match=r"^cannot write \S+read_only/model.npz: (Permission denied|"
                                        r"Operation not permitted)$"):
    export(digits_run[0], digits_run[1], str(read_only_dir / "model.npz"))


def test_loading_a_bad_file_names_it_and_what_is_wrong(tmp_path):
  """One line each, and never numpy's advice to load an untrusted file "unsafely"."""
  np.savez(tmp_path / "not_a_model.npz", w=np.zeros(3))
  np.savez(tmp_path / "pickled.npz", model=np.array([{"code": "runs"}], dtype=object))
  (tmp_path / "garbage.npz").write_bytes(os.urandom(300))
  (tmp_path / "truncated.npz").write_bytes((tmp_path / "not_a_model.npz").read_bytes()[:100])
  expected = {"garbage.npz": r"\(it is no .npz archive\)",
              "not_a_model.npz": r"\(it has no \['input_shape', 'model'\]\)",
              "pickled.npz": r"\(it holds a pickled object, which is never unpickled\)",
              "truncated.npz": r"\(BadZipFile: File is not a zip file\)"}
  for name, reason in expected.items():
    path = tmp_path / name
    with pytest.raises(ConfigError, match=f"^{path} is not a packed model file of bnn_jax.export "
                                          f"{reason}$") as error:
      packed.load(str(path))
    assert "pickle=" not in str(error.value) and "\n" not in str(error.value)
  with pytest.raises(ConfigError, match="^no packed model file "):
    packed.load(str(tmp_path / "missing.npz"))
