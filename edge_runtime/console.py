"""Progress and output conventions shared by every command: --quiet, --json, progress on stderr."""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm


def add_output_flags(parser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors and the result")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (implies no progress bars)")


def progress(iterable=None, *, total=None, desc=None, quiet=False, unit="it"):
    """A progress bar on stderr, off when quiet, when printing JSON, or when stderr is not a terminal-ish stream."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True)


def print_json(obj) -> None:
    from edge_runtime.atomic import json_default

    json.dump(obj, sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")


def say(args, *lines) -> None:
    """Human-readable lines on stdout unless --quiet or --json."""
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        return
    for line in lines:
        print(line)


def printable(text) -> str:
    """Printable text for a file name (str or bytes): bytes that are not UTF-8 show as \\xNN
    instead of crashing the output or a UTF-8 report."""
    text = text if isinstance(text, str) else os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
