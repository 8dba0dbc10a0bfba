"""``crystaltune COMMAND ARGS...``: every ``python -m crystaltune.X`` entry point as one command.

``crystaltune search perovskites`` runs ``python -m crystaltune.search perovskites``: each command hands
its arguments to that module's ``main(argv)``, so the options, the help text, the errors (one ``error:``
line, exit 2) and the exit status are the module's own, and the ``python -m`` forms keep working.
Nothing heavy is imported until a command runs: ``crystaltune --help`` reads the one-line descriptions
from the modules' docstrings without importing them (no torch, no Ray).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

from . import __version__
from .registry import did_you_mean

PACKAGE = Path(__file__).resolve().parent

# command -> (module whose main(argv) runs it, its source file relative to the package)
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("crystaltune.search.__main__", "search/__main__.py"),
    "train": ("crystaltune.train.__main__", "train/__main__.py"),
    "predict": ("crystaltune.predict", "predict.py"),
    "report": ("crystaltune.report", "report.py"),
    "ensemble": ("crystaltune.ensemble", "ensemble.py"),
    "data": ("crystaltune.data.__main__", "data/__main__.py"),
    "bench": ("crystaltune.bench.__main__", "bench/__main__.py"),
}

# for a module whose docstring opens with its usage only (predict's: "``python -m ... out.csv``.")
FALLBACK_SUMMARY = {
    "predict": "predictions of a checkpoint (or an ensemble) for CIF files, folders or dataset files, as CSV",
}

_USAGE_PREFIX = re.compile(r"^``[^`]*``\s*[:.]?\s*")


def summary(command: str) -> str:
    """The one-line description of a command: the first sentence of its module's docstring, less the
    leading ``python -m crystaltune.X ...`` usage, read from the source without importing it."""
    try:
        doc = ast.get_docstring(ast.parse((PACKAGE / COMMANDS[command][1]).read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, ValueError):
        doc = ""
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())  # the first paragraph, unwrapped
    text = _USAGE_PREFIX.sub("", first)
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".").replace("``", "")
    return text or FALLBACK_SUMMARY.get(command, f"python -m {COMMANDS[command][0].removesuffix('.__main__')}")


def parser() -> argparse.ArgumentParser:
    """The top-level parser, for the help and the errors; each command parses its own arguments."""
    width = max(len(c) for c in COMMANDS)
    listing = "\n".join(f"  {c:<{width}}  {summary(c)}" for c in COMMANDS)
    p = argparse.ArgumentParser(
        prog="crystaltune",
        usage="crystaltune [-h] [--version] COMMAND [ARGS ...]",
        description=f"Hyperparameter search for crystal graph neural networks.\n\ncommands:\n{listing}",
        epilog="Run `crystaltune COMMAND --help` for a command's options.\n"
        "`crystaltune COMMAND ARGS ...` runs `python -m crystaltune.COMMAND ARGS ...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"crystaltune {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    if not argv:
        p.error(f"no command given; choose one of: {', '.join(COMMANDS)}")
    first = argv[0]
    if first.startswith("-"):  # only -h/--help and --version come before the command
        if first in ("-h", "--help", "--version"):
            p.parse_args([first])  # prints the help or the version, exits 0
        p.error(f"unrecognized argument {first!r} before the command; choose one of: {', '.join(COMMANDS)}")
    if first not in COMMANDS:
        p.error(f"unknown command {first!r}{did_you_mean(first, COMMANDS)} (choose one of: {', '.join(COMMANDS)})")
    module = importlib.import_module(COMMANDS[first][0])  # only now: torch, Ray, ... as that command needs
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
