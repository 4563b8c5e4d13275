"""The public face of snopt.search: every exported name imports and is documented."""

import inspect

import snopt.search


def test_all_names_import_and_have_docstrings():
    for name in snopt.search.__all__:
        obj = getattr(snopt.search, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    assert snopt.search.__doc__


def test_cli_commands_are_snopt_commands():
    from snopt.search._cli import SEARCH_COMMANDS

    from snopt.cli import Command

    assert [c.name for c in SEARCH_COMMANDS] == ["search", "compare", "worker"]
    for cls in SEARCH_COMMANDS:
        assert issubclass(cls, Command) and cls.help
