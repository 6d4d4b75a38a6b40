"""The command line explains itself: every flag and argument has help text, and `amdim --help`
prints plain text."""

from __future__ import annotations

import argparse

from amdim.cli import make_parser


def _arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("amdim",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_flag_and_argument_has_help():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _arguments(make_parser()) if not a.help]
    assert not missing, missing


def test_help_is_plain_text(capsys):
    parser = make_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    for text in texts:
        assert "``" not in text and ":func:" not in text, text[:400]
