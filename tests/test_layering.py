"""The package's layering, read from the code: every import (module level or inside a function)
between ncjax modules goes downwards, there is no import cycle, the library's light entry points
stay light, and docs/design.md's dependency graph is the one the code has.

``python tests/test_layering.py --write`` regenerates the graph in docs/design.md.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ncjax")
DESIGN = os.path.join(ROOT, "docs", "design.md")
BEGIN, END = "<!-- dependency graph: begin -->", "<!-- dependency graph: end -->"

# Floors, lowest first: a module imports only from its own floor or below.
FLOORS = (
    ("base", ("ncjax", "ncjax.errors", "ncjax.io")),
    ("library", ("ncjax.metrics", "ncjax.transferability", "ncjax.losses", "ncjax.methods",
                 "ncjax.lora", "ncjax.telemetry", "ncjax.models", "ncjax.weights", "ncjax.fewshot",
                 "ncjax.data", "ncjax.train", "ncjax.measure")),
    ("report", ("ncjax.report",)),
    ("experiment", ("ncjax.experiment",)),
    ("cli", ("ncjax.main",)),
)


def modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for d, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the ncjax modules it imports anywhere in its file (a name imported from a
  package is that package's submodule when one has the name, else the package)."""
  graph = {}
  for name, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.split(".")[0] == "ncjax"}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
          node.module.split(".")[0] == "ncjax":
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          deps.add(sub if sub in mods else node.module)
    deps.discard(name)
    graph[name] = {d for d in deps if d in mods}
  return graph


def floor(module: str) -> int:
  best = None
  for i, (_, prefixes) in enumerate(FLOORS):
    for p in prefixes:
      if module == p or (p != "ncjax" and module.startswith(p + ".")):
        best = i
  if best is None:
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")
  return best


def test_every_import_goes_down_or_sideways():
  graph = imports(modules())
  bad = [f"{m} ({FLOORS[floor(m)][0]}) imports {d} ({FLOORS[floor(d)][0]})"
         for m, deps in sorted(graph.items()) for d in sorted(deps) if floor(d) > floor(m)]
  assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle, or None (a package's __init__ importing its own submodules is its
  re-export, not a cycle; a submodule importing its package's __init__ is)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if m == "ncjax" or d.startswith(m + "."):
        continue  # a package re-exporting its submodules
      if d != "ncjax" and m.startswith(d + "."):
        return [m, d, m]  # its package's __init__ imports it back
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state and (found := visit(d)):
        return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_no_import_cycle():
  cycle = _cycle(imports(modules()))
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_can_fail():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"p": {"p.x"}, "p.x": set()}) is None
  assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p.x", "p", "p.x"]


@pytest.mark.parametrize("module, absent", [
    ("ncjax.metrics", ("matplotlib", "absl", "orbax", "flax", "ncjax.experiment")),
    ("ncjax.report", ("jax", "flax", "orbax", "ncjax.experiment")),
    ("ncjax.transferability", ("matplotlib", "absl", "orbax", "flax")),
])
def test_light_entry_points_stay_light(module, absent):
  code = (f"import sys, {module}; "
          f"print([m for m in {list(absent)!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.stdout.strip() == "[]", f"import {module} pulled in {out.stdout.strip()}"


def graph_text() -> str:
  """The dependency graph as docs/design.md shows it: one line per module, by floor, with
  the ncjax modules it imports (a package's re-exports left out)."""
  mods = modules()
  graph = imports(mods)
  lines = []
  for i, (title, _) in enumerate(FLOORS):
    lines.append(f"# {title}")
    for m in sorted(x for x in mods if floor(x) == i):
      deps = sorted(d for d in graph[m] if not d.startswith(m + ".") and m != "ncjax")
      short = lambda x: x[len("ncjax."):] if x.startswith("ncjax.") else x
      lines.append(f"{short(m):28s} -> {', '.join(map(short, deps))}" if deps else short(m))
  return "\n".join(lines)


def _design_block() -> str:
  return f"{BEGIN}\n```\n{graph_text()}\n```\n{END}"


def test_design_md_graph_is_the_code_graph():
  text = open(DESIGN).read()
  assert BEGIN in text and END in text, f"{DESIGN} lacks the {BEGIN} ... {END} block"
  have = text[text.index(BEGIN):text.index(END) + len(END)]
  assert have == _design_block(), (
      "docs/design.md's dependency graph has drifted from the code: run "
      "python tests/test_layering.py --write")


if __name__ == "__main__" and "--write" in sys.argv:
  text = open(DESIGN).read()
  block = _design_block()
  if BEGIN in text:
    text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
  else:
    raise SystemExit(f"put {BEGIN} and {END} into {DESIGN} first")
  open(DESIGN, "w").write(text)
  print(f"wrote the graph into {DESIGN}")
