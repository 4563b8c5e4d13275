"""Packaging facts: the public API, the snopt.search mapping, mlflow/ not shadowing MLflow, CI == README."""

import importlib
import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import snopt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["snopt", "snopt.search"])
def test_every_public_name_imports_and_has_a_docstring(module):
    mod = importlib.import_module(module)
    assert mod.__all__, module
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_version_comes_from_metadata():
    from importlib.metadata import version

    assert snopt.__version__ == version("snopt")


def test_search_is_snopt_search():
    import snopt.search

    assert Path(snopt.search.__file__).parent.name == "search"
    assert snopt.search.__name__ == "snopt.search"


def test_mlflow_folder_is_not_a_package_and_mlflow_is_real():
    assert not list((ROOT / "mlflow").glob("*.py"))
    import mlflow

    assert hasattr(mlflow, "start_run") and mlflow.__file__ is not None
    assert Path(mlflow.__file__).parent != ROOT / "mlflow"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2, commands
    assert "pytest" in commands[1] and "snopt compare" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run may add -q to pip; otherwise the command is the README's.
    assert commands[1].replace("pip install -c", "pip install -q -c") in ci


def test_every_source_package_is_listed_in_pyproject():
    """A subpackage missing from `packages` works editable and breaks every real install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "snopt." + ".".join(f.parent.relative_to(ROOT / "snopt").parts)
        for f in (ROOT / "snopt").rglob("__init__.py")
    }
    found = {name.rstrip(".") for name in found}
    found |= {
        "snopt.search" + "".join("." + p for p in f.parent.relative_to(ROOT / "search").parts)
        for f in (ROOT / "search").rglob("__init__.py")
    }
    assert found == listed


@pytest.mark.integration
def test_built_wheel_maps_search_into_snopt(tmp_path):
    """The package-dir mapping is unusual; check the wheel itself, not an editable install."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("snopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = {f"snopt/{f.relative_to(ROOT / 'snopt').as_posix()}" for f in (ROOT / "snopt").rglob("*.py")}
    sources |= {
        f"snopt/search/{f.relative_to(ROOT / 'search').as_posix()}" for f in (ROOT / "search").rglob("*.py")
    }
    assert sources - set(names) == set(), "source files missing from the wheel"
    assert "snopt/py.typed" in names
    assert not any(n.startswith("mlflow/") for n in names)
    assert not any(n.startswith("search/") for n in names)


@pytest.mark.parametrize("package", ["snopt", "snopt.tracking", "snopt.search"])
def test_facade_type_checking_imports_match_the_lazy_exports(package):
    """The names type checkers see are exactly the names the package resolves at run time."""
    import ast

    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    static = {
        (f".{node.module}" if node.level else node.module, alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lazy = {(module, name) for module, names in module._EXPORTS.items() for name in names}
    assert static == lazy
    assert sorted(module.__all__) == sorted(name for _, name in lazy)


@pytest.mark.integration
@pytest.mark.parametrize(
    "statement",
    [
        "import snopt",
        "import snopt.tracking",
        "from snopt.cli import main; main(['--version'])",
        "from snopt.cli import main; main(['--help'])",
        "from snopt.cli import main; main(['train', '--help'])",
        "from snopt.cli import main; main(['ui', '--help'])",
        "from snopt.cli import main; main(['search', '--help'])",
        "from snopt.cli import main; main(['compare', '--help'])",
        "from snopt.cli import main; main(['worker', '--help'])",
    ],
)
def test_start_up_loads_no_heavy_module(statement):
    """``import snopt`` and the CLI's help and version answer without torch, Optuna or MLflow."""
    code = (
        f"import sys\ntry:\n    {statement}\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "HEAVY []", out.stdout[-500:]


def test_unknown_public_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        snopt.Nope  # noqa: B018
