"""Every command that README.md and docs/*.md give still parses.

Each `python X.py ...` or `torchrun ... X.py ...` (in a code block, with its backslash continuations, or in
inline code) is handed to X's own command line, whose argument parser stops the run right after parsing: nothing
trains, samples or reads a file. A renamed or removed flag, or a bad choice, fails here with argparse's
message.
"""

import argparse
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"\b(?:python3?|torchrun)\s(?:.*?\s)??((?:tools/)?\w+\.py)\b(.*)")
ASSIGNMENT = re.compile(r'(\w+)="([^"]*)"')
SHELL_STOPS = {";", "&", "&&", "|", "||", ">", ">>", "2>", "<"}


def commands():
    """-> [(where, script, argv)] for every documented command line."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        number, in_block, variables = 0, False, {}  # NAME="..." set in a code block, used as $NAME below it
        while number < len(lines):
            start, line = number + 1, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):  # a shell continuation
                number += 1
                line = line[:-1] + " " + lines[number].strip()
            number += 1
            if line.startswith("```"):
                in_block = not in_block
                continue
            assignment = ASSIGNMENT.fullmatch(line.strip())
            if in_block and assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            for name, value in variables.items():
                line = re.sub(rf"\${name}\b", value, line)
            code = [line] if in_block else line.split("`")[1::2]  # a code block's line, or inline code spans
            for match in (match for span in code for match in COMMAND.finditer(span)):
                argv = []
                lexer = shlex.shlex(match.group(2), posix=True, punctuation_chars=";&|<>")
                lexer.whitespace_split, lexer.commenters = True, "#"
                for token in lexer:
                    if token in SHELL_STOPS or token.startswith(("2>", ">")):
                        break
                    if token != "...":  # an elision in the text: "the same command, ..."
                        argv.append(re.sub(r"\$\{?\w+\}?", "1", token))  # shell variables, as in a loop
                found.append((f"{path.name}:{start}", match.group(1), argv))
    return found


class Parsed(Exception):
    """Raised by the patched parser once the command line has parsed."""


def load(script):
    path = ROOT / script
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = commands()


def test_the_docs_give_commands_for_every_entry_point():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"train.py", "flow_matching.py", "sample.py", "quality.py", "fid.py", "toy.py"} <= scripts


@pytest.mark.parametrize("where, script, argv", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_documented_command_parses(where, script, argv, monkeypatch, capsys):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad flag exits here with code 2 and argparse's message
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    main = load(script).main
    try:
        main(argv) if inspect.signature(main).parameters else main()  # some read sys.argv themselves
    except Parsed:
        return
    except SystemExit as exit_info:
        if exit_info.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{where}: `{script} {shlex.join(argv)}` does not parse (exit {exit_info.code}): "
                    f"{capsys.readouterr().err.strip()}")
    pytest.fail(f"{where}: `{script} {shlex.join(argv)}` ran without parsing its arguments")


def anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_relative_links_resolve(path):
    """Every link to a file of the repository (and to a heading in it) points at something that exists."""
    broken = []
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            if fragment not in {anchor(heading) for heading in headings}:
                broken.append(target)
    assert not broken, f"{path.name}: links to nothing: {broken}"
