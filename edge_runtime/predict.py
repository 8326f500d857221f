"""`python -m edge_runtime predict [MODEL] PATH...`: classify files, folders (recursive) and globs.

One row per image (label, probability, uncertain flag, top-k, latency) as a table, `--csv` or
`--json` (JSON Lines), written and flushed the moment the image is classified: an interrupted
run loses at most the image in flight, and `--skip-done` resumes it from its own output. A file
that cannot be read is listed with the reason and never stops the batch; files in a folder that
are not images by name are reported as skipped, never silently dropped. The exit code says
what happened: 0 all classified, 1 some (or all) files failed, 2 nothing to do / bad model.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import glob
import io
import json
import os
import stat
import sys
import time
from collections import Counter

from edge_runtime.backends import BACKENDS, RESOLVERS
from edge_runtime.console import add_output_flags, printable, progress
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, ImageError, OncoliteError
from edge_runtime.preprocess import FORMATS_TEXT, IMAGE_SUFFIXES, is_image_name

EPILOG = f"""\
images: {FORMATS_TEXT} (animated: the first frame); any other file gets a one-line error.
A folder is searched for {' '.join(sorted(IMAGE_SUFFIXES))} files;
its other files are reported as skipped.

output: one row per image, written as soon as it is classified: a table, --csv
(flushed per image) or --json (JSON Lines: a "model" line, then one "result",
"error" or "skipped" line per file, then a "summary" line). --quiet prints the
answers alone, one line per image ("FILE: LABEL (p P)"), the rest on stderr.
Every answer carries the decision rule (highest probability, or the model's
threshold) and, for a model with an uncertain band, whether it is uncertain
(review on a second reader).

resume: an interrupted run (Ctrl+C, a kill, a power cut) loses at most the image
in flight. Run the command again with --skip-done OUT, OUT being its --csv or
--json output: files OUT lists as classified are skipped (recognised by their
absolute path, from any folder and however the paths are spelled), files that
failed are tried again. Appending to OUT itself works:
  predict MODEL FOLDER --csv > out.csv                         (interrupted)
  predict MODEL FOLDER --csv --skip-done out.csv >> out.csv    (finishes it)
"""


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("paths", nargs="+", metavar="[MODEL] PATH",
                        help="a .tflite model (optional: default the shipped BUSI int8 model), then image files, "
                             "folders (searched recursively) or globs")
    parser.add_argument("--model", help="the .tflite model (instead of giving it first)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter (default: the first installed)")
    parser.add_argument("--threads", type=int, help="interpreter threads (default: the backend's choice)")
    parser.add_argument("--resolver", choices=RESOLVERS, default="default",
                        help="'reference' kernels are slower but bit-identical across CPUs")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to list per image (default 3)")
    parser.add_argument("--csv", action="store_true", help="print CSV on stdout, one row per image as it is classified "
                                                           "(--json prints JSON Lines, see 'output' below)")
    parser.add_argument("--skip-done", metavar="OUT",
                        help="an earlier --csv or --json output: skip the files it lists as classified (see 'resume' below)")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.model import EdgeModel, decision_rule, default_model_path

    if args.top_k < 1:
        raise OncoliteError(f"--top-k {args.top_k}: give 1 or more classes to list")
    if args.csv and args.json:
        raise OncoliteError("--csv and --json: give one (both write every answer to stdout)")
    model_path, paths = split_model_argument(args.model, args.paths)
    files, skipped = find_inputs(paths)
    done, appending = set(), False
    if args.skip_done:
        done = read_done(args.skip_done)
        appending = continue_output(args.skip_done)
    todo = [f for f in files if resume_key(f) not in done]
    model = EdgeModel.load(model_path or default_model_path(), backend=args.backend,
                           threads=args.threads, resolver=args.resolver)
    for warning in model.warnings:  # stderr in every mode: --json and --quiet are about stdout
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    rule = decision_rule(model.labels, model.threshold)
    writer = csv.writer(sys.stdout) if args.csv else None
    width = min(max((len(printable(f)) for f in todo), default=4), 60)
    if args.json:
        emit_json({"type": "model", "model": os.fsdecode(model.path), "sha256": model.sha256, "backend": model.backend,
                   "variant": model.facts.get("variant"), "kind": model.kind,
                   "labels": model.labels, "threshold": model.threshold, "decision_rule": rule,
                   "uncertain_margin": model.uncertain_margin})
        for path, reason in skipped:
            emit_json({"type": "skipped", "file": printable(path), "reason": reason})
    elif args.csv:
        if not appending:
            writer.writerow(csv_header(model.labels))
    elif not args.quiet:  # --quiet: the answers alone, one line per image (quiet_row)
        made = ", ".join(str(x) for x in (model.facts.get("variant"), model.kind) if x)
        print(f"model: {printable(os.fsdecode(model.path))} ({made}; {model.backend})")
        print(f"decision rule: {rule}" + (f"; uncertain below a margin of {model.uncertain_margin:g}"
                                          if model.uncertain_margin is not None else ""))
        print(f"{'file':<{width}}  {'label':<12} {'p':>6}  {'':9}  {'ms':>7}  top-k", flush=True)
    failed = []
    bar = progress(todo, desc="predict", quiet=args.quiet or args.json, unit="img")
    for path in bar:
        record = classify(model, path, args.top_k)
        if record["type"] == "error":
            failed.append(record)
        if args.json:
            emit_json(record)
        elif args.csv:
            writer.writerow(csv_row(record, model.labels))
            sys.stdout.flush()
        elif record["type"] == "result":
            bar.write(quiet_row(record) if args.quiet else table_row(record, width), file=sys.stdout)
            sys.stdout.flush()
    summary = {"images": len(todo), "classified": len(todo) - len(failed), "failed": len(failed),
               "skipped": len(skipped), "already_done": len(files) - len(todo)}
    if args.json:
        emit_json({"type": "summary", **summary})
    else:
        finish_table(summary, failed, skipped, table=not args.csv, quiet=args.quiet)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def split_model_argument(model: str | None, paths: list[str]) -> tuple[str | None, list[str]]:
    """`predict MODEL PATH...` or `predict PATH...` (shipped model) or `predict --model M PATH...`."""
    if paths and paths[0].lower().endswith(".tflite"):
        if model is not None:
            raise OncoliteError(f"two models: {paths[0]} and --model {model}; give one")
        return paths[0], paths[1:]
    return model, paths


def find_inputs(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand folders (recursively, image suffixes only, symlinked folders not followed: no loops)
    and globs; a named file is kept whatever it is, so a bad one gets reported, not dropped.
    Returns (files, skipped): skipped are the (path, reason) of a folder's other files."""
    files, skipped = [], []
    for path in paths:
        if os.path.isdir(path):
            found, passed_over = _walk_images(path)
            files += found
            skipped += passed_over
        elif os.path.lexists(path) or not glob.has_magic(path):
            files.append(path)
        else:
            files += sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
    if not files:
        also = f" ({skipped_summary(skipped)})" if skipped else ""
        raise OncoliteError(f"no images found in {', '.join(printable(p) for p in paths) or 'the arguments'}{also}; "
                            f"pass image files, folders or globs ({FORMATS_TEXT})")
    return files, skipped


def _walk_images(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    found, skipped = [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            # Hidden files are not inputs: an atomic writer's temporaries, macOS's ._ resource forks.
            if name.startswith("."):
                skipped.append((path, "hidden file"))
            elif is_image_name(name):
                found.append(path)
            else:
                skipped.append((path, "not an image by its suffix"))
    return found, skipped


def skipped_summary(skipped: list[tuple[str, str]]) -> str:
    """'skipped 3 file(s) by name (.txt: 2, .dcm: 1) and 1 hidden file(s), e.g. data/notes.txt'."""
    hidden = sum(reason == "hidden file" for _, reason in skipped)
    suffixes = Counter(os.path.splitext(path)[1].lower() or "no suffix"
                       for path, reason in skipped if reason != "hidden file")
    parts = []
    if suffixes:
        counts = ", ".join(f"{suffix}: {n}" for suffix, n in sorted(suffixes.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"{sum(suffixes.values())} file(s) that are not images by their suffix ({counts})")
    if hidden:
        parts.append(f"{hidden} hidden file(s)")
    return f"skipped {' and '.join(parts)}, e.g. {printable(skipped[0][0])}"


def resume_key(path) -> str:
    """How --skip-done recognises a file from any working directory and however its path is
    spelled (relative, absolute, through a symlinked folder): its absolute path with the folders
    resolved. The file's own name is not resolved: two links to one image are two inputs."""
    folder, name = os.path.split(os.path.abspath(path))
    return printable(os.path.join(os.path.realpath(folder), name))


def read_done(path: str) -> set[str]:
    """The resume keys of the files an earlier --csv or --json output lists as classified. A
    last line cut short by a kill is not a result; a file that failed is not done. Outputs of
    older versions have no `path`: their `file` is taken relative to the current folder."""
    name = printable(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OncoliteError(f"--skip-done {name}: file not found; pass the --csv or --json output of an earlier run") from None
    except OSError as e:
        raise OncoliteError(f"--skip-done {name}: cannot read it ({e.strerror}); check the path") from None
    if not stat.S_ISREG(mode):  # a FIFO would block
        raise OncoliteError(f"--skip-done {name}: not a regular file; pass the saved output of an earlier run")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OncoliteError(f"--skip-done {name}: cannot read it ({e}); pass the --csv or --json output of an earlier run") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("{"):
        return _done_in_json_lines(name, lines)
    rows = csv.DictReader(io.StringIO(text))
    if first and not {"file", "label", "error"} <= set(rows.fieldnames or ()):
        raise OncoliteError(f"--skip-done {name}: neither predict --csv output (no file, label and error columns) "
                            "nor --json lines; pass the output of an earlier run")
    # A row a kill cut short lacks its last columns (None).
    return {row.get("path") or resume_key(row["file"])
            for row in rows if None not in row.values() and row["label"] and not row["error"]}


def _done_in_json_lines(name: str, lines: list[str]) -> set[str]:
    done = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the line a kill cut short
                break
            raise OncoliteError(f"--skip-done {name}: line {number} is not JSON; pass the --json output of an earlier run") from None
        if isinstance(record, dict) and record.get("type") == "result" and isinstance(record.get("file"), str):
            done.add(record.get("path") or resume_key(record["file"]))
    return done


def continue_output(path: str) -> bool:
    """True when stdout is appending to `path` (`--skip-done OUT >> OUT`): no second CSV header,
    and a line a kill cut short is ended first so the next row starts on its own line."""
    try:
        out = os.fstat(sys.stdout.fileno())
        flags = fcntl.fcntl(sys.stdout.fileno(), fcntl.F_GETFL)
    except (OSError, ValueError):  # not a real file (a test's captured stdout)
        return False
    st = os.stat(path)
    if (out.st_dev, out.st_ino) != (st.st_dev, st.st_ino):
        return False
    if not flags & os.O_APPEND:
        print(f"warning: {printable(path)} is also the output, opened with '>' which emptied it before it could be read: "
              "every file is classified again (use '>>' to append)", file=sys.stderr)
        return False
    if st.st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            sys.stdout.write("\n")
    return True


def classify(model, path: str, top_k: int) -> dict:
    """One image -> its record (edge_runtime.model.prediction_record plus file and timings), or
    an error record (the batch goes on)."""
    from edge_runtime.model import prediction_record

    name, key = printable(path), resume_key(path)
    try:
        started = time.perf_counter()
        tensor = model.input_tensor(path)
        prepared = time.perf_counter()
        probs = model.run(tensor)
        finished = time.perf_counter()
    except ImageError as e:
        return {"type": "error", "file": name, "path": key, "error": printable(str(e))}
    return {"type": "result", "file": name, "path": key, **prediction_record(model, probs, top_k),
            "preprocess_ms": round((prepared - started) * 1000, 3), "inference_ms": round((finished - prepared) * 1000, 3)}


def emit_json(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _flag(uncertain: bool | None) -> str:
    return "" if uncertain is None else "true" if uncertain else "false"


def table_row(r: dict, width: int) -> str:
    top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
    flag = "uncertain" if r["uncertain"] else ""
    return f"{r['file']:<{width}}  {r['label']:<12} {r['probability']:6.3f}  {flag:<9}  {r['inference_ms']:7.2f}  {top}"


def quiet_row(r: dict) -> str:
    """One image's answer under --quiet, readable without the table's header."""
    return f"{r['file']}: {r['label']} (p {r['probability']:.3f}{', uncertain' if r['uncertain'] else ''})"


def finish_table(summary: dict, failed: list[dict], skipped: list[tuple[str, str]], table: bool, quiet: bool) -> None:
    """The end of a table (on stdout), or of --quiet's answers or of CSV (the notes go to stderr:
    stdout holds only the answers)."""
    out = sys.stdout if table and not quiet else sys.stderr
    if failed and table:
        gap = "" if quiet else "\n"  # a table's end is set apart from its rows
        print(f"{gap}{len(failed)} of {summary['images']} file(s) could not be classified:", file=out)
        for r in failed:
            print(f"  {r['error']}", file=out)
    elif not quiet and table:
        print(f"\n{summary['classified']} image(s) classified", file=out)
    if summary["already_done"] and not quiet:
        print(f"{summary['already_done']} file(s) already classified in --skip-done, not repeated", file=out)
    if skipped:
        print(skipped_summary(skipped), file=out)


def csv_header(labels: list[str]) -> list[str]:
    return ["file", "path", "label", "probability", *[f"p_{label}" for label in labels], "uncertain", "decision_rule",
            "preprocess_ms", "inference_ms", "error"]


def csv_row(r: dict, labels: list[str]) -> list:
    if r["type"] == "error":
        return [r["file"], r["path"], "", "", *[""] * len(labels), "", "", "", "", r["error"]]
    return [r["file"], r["path"], r["label"], f"{r['probability']:.6f}", *[f"{r['probabilities'][label]:.6f}" for label in labels],
            _flag(r["uncertain"]), r["decision_rule"], r["preprocess_ms"], r["inference_ms"], ""]
