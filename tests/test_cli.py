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


def test_a_reader_that_goes_away_stops_amdim_quietly():
    """`amdim config | head -1`: the pipe closes under amdim; it stops without a traceback."""
    import subprocess
    import sys

    code = "import sys; from amdim.cli import main; sys.exit(main(['config', '--preset', 'tiny']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before amdim writes a line: its first print meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err, err
