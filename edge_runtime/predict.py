"""`python -m edge_runtime predict [MODEL] PATH...`: classify files, folders (recursive) and globs.

One line per image (label, probability, top-k, latency) as a table, `--json` or `--csv`. A file
that cannot be read is listed with the reason and never stops the batch; the exit code says
what happened: 0 all classified, 1 some (or all) files failed, 2 nothing to do / bad model.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
import time

from edge_runtime.backends import BACKENDS, RESOLVERS
from edge_runtime.console import add_output_flags, print_json, printable, progress
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, ImageError, OncoliteError
from edge_runtime.preprocess import is_image_name


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="[MODEL] PATH",
                        help="a .tflite model (optional: default the shipped BUSI int8 model), then image files, "
                             "folders (searched recursively) or globs")
    parser.add_argument("--model", help="the .tflite model (instead of giving it first)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter (default: the first installed)")
    parser.add_argument("--threads", type=int, help="interpreter threads (default: the backend's choice)")
    parser.add_argument("--resolver", choices=RESOLVERS, default="default",
                        help="'reference' kernels are slower but bit-identical across CPUs")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to list per image (default 3)")
    parser.add_argument("--csv", action="store_true", help="print CSV on stdout")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.model import EdgeModel, default_model_path

    model_path, paths = split_model_argument(args.model, args.paths)
    files = find_inputs(paths)
    model = EdgeModel.load(model_path or default_model_path(), backend=args.backend,
                           threads=args.threads, resolver=args.resolver)
    results = [classify(model, f, args.top_k) for f in
               progress(files, desc="predict", quiet=args.quiet or args.json, unit="img")]
    failed = [r for r in results if "error" in r]
    if args.json:
        print_json({"model": os.fsdecode(model.path), "backend": model.backend, "labels": model.labels,
                    "threshold": model.threshold, "results": results,
                    "summary": {"images": len(results), "classified": len(results) - len(failed), "failed": len(failed)}})
    elif args.csv:
        write_csv(sys.stdout, results, model.labels)
    else:
        print_table(results, quiet=args.quiet)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def split_model_argument(model: str | None, paths: list[str]) -> tuple[str | None, list[str]]:
    """`predict MODEL PATH...` or `predict PATH...` (shipped model) or `predict --model M PATH...`."""
    if model is None and paths and paths[0].lower().endswith(".tflite"):
        return paths[0], paths[1:]
    return model, paths


def find_inputs(paths: list[str]) -> list[str]:
    """Expand folders (recursively, image suffixes only, symlinked folders not followed: no loops)
    and globs; a named file is kept whatever it is, so a bad one gets reported, not dropped."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += _walk_images(path)
        elif os.path.lexists(path) or not glob.has_magic(path):
            files.append(path)
        else:
            files += sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
    if not files:
        raise OncoliteError(f"no images found in {', '.join(printable(p) for p in paths) or 'the arguments'}; "
                            "pass image files, folders or globs")
    return files


def _walk_images(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        # Hidden files are not inputs: an atomic writer's temporaries, macOS's ._ resource forks.
        found += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and is_image_name(n)]
    return found


def classify(model, path: str, top_k: int) -> dict:
    """One image -> its result row, or a row with `error` (the batch goes on)."""
    name = printable(path)
    try:
        started = time.perf_counter()
        tensor = model.quantize_input(model.prepare(path)[None])
        prepared = time.perf_counter()
        probs = model.run(tensor)
        finished = time.perf_counter()
    except ImageError as e:
        return {"file": name, "error": printable(str(e))}
    index = model.decide(probs)
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])[:max(top_k, 1)]
    return {"file": name, "label": model.labels[index], "index": index, "probability": float(probs[index]),
            "probabilities": {label: float(p) for label, p in zip(model.labels, probs)},
            "top_k": [[model.labels[i], float(probs[i])] for i in ranked],
            "preprocess_ms": round((prepared - started) * 1000, 3), "inference_ms": round((finished - prepared) * 1000, 3)}


def print_table(results: list[dict], quiet: bool = False) -> None:
    ok = [r for r in results if "error" not in r]
    if ok:
        width = min(max(len(r["file"]) for r in ok), 60)
        print(f"{'file':<{width}}  {'label':<12} {'p':>6}  {'ms':>7}  top-k")
        for r in ok:
            top = ", ".join(f"{label} {p:.3f}" for label, p in r["top_k"])
            print(f"{r['file']:<{width}}  {r['label']:<12} {r['probability']:6.3f}  {r['inference_ms']:7.2f}  {top}")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"\n{len(failed)} of {len(results)} file(s) could not be classified:")
        for r in failed:
            print(f"  {r['error']}")
    elif not quiet:
        print(f"\n{len(ok)} image(s) classified")


def write_csv(stream, results: list[dict], labels: list[str]) -> None:
    writer = csv.writer(stream)
    writer.writerow(["file", "label", "probability", *[f"p_{label}" for label in labels],
                     "preprocess_ms", "inference_ms", "error"])
    for r in results:
        if "error" in r:
            writer.writerow([r["file"], "", "", *[""] * len(labels), "", "", r["error"]])
        else:
            writer.writerow([r["file"], r["label"], f"{r['probability']:.6f}",
                             *[f"{r['probabilities'][label]:.6f}" for label in labels],
                             r["preprocess_ms"], r["inference_ms"], ""])
