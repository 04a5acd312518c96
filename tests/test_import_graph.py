"""The layers of the repository, read from the source: every import points down, none hides in a function.

The graph is built with `ast` from the project's own modules (and_mask, gen_mask, vizualization):
an edge A -> B for every `import B` or `from B import name` in A (to B.name when that is a module).
It must have no cycle; no module may import from a layer above its own (LAYERS, bottom first); no
import of a project module may sit inside a function or class (the way a cycle is hidden) unless
a comment block right above it starts with "# lazy:" and says why the import is deferred (start-up
time of a command that seldom needs it); such an import still counts as an edge, so it can hide
neither a cycle nor an upward import. The argparse types are a leaf, and the training loop never
reaches the command line. and_mask/README.md draws the same map.
"""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("and_mask", "gen_mask", "vizualization")
# Bottom first; a module may import its own layer and those below. The first prefix that a module's
# name starts with places it.
LAYERS = (
    ("shared", ("and_mask.core",)),
    ("data and models", ("and_mask.datasets", "and_mask.models")),
    ("experiments", ("and_mask.experiments",)),
    ("and_mask commands", ("and_mask",)),
    ("gen_mask", ("gen_mask",)),
    ("figures", ("vizualization",)),
)


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def targets(node, here: str) -> list[str]:
    """The project modules an import statement in module `here` imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if node.level:  # relative: resolved against the importing module's package
        package = here if MODULES[here].name == "__init__.py" else here.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    if base in MODULES and len(found) < len(node.names):
        found.append(base)  # names defined in the module itself
    return found


LAZY = "# lazy:"


def justified(lines: list[str], lineno: int) -> bool:
    """Whether the comment block right above line `lineno` (1-based), or above the imports that
    directly precede it, starts with LAZY."""
    block, i = [], lineno - 2
    while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
        i -= 1
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip())
        i -= 1
    return bool(block) and block[0].startswith(LAZY)


def import_graph():
    """({module: {imported modules}}, [(module, line, imported module) of unjustified imports inside a
    function or class])."""
    edges, hidden = defaultdict(set), []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, str(path))
        nested = {id(n) for scope in ast.walk(tree) if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                            ast.ClassDef))
                  for n in ast.walk(scope) if n is not scope}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in targets(node, module):
                    if target != module:
                        edges[module].add(target)
                        if id(node) in nested and not justified(lines, node.lineno):
                            hidden.append((module, node.lineno, target))
    return edges, hidden


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    return next(i for i, (_, prefixes) in enumerate(LAYERS)
                if any(module == p or module.startswith(p + ".") for p in prefixes))


def reachable(edges, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


EDGES, HIDDEN = import_graph()


def test_the_import_graph_has_no_cycle():
    assert cycles(EDGES) == []


def test_every_import_points_down_the_layers():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets_of_a in sorted(EDGES.items()) for b in sorted(targets_of_a) if layer(b) > layer(a)]
    assert upward == []


def test_no_project_import_hides_inside_a_function():
    assert HIDDEN == []


def test_the_argparse_types_are_a_leaf_and_the_loop_never_reaches_the_command_line():
    assert EDGES.get("and_mask.core.flags", set()) == set()
    assert "and_mask.core.cli" not in reachable(EDGES, "and_mask.core.training")


@pytest.mark.parametrize("source, expected", [
    ("import and_mask.core.cli", {"and_mask.core.cli"}),
    ("from and_mask.core import cli, flags", {"and_mask.core.cli", "and_mask.core.flags"}),
    ("from and_mask.core.cli import main", {"and_mask.core.cli"}),
    ("from gen_mask.sweep import execute", {"gen_mask.sweep.execute"}),
    ("import numpy", set()),
])
def test_the_graph_reads_each_form_of_import(source, expected):
    (node,) = ast.parse(source).body
    assert set(targets(node, "vizualization.toy_landscape")) == expected


def test_the_checks_find_what_they_look_for():
    """On a made-up graph: a cycle, an upward edge and a hidden import are each found."""
    assert cycles({"and_mask.core.cli": {"and_mask.core.training"},
                   "and_mask.core.training": {"and_mask.core.cli"}}) == [["and_mask.core.cli", "and_mask.core.training"]]
    assert layer("and_mask.core.runfolder") < layer("and_mask.experiments.synthetic") < layer("and_mask.paper.runs") \
        < layer("gen_mask.sweep.cli") < layer("vizualization.plot_runs")
    tree = ast.parse("def f():\n    from and_mask.core import cli\n")
    nested = [n for n in ast.walk(tree.body[0]) if isinstance(n, ast.ImportFrom)]
    assert targets(nested[0], "and_mask.paper.runs") == ["and_mask.core.cli"]
    lines = ["def f():", "    # lazy: seconds of start-up", "    # that most calls do not need", "    import x",
             "    import z", "    # a cycle otherwise", "    import y"]
    assert justified(lines, 4) and justified(lines, 5) and not justified(lines, 7) and not justified(lines, 1)
