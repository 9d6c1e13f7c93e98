"""Every `herd ...` command shown in a code block of README.md and docs/*.md parses with the real CLI parser.

A command is a line of a fenced code block that starts with `herd` (or `.venv/bin/herd`, or either after a
`$ ` prompt), with its `\\` continuation lines; it ends where the shell would hand its output on (`|`, `>`,
`&&`, `&`, `;`) or at a comment. Parsing is what the test checks: flags, subcommands, choices and types;
nothing runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from cluster.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```")
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:\.venv/bin/)?herd(?:\s|$)")
SHELL_ENDS = {"|", "||", "&&", "&", ";"}


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced code block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def herd_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv after `herd`) for every herd command in the file's code blocks."""
    found = []
    for start, lines in code_blocks(path.read_text()):
        i = 0
        while i < len(lines):
            line, where = lines[i], f"{path.relative_to(REPO)}:{start + i}"
            while line.rstrip().endswith("\\") and i + 1 < len(lines):     # continuation lines
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            if not COMMAND.match(line):
                continue
            words = shlex.split(line, comments=True)
            words = words[words.index("$") + 1:] if words[0] == "$" else words
            argv = []
            for w in words[1:]:
                if w in SHELL_ENDS or w.startswith((">", "<", "2>")):
                    break
                argv.append(w)
            found.append((where, argv))
    return found


COMMANDS = [c for doc in DOCS for c in herd_commands(doc)]


def test_the_docs_show_herd_commands():
    # The extraction finds the commands people copy: a broken pattern would make the test below vacuous.
    shown = {" ".join(argv[:2]) for _, argv in COMMANDS} | {argv[0] for _, argv in COMMANDS}
    assert {"serve", "plan", "client models", "k8s render", "k8s apply", "bench routing-sim"} <= shown
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, argv):
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `herd {' '.join(argv)}` does not parse (exit {e.code}): {err.getvalue().strip()}")
    assert isinstance(args, argparse.Namespace) and callable(getattr(args, "func", None)), where


def test_a_wrong_command_is_caught():
    # The docs/kubernetes.md line this test was written for: the address belongs to the subcommand.
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(["client", "--address", "localhost:9000", "models"])
