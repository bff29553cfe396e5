"""The house rules of DESIGN.md, checked on the source: the core imports no method room, no room
imports another, and no module imports itself back through a cycle (function-level imports count)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "persona_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
  """persona_jax modules imported anywhere in the file (module level and inside functions)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    for target in targets:
      if target.startswith("persona_jax"):
        # the longest known module that the target names (a name imported from a module is that module)
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if target and target != name:
          found.add(target)
  return found


def _graph():
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(files)
  return {name: _imports(path, name, modules) for name, path in files.items()}


def _rooms() -> set[str]:
  return {p.parent.name for p in PACKAGE.glob("*/job.py")}


def _room_of(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in _rooms() else None


def test_every_room_has_the_same_shape():
  rooms = _rooms()
  assert {"coprocessor", "user_llm", "rlpf", "curio", "milp"} <= rooms, rooms
  for room in rooms:
    names = {p.name for p in (PACKAGE / room).glob("*.py")}
    assert {"__init__.py", "model.py", "tasks.py", "job.py", "eval.py"} <= names, (room, names)
    assert "train.py" not in names, f"{room}: the generic train job replaces room train modules"


def test_core_imports_no_room_and_rooms_import_no_other_room():
  graph = _graph()
  problems = []
  for module, imported in graph.items():
    room = _room_of(module)
    for target in imported:
      target_room = _room_of(target)
      if target_room is None:
        continue
      if room is None and target_room is not None:
        problems.append(f"core module {module} imports room module {target}")
      elif room != target_room:
        problems.append(f"room module {module} imports another room's {target}")
  assert not problems, "\n".join(sorted(problems))


def test_no_import_cycles():
  graph = _graph()
  # Importing a package runs its __init__, so a module that imports `persona_jax.x.y` also imports
  # `persona_jax.x`; that edge is implied, not written, and is left out (it would make every
  # package with a re-exporting __init__ look cyclic).
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", ["persona_jax.train.jobs", "persona_jax.main", "persona_jax.export"])
def test_generic_entry_points_name_no_room(name):
  path = PACKAGE.parent / (name.replace(".", "/") + ".py")
  text = path.read_text()
  for room in _rooms():
    assert f"persona_jax.{room}" not in text, f"{name} names the room {room}: find rooms through the registry"
