"""Subcommand dispatch shared by `python -m edge_runtime` and `oncolite`.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`.
Only the chosen command's module is imported, so `predict` never pays for (or needs) TensorFlow.
A command that does import TensorFlow prints only the C++ log lines TF_CPP_MIN_LOG_LEVEL lets
through (default 3: none; TensorFlow's real errors come as Python exceptions).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import shlex
import sys

from edge_runtime.console import TF_LOG_LEVEL, did_you_mean, native_log_level, native_stderr_filtered
from edge_runtime.errors import EXIT_USAGE, OncoliteError

# name -> (module, one-line help)
EDGE_COMMANDS = {
    "predict": ("edge_runtime.predict", "classify image files, folders or globs with a .tflite model"),
    "serve": ("edge_runtime.server", "serve the phone-friendly field page and JSON API"),
    "bench": ("edge_runtime.bench", "time one .tflite model on this device: latency percentiles, memory "
                                    "(`oncolite benchmark` is the full report)"),
    "info": ("edge_runtime.model", "show a .tflite model's labels, preprocessing, tensors and checks"),
    "slidemap": ("edge_runtime.slidemap", "IDC slide map: a patient's patches with predicted IDC probability"),
    "webapp": ("edge_runtime.webapp", "build the installable, offline field page that runs the model in the phone's browser"),
}


class _FilteredLoader:
    """A module loader whose exec_module runs with native stderr filtered."""

    def __init__(self, loader, level: int):
        self._loader, self._level = loader, level

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            with native_stderr_filtered(self._level):
                self._loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self._loader

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Filters TensorFlow's first import. Its native libraries print INFO lines ("oneDNN custom
    operations are on", "Could not find cuda drivers") before absl's logging reads
    TF_CPP_MIN_LOG_LEVEL, so the variable alone cannot hide them; this applies it to them."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or name in sys.modules:
            return None
        # Out of the way while the real finders look, and back after: a first lookup may only ask
        # whether TensorFlow is installed (importlib.util.find_spec), and the import comes later.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader, native_log_level())
        return spec


@contextlib.contextmanager
def quiet_tensorflow_logs():
    """While a command runs: TensorFlow's C++ logs at TF_CPP_MIN_LOG_LEVEL (3 unless the user
    set it), applied also to the lines TensorFlow prints while it is first imported."""
    os.environ.setdefault(TF_LOG_LEVEL, "3")
    finder = None
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        finder = _QuietTensorFlowImport()
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: what is wrong, the closest option for a mistyped
    one, and where the full list is (not the usage block before it)."""

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        options = [o for action in self._actions for o in action.option_strings]
        hint = next((did_you_mean(u.split("=")[0], options) for u in unknown if u.startswith("-")), "")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{hint}; `{self.prog} --help` lists the options\n")


def dispatch(prog: str, commands: dict, argv=None, groups: dict | None = None) -> int:
    """Run one command. `groups`: heading -> command names, how the command list is shown
    (default: one list, "commands")."""
    with quiet_tensorflow_logs():
        return _dispatch(prog, commands, argv, groups or {"commands": list(commands)})


def _dispatch(prog: str, commands: dict, argv, groups: dict) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, commands))
    listing = "\n\n".join(f"{heading}:\n" + "\n".join(f"  {name:<{width}}  {commands[name][1]}" for name in names)
                           for heading, names in groups.items())
    if argv and argv[0] == "--version":
        print(f"{prog} {version()}")
        return 0
    if argv[:1] == ["help"]:  # `oncolite help [COMMAND]`: the listing, or the command's own help
        argv = [argv[1], "--help"] if len(argv) > 1 else ["--help"]
    if argv and argv[0] not in ("-h", "--help") and argv[0] not in commands:
        # One line saying what is wrong and the closest command, not the whole list before it.
        at = next((i for i, a in enumerate(argv) if a in commands), None)
        if argv[0].startswith("-") and at is not None:
            moved = shlex.join(argv[:at])
            print(f"{prog}: error: options go after the command: {prog} {argv[at]} ... {moved}", file=sys.stderr)
        else:
            print(f"{prog}: error: unknown command {argv[0]!r}{did_you_mean(argv[0], commands)}\n"
                  f"`{prog} --help` lists the commands", file=sys.stderr)
        return EXIT_USAGE
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} COMMAND [options]\n\n{listing}\n\n"
              f"`{prog} COMMAND --help` describes one command; `{prog} --version` prints the version.",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    name = argv[0]
    return run_command(f"{prog} {name}", commands[name][0], commands[name][1], argv[1:])


def run_command(prog: str, module_name: str, description: str, argv: list[str]) -> int:
    """Parse `argv` for the command module (add_arguments, main) and run it: an OncoliteError is
    one line and exit 2, an interrupt or a closed pipe no traceback. Also what a module run on its
    own uses (`python -m oncolite.benchmarks.float_study`, `run_module`)."""
    module = importlib.import_module(module_name)
    parser = CommandParser(prog=prog, description=description)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    # Reports and manifests record the command that made them as given, quoted so it can be pasted
    # (a BUSI file name holds spaces); with `oncolite run` that is not sys.argv.
    args.command_line = " ".join([prog, shlex.join(argv)]) if argv else prog
    args.command = prog
    try:
        return int(module.main(args) or 0)
    except OncoliteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop as a pipe's writer does, without a traceback;
        # stdout goes to devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


def run_module(module_name: str, argv=None) -> int:
    """`python -m MODULE` of a command module that is not an `oncolite` command (the studies):
    the commands' parsing, quiet TensorFlow import and one-line errors."""
    module = importlib.import_module(module_name)
    with quiet_tensorflow_logs():
        return run_command(f"python -m {module_name}", module_name, module.__doc__.split("\n\n")[0],
                           list(sys.argv[1:] if argv is None else argv))


def version() -> str:
    """The installed package's version; without an installed package (a checkout on PYTHONPATH),
    pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("oncolite")
    except PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    try:  # the [project] table's `version = "..."` (tomllib is Python 3.11+ only)
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    found = re.search(r'^version\s*=\s*"([^"]+)"', text.partition("[project]")[2], re.MULTILINE)
    return found.group(1) if found else "unknown"


def main(argv=None) -> int:
    return dispatch("python -m edge_runtime", EDGE_COMMANDS, argv)
