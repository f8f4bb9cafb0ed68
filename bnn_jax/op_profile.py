"""Where a jitted program's time goes, op by op, from XLA's own trace (``jax.profiler``).

Each HLO instruction's self time per call (its trace events less the events nested in them), with
the Flax module that emitted it (the instruction's ``op_name`` metadata, e.g.
``Classifier/backbone/quant_conv2d_3/...``) and, for a custom call, its target: what
``scripts/benchmark_packed.py --layers`` tabulates per layer.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from typing import Callable, Dict, List, Tuple

import jax
from jax.profiler import ProfileData

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OVERHEAD = ("ThunkExecutor", "ThreadpoolListener", "end: ")  # the runtime's, not an op's


@dataclasses.dataclass(frozen=True)
class Op:
  instruction: str  # the HLO instruction, e.g. "fusion.12" or "ffi_call.3"
  module: str  # the emitting module's path below the jitted function, e.g. "backbone/conv1"
  primitive: str  # the JAX primitive it came from, e.g. "conv_general_dilated"
  target: str  # a custom call's target ("" otherwise)
  seconds: float  # per call


def _instructions(hlo_text: str) -> Dict[str, Tuple[str, str, str]]:
  """{instruction: (module path, primitive, custom call target)} of a compiled HLO module."""
  found = {}
  for line in hlo_text.splitlines():
    name = _INSTRUCTION.match(line)
    if not name:
      continue
    op_name = _OP_NAME.search(line)
    parts = op_name.group(1).split("/")[1:] if op_name else []  # drop "jit(<fn>)"
    if parts and parts[0][:1].isupper():  # the top module's class name ("Classifier")
      parts = parts[1:]
    target = _TARGET.search(line)
    found[name.group(1)] = ("/".join(parts[:-1]), parts[-1] if parts else "",
                            target.group(1) if target else "")
  return found


def _self_times(events) -> Dict[str, int]:
  """{event name: nanoseconds} on one thread, each event less the events nested in it."""
  totals = collections.Counter()
  stack: List[list] = []  # [end_ns, name, self_ns]
  for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
    while stack and event.start_ns >= stack[-1][0]:
      _, name, own = stack.pop()
      totals[name] += own
    if stack:
      stack[-1][2] -= event.duration_ns
    stack.append([event.end_ns, event.name, event.duration_ns])
  for _, name, own in stack:
    totals[name] += own
  return totals


def profile(fn: Callable, *args, repeats: int = 10) -> List[Op]:
  """The ops of ``fn(*args)`` (a jitted function) with their mean self time per call, costliest
  first; ``fn`` is compiled and run once before the ``repeats`` traced calls."""
  jax.block_until_ready(fn(*args))
  instructions = _instructions(fn.lower(*args).compile().as_text())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    data = ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0])
  nanoseconds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name != "python":
        nanoseconds.update(_self_times(line.events))
  ops = [Op(name, *instructions[name], seconds=ns / repeats / 1e9)
         for name, ns in nanoseconds.items()
         if name in instructions and not name.startswith(_OVERHEAD)]
  return sorted(ops, key=lambda op: -op.seconds)
