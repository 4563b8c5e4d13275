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
    assert "snopt/search/__init__.py" in names
    assert "snopt/py.typed" in names
    assert not any(n.startswith("mlflow/") for n in names)
    assert not any(n.startswith("search/") for n in names)
