"""`oncolite run`: audit, split, train, quantize, export, benchmark, report in one run directory.

Each stage is the same command a user would type (`oncolite audit ...`, `oncolite train ...`),
so the pipeline adds no second code path. stages.json records finished stages: a re-run skips
them and resumes an interrupted one (train and quantize resume from their checkpoints, export
skips finished variants); `--from STAGE` redoes that stage and everything after it, in every fold.
`--folds K` is K-fold cross-validation, as in `oncolite split` (1: one train/val/test split): the
split has K folds and each is trained and benchmarked; `--only-folds I,J` runs only some of them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from edge_runtime.atomic import write_bytes, write_json, write_text
from edge_runtime.console import add_output_flags, old_spelling, print_json, result, say
from edge_runtime.errors import EXIT_OK, OncoliteError
from edge_runtime.resources import WORKSPACE, shown
from oncolite.train.rundir import RunDir

DEFAULT_DATA = WORKSPACE / "data" / "busi"
STAGES = ("audit", "split", "train", "evaluate", "quantize", "export", "benchmark", "report")
# The headline numbers of the summary table and of the shipped README table.
# Folds after the first export and time only what the float-vs-int8 question needs: the
# comparison variants (fp16, dynamic), the uint8 twin and the latency figures come from fold 0.
CV_VARIANTS = "fp32,int8_ptq,int8_gptq,int8_gptq_act,int8_qat,int8"
FIRST_FOLD_VARIANTS = "fp32,fp16,dynamic,int8_ptq,int8_gptq,int8_gptq_act,int8_qat,int8,int8_uint8"
SUMMARY_VARIANTS = ("keras_float", "tflite_fp32", "tflite_fp16", "tflite_dynamic", "tflite_int8_ptq", "tflite_int8_gptq",
                    "tflite_int8_gptq_act", "tflite_int8_qat", "tflite_int8")
# What `--publish NAME` ships in models/NAME: the int8 model export chose, its uint8-I/O twin
# (MediaPipe Tasks, the browser), and the fp32 reference.
PUBLISHED_VARIANTS = ("int8", "int8_uint8", "fp32")


def add_arguments(parser) -> None:
    from oncolite.train.config import FOLDS_HELP, add_profile_argument, add_set_argument

    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run directory (default: runs/<dataset>-<profile>)")
    parser.add_argument("--data", help="dataset folder or CSV (default: the shipped BUSI copy, data/busi)")
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)  # the old spelling: `run DATA --run RUN_DIR`
    add_profile_argument(parser)
    parser.add_argument("--dataset", help="dataset defaults (configs/datasets/<name>.json; default: from the layout)")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="stop after this stage (e.g. evaluate: float models only, for comparing training "
                             "recipes with python -m oncolite.benchmarks.float_study); a later run without it goes on")
    parser.add_argument("--folds", type=int, metavar="K",
                        help=f"{FOLDS_HELP}; every fold is trained and benchmarked (default: the config's `folds`, "
                             "the profile's)")
    parser.add_argument("--only-folds", metavar="I,J",
                        help="train and benchmark only these of the K folds, e.g. 0,1 (cheap exploration; "
                             "the others can follow in a later run)")
    parser.add_argument("--random", action="store_true", help="naive random split (to show what leakage does)")
    parser.add_argument("--seed", type=int, default=0)
    add_set_argument(parser)
    parser.add_argument("--publish", metavar="NAME",
                        help="copy fold 0's int8, int8_uint8 and fp32 models to models/NAME/ and the reports to reports/NAME/")
    add_output_flags(parser)


def main(args) -> int:
    from oncolite.cli import COMMANDS
    from edge_runtime.cli import dispatch

    from oncolite.train.config import default_profile, load_config, parse_overrides

    profile = args.profile or default_profile()
    run_dir, data = given_run_and_data(args)
    if not data.exists():
        raise OncoliteError(f"{data}: no such dataset; pass a dataset folder or CSV (default: {DEFAULT_DATA})")
    dataset = args.dataset or _dataset_name(data)
    run = Path(run_dir or WORKSPACE / "runs" / f"{dataset or data.name}-{profile}{'-random' if args.random else ''}")
    config = load_config(dataset=dataset, profile=profile, overrides=parse_overrides(args.set))  # before any work
    folds = config["folds"] if args.folds is None else args.folds
    if folds < 1:
        raise OncoliteError(f"--folds {folds}: need at least 1 (1: one train/val/test split; K: K-fold cross-validation)")
    only = only_folds(args.only_folds, folds)
    if args.publish and args.until != STAGES[-1]:
        raise OncoliteError(f"--publish needs the whole run; drop --until {args.until} (or --publish)")
    run.mkdir(parents=True, exist_ok=True)
    fold_dirs = [run] if folds == 1 else [RunDir(run).fold(i).path for i in range(folds)]
    state = _load_state(run)
    settings = {"data": str(data.resolve()), "profile": profile, "dataset": dataset, "folds": folds,
                "seed": args.seed, "random": bool(args.random), "set": sorted(args.set)}
    check_same_settings(run, state, settings, args.from_stage)
    state["settings"] = settings
    if args.from_stage:
        redo = STAGES[STAGES.index(args.from_stage):]
        state = {k: v for k, v in state.items() if k == "settings" or k.split("/")[-1] not in redo}
        _save_state(run, state)
        for fold_dir in fold_dirs:
            forget(fold_dir, redo)

    quiet = ["--quiet"] if args.quiet or args.json else []
    manifest = RunDir(run).manifest_copy
    plan = [("audit", ["audit", str(data), "--out", str(RunDir(run).audit_dir)]),
            ("split", ["split", str(data), "--out", str(manifest), "--folds", str(folds),
                       "--seed", str(args.seed), *(["--random"] if args.random else [])])]
    # Stage by stage across the folds: every float model is trained (the expensive, settled part)
    # before the first quantization, so the float CV results never wait on a later stage.
    per_fold = {stage: [] for stage in ("train", "evaluate", "quantize", "export", "benchmark")}
    fold_of = {}  # a per-fold step's key -> its fold directory
    for i in only:
        fold_dir = fold_dirs[i]
        prefix = "" if folds == 1 else f"fold{i}/"
        fold_of.update({f"{prefix}{stage}": fold_dir for stage in per_fold})
        resume = ["--resume"] if RunDir(fold_dir).train_state.exists() else []
        qat_resume = ["--resume"] if RunDir(fold_dir).qat_state_file.exists() else []
        per_fold["train"].append((f"{prefix}train", ["train", str(fold_dir), "--manifest", str(manifest),
                                                     "--profile", profile, *(["--dataset", dataset] if dataset else []),
                                                     *(["--fold", str(i)] if folds > 1 else []), *resume,
                                                     *(f"--set={pair}" for pair in args.set)]))
        per_fold["evaluate"].append((f"{prefix}evaluate", ["evaluate", str(fold_dir)]))
        per_fold["quantize"].append((f"{prefix}quantize", ["quantize", str(fold_dir), *qat_resume]))
        # The first fold run here also makes the comparison variants and the timing (see CV_VARIANTS).
        first = i == only[0]
        per_fold["export"].append((f"{prefix}export", ["export", str(fold_dir),
                                                       "--variants", FIRST_FOLD_VARIANTS if first else CV_VARIANTS]))
        per_fold["benchmark"].append((f"{prefix}benchmark", ["benchmark", str(fold_dir),
                                                             *([] if first else ["--no-timing"])]))
    plan += [step for steps in per_fold.values() for step in steps]
    last = STAGES.index(args.until)
    plan = [(key, argv) for key, argv in plan if STAGES.index(key.split("/")[-1]) <= last]

    started = time.monotonic()
    # The steps planned, and the final report as the last one when the run goes that far.
    total = len(plan) + (1 if args.until == STAGES[-1] else 0)
    for n, (key, argv) in enumerate(plan, 1):
        redone = ""
        if state.get(key, {}).get("status") == "done":
            stage = key.split("/")[-1]
            changed = stale_inputs(stage, fold_of[key]) if key in fold_of else []
            missing = missing_variants(argv, fold_of[key]) if stage == "export" else []
            if not changed and not missing:
                _say(args, f"[{n}/{total}] {key}: done before, skipped")
                continue
            if changed and stage == "export":
                forget(fold_of[key], ["export"])  # its variants are remade, not found up to date
            redone = (f" (redone: its models changed since: {', '.join(changed)})" if changed
                      else f" (redone: it did not make {', '.join(missing)})")
        _say(args, f"[{n}/{total}] {key}: oncolite {' '.join(argv)}{redone}")
        t0 = time.monotonic()
        # A stage's stdout is its own report (benchmark prints its whole report.md): captured, and
        # only its last line, its result, shown; under --quiet or --json not even that.
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = dispatch("oncolite", COMMANDS, argv + quiet)
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        if lines and not quiet:
            print(f"  {key}: {lines[-1]}", flush=True)
        if code != EXIT_OK:
            print(f"oncolite run: stage {key} failed (exit {code}); fix it and re-run the same command to resume",
                  file=sys.stderr)
            return code
        state[key] = {"status": "done", "seconds": round(time.monotonic() - t0, 1), "argv": argv}
        _save_state(run, state)

    ran = [fold_dirs[i] for i in only]
    if args.until != STAGES[-1]:
        if args.json:
            print_json({"run": str(run), "until": args.until, "folds": [str(d) for d in ran]})
        else:
            result(args, f"stopped after {args.until}; run directory: {run} (the same command without --until goes on)")
        return EXIT_OK
    summary = summarize(run, ran)
    summary["warnings"] = int8_warnings(ran)
    summary["profile"] = profile
    summary["cv_folds"] = folds
    if len(only) < folds:
        summary["only_folds"] = only
    summary["seconds"] = round(time.monotonic() - started, 1)
    _say(args, f"[{total}/{total}] report: {RunDir(run).report_md}")
    write_json(RunDir(run).report, summary)
    write_text(RunDir(run).report_md, summary_markdown(summary, command=recorded_command(args.command_line)))
    if args.publish:
        publish(run, ran[0], args.publish)
    if args.json:
        print_json(summary)
    say(args, summary_markdown(summary, pooled=False))
    result(args, f"report: {RunDir(run).report_md}: {headline(summary)}")
    for warning in summary["warnings"]:
        print(f"oncolite run: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def only_folds(text: str | None, folds: int) -> list[int]:
    """The folds `--only-folds I,J` names (all K without it), in order."""
    if text is None:
        return list(range(folds))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        chosen = []
    if not chosen or not all(0 <= i < folds for i in chosen):
        example = ",".join(map(str, range(min(folds, 2))))
        raise OncoliteError(f"--only-folds {text}: give fold numbers among 0..{folds - 1} (--folds {folds}), "
                            f"comma-separated, e.g. --only-folds {example}")
    return chosen


def given_run_and_data(args) -> tuple[str | None, Path]:
    """(RUN_DIR, DATA) of `run [RUN_DIR] [--data DATA]`, or of the old spelling `run [DATA]
    [--run RUN_DIR]` (with a note). Without --run, the one positional is taken for the old DATA
    only when it is a dataset: a CSV file, or a folder that is neither empty nor holds what a run
    writes first (a run interrupted in its first stage holds audit/)."""
    given = args.run_dir
    if not args.old_run and not (given and not args.data and _is_dataset(Path(given))):
        return given, Path(args.data or DEFAULT_DATA)
    data = given or args.data
    old = " ".join(filter(None, ["run", given, args.old_run and f"--run {args.old_run}"]))
    new = " ".join(filter(None, ["oncolite run", args.old_run, data and f"--data {data}"]))
    old_spelling(args, old, new)
    return args.old_run, Path(data or DEFAULT_DATA)


def _is_dataset(path: Path) -> bool:
    if path.is_file():
        return True
    return path.is_dir() and any(path.iterdir()) and not any(mark.exists() for mark in run_marks(path))


def run_marks(path: Path) -> tuple[Path, ...]:
    """What a run directory holds from its first stage on (`run RUN_DIR` is never taken for old-style DATA)."""
    run = RunDir(path)
    return run.stages_file, run.audit_dir, run.manifest_copy, run.config_file


# The first stage each setting feeds: a change there means redoing from that stage on.
FIRST_STAGE_OF = {"data": "audit", "seed": "split", "random": "split", "folds": "split", "profile": "train",
                  "dataset": "train", "set": "train"}


def check_same_settings(run: Path, state: dict, settings: dict, from_stage: str | None) -> None:
    """A finished stage is reused only under the settings it ran with: refuse a re-run whose
    settings changed, unless --from redoes every stage they feed."""
    before = state.get("settings")
    if not before or not any(v.get("status") == "done" for k, v in state.items() if k != "settings"):
        return
    changed = [key for key in settings if before.get(key) != settings[key]]
    if not changed:
        return
    first = min((FIRST_STAGE_OF[key] for key in changed), key=STAGES.index)
    if from_stage and STAGES.index(from_stage) <= STAGES.index(first):
        return
    what = "; ".join(f"{key}: {before.get(key)!r} -> {settings[key]!r}" for key in changed)
    raise OncoliteError(f"{run}: its finished stages ran with other settings ({what}); redo them with "
                        f"--from {first} (or an earlier stage), or give another RUN_DIR")


def stale_inputs(stage: str, fold_dir: Path) -> list[str]:
    """The inputs of a finished evaluate, export or benchmark step that are newer than its output
    (a user re-ran `oncolite train`, `quantize` or `export` by hand): such a step is redone. Empty
    when either is missing: a missing output is the stage's own business (it was recorded done)."""
    run = RunDir(fold_dir)
    if stage == "evaluate":
        output, inputs = run.eval_dir("float") / "metrics.json", [run.float_model]
    elif stage == "export":
        output, inputs = run.export_report, [run.float_model, run.qat_model]
    elif stage == "benchmark":
        output, inputs = run.benchmark_report, [run.float_model, *sorted(run.models.glob("*.tflite"))]
    else:
        return []
    if not output.is_file():
        return []
    made = output.stat().st_mtime_ns
    return [path.name for path in inputs if path.is_file() and path.stat().st_mtime_ns > made]


def missing_variants(argv: list[str], fold_dir: Path) -> list[str]:
    """The variants a finished export step is now asked for that its export report lacks (a newer
    oncolite exports more by default): the step runs again and makes only those, the others are
    up to date, and `int8` is chosen again among all the candidates. Empty without a report;
    every variant when the report cannot be read."""
    path = RunDir(fold_dir).export_report
    if "--variants" not in argv or not path.is_file():
        return []
    try:
        made = json.loads(path.read_text(encoding="utf-8")).get("variants") or {}
    except (ValueError, AttributeError):
        made = {}
    return [name for name in argv[argv.index("--variants") + 1].split(",") if name not in made]


def recorded_command(command: str | None) -> str | None:
    """The command a report records: without the output flags (--json, --quiet), which change no result."""
    if not command:
        return command
    import shlex

    words = shlex.split(command)
    return shlex.join([w for w in words if w not in ("--json", "--quiet", "-q")])


def forget(fold_dir: Path, stages) -> None:
    """What a redone stage must neither resume from nor find up to date."""
    if "train" in stages:
        from oncolite.train.train import forget_training

        forget_training(fold_dir)
    run = RunDir(fold_dir)
    if "quantize" in stages:
        shutil.rmtree(run.qat_state, ignore_errors=True)
    if "export" in stages:
        for sidecar in run.models.glob("*.json"):
            if run.variant(sidecar.stem).exists():
                sidecar.unlink()


def int8_warnings(fold_dirs: list[Path]) -> list[str]:
    """In plain words: every fold whose shipped int8 model still loses more than the export gate."""
    warnings = []
    for fold_dir in fold_dirs:
        path = RunDir(fold_dir).export_report
        report = json.loads(path.read_text()) if path.is_file() else {}
        chosen = (report.get("int8") or {})
        if chosen.get("over_gate"):
            warnings.append(f"{fold_dir}: the shipped int8 model ({chosen['from']}) loses "
                            f"{chosen['accuracy_loss']:.1%} accuracy against float on validation, more than the "
                            f"gate of {report['gate']:.1%}; {path.with_suffix('.md')} says what the debugger found")
    return warnings


def summarize(run: Path, fold_dirs: list[Path]) -> dict:
    """Headline numbers per variant: each fold's, mean and spread across folds, and pooled over
    the folds' held-out images (benchmarks.pooled)."""
    import numpy as np

    from oncolite.benchmarks.pooled import load_folds, pool

    per_fold = [json.loads(RunDir(d).benchmark_report.read_text()) for d in fold_dirs]
    keys = ("accuracy", "mcc", "roc_auc_macro", "f1_macro", "agreement_with_float")
    variants = {}
    for name in SUMMARY_VARIANTS:
        rows = [r["variants"][name] for r in per_fold if name in r["variants"]]
        if not rows:
            continue
        entry = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows])),
                     "folds": [r[k] for r in rows]} for k in keys if all(r.get(k) is not None for r in rows)}
        first = per_fold[0]["variants"].get(name, {})
        entry["size_bytes"] = first.get("size_bytes")
        entry["latency_ms"] = first.get("latency_ms")
        entry["ci_fold0"] = first.get("ci")
        variants[name] = entry
    pooled = pool(load_folds([RunDir(d).benchmark_dir for d in fold_dirs]))
    return {"variants": variants, "pooled": pooled, "split": per_fold[0].get("split"), "folds": len(fold_dirs),
            "run": str(run), "stages": {k: {**v, "argv": [shown(a) for a in v.get("argv", [])]}
                                        for k, v in _load_state(run).items() if k != "settings"}}


def headline(summary: dict) -> str:
    """The result line's figures: MCC of the float model and of the shipped int8 model, over the folds."""
    parts = []
    for name in ("keras_float", "tflite_int8"):
        mcc = summary["variants"].get(name, {}).get("mcc")
        if mcc:
            spread = f" ± {mcc['std']:.3f}" if len(mcc["folds"]) > 1 else ""
            parts.append(f"{name} MCC {mcc['mean']:.3f}{spread}")
    folds = summary["folds"]
    return ", ".join(parts or ["no MCC in the benchmark reports"]) + (f" over {folds} folds" if folds > 1 else "")


def split_words(split: dict | None) -> str:
    """The split a benchmark report records, in words: kind, seed, images, manifest and its hash."""
    if not split:
        return "not recorded"
    kind = split.get("kind")
    parts = [f"{kind} (leak-free)" if kind == "group" else str(kind or "unknown kind")]
    if split.get("seed") is not None:
        parts.append(f"seed {split['seed']}")
    side = split.get("side") or "test"
    n = split.get(f"n_{side}")
    if n is not None:
        parts.append(f"{n} {side} images")
    if split.get("folds") and split["folds"] > 1 and split.get("test_fold") is not None:
        parts.append(f"test fold {split['test_fold']} of {split['folds']}")
    if split.get("conflicts_excluded") is True:
        parts.append("images in label-conflicting groups excluded")
    if split.get("manifest"):
        sha = split.get("manifest_sha256")
        parts.append(f"manifest {shown(split['manifest'])}" + (f" (sha256 {sha[:8]}…)" if sha else ""))
    return ", ".join(parts)


def summary_markdown(summary: dict, command: str | None = None, pooled: bool = True) -> str:
    """report.md; without `pooled` only the header and the table (what `oncolite run` prints)."""
    folds = summary["folds"]
    lines = [f"Made by: `{command}`", ""] if command else []
    if summary.get("only_folds"):
        lines += [f"Folds {', '.join(map(str, summary['only_folds']))} of {summary['cv_folds']} only (--only-folds).", ""]
    split = (f"{folds}-fold CV; fold 0's split: " if folds > 1 else "one held-out split; split: ") + split_words(summary.get("split"))
    lines += [f"{'mean ± sd over the folds; ' if folds > 1 else ''}{split}",
              "", "| variant | folds | accuracy | MCC | ROC-AUC | agreement with float | size (KB) | p50 ms (2 threads) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in summary["variants"].items():
        cells = []
        for key in ("accuracy", "mcc", "roc_auc_macro", "agreement_with_float"):
            v = e.get(key)
            cells.append("—" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}" if len(v["folds"]) > 1 else f"{v['mean']:.3f}")
        n = len(e["accuracy"]["folds"]) if "accuracy" in e else 0
        size = f"{e['size_bytes'] / 1024:.0f}" if e.get("size_bytes") else "—"
        p50 = ((e.get("latency_ms") or {}).get("2") or {}).get("p50")
        lines.append(f"| {name} | {n} | {' | '.join(cells)} | {size} | {'—' if p50 is None else f'{p50:.2f}'} |")
    if pooled:
        from oncolite.benchmarks.pooled import markdown as pooled_markdown

        pooled_lines = pooled_markdown(summary.get("pooled") or {})
        if pooled_lines:
            lines += ["", "## Pooled over the folds", "", *pooled_lines]
    for warning in summary.get("warnings", []) if pooled else []:  # printed: on stderr
        lines += ["", f"**Warning:** {warning}"]
    return "\n".join(lines) + "\n"


def publish(run: Path, fold_dir: Path, name: str) -> None:
    """Ship the fold-0 models and every report inside the repo (models/NAME, reports/NAME)."""
    models, reports = WORKSPACE / "models" / name, WORKSPACE / "reports" / name
    fold, whole = RunDir(fold_dir), RunDir(run)
    for variant in PUBLISHED_VARIANTS:
        for path in (fold.variant(variant), fold.sidecar(variant)):
            _copy(path, models / path.name)
    _copy(fold.benchmark_report, reports / "benchmark.json")
    _copy(fold.benchmark_report_md, reports / "benchmark.md")
    for png in fold.benchmark_dir.glob("*.png"):
        _copy(png, reports / "benchmark" / png.name)
    # Evaluation reports and plots; training history and curves (not the resume points, not the tuner's trials).
    for subdir, folder in (("eval", fold.eval_root), ("train", fold.train_dir)):
        for f in folder.rglob("*"):
            if f.suffix in (".png", ".md", ".json", ".csv") and not {fold.train_state, fold.tune_dir} & {*f.parents}:
                _copy(f, reports / subdir / f.relative_to(folder))
    for path in (fold.export_report_md, fold.export_report, fold.qat_report):
        _copy(path, reports / "export" / path.name)
    for f in whole.audit_dir.glob("*"):
        _copy(f, reports / "audit" / f.name)
    _copy(whole.manifest_copy, reports / "manifest.json")
    _copy(whole.report, reports / "run.json")
    _copy(whole.report_md, reports / "run.md")


def _copy(src: Path, dst: Path) -> None:
    """A copy; a text report's paths inside the workspace become relative to it (recorded
    commands, image paths), so that the committed reports name files the same on every machine."""
    if not src.is_file():
        return
    if src.suffix in (".md", ".json", ".csv") and src.name != "manifest.json":  # a manifest stays as hashed
        write_bytes(dst, src.read_bytes().replace(os.fsencode(f"{WORKSPACE.resolve()}/"), b""))
        return
    from edge_runtime.atomic import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _dataset_name(data: Path) -> str | None:
    """The configs/datasets/<name>.json that fits the data, if one does."""
    from oncolite.train.config import available
    from oncolite.train.datasets import detect_layout

    layout = detect_layout(data)
    name = {"breakhis-folds": "breakhis"}.get(layout, layout)
    if layout in ("busi", "folders") and "busi" in data.name.lower():
        name = "busi"
    return name if name in available("datasets") else None


def _load_state(run: Path) -> dict:
    path = RunDir(run).stages_file
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(run: Path, state: dict) -> None:
    write_json(RunDir(run).stages_file, state)


def _say(args, line: str) -> None:
    if not (args.quiet or args.json):
        print(line, file=sys.stderr, flush=True)
