"""The package's import structure: no import cycles among fmjax's modules, counting imports inside functions (a lazy
import hides a cycle, it does not remove it), and `import fmjax` stays light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

PACKAGE = "fmjax"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
  """Every module of `package` by dotted name -> file; a package is named by its `__init__.py`."""
  out = {}
  for directory, dirs, files in os.walk(os.path.join(root, package)):
    dirs[:] = sorted(d for d in dirs if os.path.isfile(os.path.join(directory, d, "__init__.py")))
    parts = os.path.relpath(directory, root).split(os.sep)
    for name in sorted(files):
      if name.endswith(".py"):
        out[".".join(parts if name == "__init__.py" else [*parts, name[:-3]])] = os.path.join(directory, name)
  return out


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]):
  """Import statements that run when the module is imported: not those inside functions (deliberate lazy imports)
  nor under `if TYPE_CHECKING:`; those inside classes, `if`, `try` and `with` blocks count."""
  for node in body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    elif isinstance(node, ast.If):
      if not _is_type_checking(node.test):
        yield from _module_level_imports(node.body)
      yield from _module_level_imports(node.orelse)
    elif isinstance(node, ast.ClassDef):
      yield from _module_level_imports(node.body)
    elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
      for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
        yield from _module_level_imports(block)
    elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.While)):
      yield from _module_level_imports(node.body)
      yield from _module_level_imports(getattr(node, "orelse", []))


def _all_imports(body: list[ast.stmt]):
  """Every import statement, inside functions too, except under `if TYPE_CHECKING:` (never run)."""
  for node in body:
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      yield from _all_imports(node.orelse)
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.stmt):
        yield from _all_imports([child])
      elif isinstance(child, (ast.excepthandler, ast.match_case)):
        yield from _all_imports(child.body)


def import_graph(root: str = ROOT, package: str = PACKAGE, lazy: bool = True) -> dict[str, set[str]]:
  """module -> the package's modules it imports (`lazy`: inside functions too; else at module level only).
  `from a.b import c` is module a.b.c when that is a submodule, else a.b (its __init__, its own node: importing
  a.b.c does not count as importing a.b here)."""
  mods = modules(root, package)
  graph: dict[str, set[str]] = {m: set() for m in mods}
  for name, path in mods.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    for node in (_all_imports if lazy else _module_level_imports)(tree.body):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join([*anchor, base] if base else anchor)
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
      for target in targets:
        while target and target not in mods and "." in target:  # `import fmjax.x.f` where f is not a module
          target = target.rsplit(".", 1)[0]
        if target in mods and target != name:
          graph[name].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of `graph`, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_graph_resolves_submodules_and_packages():
  graph = import_graph()
  assert "fmjax.data" in graph and "fmjax.data.sources" in graph
  assert "fmjax.errors" in graph["fmjax.data.sources"]  # `from fmjax.errors import UserError`: a name -> the module
  assert "fmjax.data.embedded" in graph["fmjax.data.sources"]  # `from fmjax.data import embedded`: a submodule
  assert "fmjax.data" not in graph["fmjax.data.sources"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_finds_cycles_through_imports_inside_functions(tmp_path):
  """A package shaped like fmjax.data once was: `prepared` imports `sources` at module level, `sources` imports
  `prepared` inside a function (a cycle, which module-level imports alone do not show), then at module level."""
  pkg = tmp_path / "pkg"
  (pkg / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "data" / "__init__.py").write_text("from pkg.data.sources import open_source\n")
  (pkg / "data" / "prepared.py").write_text("from pkg.data.sources import WHERE\n")
  lazy = "WHERE = 1\ndef open_source():\n  from pkg.data.prepared import PreparedSource\n"
  (pkg / "data" / "sources.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "  from pkg.data import prepared\n" + lazy)
  assert find_cycle(import_graph(str(tmp_path), "pkg", lazy=False)) is None
  cycle = find_cycle(import_graph(str(tmp_path), "pkg"))
  assert cycle is not None and set(cycle) == {"pkg.data.prepared", "pkg.data.sources"}
  (pkg / "data" / "sources.py").write_text("WHERE = 1\nif TYPE_CHECKING:\n  from pkg.data import prepared\n")
  assert find_cycle(import_graph(str(tmp_path), "pkg")) is None  # a type-checking import never runs
  (pkg / "data" / "sources.py").write_text("try:\n  from . import prepared\nexcept ImportError:\n  pass\n" + lazy)
  cycle = find_cycle(import_graph(str(tmp_path), "pkg", lazy=False))
  assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.data.prepared", "pkg.data.sources"}


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_import_fmjax_does_not_import_jax():
  code = "import sys, fmjax; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", f"`import fmjax` imported {out.stdout.strip()}; keep its __init__ light"


PARAMETERISATIONS = ("lora", "reft")  # fmjax/adapters/ REGISTRY's names


def _words(path: str) -> set[str]:
  """The lower-cased words of a module: its identifiers and the words of its strings, docstrings included (comments
  are not in the syntax tree)."""
  import re

  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  words: set[str] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      words |= {w.lower() for w in re.findall(r"[A-Za-z]+", node.value)}
    for attr in ("id", "attr", "name", "arg", "asname", "module"):
      value = getattr(node, attr, None)
      if isinstance(value, str):
        words |= {w.lower() for w in re.split(r"[._]", value) if w} | {value.lower()}
  return words


def test_plug_ins_are_named_only_in_their_own_package():
  """A parameterisation is named only under fmjax/adapters/, a loss head only under fmjax/objectives/: the rest of
  the package reads their declarations, not their names."""
  from fmjax import adapters, objectives

  assert set(PARAMETERISATIONS) == set(adapters.REGISTRY)
  heads = set(objectives.REGISTRY) - {"lm", "reward"}  # also common words: lm-eval's `lm`, a reward function
  for module, path in modules().items():
    words = _words(path)
    if not module.startswith("fmjax.adapters"):
      assert not words & set(PARAMETERISATIONS), f"{path} names {sorted(words & set(PARAMETERISATIONS))}"
    if not module.startswith("fmjax.objectives"):
      assert not words & heads, f"{path} names the heads {sorted(words & heads)}"


# The layers, lowest first (README.md's layout map): a module may import its own layer and those below it.
LAYERS = (
    ("core", ("fmjax.errors", "fmjax.checks", "fmjax.version", "fmjax.startup", "fmjax.sharding",
              "fmjax.distributed", "fmjax.topology")),
    ("model", ("fmjax.model", "fmjax.quant", "fmjax.adapters", "fmjax.sample", "fmjax.rl")),
    ("heads", ("fmjax.objectives",)),
    ("data", ("fmjax.data", "fmjax.curation", "fmjax.governance")),
    ("spec", ("fmjax.spec", "fmjax.config_lib")),
    ("train", ("fmjax.train",)),
    ("api", ("fmjax", "fmjax.api", "fmjax.interop", "fmjax.evaluation", "fmjax.main")),
)


def layer_of(module: str) -> int:
  """The index in LAYERS of the longest prefix that names `module`."""
  best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
              if module == p or module.startswith(p + ".")), default=None)
  assert best is not None, f"{module} is in no layer of LAYERS; add it where it belongs"
  return best[1]


def test_no_module_imports_a_higher_layer():
  """Counting imports inside functions: core <- model, adapters, rl <- objectives <- data <- spec <- train <- api."""
  assert layer_of("fmjax.train.loop") > layer_of("fmjax.spec") > layer_of("fmjax.data.pipeline")
  upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m, targets in sorted(import_graph().items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
  assert not upward, "imports up the layers:\n" + "\n".join(upward)
