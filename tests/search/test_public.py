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


def test_help_defaults_agree_with_the_library():
    """``--help`` reads strategy names and defaults from ``_choices`` (no Optuna): the same values."""
    from snopt.search import _choices, _compare, _storage, _strategies

    assert _choices.DEFAULT_STRATEGIES == _compare.DEFAULT_STRATEGIES
    assert _choices.DEFAULT_EPSILON == _compare.DEFAULT_EPSILON
    assert _choices.DEFAULT_STORAGE == _storage.DEFAULT_STORAGE == snopt.search.DEFAULT_STORAGE
    # Every name --help offers has a sampler or pruner behind it, and nothing else has one.
    assert set(_choices.STRATEGIES) == set(_strategies._SAMPLERS) == set(_choices.STRATEGY_HELP)
    assert set(_choices.PRUNERS) == set(_strategies._PRUNERS)
