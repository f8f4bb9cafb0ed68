"""BOPs, FLOPs, parameters and model size, read off the jaxpr of ``model.apply``.

    python -m bnn_jax.bops --config configs/birealnet_r18.py [--shape 224] [--json] [--plot FILE.png]

Nothing is hooked and nothing is compiled or run: :func:`analyze` traces the
apply function with ``jax.make_jaxpr`` on abstract inputs (batch 1) and walks the
jaxpr, sub-jaxprs included (jit, custom_vjp/custom_jvp, remat, scan, cond). A
value is *binary* when it comes from a sign: the ``sign`` primitive, or a select
between two constants (``where(x >= 0, 1, -1)``, what every estimator of
:mod:`bnn_jax.binarize` computes in its forward), possibly scaled by a
broadcast per-channel factor, reshaped or cast. So it works for any Flax model,
a user's own sign estimator included.

Counting follows the papers and the original: a conv's MACs are output elements
· (Cin / groups) · kh · kw (padding included); a conv or matmul with both
operands binary counts as BOPs, with both real as FLOPs, with one of each as
*mixed* (binary activations with real weights: step 1 of two-step training).
OPs = BOPs / 64 + FLOPs. Normalisation, activations, pooling and elementwise
ops are not counted.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from bnn_jax.models import abstract_variables


class Precision(enum.Enum):
  CONST = "const"  # a literal or a value computed from literals alone
  BINARY = "binary"  # ±1 (times a broadcast scale)
  REAL = "real"


@dataclasses.dataclass(frozen=True)
class Value:
  """What the walk knows of one jaxpr variable."""
  precision: Precision
  source_size: int  # elements before the last broadcast: a per-channel scale is smaller than its target
  params: FrozenSet[int] = frozenset()  # parameter leaves it is computed from (empty once from_input)
  from_input: bool = False


@dataclasses.dataclass
class Layer:
  name: str
  kind: str  # conv | dense
  input_shape: Sequence[int]
  kernel_shape: Sequence[int]
  output_shape: Sequence[int]
  macs: int
  input_precision: str
  kernel_precision: str
  params: int = 0  # the parameters its kernel is computed from (every expert of an expert conv)

  @property
  def bits(self) -> int:
    """Its kernel's storage: 1 bit per binary parameter, 32 per real one."""
    return self.params * (1 if self.kernel_precision == "binary" else 32)

  @property
  def counted_as(self) -> str:
    binary = (self.input_precision == "binary", self.kernel_precision == "binary")
    return "bops" if all(binary) else "mixed" if any(binary) else "flops"


@dataclasses.dataclass
class Report:
  layers: List[Layer]
  params: int
  binary_params: int

  def total(self, counted_as: str) -> int:
    return sum(layer.macs for layer in self.layers if layer.counted_as == counted_as)

  @property
  def bops(self) -> int:
    return self.total("bops")

  @property
  def flops(self) -> int:
    return self.total("flops")

  @property
  def mixed(self) -> int:
    return self.total("mixed")

  @property
  def ops(self) -> float:
    return self.bops / 64 + self.flops

  @property
  def size_bytes(self) -> float:
    """Binary weights at 1 bit, every other parameter at 32."""
    return (self.binary_params + 32 * (self.params - self.binary_params)) / 8

  @property
  def compression(self) -> float:
    return 4 * self.params / self.size_bytes if self.params else 1.0

  @property
  def binary_mac_share(self) -> float:
    total = self.bops + self.flops + self.mixed
    return self.bops / total if total else 0.0

  def as_dict(self) -> Dict[str, Any]:
    return {"bops": self.bops, "flops": self.flops, "mixed": self.mixed, "ops": self.ops,
            "params": self.params, "binary_params": self.binary_params,
            "real_params": self.params - self.binary_params, "size_bytes": self.size_bytes,
            "compression": self.compression, "binary_mac_share": self.binary_mac_share,
            "layers": [dataclasses.asdict(layer) | {"counted_as": layer.counted_as,
                                                    "bits": layer.bits} for layer in self.layers]}


# --- The walk ------------------------------------------------------------------------

# Ops whose single result is its (first) operand rearranged, cast or scaled by nothing new.
_SHAPE_OPS = frozenset({
    "convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "pad", "slice", "rev", "copy", "copy_p", "stop_gradient", "neg",
    "reduce_precision", "optimization_barrier"})
# Elementwise ops that keep a (broadcast) scale a scale (mul and div: :func:`_scaled`).
_SCALE_PRESERVING = frozenset({"abs", "exp2", "pow", "round", "log", "sqrt", "rsqrt"})


def _size(aval) -> int:
  return int(np.prod(aval.shape)) if hasattr(aval, "shape") else 1


def _sub_jaxprs(eqn):
  """(jaxpr, consts, repeat) for each sub-jaxpr an equation calls, with how often it runs."""
  name = eqn.primitive.name
  if name == "cond":
    return [(b.jaxpr, b.consts, 1) for b in eqn.params["branches"]]
  if name == "while":
    return [(eqn.params["body_jaxpr"].jaxpr, eqn.params["body_jaxpr"].consts, 1)]
  repeat = eqn.params.get("length", 1) if name == "scan" else 1
  found = []
  for param in eqn.params.values():
    if isinstance(param, core.ClosedJaxpr):
      found.append((param.jaxpr, param.consts, repeat))
    elif isinstance(param, core.Jaxpr):
      found.append((param, (), repeat))
  return found


def _clean_name(stack: str) -> str:
  """'Classifier/backbone/layer2.0/layer2.0.shortcut/downsample/0' -> 'backbone/layer2.0/downsample/0'."""
  # Drop the top-level module's class name, transformation markers (``vmap()``) and einsum specs.
  parts = [p for p in stack.split("/") if p and not p.endswith("()") and "->" not in p][1:]
  kept = []
  for part in parts:
    if kept and part.startswith(kept[-1] + "."):
      continue  # a method call on the module before it (``layer2.0.shortcut``)
    kept.append(part)
  return "/".join(kept)


@dataclasses.dataclass
class _Equation:
  """One equation as a handler sees it: its arguments' Values and its outputs."""
  eqn: Any
  args: List[Value]

  @property
  def first(self) -> Value:
    return self.args[0]

  def value(self, precision: Precision, source_size=None, aval=None) -> Value:
    """An output Value: computed from the arguments' parameters unless one came from the input."""
    aval = self.eqn.outvars[0].aval if aval is None else aval
    from_input = any(a.from_input for a in self.args)
    params = frozenset() if from_input else frozenset().union(*(a.params for a in self.args))
    return Value(precision, _size(aval) if source_size is None else source_size, params, from_input)

  def outputs(self, precision: Precision, source_size=None) -> List[Value]:
    return [self.value(precision, source_size, v.aval) for v in self.eqn.outvars]

  def smallest_source(self) -> int:
    return min(a.source_size for a in self.args)


def _real_unless_const(precision: Precision) -> Precision:
  return precision if precision is not Precision.CONST else Precision.REAL


def _real(e: _Equation) -> List[Value]:
  return e.outputs(Precision.REAL)


def _sign(e: _Equation) -> List[Value]:
  return [e.value(Precision.BINARY)]


def _select(e: _Equation) -> List[Value]:
  """where(x >= 0, 1, -1): a choice between constants is a sign."""
  if all(a.precision is Precision.CONST for a in e.args[1:]):
    return [e.value(Precision.BINARY)]
  return _real(e)


def _indexed(e: _Equation) -> List[Value]:
  """Elements of the first operand, wherever the indices come from (an expert gate)."""
  first = e.first
  return [Value(_real_unless_const(first.precision), _size(e.eqn.outvars[0].aval), first.params,
                first.from_input)]


def _rearranged(e: _Equation) -> List[Value]:
  """The first operand reshaped, cast, padded…: same precision; a broadcast keeps its source size."""
  source = e.first.source_size
  if e.eqn.primitive.name == "broadcast_in_dim":
    source = min(source, _size(e.eqn.invars[0].aval))
  return [e.value(_real_unless_const(e.first.precision), source)]


def _scaled(e: _Equation) -> List[Value]:
  """±1 times a per-channel (or scalar) scale, or ±1 · ±1, stays binary."""
  size = _size(e.eqn.outvars[0].aval)
  binary = [a for a in e.args if a.precision is Precision.BINARY]
  others = [a for a in e.args if a.precision is not Precision.BINARY]
  if binary and all(o.precision is Precision.CONST or o.source_size < size for o in others):
    return [e.value(Precision.BINARY)]
  return [e.value(Precision.REAL, e.smallest_source())]


def _joined(e: _Equation) -> List[Value]:
  if all(a.precision is Precision.BINARY for a in e.args):
    return [e.value(Precision.BINARY)]
  return _real(e)


def _scale_kept(e: _Equation) -> List[Value]:
  """A real result that is still as small as its smallest operand (a scale stays a scale)."""
  return e.outputs(Precision.REAL, e.smallest_source())


# How each primitive changes what the walk knows (anything else: a real value). Constants in,
# constants out; convolutions and dot products are counted (:meth:`_Walker.count`).
_HANDLERS: Dict[str, Callable[[_Equation], List[Value]]] = {
    **{prim: _scale_kept for prim in _SCALE_PRESERVING},
    **{prim: _rearranged for prim in _SHAPE_OPS},
    "sign": _sign, "select_n": _select, "gather": _indexed, "dynamic_slice": _indexed,
    "mul": _scaled, "div": _scaled, "concatenate": _joined, "stack": _joined,
}


class _Walker:
  def __init__(self, param_sizes: Sequence[int]):
    self.param_sizes = param_sizes
    self.layers: List[Layer] = []
    self.binary_param_ids: set = set()

  def read(self, env, atom) -> Value:
    if isinstance(atom, core.Literal):
      return Value(Precision.CONST, _size(atom.aval))
    return env.get(atom, Value(Precision.REAL, _size(atom.aval)))

  def walk(self, jaxpr, inputs: Sequence[Value], consts: Sequence[Any] = (), prefix: str = "",
           repeat: int = 1) -> List[Value]:
    env = {v: Value(Precision.CONST, _size(v.aval)) for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, inputs))
    for eqn in jaxpr.eqns:
      args = [self.read(env, a) for a in eqn.invars]
      name = prefix + str(eqn.source_info.name_stack)
      outputs = self.equation(eqn, args, name, repeat)
      env.update(zip(eqn.outvars, outputs))
    return [self.read(env, v) for v in jaxpr.outvars]

  def walk_apart(self, jaxpr, inputs, consts, prefix, repeat) -> Tuple[List[Layer], List[Value]]:
    """(the layers it counts, its outputs) of a sub-jaxpr, without adding them to the report."""
    outer, self.layers = self.layers, []
    try:
      outputs = self.walk(jaxpr, inputs, consts, prefix, repeat)
      return self.layers, outputs
    finally:
      self.layers = outer

  def equation(self, eqn, args: List[Value], name: str, repeat: int) -> List[Value]:
    equation = _Equation(eqn, args)
    subs = [] if _is_tap_conv(eqn) else _sub_jaxprs(eqn)
    if subs:
      # A cond runs one of its branches: keep the costliest. Other calls have one sub-jaxpr.
      walked = [self.walk_apart(sub, args[len(args) - len(sub.invars):], consts,
                                name + "/" if name else "", repeat * times)
                for sub, consts, times in subs]
      layers, results = max(walked, key=lambda w: sum(layer.macs for layer in w[0]))
      self.layers.extend(layers)
      if len(results) == len(eqn.outvars):
        return results
      return equation.outputs(Precision.REAL)
    prim = eqn.primitive.name
    if prim in ("conv_general_dilated", "dot_general") or _is_tap_conv(eqn):
      self.count(eqn, args, name, repeat)
      return equation.outputs(Precision.REAL)
    if prim != "sign" and all(a.precision is Precision.CONST for a in args):
      return equation.outputs(Precision.CONST)
    return _HANDLERS.get(prim, _real)(equation)

  def count(self, eqn, args: List[Value], name: str, repeat: int) -> None:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
      per_output = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
      kind = "conv"
    elif _is_tap_conv(eqn):  # depthwise (k, k, C, M): k² taps per output; else HWIO
      per_output = rhs.shape[0] * rhs.shape[1] * (
          1 if eqn.params["name"] == "depthwise_conv" else rhs.shape[2])
      kind = "conv"
    else:
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      per_output = math.prod(lhs.shape[d] for d in lhs_contract)
      kind = "dense"
    # Which operand is the kernel: the one computed from parameters alone.
    kernel_index = 1 if not args[1].from_input or args[0].from_input else 0
    inputs, kernel = args[1 - kernel_index], args[kernel_index]
    operands = (lhs, rhs)
    input_aval, kernel_aval = operands[1 - kernel_index], operands[kernel_index]

    def own_params(operand: Value, aval) -> set:
      """The parameters an operand is: of its size, or a whole number of them (experts); not the
      per-channel scales or statistics it may also be computed from."""
      return {i for i in operand.params if self.param_sizes[i] % _size(aval) == 0}

    self.layers.append(Layer(
        _clean_name(name), kind, tuple(input_aval.shape), tuple(kernel_aval.shape),
        tuple(out.shape), repeat * _size(out) * per_output,
        _real_unless_const(inputs.precision).value, _real_unless_const(kernel.precision).value,
        params=sum(self.param_sizes[i] for i in own_params(kernel, kernel_aval))))
    for operand, aval in ((inputs, input_aval), (kernel, kernel_aval)):
      if operand.precision is Precision.BINARY and not operand.from_input:
        self.binary_param_ids.update(own_params(operand, aval))


def _is_tap_conv(eqn) -> bool:
  """Whether ``eqn`` calls bnn_jax.layers.cpu_kernels' depthwise_conv or small_input_conv
  (shifted taps, no convolution primitive: counted as the convolution each computes)."""
  return eqn.primitive.name in ("pjit", "jit") and eqn.params.get("name") in (
      "depthwise_conv", "small_input_conv")


def analyze(apply_fn: Callable, variables: Any, input_shape: Sequence[int],
            input_dtype=jnp.float32) -> Report:
  """Costs of ``apply_fn(variables, images)`` on one image, read off its jaxpr.

  Args:
    apply_fn: ``(variables, images) -> logits``, e.g. ``model.apply`` in eval mode.
    variables: arrays or ``jax.ShapeDtypeStruct`` stand-ins (``jax.eval_shape``): the function
      is only traced. Leaves under ``params`` count as parameters.
    input_shape: NHWC; the batch is taken as 1.
    input_dtype: the images' dtype.
  Returns:
    A :class:`Report`: per-layer MACs by precision (binary, mixed, real), BOPs, FLOPs, parameter
    counts and the model's size at 1 bit per binary parameter.
  """
  input_shape = (1, *tuple(input_shape)[1:])
  images = jax.ShapeDtypeStruct(input_shape, input_dtype)
  closed = jax.make_jaxpr(apply_fn)(variables, images)
  param_leaves = jax.tree_util.tree_leaves(variables.get("params", variables)
                                           if isinstance(variables, dict) else variables)
  all_leaves = jax.tree_util.tree_leaves(variables)
  param_ids = {id(leaf) for leaf in param_leaves}
  inputs = []
  sizes = []
  for index, leaf in enumerate(all_leaves):
    sizes.append(_size(leaf))
    inputs.append(Value(Precision.REAL, _size(leaf),
                        frozenset({index}) if id(leaf) in param_ids else frozenset()))
  inputs.append(Value(Precision.REAL, _size(images), frozenset(), from_input=True))
  walker = _Walker(sizes)
  walker.walk(closed.jaxpr, inputs, closed.consts)
  return Report(walker.layers, params=sum(_size(p) for p in param_leaves),
                binary_params=sum(sizes[i] for i in walker.binary_param_ids))


def analyze_model(model, input_shape: Sequence[int]) -> Report:
  """:func:`analyze` of a Flax classifier (:func:`bnn_jax.models.build_model`) in eval mode, from
  shapes alone: ``input_shape`` NHWC (batch taken as 1). Returns a :class:`Report`."""
  variables = abstract_variables(model, (1, *tuple(input_shape)[1:]))
  return analyze(lambda v, x: model.apply(v, x, train=False), variables, input_shape)


# --- Report --------------------------------------------------------------------------


def _human(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3f}{unit}"
  return f"{n:.0f}"


def format_report(report: Report, title: str = "") -> str:
  """The per-layer table (with each kernel's parameters and storage bits) and the totals, as
  larq.models.summary shows them."""
  rows = [f"{'layer':<44} {'kind':<5} {'input':<18} {'kernel':<18} {'params':>9} {'bits':>10} "
          f"{'MACs':>10}  precision"]
  for layer in report.layers:
    rows.append(f"{layer.name:<44} {layer.kind:<5} {str(layer.input_shape):<18} "
                f"{str(layer.kernel_shape):<18} {layer.params:>9,} {_human(layer.bits):>10} "
                f"{_human(layer.macs):>10}  "
                f"{layer.input_precision} x {layer.kernel_precision} -> {layer.counted_as}")
  totals = [
      f"BOPs    {report.bops:>16,}  ({_human(report.bops)})",
      f"FLOPs   {report.flops:>16,}  ({_human(report.flops)})",
      f"mixed   {report.mixed:>16,}  ({_human(report.mixed)}; binary x real MACs, not in OPs)",
      f"OPs     {report.ops:>16,.0f}  ({_human(report.ops)} = BOPs/64 + FLOPs)",
      f"params  {report.params:>16,}  (binary {report.binary_params:,}, "
      f"real {report.params - report.binary_params:,})",
      f"size    {report.size_bytes / 2**20:>15.2f}M  bytes (binary weights at 1 bit; "
      f"{report.compression:.1f}x smaller than float32)",
      f"binary share of MACs {report.binary_mac_share:.1%}",
  ]
  return "\n".join(([title] if title else []) + rows + [""] + totals)


def plot(report: Report, path: str) -> None:
  """A bar chart per layer of BOPs (binary and mixed) and FLOPs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  names = [layer.name or f"#{i}" for i, layer in enumerate(report.layers)]
  colours = {"bops": "tab:blue", "mixed": "tab:orange", "flops": "tab:red"}
  fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(names)), 5))
  ax.bar(range(len(names)), [layer.macs for layer in report.layers],
         color=[colours[layer.counted_as] for layer in report.layers])
  ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
  ax.set_ylabel("MACs")
  ax.set_yscale("log")
  ax.legend(handles=[Patch(color=colour, label=label) for label, colour in
                     (("BOPs", colours["bops"]), ("mixed", colours["mixed"]), ("FLOPs", colours["flops"]))])
  ax.set_title(f"BOPs {_human(report.bops)}, FLOPs {_human(report.flops)}, OPs {_human(report.ops)}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  from absl import flags

  from bnn_jax import cli
  from bnn_jax.models import build_model

  config = cli.config_flag("A config file; its model is analysed.")
  shape = flags.DEFINE_integer("shape", None, "Input height and width (default: the config's).",
                               lower_bound=1)
  as_json = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
  plot_path = flags.DEFINE_string("plot", None, "Write a per-layer bar chart to this PNG.")

  def body():
    size = shape.value or config.value.dataset.image_size
    report = analyze_model(build_model(config.value.model),
                           (1, size, size, len(config.value.dataset.mean)))
    if plot_path.value:
      plot(report, plot_path.value)
    if as_json.value:
      print(json.dumps(report.as_dict()))
    else:
      print(format_report(report, f"{config.value.model.arch} at {size}x{size}"))

  cli.run(body, required=(config,))


if __name__ == "__main__":
  main()
