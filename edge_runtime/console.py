"""Progress and output conventions shared by every command: --quiet, --json, progress on stderr,
and the native runtimes' log lines kept to TF_CPP_MIN_LOG_LEVEL."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm


def add_output_flags(parser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors and the result")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (implies no progress bars)")


# Seconds between two progress lines when stderr is a log file or a pipe.
LINE_EVERY = 30.0


def progress(iterable=None, *, total=None, desc=None, quiet=False, unit="it"):
    """Progress on stderr: nothing when quiet (commands pass --quiet or --json), a bar on a
    terminal, and plain lines (`ProgressLines`) anywhere else: a bar redraws itself with carriage
    returns, which a log file or a pipe keeps as one garbled line."""
    if not quiet and not _is_terminal(sys.stderr):
        return ProgressLines(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class ProgressLines:
    """The part of tqdm's interface the commands use (iterate, update, set_postfix, write, close,
    `with`), printing one line every LINE_EVERY seconds (`predict: 120/300 img (40 %), 31 s`)
    and, after such a line, one when done. Work shorter than LINE_EVERY prints nothing: a log
    gets a line for what took long, not one per step."""

    def __init__(self, iterable=None, *, total=None, desc=None, unit="it"):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n, self.postfix, self.lines, self.closed = 0, "", 0, False
        self.started = self.printed = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.printed >= LINE_EVERY:
            self.printed = now
            self._line(now)

    def set_postfix(self, refresh=True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    @staticmethod
    def write(text, file=None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.lines:
                self._line(time.monotonic(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        state = "done in " if done else ""
        self.lines += 1
        print(f"{self.desc}: {count} {self.unit}{share}, {state}{now - self.started:.0f} s{extra}", file=sys.stderr, flush=True)


class Log:
    """A stage's log, RUN_DIR/logs/<stage>.log (appended: a resumed or repeated stage continues the
    same log), one timestamped line per call, and, unless quiet, the same line on stderr."""

    def __init__(self, path, quiet: bool):
        self.path, self.quiet = Path(path), quiet

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        # Made on the first line, not before: a run refused before its stage starts leaves no folder behind.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


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


def result(args, line: str) -> None:
    """The command's result in one line on stdout (the report or file it wrote and the headline):
    printed under --quiet too, which means nothing but errors and the result; --json prints the
    result as JSON instead."""
    if not getattr(args, "json", False):
        print(line)


def file_size(size_bytes: int) -> str:
    """A file's size for people: "2.72 MB", "48.3 KB" (a tiny test model is not "0.00 MB")."""
    return f"{size_bytes / 1e6:.2f} MB" if size_bytes >= 1e6 else f"{size_bytes / 1e3:.1f} KB"


def did_you_mean(name: str, choices) -> str:
    """" (did you mean 'x'?)", closest first, for the one-line error that refuses a mistyped
    `name` (a key, a command); "" when no choice is close."""
    close = [repr(c) for c in difflib.get_close_matches(name, list(choices), n=3)]
    if not close:
        return ""
    return f" (did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?)"


def old_spelling(args, old: str, new: str) -> None:
    """An option renamed for one grammar across commands still works; this says, on stderr and
    unless --quiet or --json, what to write instead."""
    if not (getattr(args, "quiet", False) or getattr(args, "json", False)):
        print(f"{getattr(args, 'command', 'oncolite')}: note: {old} is the old spelling; write {new}", file=sys.stderr)


def printable(text) -> str:
    """Printable text for a file name (str or bytes): bytes that are not UTF-8 show as \\xNN
    instead of crashing the output or a UTF-8 report."""
    text = text if isinstance(text, str) else os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- native log lines ------------------------------------------------------------------------
# TensorFlow and LiteRT print from C++ straight to file descriptor 2, where Python's logging
# cannot reach. TensorFlow's absl lines obey TF_CPP_MIN_LOG_LEVEL only once absl is initialized;
# LiteRT's own logger (tflite::MinimalLogger: "INFO: Created TensorFlow Lite XNNPACK delegate for
# CPU.") ignores it, and ai-edge-litert offers no Python switch for it (its minimum severity is a
# C++ static). So both are filtered here, by the same variable: `python -m edge_runtime` and
# `oncolite` set it to 3 unless the user did; TF_CPP_MIN_LOG_LEVEL=0 shows every line again.

TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# An absl log line ("I0000 00:00:1796120757.632656 7701 port.cc:153] ...") and its severity.
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Informational lines of LiteRT (its "WARNING: " and "ERROR: " lines always pass) and of the
# TFLite converter's quantizer, which prints its settings with every full-integer conversion.
_TFLITE_INFO = re.compile(rb"^(VERBOSE: |INFO: |fully_quantize: )")


def native_log_level() -> int:
    try:
        return int(os.environ.get(TF_LOG_LEVEL, "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def native_stderr_filtered(level: int):
    """File descriptor 2 captured while the block runs, then written back without the native log
    lines below `level` (absl's, its notice about them, LiteRT's INFO lines). Everything else
    comes back as it was. Level 0 keeps everything: nothing is captured."""
    if level <= 0:
        yield
        return
    if sys.stderr is not None:
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = b"".join(line for line in capture.read().splitlines(keepends=True)
                            if not _below(line, level))
            while kept:
                kept = kept[os.write(2, kept):]


def _below(line: bytes, level: int) -> bool:
    found = _ABSL_LINE.match(line)
    if found:
        return _SEVERITY[found.group(1)] < level
    return line.rstrip() == _ABSL_NOTICE or bool(_TFLITE_INFO.match(line))
