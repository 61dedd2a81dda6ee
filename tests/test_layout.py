"""The package's layering, read from the import statements of every module (ast).

Data flows one way: archive or registry, tar stream, events, store, views,
output.  Each room may import only the rooms below it (ROOMS); nothing imports
api.py but the CLI; there is no import cycle between modules; and no module
takes a _private name from another.  Function-level imports count too: they
are deferred, not absent.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"layerdb.engine": ROOT / "engine", "layerdb.cli": ROOT / "cli"}

# room -> the rooms it may import.  "foundation" is engine/*.py (but api.py).
BELOW_ALL = {"foundation"}
ROOMS = {
    "foundation": BELOW_ALL,
    "ingest": BELOW_ALL | {"ingest"},
    "output": BELOW_ALL | {"output"},
    "audit": BELOW_ALL | {"audit"},
    "registry": BELOW_ALL | {"registry", "ingest", "output"},
    "containers": BELOW_ALL | {"containers", "ingest", "output", "audit"},
    "upkeep": BELOW_ALL | {"upkeep", "output"},
    "build": BELOW_ALL | {"build", "ingest", "output", "containers", "registry"},
    "explore": BELOW_ALL | {"explore", "audit", "output"},
    "api": {"foundation", "ingest", "output", "audit", "registry", "containers", "upkeep", "build", "explore"},
}
# The CLI is parse, call, render: it reaches the engine through the front door only.
CLI_MAY_IMPORT = {"layerdb.engine.api", "layerdb.engine.errors", "layerdb.engine.log"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import in a module."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    here = name if is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, None, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.append((sub, None, node.lineno))
                else:
                    out.append((src, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m.startswith("layerdb.")]


def room(name: str) -> str:
    if name.startswith("layerdb.cli"):
        return "cli"
    rest = name[len("layerdb.engine"):].lstrip(".").split(".")
    if rest == [""] or (len(rest) == 1 and rest[0] != "api" and not is_package(name)):
        return "foundation"
    return rest[0]


def test_every_module_is_in_a_room():
    for name in MODULES:
        r = room(name)
        assert r == "cli" or r in ROOMS, f"{name} is in no room of ROOMS: add it (and its rule) there"


def test_each_room_imports_only_the_rooms_below_it():
    bad = []
    for name in MODULES:
        r = room(name)
        for target, _, line in imports(name):
            if target not in MODULES:
                bad.append(f"{name}:{line} imports {target}, which does not exist")
                continue
            if r == "cli":
                if not target.startswith("layerdb.cli") and target not in CLI_MAY_IMPORT:
                    bad.append(f"{name}:{line} imports {target}: the CLI goes through api.LayerDB")
                continue
            t = room(target)
            if t == "cli":
                bad.append(f"{name}:{line} imports the CLI ({target})")
            elif t != r and t not in ROOMS[r]:
                bad.append(f"{name}:{line} ({r}) imports {target} ({t}), which is not below it")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: sorted({t for t, _, _ in imports(name) if t in MODULES and t != name}) for name in MODULES}
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            for j in range(i, len(graph[v])):
                w = graph[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        cycles.append(sorted(comp))
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    bad = []
    for name in MODULES:
        for target, taken, line in imports(name):
            if taken and taken.startswith("_") and not taken.startswith("__") and target != name:
                bad.append(f"{name}:{line} takes {taken} from {target}")
        # module._private through an imported module
        tree = ast.parse(MODULES[name].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases):
                targets = [t for t, taken, _ in imports(name) if t.rpartition(".")[2] == aliases[node.value.id]]
                if any(t in MODULES for t in targets):
                    bad.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_cycle_and_a_private_name(tmp_path, monkeypatch):
    """The checks above must be able to fail: two modules that import each other,
    one of them taking a private name, are caught."""
    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    a.write_text("from .b import _hidden\n")
    b.write_text("from . import a\n")
    monkeypatch.setitem(MODULES, "layerdb.engine.a", a)
    monkeypatch.setitem(MODULES, "layerdb.engine.b", b)
    for check in (test_no_import_cycles, test_no_private_names_cross_modules):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a cycle with a private name")


def test_every_package_says_what_it_holds_and_may_import():
    for name, f in MODULES.items():
        if f.name == "__init__.py" and name.startswith("layerdb.engine"):
            doc = ast.get_docstring(ast.parse(f.read_text()))
            assert doc and "import" in doc, f"{f}: the docstring says what lives here and what it may import"
