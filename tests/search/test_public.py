"""The public face of snopt.search: every exported name imports and is documented."""

import inspect

import snopt.search


def test_all_names_import_and_have_docstrings():
    for name in snopt.search.__all__:
        obj = getattr(snopt.search, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    assert snopt.search.__doc__


def test_search_commands_are_registered_snopt_commands():
    from snopt.cli import COMMANDS, Command

    for name in ("search", "compare", "worker"):
        command = COMMANDS[name].load()
        assert isinstance(command, Command) and command.name == name and COMMANDS[name].help
