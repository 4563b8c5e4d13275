"""Every subcommand's ``--help``, built in this process: each option says its default once."""

from __future__ import annotations

import re

import pytest

from snopt.cli import COMMANDS, build_parser


def _entries(text: str) -> list[str]:
    """The option entries of a help text, each joined into one line.

    An entry starts at a line ``  -...`` and goes on over the more deeply indented lines below
    it, up to the next entry, a blank line or a section title.
    """
    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            current = [line.strip()]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return [" ".join(entry) for entry in entries]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_states_each_default_once(name):
    _, subparsers, _ = build_parser([name])
    entries = _entries(subparsers[name].format_help())
    assert len(entries) >= 3, entries
    twice = [entry for entry in entries if entry.count("(default:") > 1]
    assert not twice, twice
    # Defaults are still shown: the ones written in the help and the ones argparse adds.
    assert any("(default:" in entry for entry in entries), entries


def test_help_shows_a_value_default_and_hides_none_and_switches():
    _, subparsers, _ = build_parser(["compare", "train"])
    compare = {e.split()[0]: e for e in _entries(subparsers["compare"].format_help())}
    assert compare["--epsilon"].endswith("(default: 0.005)")
    assert compare["--strategies"].endswith("(default: feedback,tpe,gp,random)")
    assert "(default:" not in compare["--n-trials"] and "(default:" not in compare["--test"]
    train = {e.split()[0]: e for e in _entries(subparsers["train"].format_help())}
    assert train["--checkpoint-every"].endswith("(default: at epoch ends)")
