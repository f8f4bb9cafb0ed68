"""The package's import graph: no module imports one that imports it back, and each imports alone."""
import ast
import os
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "bnn_jax")


def modules():
  """{module name: file} for every module of the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def top_level_imports(name: str, path: str, known) -> set:
  """The package modules ``name`` imports when it is imported (module level, not in functions).

  Importing ``a.b.c`` runs ``a`` and ``a.b`` first; a module's own parent packages are left out
  (a submodule importing a sibling through its package is not a cycle)."""
  tree = ast.parse(open(path).read())
  targets = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      targets |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
  imported = set()
  for target in targets:
    parts = target.split(".")
    imported |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(known)
  own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
  return imported - own_parents - {name}


def test_the_import_graph_has_no_cycle():
  known = modules()
  graph = {name: top_level_imports(name, path, known) for name, path in known.items()}
  state, cycles = {}, []

  def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(trail[trail.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, trail + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, cycles
  assert "bnn_jax.experiment" not in graph["bnn_jax.convert"]  # the circle this test was written for


def test_every_module_imports_on_its_own():
  """Each module imported first, in a fresh set of package modules (third-party ones stay loaded)."""
  script = (
      "import importlib, sys\n"
      f"names = {sorted(modules())!r}\n"
      "failed = []\n"
      "for name in names:\n"
      "  for loaded in [m for m in sys.modules if m == 'bnn_jax' or m.startswith('bnn_jax.')]:\n"
      "    del sys.modules[loaded]\n"
      "  try:\n"
      "    importlib.import_module(name)\n"
      "  except Exception as error:\n"
      "    failed.append(f'{name}: {error!r}')\n"
      "print('\\n'.join(failed) or 'ok')\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "ok", (
      result.stdout[-3000:] + result.stderr[-3000:])
