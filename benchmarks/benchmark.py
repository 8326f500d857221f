"""`oncolite benchmark RUN_DIR`: the float Keras model against every TFLite variant.

Accuracy side: every model predicts the SAME held-out images of the manifest; metrics with
bootstrap CIs come from train.metrics, paired statistics against the float model from
benchmarks.stats. Cost side: size, load time, latency per thread count and peak RSS, each
variant timed in a process of its own (`python -m edge_runtime bench` for .tflite files,
`python -m benchmarks.latency` for the Keras model). Devices given with --target run the
same edge bench remotely. Writes RUN_DIR/benchmark/report.json, report.md and PNG plots.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_runtime.console import add_output_flags, print_json, progress, say
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, OncoliteError
from edge_runtime.hashing import file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
# Report order; also the file names under RUN_DIR/models/ (<variant>.tflite).
TFLITE_VARIANTS = ("fp32", "fp16", "dynamic", "int8_ptq", "int8_qat")
FLOAT = "keras_float"
BASELINE = "majority_baseline"
# report key (issue 8's names) -> train.metrics name
METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "f1_macro": "macro_f1",
           "roc_auc_macro": "macro_roc_auc", "pr_auc_macro": "macro_pr_auc", "mcc": "mcc"}
LATENCY_IMAGES = 10  # distinct images cycled through by the timed runs


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="run directory with models/float.keras and models/*.tflite")
    parser.add_argument("--manifest", help="manifest with the held-out images (default: RUN_DIR/manifest.json)")
    parser.add_argument("--side", default="test", choices=("test", "val", "train"), help="manifest side to evaluate on")
    parser.add_argument("--threads", default="1,2,4",
                        help="thread counts to time, comma-separated, capped at the available cores; 'none' skips timing")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per variant and thread count")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs before them")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs")
    parser.add_argument("--target", action="append", default=[], metavar="URL",
                        help="also run on a device: ssh://user@host[:port][?python=PATH] or adb[:serial] (repeatable)")
    parser.add_argument("--compare", nargs="+", metavar="REPORT",
                        help="merge these report.json files (or run directories) with RUN_DIR's into one table; runs nothing")
    add_output_flags(parser)


def main(args) -> int:
    run_dir = Path(args.run_dir)
    if args.compare:
        from benchmarks.report import compare_reports, write_comparison

        reports = [load_report(p) for p in [run_dir, *args.compare]]
        merged = compare_reports(reports)
        md = write_comparison(run_dir / "benchmark", merged)
        print_json(merged) if args.json else say(args, md)
        return EXIT_OK
    report, probs, y = run_benchmark(run_dir, manifest_path=args.manifest, side=args.side,
                                     threads=parse_threads(args.threads), runs=args.runs, warmup=args.warmup,
                                     bootstrap=args.bootstrap, targets=args.target,
                                     quiet=args.quiet or args.json, command=args.command_line)
    from benchmarks.report import write_report

    md = write_report(run_dir / "benchmark", report, probs, y)
    print_json(report) if args.json else say(args, md, f"report: {run_dir / 'benchmark' / 'report.md'}")
    return EXIT_SOME_FAILED if report["failures"] else EXIT_OK


def parse_threads(text: str) -> list[int]:
    """'1,2,4' -> the counts this machine can run (at most its usable cores); 'none' -> []."""
    if text.strip().lower() in ("none", "0", ""):
        return []
    try:
        wanted = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise OncoliteError(f"--threads {text!r}: give comma-separated integers like 1,2,4, or none") from None
    cores = available_cores()
    return [t for t in wanted if 0 < t <= cores] or [1]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_report(path) -> dict:
    """A report.json, or the one inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "benchmark" / "report.json"
    if not path.is_file():
        raise OncoliteError(f"{path}: no benchmark report; run `oncolite benchmark RUN_DIR` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OncoliteError(f"{path}: not valid JSON ({e}); re-run the benchmark") from None


def find_models(run_dir: Path) -> dict[str, Path]:
    """Report name -> model file: the Keras float model first, then the TFLite variants present."""
    models = run_dir / "models"
    keras_path = models / "float.keras"
    if not keras_path.is_file():
        raise OncoliteError(f"{keras_path}: missing; train first (`oncolite train`) or give the right RUN_DIR")
    found = {FLOAT: keras_path}
    # Hidden files are an atomic writer's temporaries (.<stem>.<random>.tmp.tflite), possibly half-written.
    others = sorted(p for p in models.glob("*.tflite") if p.stem not in TFLITE_VARIANTS and not p.name.startswith("."))
    for path in [models / f"{v}.tflite" for v in TFLITE_VARIANTS] + others:
        if path.is_file():
            found[f"tflite_{path.stem}"] = path
    if len(found) == 1:
        raise OncoliteError(f"{models}: no .tflite variants; export them first (`oncolite export {run_dir}`)")
    return found


def model_preprocessing(run_dir: Path):
    """The preprocessing the variants were exported with (their sidecars carry it)."""
    from edge_runtime.preprocess import Preprocessing

    for sidecar in sorted(p for p in (run_dir / "models").glob("*.json") if not p.name.startswith(".")):
        try:
            d = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "preprocessing" in d:
            return Preprocessing.from_dict(d["preprocessing"])
    raise OncoliteError(f"{run_dir / 'models'}: no <variant>.json sidecar with preprocessing; re-run `oncolite export`")


def run_benchmark(run_dir, manifest_path=None, side="test", threads=(1, 2, 4), runs=100, warmup=10,
                  bootstrap=1000, targets=(), quiet=False, command=None):
    """Evaluate and time everything; returns (report dict, {name: probs}, y_true)."""
    from train.manifest import load_manifest
    from train.provenance import git_state

    run_dir = Path(run_dir)
    models = find_models(run_dir)
    manifest_path = Path(manifest_path or run_dir / "manifest.json")
    manifest = load_manifest(manifest_path)
    fold = run_fold(run_dir)
    sides = manifest.sides(fold=fold)
    items = sides[side]
    if not items:
        raise OncoliteError(f"{manifest_path}: no {side} images; split with a {side} side or pick --side")
    labels = list(manifest.labels)
    y = np.array([labels.index(it["label"]) for it in items])
    prep = model_preprocessing(run_dir)

    probs = predict_all(models, items, labels, prep, quiet)
    probs[BASELINE] = majority_probs(sides["train"] or items, labels, len(items))
    variants = accuracy_side(y, probs, labels, bootstrap, quiet)
    add_cost_side(variants, models)
    failures = []
    images = [it["path"] for it in items[:LATENCY_IMAGES]]
    if threads:
        failures += add_latency(variants, models, images, prep, threads, runs, warmup, quiet)
    devices = {}
    for target in targets:
        from benchmarks.devices import run_target

        try:
            devices[target] = run_target(target, models, images, probs, items, runs=runs, warmup=warmup,
                                         threads=threads or [1], quiet=quiet)
        except OncoliteError as e:
            failures.append({"target": target, "error": str(e)})
    report = {
        "format": "oncolite-benchmark/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "run": str(run_dir),
        "labels": labels,
        "split": {**split_facts(manifest, manifest_path, side, len(items)),
                  **({"test_fold": fold} if fold is not None else {})},
        "machine": machine_facts(),
        "git": git_state(),
        "settings": {"threads": list(threads), "runs": runs, "warmup": warmup, "bootstrap": bootstrap,
                     "latency_images": len(images), "preprocessing": prep.to_dict()},
        "variants": variants,
        "devices": devices,
        "failures": failures,
    }
    return report, probs, y


def predict_all(models: dict, items: list, labels: list, prep, quiet: bool) -> dict:
    """N x C probabilities of every model on the same items, all with the variants' preprocessing."""
    from train.evaluate import predict_items

    probs = {}
    for name, path in progress(models.items(), total=len(models), desc="predicting", quiet=quiet, unit="model"):
        p = np.asarray(predict_items(path, items, prep=prep, quiet=True), dtype=np.float64)
        if p.shape != (len(items), len(labels)):
            raise OncoliteError(f"{path}: gives {p.shape[-1]} outputs for {len(labels)} labels; "
                                "the model was trained on another manifest")
        probs[name] = p
    return probs


def majority_probs(train_items: list, labels: list, n: int) -> np.ndarray:
    """The majority-class baseline: every image gets the training class frequencies."""
    counts = np.array([sum(it["label"] == label for it in train_items) for label in labels], dtype=np.float64)
    return np.tile(counts / counts.sum(), (n, 1))


def accuracy_side(y, probs: dict, labels: list, bootstrap: int, quiet: bool) -> dict:
    from train.metrics import classification_report

    from benchmarks.stats import compare_to_reference

    variants = {}
    for name, p in progress(probs.items(), total=len(probs), desc="metrics", quiet=quiet, unit="model"):
        full = classification_report(y, p, labels, bootstrap=bootstrap)
        paired = compare_to_reference(y, probs[FLOAT], p, labels)
        entry = {key: _number(full["metrics"][name]["value"]) for key, name in METRICS.items()}
        entry["ci"] = {key: full["metrics"][name]["ci"] for key, name in METRICS.items()}
        entry.update({
            "agreement_with_float": paired["agreement"]["value"],
            "agreement_ci": paired["agreement"]["ci"],
            "mean_abs_prob_diff": paired["probability_difference"]["mean_abs"],
            "max_abs_prob_diff": paired["probability_difference"]["max_abs"],
            "mcnemar": paired["mcnemar"],
            "per_class_delta": paired["per_class_delta"],
            "confusion_matrix": full["confusion_matrix"]["counts"],
            "metrics": full,
        })
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
                               "size_ratio_fp32": size / fp32_size if fp32_size else None})
    variants[BASELINE].update({"size_bytes": None, "latency_ms": {}})


def add_latency(variants, models, images, prep, threads, runs, warmup, quiet) -> list:
    """Time each model in a subprocess of its own; returns the failures (the report notes them)."""
    failures = []
    # The Keras model takes one process per thread count, each edge variant one in all.
    bar = progress(total=len(models) - 1 + len(threads), desc="timing", quiet=quiet, unit="process")
    for name, path in models.items():
        try:
            if name == FLOAT:
                timing = time_keras(path, images, prep, threads, runs, warmup, bar)
            else:
                timing = time_edge(path, images, threads, runs, warmup)
                timing.pop("device")  # the report's machine section says it once
                bar.update(1)
        except OncoliteError as e:
            failures.append({"variant": name, "error": str(e)})
            variants[name]["latency_ms"] = {}
            continue
        variants[name].update(timing)
    bar.close()
    keras = variants[FLOAT].get("latency_ms", {})
    for entry in variants.values():
        entry["speedup_vs_keras"] = {t: keras[t]["p50"] / lat["p50"]
                                     for t, lat in entry.get("latency_ms", {}).items() if t in keras and lat.get("p50")}
    return failures


def run_json(cmd: list[str], what: str, timeout: float = 3600) -> dict:
    """Run a command that prints one JSON document; its stderr becomes the error message."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        raise OncoliteError(f"{what}: no answer after {timeout:.0f} s; lower --runs") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise OncoliteError(f"{what}: exited with {done.returncode}: {tail}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise OncoliteError(f"{what}: printed no JSON result; run it by hand to see why") from None


def time_edge(model: Path, images: list, threads: list, runs: int, warmup: int) -> dict:
    """`python -m edge_runtime bench` in its own process: all thread counts, one peak RSS."""
    cmd = [sys.executable, "-m", "edge_runtime", "bench", str(model), *map(str, images),
           "--threads", ",".join(map(str, threads)), "--runs", str(runs), "--warmup", str(warmup), "--json"]
    return edge_timing(run_json(cmd, f"{model}: edge bench"))


def edge_timing(result: dict) -> dict:
    """The report's timing fields from `edge_runtime bench --json` output."""
    per_threads = {str(r["threads"]): r for r in result["threads"]}
    return {
        "interpreter": f"{result.get('backend')} ({result.get('resolver')} resolver)",
        "load_ms": next(iter(per_threads.values()))["load_ms"] if per_threads else None,
        "preprocess_ms": result.get("preprocessing"),
        "latency_ms": {t: r["latency_ms"] for t, r in per_threads.items()},
        "throughput_per_s": {t: r.get("throughput_per_s") for t, r in per_threads.items()},
        "peak_rss_mb": result.get("peak_rss_mb"),
        "device": result.get("device"),
    }


def time_keras(model: Path, images: list, prep, threads: list, runs: int, warmup: int, bar) -> dict:
    """benchmarks.latency once per thread count (TensorFlow fixes its pools at start-up)."""
    out = {"latency_ms": {}, "throughput_per_s": {}, "peak_rss_mb": {}}
    for t in threads:
        cmd = [sys.executable, "-m", "benchmarks.latency", str(model), *map(str, images),
               "--prep", json.dumps(prep.to_dict()), "--threads", str(t), "--runs", str(runs), "--warmup", str(warmup)]
        r = run_json(cmd, f"{model}: Keras timing at {t} threads")
        out["latency_ms"][str(t)] = r["inference_ms"]
        out["throughput_per_s"][str(t)] = r["throughput_per_s"]
        out["peak_rss_mb"][str(t)] = r["peak_rss_mb"]
        out.update(interpreter=r["interpreter"], load_ms=r["load_ms"], preprocess_ms=r["preprocess_ms"])
        bar.update(1)
    # One number like the edge variants': the largest process.
    out["peak_rss_mb"] = max(out["peak_rss_mb"].values())
    return out


def run_fold(run_dir: Path):
    """The CV fold a run directory trained on (recorded by `oncolite train`), or None."""
    from train.train import read_run_config

    if not (Path(run_dir) / "config.json").exists():
        return None
    return read_run_config(Path(run_dir))[1].get("fold")


def split_facts(manifest, manifest_path: Path, side: str, n: int) -> dict:
    split, audit = manifest.meta.get("split") or {}, manifest.meta.get("audit") or {}
    return {"kind": split.get("kind"), "seed": manifest.meta.get("seed"), "side": side, f"n_{side}": n,
            "n_test": n if side == "test" else None, "conflicts_excluded": audit.get("conflicts_excluded"),
            "folds": split.get("folds"), "test_fold": split.get("test_fold"),
            "manifest": str(manifest_path), "manifest_sha256": manifest.sha256}


def machine_facts() -> dict:
    """The edge bench's device facts (CPU model and flags, CPUs) plus OS, usable cores, interpreters."""
    from edge_runtime.bench import device_facts
    from train.provenance import package_version

    return {**device_facts(), "usable_cores": available_cores(), "os": platform.platform(),
            "interpreters": {pkg: package_version(pkg) for pkg in ("ai-edge-litert", "tflite-runtime", "tensorflow", "tf-keras")}}


def validate_report(d: dict) -> list[str]:
    """Problems with a report's minimal shape (issue 8); empty when it is fine."""
    problems = []
    variants = d.get("variants")
    if not isinstance(variants, dict) or FLOAT not in variants:
        return [f"variants must be an object with {FLOAT!r}"]
    for name, v in variants.items():
        if name == BASELINE:
            continue
        for key in ("accuracy", "mcc", "roc_auc_macro", "f1_macro", "agreement_with_float"):
            if not isinstance(v.get(key), (int, float)) and not (key == "roc_auc_macro" and v.get(key) is None):
                problems.append(f"variants.{name}.{key} must be a number")
        if not isinstance(v.get("size_bytes"), int):
            problems.append(f"variants.{name}.size_bytes must be an integer")
        lat = v.get("latency_ms")
        if not isinstance(lat, dict):
            problems.append(f"variants.{name}.latency_ms must be an object")
        else:
            for t, s in lat.items():
                if not (t.isdigit() and isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in ("p50", "p90"))):
                    problems.append(f"variants.{name}.latency_ms.{t} must be {{'p50': ms, 'p90': ms, ...}}")
    split = d.get("split")
    if not isinstance(split, dict):
        problems.append("split must be an object")
    else:
        if split.get("kind") not in ("group", "random"):
            problems.append("split.kind must be 'group' or 'random'")
        if not isinstance(split.get("n_test"), int):
            problems.append("split.n_test must be an integer")
        for key in ("seed", "conflicts_excluded"):
            if key not in split:
                problems.append(f"split.{key} is missing")
    return problems
