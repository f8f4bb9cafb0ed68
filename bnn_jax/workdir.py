"""A run's workdir: checked and created for the run, locked for its lifetime, and removed again
when the run fails before it saved anything.

The lock is ``<workdir>/.lock`` (JSON: host, pid, start time), created exclusively by process 0
and touched every ``HEARTBEAT_S`` seconds while the run lives. A second run in the same workdir
fails at once naming the owner. A lock whose owner is dead (same host: no such process; any
host, e.g. on a shared file system: no heartbeat for ``STALE_S`` seconds) is taken over, and so
is a lock that names no owner (empty or garbage: a crash between its creation and its write)
once it is ``UNWRITTEN_S`` seconds old.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from typing import Iterator, Optional

import jax

from bnn_jax.errors import ConfigError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0
UNWRITTEN_S = 10.0  # far longer than a live run takes to write the lock it just created


class WorkdirInUse(ConfigError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _read_owner(lock_path: str) -> Optional[dict]:
  """The owner a lock names ({host, pid, started}), or None: vanished, half-written or garbage."""
  try:
    with open(lock_path) as f:
      owner = json.load(f)
  except (OSError, ValueError):
    return None
  fields = {"host": str, "pid": int, "started": (int, float)}
  if not isinstance(owner, dict) or not all(isinstance(owner.get(k), t) for k, t in fields.items()):
    return None
  return owner if owner["pid"] > 0 else None  # os.kill(0 or -1) would signal a whole group


def _is_stale(lock_path: str, owner: Optional[dict], stale_s: float) -> bool:
  try:
    silent_for = time.time() - os.path.getmtime(lock_path)
  except OSError:
    return True
  if owner is None:
    return silent_for > UNWRITTEN_S
  dead_here = owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"])
  return dead_here or silent_for > stale_s


def _live_owner(owner: Optional[dict]) -> str:
  if owner is None:
    return "one that is starting: its lock is not written yet"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))
  return f"pid {owner['pid']} on {owner['host']}, started {started}"


def _describe(owner: Optional[dict]) -> str:
  if owner is None:
    return "a run that is gone (its lock names no owner: empty or garbage)"
  return f"a run that is gone (pid {owner['pid']} on {owner['host']})"


class Lock:
  """The exclusive lock of one workdir (see the module's docstring)."""

  def __init__(self, directory: str, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
    self.path = os.path.join(directory, LOCK_NAME)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
    self._stop = threading.Event()
    self._beat: Optional[threading.Thread] = None
    self.took_over: Optional[str] = None  # whose lock this one replaced, in words

  def acquire(self) -> None:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      with os.fdopen(fd, "w") as f:
        json.dump(self.owner, f)
    except FileExistsError:
      other = _read_owner(self.path)
      if not _is_stale(self.path, other, self.stale_s):
        raise WorkdirInUse(f"{os.path.dirname(self.path)} is in use by another run "
                           f"({_live_owner(other)}); wait for it, or use another --workdir") from None
      temporary = f"{self.path}.{self.owner['host']}.{self.owner['pid']}"
      with open(temporary, "w") as f:
        json.dump(self.owner, f)
      os.replace(temporary, self.path)  # atomic: the stale lock becomes ours
      self.took_over = _describe(other)
    self._beat = threading.Thread(target=self._heartbeat, daemon=True)
    self._beat.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    self._stop.set()
    if self._beat is not None:
      self._beat.join()
    if _read_owner(self.path) == self.owner:  # never remove a lock another run took over
      with contextlib.suppress(OSError):
        os.remove(self.path)


def _saved_any(directory: str) -> bool:
  """Whether the run saved a checkpoint step (``checkpoints/<step>``) in ``directory``."""
  checkpoints = os.path.join(directory, "checkpoints")
  return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))


@contextlib.contextmanager
def claim(directory: str) -> Iterator[Optional[Lock]]:
  """The workdir of a run, checked, created and locked (process 0) for the ``with`` block.

  A block that fails before anything was checkpointed removes a workdir it created (process 0
  does), so a failed start leaves nothing behind.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ConfigError(f"--workdir {directory} is a file, not a directory")
  created = not os.path.exists(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"cannot create --workdir {directory}: {error.strerror}") from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {directory} is not writable")
  lock = Lock(directory) if jax.process_index() == 0 else None
  try:
    if lock is not None:
      lock.acquire()
    yield lock
  except BaseException:
    if created and lock is not None and not _saved_any(directory):  # process 0 cleans up
      lock.release()
      lock = None
      shutil.rmtree(directory, ignore_errors=True)
    raise
  finally:
    if lock is not None:
      lock.release()
