"""Subcommand dispatch shared by `python -m edge_runtime` and `oncolite`.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`.
Only the chosen command's module is imported, so `predict` never pays for (or needs) TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edge_runtime.errors import EXIT_USAGE, OncoliteError

# name -> (module, one-line help)
EDGE_COMMANDS = {
    "predict": ("edge_runtime.predict", "classify image files, folders or globs with a .tflite model"),
    "serve": ("edge_runtime.server", "serve the phone-friendly field page and JSON API"),
    "bench": ("edge_runtime.bench", "time a .tflite model on this device (latency percentiles, memory)"),
    "info": ("edge_runtime.model", "show a .tflite model's labels, preprocessing, tensors and checks"),
    "slidemap": ("edge_runtime.slidemap", "IDC slide map: a patient's patches with predicted IDC probability"),
}


def dispatch(prog: str, commands: dict, argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, commands))
    listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items())
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: {prog} COMMAND [options]\n\ncommands:\n{listing}\n\n"
              f"`{prog} COMMAND --help` describes one command.", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"{prog}: error: unknown command {argv[0]!r}", file=sys.stderr)
            return EXIT_USAGE
        return 0 if argv else EXIT_USAGE
    name = argv[0]
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=commands[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    # Reports record the command that made them; with `oncolite run` that is not sys.argv.
    args.command_line = " ".join([prog, name, *argv[1:]])
    try:
        return int(module.main(args) or 0)
    except OncoliteError as e:
        print(f"{prog} {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog} {name}: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    return dispatch("python -m edge_runtime", EDGE_COMMANDS, argv)
