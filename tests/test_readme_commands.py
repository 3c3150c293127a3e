"""The commands of README.md and docs/*.md still run as written.

A fenced ```bash block preceded by the line `<!-- cheap -->` is run as it stands (from the
repository root, `.venv/bin/` meaning this interpreter's folder). In every other block, each
`atpt <command>` (or `-m atpt_plugin.adapters.cli <command>`) must name a real command, and
each of its options must be one that `atpt <command> --help` lists."""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from atpt_plugin.adapters.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = "<!-- cheap -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def shell_blocks(text: str):
    """(is cheap, body) of every ```bash / ```sh block."""
    for match in FENCE.finditer(text):
        if match.group(1) not in ("bash", "sh", "shell"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        yield before == CHEAP, match.group(2)


def atpt_invocations(body: str):
    """(command, [options]) for each `atpt` call in a shell block."""
    joined = body.replace("\\\n", " ")
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        for piece in _pieces(tokens):
            for index, token in enumerate(piece):
                if token == "atpt" or token.endswith("/atpt"):
                    start = index + 1
                elif token == "atpt_plugin.adapters.cli" and index and piece[index - 1] == "-m":
                    start = index + 1
                else:
                    continue
                if start < len(piece):
                    rest = piece[start + 1 :]
                    yield piece[start], [t.split("=", 1)[0] for t in rest if t.startswith("--")]
                break


def _pieces(tokens):
    piece = []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            yield piece
            piece = []
        else:
            piece.append(token)
    yield piece


def documented_options():
    """{command: the options its --help lists}."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {
            option for action in sub._actions if action.help != argparse.SUPPRESS for option in action.option_strings
        }
        for name, sub in commands.choices.items()
    }


def problems(text: str, known) -> list:
    found = []
    for _, body in shell_blocks(text):
        for command, options in atpt_invocations(body):
            if command not in known:
                found.append(f"atpt {command}: no such command")
                continue
            found += [f"atpt {command} {option}: no such option" for option in options if option not in known[command]]
    return found


def test_the_checker_finds_a_wrong_command_and_a_wrong_option():
    known = documented_options()
    text = "```bash\natpt eval --eps 4 --no-such-option 1 \\\n  --out x && .venv/bin/atpt evaluate --out y\n```\n"
    assert problems(text, known) == ["atpt eval --no-such-option: no such option", "atpt evaluate: no such command"]
    hidden = "```bash\natpt eval --steps 20 --out x  # a deprecated option, hidden from --help\n```\n"
    assert problems(hidden, known) == ["atpt eval --steps: no such option"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_atpt_option_in_the_docs_is_real(page):
    assert problems(page.read_text(), documented_options()) == []


def test_the_docs_name_the_main_commands():
    calls = [call for page in PAGES for _, body in shell_blocks(page.read_text()) for call in atpt_invocations(body)]
    assert {"eval", "leaderboard"} <= {command for command, _ in calls}
    assert len(calls) >= 10


CHEAP_BLOCKS = [(page, body) for page in PAGES for cheap, body in shell_blocks(page.read_text()) if cheap]


def test_the_readme_marks_cheap_commands():
    assert any(page.name == "README.md" for page, _ in CHEAP_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("page,body", CHEAP_BLOCKS, ids=[f"{p.name}:{b.strip()[:40]}" for p, b in CHEAP_BLOCKS])
def test_cheap_commands_run_as_written(page, body):
    script = body.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, f"{page.name}: {body}\n{done.stderr[-2000:]}"
