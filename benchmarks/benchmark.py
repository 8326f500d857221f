"""`oncolite benchmark RUN_DIR`: the float Keras model against every TFLite variant.

Accuracy side: every model predicts the SAME held-out images of the manifest; metrics with
bootstrap CIs come from train.metrics, paired statistics against the float model from
benchmarks.stats. Cost side: size, load time, latency per thread count and peak RSS, each
variant timed in a process of its own (`python -m edge_runtime bench` for .tflite files,
`python -m oncolite.benchmarks.latency` for the Keras model). Variants LiteRT.js can run (the
int8_uint8 export) are also timed in headless Chromium (edge_runtime.webapp.browser_latency)
in the same run, when Chromium, playwright and the LiteRT.js files are there (--no-browser:
never). Devices given with --target run the same edge bench remotely. Writes
RUN_DIR/benchmark/report.json, report.md and PNG plots.

A run directory of a CV fold (RUN/folds/<i>) is benchmarked on its own fold's test side; a
binary model with an operating point decides with it (the float model: RUN_DIR/threshold.json,
each variant: its sidecar's `threshold`). Timing settings default to the run's config
(`benchmark`: threads, warmup, runs); flags win.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime.console import add_output_flags, old_spelling, print_json, progress, result, say
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, OncoliteError
from edge_runtime.hashing import file_sha256
from oncolite.train.config import add_set_argument, with_overrides
from oncolite.train.rundir import RunDir

from .pooled import flipped_images, fold_predictions
from .report import BASELINE, FLOAT

# report key (issue 8's names) -> train.metrics name
METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "f1_macro": "macro_f1",
           "roc_auc_macro": "macro_roc_auc", "pr_auc_macro": "macro_pr_auc", "mcc": "mcc"}
LATENCY_IMAGES = 10  # distinct images cycled through by the timed runs
BROWSER_THREADS = "1"  # the page runs LiteRT.js on one thread: compared with the Python runtime at 1


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", nargs="*", metavar="RUN_DIR|MODEL.tflite",
                        help="run directory with models/float.keras and models/*.tflite; or, with --float, any "
                             "number of .tflite files (ours, Model Maker's, or bare ones with --labels)")
    # The old spelling of RUN_DIR; also keeps argparse from reading `--run` as an abbreviation of --runs.
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)
    parser.add_argument("--float", dest="float_model", metavar="MODEL",
                        help="your own float model (.keras, .h5 or SavedModel directory): the reference every "
                             ".tflite file is compared with; images from --data or --manifest")
    parser.add_argument("--manifest", help="manifest with the held-out images (default: RUN_DIR/manifest.json)")
    parser.add_argument("--side", default="test", choices=("test", "val", "train"), help="manifest side to evaluate on")
    parser.add_argument("--threads", metavar="N,...",
                        help="interpreter thread counts to time, comma-separated as in `bench`, capped at the "
                             "available cores (default: config benchmark.threads)")
    parser.add_argument("--no-timing", action="store_true",
                        help="accuracy, agreement and size only: no latency, memory or browser timing")
    parser.add_argument("--runs", type=int, help="timed runs per variant and thread count (default: config benchmark.runs)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs before them (default: config benchmark.warmup)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs")
    parser.add_argument("--target", action="append", default=[], metavar="URL",
                        help="also run on a device: ssh://user@host[:port][?python=PATH] or adb[:serial] (repeatable)")
    parser.add_argument("--benchmark-model", metavar="PATH",
                        help="LiteRT's Android benchmark_model binary for adb targets "
                             "(default: $ONCOLITE_BENCHMARK_MODEL, else tools/benchmark_model)")
    parser.add_argument("--no-browser", dest="browser", action="store_false",
                        help="skip the in-browser latency (LiteRT.js in headless Chromium; by default measured for "
                             "the variants it can run when Chromium, playwright and web/node_modules are there)")
    parser.add_argument("--compare", nargs="+", metavar="REPORT",
                        help="merge these report.json files (or run directories) with RUN_DIR's into one table; runs nothing")
    from oncolite.quantize.byo import add_model_arguments

    add_model_arguments(parser, "images in class folders, every one evaluated (with --float)", out_suffix="benchmark")
    add_set_argument(parser, "benchmark")
    add_output_flags(parser)


def main(args) -> int:
    if args.old_run:
        if args.run_dir:
            raise OncoliteError(f"--run {args.old_run} and {' '.join(args.run_dir)}: give the run directory once, first")
        old_spelling(args, f"--run {args.old_run}", f"oncolite benchmark {args.old_run} ...")
        args.run_dir = [args.old_run]
    if args.float_model or any(str(p).endswith(".tflite") for p in args.run_dir):
        return main_byo(args)
    if len(args.run_dir) != 1:
        raise OncoliteError("give one RUN_DIR, or --float MODEL with .tflite files and --data/--manifest")
    used = [f for f in ("data", "labels", "size", "mean", "std", "resample", "out") if getattr(args, f, None) is not None]
    if used:
        raise OncoliteError(f"--{used[0]}: only with --float MODEL (a bring-your-own model); a run directory has its own")
    run_dir = Path(args.run_dir[0])
    if not run_dir.exists():
        raise OncoliteError(f"{run_dir}: no such run directory; check the path, or train one with "
                            f"`oncolite train {run_dir} --manifest M`")
    if args.compare:
        from .report import compare_reports, write_comparison

        reports = [load_report(p) for p in [run_dir, *args.compare]]
        merged = compare_reports(reports)
        md = write_comparison(RunDir(run_dir).benchmark_dir, merged)
        print_json(merged) if args.json else say(args, md)
        result(args, f"report: {RunDir(run_dir).benchmark_dir / 'compare.md'}: {len(merged['rows'])} rows from "
                     f"{len(reports)} reports")
        return EXIT_OK
    from .report import write_report
    from oncolite.quantize.rundir import open_run

    run = open_run(run_dir)
    run.config = with_overrides(run.config, args.set, "benchmark")
    settings = run.config["benchmark"]
    threads = timed_threads(args, settings["threads"])
    report, probs, y = run_benchmark(run, manifest_path=args.manifest, side=args.side, threads=threads,
                                     runs=settings["runs"] if args.runs is None else args.runs,
                                     warmup=settings["warmup"] if args.warmup is None else args.warmup,
                                     bootstrap=args.bootstrap, targets=args.target, benchmark_model=args.benchmark_model,
                                     browser=args.browser, quiet=args.quiet or args.json, command=args.command_line)

    earlier = earlier_timing(run.dir.benchmark_report, report) if not threads else None
    if earlier:
        carry_timing(report, earlier)
    elif not threads:
        # Nothing timed and nothing to carry over: no plot of an earlier run's timing stays beside this report.
        (run.dir.benchmark_dir / "latency.png").unlink(missing_ok=True)
    md = write_report(run.dir.benchmark_dir, report, probs, y)
    # report.md holds every timing: the CPU's int8 features, the float model's ways of calling,
    # batch throughput, the image-to-answer split and the browser's latency.
    print_json(report) if args.json else say(args, md)
    result(args, f"report: {run.dir.benchmark_report_md}: {headline(report)}")
    return EXIT_SOME_FAILED if report["failures"] else EXIT_OK


# What timing adds to a report, beside each variant's keys absent from an untimed one.
TIMED_SETTINGS = ("threads", "runs", "warmup", "latency_images")


def earlier_timing(report_path: Path, report: dict) -> dict | None:
    """The previous report.json beside this untimed one, if it timed the very same model files
    (sha256 recorded per model; size, and a file not changed after that report, when it lacks one)."""
    try:
        old = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    old_variants = old.get("variants") or {}
    if not isinstance(old_variants, dict) or not any(v.get("latency_ms") for v in old_variants.values() if isinstance(v, dict)):
        return None
    for name, v in report["variants"].items():
        if name == BASELINE:
            continue
        before = old_variants.get(name)
        if not isinstance(before, dict):
            return None
        if before.get("sha256"):
            if before["sha256"] != v.get("sha256"):
                return None
        elif not (before.get("size_bytes") == v.get("size_bytes") and v.get("file")
                  and Path(v["file"]).stat().st_mtime <= report_path.stat().st_mtime):
            return None
    return old


def carry_timing(report: dict, old: dict) -> None:
    """An untimed run over the same model files keeps the earlier run's timing, marked as such."""
    for name, v in report["variants"].items():
        before = old["variants"].get(name, {})
        for key, value in before.items():
            if key not in v or key == "latency_ms":
                v[key] = value
    report["settings"].update({k: old["settings"][k] for k in TIMED_SETTINGS if k in old.get("settings", {})})
    if old.get("browser") and "skipped" not in old["browser"]:
        report["browser"] = old["browser"]
    report["timing_from"] = {"created": old.get("created"), "command": old.get("command"),
                             "note": "timing from the earlier run (same model files); this run timed nothing"}


def headline(report: dict) -> str:
    """The result line's figures: the images, the float model's MCC, the shipped int8 model's (or
    the first .tflite file's) MCC and agreement with it, and any failures."""
    from .report import fmt

    variants, split = report["variants"], report["split"]
    parts = [f"{split.get('n_' + str(split.get('side')))} {split.get('side')} images"]
    if FLOAT in variants:
        parts.append(f"{FLOAT} MCC {fmt(variants[FLOAT].get('mcc'))}")
    others = [name for name in variants if name not in (FLOAT, BASELINE)]
    shown = "tflite_int8" if "tflite_int8" in variants else others[0] if others else None
    if shown:
        agreement = variants[shown].get("agreement_with_float")
        parts.append(f"{shown} MCC {fmt(variants[shown].get('mcc'))}"
                     + ("" if agreement is None else f", agreement {agreement:.1%}"))
    if report["failures"]:
        parts.append(f"{len(report['failures'])} failure(s): see the report")
    return "; ".join(parts)


def parse_threads(text: str) -> list[int]:
    """'1,2,4' (read as `bench` reads it) -> the counts this machine can run (at most its usable
    cores); 'none', the old spelling of --no-timing -> []."""
    from edge_runtime.bench import parse_threads as thread_list

    if text.strip().lower() in ("none", "0", ""):
        return []
    return usable_threads(thread_list(text))


def timed_threads(args, configured) -> list[int]:
    """The thread counts to time: none with --no-timing, else --threads, else the config's."""
    if args.no_timing:
        return []
    if args.threads is None:
        return usable_threads(configured)
    if args.threads.strip().lower() == "none":
        old_spelling(args, "--threads none", "--no-timing")
    return parse_threads(args.threads)


def usable_threads(wanted) -> list[int]:
    """The thread counts asked for that this machine can run ([1] if none can); none asked: no timing."""
    if not wanted:
        return []
    cores = available_cores()
    return [t for t in sorted(set(wanted)) if 0 < t <= cores] or [1]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_report(path) -> dict:
    """A report.json, or the one inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).benchmark_report
    if not path.is_file():
        raise OncoliteError(f"{path}: no benchmark report; run `oncolite benchmark RUN_DIR` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OncoliteError(f"{path}: not valid JSON ({e}); re-run the benchmark") from None


def find_models(run_dir: Path) -> dict[str, Path]:
    """Report name -> model file: the Keras float model first, then the TFLite variants present
    (export's variants in its order, then any other .tflite, e.g. int8_ptq_selective)."""
    from edge_runtime.variants import VARIANTS

    layout = RunDir(run_dir)
    models, keras_path = layout.models, layout.float_model
    if not keras_path.is_file():
        raise OncoliteError(f"{keras_path}: missing; train first (`oncolite train`) or give the right RUN_DIR")
    found = {FLOAT: keras_path}
    # Hidden files are an atomic writer's temporaries (.<stem>.<random>.tmp.tflite), possibly half-written.
    others = sorted(p for p in models.glob("*.tflite") if p.stem not in VARIANTS and not p.name.startswith("."))
    for path in [layout.variant(v) for v in VARIANTS] + others:
        if path.is_file():
            found[f"tflite_{path.stem}"] = path
    if len(found) == 1:
        raise OncoliteError(f"{models}: no .tflite variants; export them first (`oncolite export {run_dir}`)")
    return found


def model_preprocessing(run_dir: Path):
    """The preprocessing the variants were exported with (their sidecars carry it)."""
    from edge_runtime.preprocess import Preprocessing

    models = RunDir(run_dir).models
    for sidecar in sorted(p for p in models.glob("*.json") if not p.name.startswith(".")):
        try:
            d = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "preprocessing" in d:
            return Preprocessing.from_dict(d["preprocessing"])
    raise OncoliteError(f"{models}: no <variant>.json sidecar with preprocessing; re-run `oncolite export`")


def run_benchmark(run, manifest_path=None, side="test", threads=(1, 2), runs=50, warmup=5, bootstrap=1000,
                  targets=(), benchmark_model=None, browser=True, quiet=False, command=None):
    """Evaluate and time everything of a run (quantize.rundir.open_run) on its fold's `side`;
    returns (report dict, {name: probs}, y_true)."""
    from oncolite.train.manifest import load_manifest

    run_dir = run.path
    models = find_models(run_dir)
    manifest = load_manifest(manifest_path) if manifest_path else run.manifest
    manifest_path = Path(manifest_path or run.dir.manifest_copy)
    sides = manifest.sides(fold=run.fold)
    items = sides[side]
    if not items:
        raise OncoliteError(f"{manifest_path}: no {side} images; split with a {side} side or pick --side")
    labels = list(manifest.labels)
    y = np.array([labels.index(it["label"]) for it in items])
    prep = model_preprocessing(run_dir)

    probs, rules = predict_all(models, items, labels, prep, run, quiet)
    bands = {name: stored_band(path) for name, path in models.items()}
    return build_report(run, models, manifest, manifest_path, side, sides, items, labels, y, prep, probs, rules, bands,
                        threads=threads, runs=runs, warmup=warmup, bootstrap=bootstrap, targets=targets,
                        benchmark_model=benchmark_model, browser=browser, quiet=quiet, command=command)


def build_report(run, models, manifest, manifest_path, side, sides, items, labels, y, prep, probs, rules, bands, *,
                 threads, runs, warmup, bootstrap, targets=(), benchmark_model=None, browser=True, quiet=False,
                 command=None, edge_args=None):
    """Everything after the predictions, shared by a run directory and a bring-your-own set:
    metrics, paired statistics, cost side, timing (the browser's too), devices; returns
    (report, probs, y)."""
    from oncolite.train.metrics import majority_baseline
    from oncolite.train.provenance import git_state

    run_dir = run.path
    variants = accuracy_side(y, probs, rules, bands, labels, bootstrap, quiet)
    # Without a training side the baseline falls back to the evaluated side's majority.
    train_y = [labels.index(it["label"]) for it in sides["train"]] if sides["train"] else y
    baseline = majority_baseline(train_y, y, len(labels), labels=labels, bootstrap=bootstrap)
    variants[BASELINE] = {**metric_entry(baseline), "majority_class": baseline["majority_class"]}
    add_cost_side(variants, models)
    failures = []
    images = [it["path"] for it in items[:LATENCY_IMAGES]]
    if threads:
        failures += add_latency(variants, models, images, prep, threads, runs, warmup, quiet, edge_args=edge_args)
    if not browser:
        in_browser = {"skipped": "turned off (--no-browser)"}
    elif not threads:
        in_browser = {"skipped": "no timing in this run (--no-timing)"}
    else:
        in_browser, browser_failures = browser_timing(variants, models, images, runs, warmup, quiet)
        failures += browser_failures
    devices = {}
    for target in targets:
        from .devices import run_target

        try:
            devices[target] = run_target(target, models, images, probs, rules, items, runs=runs, warmup=warmup,
                                         threads=threads or [1], benchmark_model=benchmark_model, quiet=quiet)
        except OncoliteError as e:
            failures.append({"target": target, "error": str(e)})
    predictions = fold_predictions(labels, items, y, probs, rules, bands)
    report = {
        "format": "oncolite-benchmark/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "run": str(run_dir),
        "labels": labels,
        "split": split_facts(manifest, manifest_path, side, len(items), run.fold),
        "machine": machine_facts(),
        "git": git_state(),
        "settings": {"threads": list(threads), "runs": runs, "warmup": warmup, "bootstrap": bootstrap,
                     "latency_images": len(images), "preprocessing": prep.to_dict(), "browser": browser},
        "variants": variants,
        "browser": in_browser,
        "predictions": predictions,
        "flipped": {name: flipped_images([predictions], name) for name in probs if name != FLOAT},
        "devices": devices,
        "failures": failures,
    }
    return report, probs, y


def stored_band(path: Path):
    """The uncertain band export stored beside a variant (None: none, or a Keras model)."""
    sidecar = path.with_suffix(".json")
    if path.suffix != ".tflite" or not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get("uncertain_margin")
    except json.JSONDecodeError:
        return None


def predict_all(models: dict, items: list, labels: list, prep, run, quiet: bool) -> tuple[dict, dict]:
    """N x C probabilities of every model on the same items, all with the variants' preprocessing,
    and each model's operating point (None: argmax): the run's threshold.json for the float
    model, the one stored with each variant for the rest."""
    from oncolite.train.predictor import load_predictor, predict_items

    probs, rules = {}, {}
    for name, path in progress(models.items(), total=len(models), desc="predicting", quiet=quiet, unit="model"):
        predictor = load_predictor(path, run.path)
        p = np.asarray(predict_items(path, items, prep=prep, quiet=True, predictor=predictor), dtype=np.float64)
        if p.shape != (len(items), len(labels)):
            raise OncoliteError(f"{path}: gives {p.shape[-1]} outputs for {len(labels)} labels; "
                                "the model was trained on another manifest")
        probs[name] = p
        rules[name] = run.threshold() if name == FLOAT else predictor.threshold
    return probs, rules


def metric_entry(full: dict) -> dict:
    """A report row's metrics, each with its CI, from a train.metrics classification report."""
    entry = {key: _number(full["metrics"][name]["value"]) for key, name in METRICS.items()}
    entry["ci"] = {key: full["metrics"][name]["ci"] for key, name in METRICS.items()}
    entry.update({"operating_point": full["operating_point"], "confusion_matrix": full["confusion_matrix"]["counts"],
                  "metrics": full})
    return entry


def accuracy_side(y, probs: dict, rules: dict, bands: dict, labels: list, bootstrap: int, quiet: bool) -> dict:
    from edge_runtime.decision import decisions, margins, uncertain
    from oncolite.train.metrics import classification_report

    from .pooled import CONFIDENT
    from .stats import compare_to_reference

    preds = {name: decisions(p, rules[name], labels) for name, p in probs.items()}
    ref_margins = margins(probs[FLOAT], rules[FLOAT], labels)
    variants = {}
    for name, p in progress(probs.items(), total=len(probs), desc="metrics", quiet=quiet, unit="model"):
        rule = rules[name] or {}
        full = classification_report(y, p, labels, bootstrap=bootstrap, threshold=rule.get("value"),
                                     positive=rule.get("positive"))
        paired = compare_to_reference(y, probs[FLOAT], p, preds[FLOAT], preds[name], labels, ref_margins, CONFIDENT)
        entry = metric_entry(full)
        entry.update({
            "agreement_with_float": paired["agreement"]["value"],
            "agreement_ci": paired["agreement"]["ci"],
            "flips": paired["flips"]["count"],
            "confident_flips": paired["flips"]["confident"],
            "mean_abs_prob_diff": paired["probability_difference"]["mean_abs"],
            "max_abs_prob_diff": paired["probability_difference"]["max_abs"],
            "mcnemar": paired["mcnemar"],
            "per_class_delta": paired["per_class_delta"],
            "uncertain_margin": bands.get(name),
        })
        if bands.get(name) is not None:
            flagged = uncertain(p, bands[name], rules[name], labels)
            outside = ~flagged
            same = preds[name] == preds[FLOAT]
            entry["uncertain"] = {"flagged": int(flagged.sum()), "share": float(flagged.mean()),
                                  "agreement_outside": float(same[outside].mean()) if outside.any() else None}
        variants[name] = entry
    return variants


def _number(value):
    # NaN (e.g. ROC-AUC with one class present) is not JSON: null.
    return None if value is None or not np.isfinite(value) else float(value)


def add_cost_side(variants: dict, models: dict) -> None:
    keras_size = models[FLOAT].stat().st_size
    fp32 = models.get("tflite_fp32")
    fp32_size = fp32.stat().st_size if fp32 else None
    for name, path in models.items():
        size = path.stat().st_size
        variants[name].update({"file": str(path), "sha256": file_sha256(path), "size_bytes": size,
                               "size_ratio_keras": size / keras_size,
                               "size_ratio_fp32": size / fp32_size if fp32_size else None,
                               "latency_ms": {}})  # until timed (--no-timing: never)
    variants[BASELINE].update({"size_bytes": None, "latency_ms": {}})


def add_latency(variants, models, images, prep, threads, runs, warmup, quiet, edge_args=None) -> list:
    """Time each model in a subprocess of its own; returns the failures (the report notes them).
    The Keras model's latency is its fastest way of calling (benchmarks.latency), and every
    speed-up is against that one (`speedup_vs_keras`); `speedup_vs_keras_eager` beside it.
    `edge_args`: extra `edge_runtime bench` flags per model (a bare .tflite's labels)."""
    failures = []
    # The Keras model takes one process per thread count, each edge variant one in all.
    bar = progress(total=len(models) - 1 + len(threads), desc="timing", quiet=quiet, unit="process")
    for name, path in models.items():
        try:
            if name == FLOAT:
                timing = time_keras(path, images, prep, threads, runs, warmup, bar)
            else:
                timing = time_edge(path, images, threads, runs, warmup, (edge_args or {}).get(name, ()))
                timing.pop("device")  # the report's machine section says it once
                bar.update(1)
        except OncoliteError as e:
            failures.append({"variant": name, "error": str(e)})
            variants[name]["latency_ms"] = {}
            continue
        variants[name].update(timing)
    bar.close()
    keras = variants[FLOAT].get("latency_ms", {})
    eager = {t: modes["eager"]["inference_ms"] for t, modes in (variants[FLOAT].get("keras_modes") or {}).items()
             if "inference_ms" in modes.get("eager", {})}
    for entry in variants.values():
        lat = entry.get("latency_ms", {})
        entry["speedup_vs_keras"] = {t: keras[t]["p50"] / v["p50"] for t, v in lat.items() if t in keras and v.get("p50")}
        entry["speedup_vs_keras_eager"] = {t: eager[t]["p50"] / v["p50"] for t, v in lat.items() if t in eager and v.get("p50")}
    return failures


def run_json(cmd: list[str], what: str, timeout: float = 3600) -> dict:
    """Run a command that prints one JSON document; its stderr becomes the error message. It runs
    in the user's working directory: paths the user gave are relative to it."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OncoliteError(f"{what}: no answer after {timeout:.0f} s; lower --runs") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise OncoliteError(f"{what}: exited with {done.returncode}: {tail}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise OncoliteError(f"{what}: printed no JSON result; run it by hand to see why") from None


def time_edge(model: Path, images: list, threads: list, runs: int, warmup: int, extra=()) -> dict:
    """`python -m edge_runtime bench` in its own process: all thread counts, one peak RSS."""
    cmd = [sys.executable, "-m", "edge_runtime", "bench", str(model), *map(str, images),
           "--threads", ",".join(map(str, threads)), "--runs", str(runs), "--warmup", str(warmup), *extra, "--json"]
    return edge_timing(run_json(cmd, f"{model}: edge bench"))


def edge_timing(result: dict) -> dict:
    """The report's timing fields from `edge_runtime bench --json` output."""
    per_threads = {str(r["threads"]): r for r in result["threads"]}
    return {
        "interpreter": f"{result.get('backend')} ({result.get('resolver')} resolver)",
        "kind": result.get("kind"),
        "load_ms": next(iter(per_threads.values()))["load_ms"] if per_threads else None,
        "preprocess_ms": result.get("preprocessing"),
        "latency_ms": {t: r["latency_ms"] for t, r in per_threads.items()},
        "throughput_per_s": {t: r.get("throughput_per_s") for t, r in per_threads.items()},
        "stages_ms": {t: r.get("stages_ms") for t, r in per_threads.items()},
        "batch": {t: r.get("batch") for t, r in per_threads.items()},
        "peak_rss_mb": result.get("peak_rss_mb"),
        "device": result.get("device"),
    }


def time_keras(model: Path, images: list, prep, threads: list, runs: int, warmup: int, bar) -> dict:
    """benchmarks.latency once per thread count (TensorFlow fixes its pools at start-up)."""
    out = {"latency_ms": {}, "throughput_per_s": {}, "peak_rss_mb": {}, "keras_modes": {}, "keras_mode": {}, "batch": {}}
    for t in threads:
        cmd = [sys.executable, "-m", "oncolite.benchmarks.latency", str(model), *map(str, images),
               "--prep", json.dumps(prep.to_dict()), "--threads", str(t), "--runs", str(runs), "--warmup", str(warmup)]
        r = run_json(cmd, f"{model}: Keras timing at {t} threads")
        out["latency_ms"][str(t)] = r["inference_ms"]
        out["throughput_per_s"][str(t)] = r["throughput_per_s"]
        out["peak_rss_mb"][str(t)] = r["peak_rss_mb"]
        out["keras_modes"][str(t)] = r["modes"]
        out["keras_mode"][str(t)] = r["mode"]
        out["batch"][str(t)] = r.get("batch")
        out.update(interpreter=r["interpreter"], load_ms=r["load_ms"], preprocess_ms=r["preprocess_ms"])
        bar.update(1)
    # One number like the edge variants': the largest process.
    out["peak_rss_mb"] = max(out["peak_rss_mb"].values())
    return out


def browser_timing(variants: dict, models: dict, images: list, runs: int, warmup: int, quiet: bool) -> tuple[dict, list]:
    """In-browser latency (issue 18) of every variant LiteRT.js can run, in headless Chromium
    (WebAssembly, the page's one thread), beside the Python runtime's latency of the same file at
    one thread from this same run: `ratio_to_python` is browser p50 / Python p50. Returns
    ({"variants": {...}, "refused": {name: why}} or {"skipped": why, ...}, failures)."""
    from edge_runtime import webapp
    from edge_runtime.model import EdgeModel

    runnable, refused = {}, {}
    for name, path in models.items():
        if name == FLOAT:
            continue
        try:
            problem = webapp.browser_problem(path, EdgeModel.load(path), path.read_bytes())
        except OncoliteError as e:  # e.g. a bare .tflite: the page needs labels and preprocessing in the model
            problem = str(e)
        if problem:
            refused[name] = problem
        else:
            runnable[name] = path
    if not runnable:
        return {"skipped": "no variant LiteRT.js can run (uint8 or float32 input/output and a static batch of 1: "
                           "the int8_uint8 export)", "refused": refused}, []
    problem = webapp.browser_unavailable()
    if problem:
        return {"skipped": problem, "refused": refused}, []
    measured, failures = {}, []
    for name, path in progress(runnable.items(), total=len(runnable), desc="browser timing", quiet=quiet, unit="model"):
        try:
            figures = webapp.browser_latency(path, runs=runs, warmup=warmup, images=images)
        except Exception as e:  # noqa: BLE001 - a browser that fails (a timeout, a crash) is noted; the report stands
            failures.append({"variant": name, "where": "browser", "error": " ".join(str(e).split())[:300]})
            continue
        python = (variants[name].get("latency_ms") or {}).get(BROWSER_THREADS)
        shown = [r for r in figures["images"] if "error" not in r]
        measured[name] = {
            "latency_ms": figures["latency_ms"], "threads": figures["threads"],
            "python_latency_ms": python,
            "ratio_to_python": figures["latency_ms"]["p50"] / python["p50"] if python and python["p50"] else None,
            # The page's own figures for one classification (a file picked, as a user would).
            "page": {"images": len(shown),
                     "preprocess_ms": float(np.median([r["preprocess_ms"] for r in shown])) if shown else None,
                     "inference_ms": float(np.median([r["latency_ms"] for r in shown])) if shown else None},
            "browser": figures["browser"], "wasm": figures["wasm"], "litertjs": (figures["runtime"] or {}).get("version"),
            "user_agent": figures["user_agent"]}
    return {"variants": measured, "refused": refused}, failures


def split_facts(manifest, manifest_path: Path, side: str, n: int, fold=None) -> dict:
    """Which images: the manifest's split settings, and the fold whose sides were used (None: its `split`)."""
    split, audit = manifest.meta.get("split") or {}, manifest.meta.get("audit") or {}
    return {"kind": split.get("kind"), "seed": manifest.meta.get("seed"), "side": side, f"n_{side}": n,
            "n_test": n if side == "test" else None, "conflicts_excluded": audit.get("conflicts_excluded"),
            "folds": split.get("folds"), "fold": fold, "test_fold": split.get("test_fold") if fold is None else fold,
            "manifest": str(manifest_path), "manifest_sha256": manifest.sha256}


def machine_facts() -> dict:
    """The edge bench's device facts (CPU model and flags, CPUs) plus OS, usable cores, interpreters."""
    from edge_runtime.bench import device_facts
    from oncolite.train.provenance import package_version

    return {**device_facts(), "usable_cores": available_cores(), "os": platform.platform(),
            "interpreters": {pkg: package_version(pkg) for pkg in ("ai-edge-litert", "tflite-runtime", "tensorflow", "tf-keras")}}


# --- bring your own models ------------------------------------------------------------------

def main_byo(args) -> int:
    """`oncolite benchmark --float MODEL [A.tflite ...] --data DIR | --manifest M`."""
    from .report import write_report
    from oncolite.quantize import byo
    from oncolite.train.config import load_config

    settings = with_overrides(load_config(), args.set, "benchmark")["benchmark"]
    threads = timed_threads(args, settings["threads"])
    if args.target:
        raise OncoliteError("--target: devices take a run directory's exported variants; benchmark them from "
                            "`oncolite export MODEL` (its --out folder) or leave --target out")
    report, probs, y = run_byo_benchmark(
        args.float_model, args.run_dir, data=args.data, manifest=args.manifest, side=args.side, out=args.out,
        labels=byo.parse_labels(args.labels), size=byo.parse_size(args.size),
        mean=byo.parse_channels(args.mean, "--mean"), std=byo.parse_channels(args.std, "--std"), resample=args.resample,
        threads=threads, runs=settings["runs"] if args.runs is None else args.runs,
        warmup=settings["warmup"] if args.warmup is None else args.warmup, bootstrap=args.bootstrap,
        browser=args.browser, quiet=args.quiet or args.json, command=args.command_line)
    out = RunDir(report["run"]).benchmark_dir
    md = write_report(out, report, probs, y)
    print_json(report) if args.json else say(args, md)
    result(args, f"report: {out / 'report.md'}: {headline(report)}")
    return EXIT_SOME_FAILED if report["failures"] else EXIT_OK


def byo_models(float_keras: Path, tflite_paths) -> dict[str, Path]:
    """Report name -> file: the float model, then each .tflite (tflite_<stem>, numbered when stems repeat)."""
    found = {FLOAT: float_keras}
    for path in map(Path, tflite_paths):
        if path.suffix != ".tflite" or not path.is_file():
            raise OncoliteError(f"{path}: not a .tflite file; give the float model with --float and .tflite files")
        name, k = f"tflite_{path.stem}", 2
        while name in found:
            name, k = f"tflite_{path.stem}_{k}", k + 1
        found[name] = path
    return found


def run_byo_benchmark(float_model, tflite_paths, data=None, manifest=None, side="test", out=None, labels=None,
                      size=None, mean=None, std=None, resample=None, threads=(1,), runs=50, warmup=5,
                      bootstrap=1000, browser=True, quiet=False, command=None):
    """A float model and .tflite files from anywhere on the same images; returns (report, probs, y).

    The float model is prepared as export prepares it (quantize.byo: flat, probabilities out) and
    saved as OUT/float.keras, which is what is evaluated and timed. A .tflite file keeps its own
    labels and preprocessing (metadata or sidecar); a bare one gets --labels and the float
    model's normalization at its own input size. Columns are put in the label order of the data."""
    from edge_runtime.model import EdgeModel
    from oncolite.quantize import byo
    from oncolite.quantize.rundir import ModelRun
    from oncolite.train.predictor import Predictor, predict_items

    if not float_model:
        raise OncoliteError("give your float model with --float MODEL: every .tflite file is compared with it")
    if (data is None) == (manifest is None):
        raise OncoliteError(f"{float_model}: give the images to evaluate with --data DIR (class folders, every image) "
                            "or --manifest M (its --side)")
    float_path = Path(float_model)
    out = Path(out) if out else float_path.resolve().parent / f"{float_path.name.split('.')[0]}_benchmark"
    float_prep, facts, prepared = byo.import_model(float_path, out, size, mean, std, resample, quiet)
    source = byo.folder_data(data, labels, halves=False) if data else byo.manifest_data(manifest, labels)
    where = Path(data or manifest)
    labels = list(source.labels)
    if facts["classes"] != len(labels):
        raise OncoliteError(f"{float_path}: {facts['classes']} outputs but {where} has {len(labels)} classes "
                            f"({', '.join(labels)}); give the model's classes with --labels in output order")
    sides = source.sides()
    side = "test" if data else side
    items = sides[side]
    if not items:
        raise OncoliteError(f"{where}: no {side} images; pick --side or give --data DIR")
    y = np.array([labels.index(it["label"]) for it in items])
    run = ModelRun(path=out, config={}, manifest=source, prep=float_prep, given_labels=labels, source=facts)
    models = byo_models(run.dir.float_model, tflite_paths)

    probs, rules, bands, edge_args = {}, {}, {}, {}
    float_predictor = Predictor(lambda x: np.asarray(prepared.predict_on_batch(x), dtype=np.float32), float_prep,
                                labels, None)
    for name, path in progress(models.items(), total=len(models), desc="predicting", quiet=quiet, unit="model"):
        if name == FLOAT:
            predictor, order = float_predictor, None
        else:
            edge = EdgeModel.load(path, labels=labels, prep=float_prep)
            if sorted(edge.labels) != sorted(labels):
                raise OncoliteError(f"{path}: labels {edge.labels} are not the classes of {where} ({labels}); "
                                    "benchmark models of the same task")
            order = [edge.labels.index(label) for label in labels]
            predictor = Predictor(edge.predict, edge.prep, list(edge.labels), edge.threshold)
            bands[name] = edge.uncertain_margin if order == sorted(order) else None
            if not edge.has_metadata and edge.facts == {}:
                edge_args[name] = ["--labels", ",".join(labels), "--mean", ",".join(map(str, float_prep.mean)),
                                   "--std", ",".join(map(str, float_prep.std))]
        p = np.asarray(predict_items(path, items, prep=predictor.prep, quiet=True, predictor=predictor), dtype=np.float64)
        probs[name] = p[:, order] if order is not None else p
        rules[name] = predictor.threshold if order is None or order == sorted(order) else None
    bands.setdefault(FLOAT, None)
    report, probs, y = build_report(run, models, source, where, side, sides, items, labels, y, float_prep, probs, rules,
                                    bands, threads=threads, runs=runs, warmup=warmup, bootstrap=bootstrap,
                                    browser=browser, quiet=quiet, command=command, edge_args=edge_args)
    report["source"] = {"float": facts, "tflite": {name: str(Path(p).resolve()) for name, p in models.items() if name != FLOAT}}
    return report, probs, y
