"""The import graph of the sources: layers import one way, and no module imports itself back.

Layers, lowest first: the core (``snopt/_*.py`` and its subpackages other than tracking and
cli), ``search/`` (``snopt.search``), ``snopt/tracking/`` and ``snopt/cli/``.  A layer imports
only from layers below it and from its own; the core imports only torch, torchdiffeq, numpy
and the standard library (plus the lazy imports listed in ``CORE_LAZY``).
The facade ``snopt/__init__.py`` re-exports core and tracking names.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "search", "tracking", "cli")
CORE_THIRD_PARTY = {"torch", "torchdiffeq", "numpy"}
#: Imports the core makes inside a function only: the bundled digits data and toy densities
#: (scikit-learn), progress bars on a terminal (tqdm) and run-configuration files
#: (``RunConfig.from_file``: PyYAML, and tomli where the standard library has no tomllib).
CORE_LAZY = {"sklearn", "tqdm", "yaml", "tomli"}
SEARCH_THIRD_PARTY = CORE_THIRD_PARTY | CORE_LAZY | {"optuna", "matplotlib"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "search":
        parts = ["snopt", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.joinpath("snopt").rglob("*.py"), *ROOT.joinpath("search").rglob("*.py")]
    return {_module_name(p): p for p in files if "__pycache__" not in p.parts}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    return parts[1] if parts[1] in ("search", "tracking", "cli") else "core"


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, at module level, line)`` for every import statement of ``path``."""
    return list(_imports_of(module, str(path), path.read_text()))


@functools.cache
def _imports_of(module: str, path: str, text: str) -> tuple[tuple[str, bool, int], ...]:
    """:func:`_imports` of one source text, parsed once (five tests walk the same sources)."""
    tree = ast.parse(text, filename=path)
    package = module if Path(path).name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks do not run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.discard(id(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
                # `from . import x` may import a submodule x.
                names = [target] if node.module else [f"{prefix}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        out.extend((name, id(node) in top_level, node.lineno) for name in names)
    return tuple(out)


def _edges() -> list[tuple[str, str, bool, int]]:
    sources = _sources()
    edges = []
    for module, path in sources.items():
        for target, top, line in _imports(module, path):
            edges.append((module, target, top, line))
    return edges


def _snopt_target(target: str, sources: dict[str, Path]) -> str | None:
    """The snopt module a dotted import refers to (a name inside a module maps to the module)."""
    if target != "snopt" and not target.startswith("snopt."):
        return None
    while target not in sources and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def test_layers_import_one_way():
    sources = _sources()
    bad = []
    for module, target, top, line in _edges():
        where = f"{module} (line {line}) imports {target}"
        own = _layer(module)
        inner = _snopt_target(target, sources)
        if inner is not None:
            other = _layer(inner)
            if own == "facade":
                if other == "cli":
                    bad.append(where)
                continue
            if other == "facade":
                # `from snopt import __version__` style imports of the facade are fine inside
                # functions; at module level they would import every layer.
                if top and own != "cli":
                    bad.append(where + " (the facade, at import time)")
                continue
            if LAYERS.index(other) > LAYERS.index(own):
                bad.append(where + f" ({own} -> {other})")
            continue
        root = target.split(".")[0]
        if root in sys.stdlib_module_names or root == "__future__":
            continue
        if own == "core":
            if root in CORE_THIRD_PARTY or (root in CORE_LAZY and not top):
                continue
            bad.append(where + " (a third-party import in the core)")
        elif own == "search" and root not in SEARCH_THIRD_PARTY:
            bad.append(where + " (search imports only optuna, matplotlib, tqdm and the core's dependencies)")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles_at_import_time():
    sources = _sources()
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, target, top, _ in _edges():
        inner = _snopt_target(target, sources)
        if top and inner is not None and inner != module:
            # Importing a submodule first imports its package; the package importing its own
            # submodules is not a cycle.
            if not inner.startswith(module + "."):
                graph[module].add(inner)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from snopt.cli import main\n", "core -> cli"),
        ("import mlflow\n", "third-party import in the core"),
    ],
)
def test_the_check_catches_a_bad_import(tmp_path, monkeypatch, source, expected):
    """The checks above must fail on a planted bad import (a test that cannot fail is no test)."""
    planted = ROOT / "snopt" / "_planted_for_test.py"
    monkeypatch.setattr(
        sys.modules[__name__], "_sources", lambda: {**_real_sources(), "snopt._planted_for_test": planted}
    )
    planted_text = {planted: source}
    monkeypatch.setattr(Path, "read_text", _fake_read(planted_text))
    with pytest.raises(AssertionError, match=expected):
        test_layers_import_one_way()


_real_sources = _sources
_real_read_text = Path.read_text


def _fake_read(overrides: dict[Path, str]):
    def read_text(self: Path, *args, **kwargs) -> str:
        if self in overrides:
            return overrides[self]
        return _real_read_text(self, *args, **kwargs)

    return read_text


def test_the_check_catches_a_cycle(monkeypatch):
    a, b = ROOT / "snopt" / "_planted_a.py", ROOT / "snopt" / "_planted_b.py"
    monkeypatch.setattr(
        sys.modules[__name__],
        "_sources",
        lambda: {**_real_sources(), "snopt._planted_a": a, "snopt._planted_b": b},
    )
    monkeypatch.setattr(
        Path, "read_text", _fake_read({a: "from . import _planted_b\n", b: "from ._planted_a import x\n"})
    )
    with pytest.raises(AssertionError, match="_planted_a -> snopt._planted_b -> snopt._planted_a"):
        test_no_import_cycles_at_import_time()
