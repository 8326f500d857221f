"""`oncolite evaluate MODEL --manifest M`: metrics with CIs, plots and error analysis of one model.

MODEL is a float/QAT `.keras` file, a `.tflite` file (run through the edge runtime, as the device
runs it) or a run directory (its models/float.keras; the report goes to RUN_DIR/eval/float/).
Binary tasks can ask for a target sensitivity: the threshold is chosen on the validation side,
applied unchanged to the side evaluated, and saved to RUN_DIR/threshold.json for the export.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from edge_runtime.atomic import atomic_path, write_json, write_text
from edge_runtime.console import add_output_flags, print_json, result, say
from edge_runtime.errors import EXIT_OK, ModelError, OncoliteError
from edge_runtime.hashing import file_sha256
from edge_runtime.preprocess import open_image
from . import metrics
from .plots import draw_confusion, pyplot, save_png
from .predictor import Predictor, load_predictor, predict_items, resolve_model
from .rundir import THRESHOLD, RunDir, given_run

FORMAT = "oncolite-eval/1"
CONTACT_SHEET_SIZE = 16  # the most confident mistakes shown as thumbnails
ERRORS_IN_MARKDOWN = 25


# --- the evaluation -----------------------------------------------------------------------------

def evaluate(model_arg, manifest_path=None, *, side: str = "test", fold=None, out=None, threshold="auto",
             target_sensitivity=None, positive=None, bootstrap: int = 1000, batch_size: int = 32,
             quiet: bool = False) -> dict:
    """Run the model on one side of the manifest, write the report into `out`, return it."""
    from .manifest import load_manifest

    model_path, run_dir, default_out = resolve_model(model_arg, fold)
    out = Path(out) if out else default_out
    if manifest_path is None:
        if run_dir is None or not RunDir(run_dir).manifest_copy.is_file():
            raise OncoliteError(f"{model_arg}: no manifest; pass --manifest MANIFEST.json")
        manifest_path = RunDir(run_dir).manifest_copy
    manifest = load_manifest(manifest_path, quiet=quiet)
    labels = list(manifest.labels)
    if fold is None and run_dir is not None and RunDir(run_dir).config_file.exists():
        fold = RunDir(run_dir).provenance().get("fold")  # a CV fold's run: its own test side
    sides = manifest.sides(fold=fold)
    items = sides[side]
    if not items:
        raise OncoliteError(f"{manifest_path}: the {side} side has no images; pick another --side or --fold")

    predictor = load_predictor(model_path, run_dir)
    _check_labels(model_path, predictor, labels)
    probs = predict_items(model_path, items, batch_size=batch_size, quiet=quiet, predictor=predictor)
    if probs.shape[1] != len(labels):
        raise ModelError(f"{model_path}: {probs.shape[1]} outputs for the manifest's {len(labels)} labels; "
                         "evaluate it on the manifest it was trained on")
    y = np.array([labels.index(item["label"]) for item in items])

    op = operating_point(threshold, target_sensitivity, positive, labels, predictor, model_path,
                         sides, run_dir, out, batch_size, quiet)
    op_value = op["value"] if op else None
    op_positive = op["positive"] if op else positive
    report = {
        "format": FORMAT,
        "model": str(model_path), "model_sha256": file_sha256(model_path),
        "manifest": str(manifest_path), "manifest_sha256": manifest.sha256,
        "side": side, "fold": fold, "labels": labels, "out": str(out),
        "operating_point": op,
        "image_level": metrics.classification_report(y, probs, labels, bootstrap=bootstrap,
                                                      threshold=op_value, positive=op_positive),
        # The baseline answers the training side's majority: none without a training side.
        "baseline": metrics.majority_baseline(
            [labels.index(item["label"]) for item in sides["train"]], y, len(labels),
            labels=labels, bootstrap=bootstrap) if sides["train"] else None,
    }
    if _has_patients(items):
        report["patient_level"] = patient_report(items, probs, y, labels, bootstrap, op_value, op_positive)
        by_mag = metrics.by_subset(items, "magnification")
        if by_mag:
            report["by_magnification"] = {
                str(mag): {"image_level": metrics.classification_report(
                               y[idx], probs[idx], labels, bootstrap=bootstrap, threshold=op_value, positive=op_positive),
                           "patient_level": patient_report([items[i] for i in idx], probs[idx], y[idx], labels,
                                                           bootstrap, op_value, op_positive)}
                for mag, idx in by_mag.items()}
    pred = metrics.decisions(probs, op, labels)
    report["errors"] = error_list(items, y, pred, probs, labels)
    report["files"] = write_report(report, items, y, pred, probs, out, run_dir)
    return report


def _check_labels(model_path, predictor: Predictor, labels) -> None:
    if predictor.labels is not None and list(predictor.labels) != labels:
        raise ModelError(f"{model_path}: the model's labels {predictor.labels} differ from the manifest's "
                         f"{labels}; evaluate it on the manifest it was trained on")


def operating_point(threshold, target_sensitivity, positive, labels, predictor, model_path, sides, run_dir,
                    out, batch_size, quiet):
    """The binary decision rule: None (argmax) or {"positive", "value", ...}.

    A target sensitivity is met on the validation side only; the test side never chooses.
    """
    binary = len(labels) == 2
    if target_sensitivity is not None or threshold not in ("auto", "none"):
        if not binary:
            raise OncoliteError(f"a threshold needs a binary task; these labels are {labels}")
    if target_sensitivity is not None:
        pos = metrics.positive_index(labels, positive)
        val = sides["val"]
        if not val:
            raise OncoliteError("--target-sensitivity needs a validation side; the manifest has none for this fold")
        p_val = predict_items(model_path, val, batch_size=batch_size, quiet=quiet, predictor=predictor)
        y_val = np.array([item["label"] == labels[pos] for item in val])
        value = metrics.choose_threshold(y_val, p_val[:, pos], target_sensitivity)
        op = {"positive": labels[pos], "value": value, "target_sensitivity": float(target_sensitivity),
              "chosen_on": "val", "val": metrics.sensitivity_specificity(y_val, p_val[:, pos], value)}
        # The run's operating point belongs to its float model (export stores it with every
        # variant); a threshold chosen for any other model stays beside that model's report.
        is_run_model = run_dir is not None and model_path == RunDir(run_dir).float_model
        write_json(RunDir(run_dir).threshold_file if is_run_model else out / THRESHOLD,
                   {k: op[k] for k in ("positive", "value", "target_sensitivity", "chosen_on")})
        return op
    if threshold == "none" or not binary:
        return None
    if threshold != "auto":
        pos = metrics.positive_index(labels, positive)
        return {"positive": labels[pos], "value": float(threshold), "chosen_on": "user"}
    saved = RunDir(run_dir).threshold_file if run_dir else None
    if predictor.threshold:
        return {**predictor.threshold, "chosen_on": "model"}
    if saved and saved.is_file():
        return {**json.loads(saved.read_text()), "from": str(saved)}
    return None


def _has_patients(items) -> bool:
    return any("magnification" in (item.get("meta") or {}) or "patient" in (item.get("meta") or {}) for item in items)


def patient_report(items, probs, y, labels, bootstrap, threshold, positive) -> dict:
    """Metrics over patients: each patient's mean image probability against its (majority) label."""
    groups = [(item.get("meta") or {}).get("patient", item.get("group")) for item in items]
    group_probs, group_y, ids = metrics.aggregate_by_group(probs, groups, y)
    report = metrics.classification_report(group_y, group_probs, labels, bootstrap=bootstrap,
                                           threshold=threshold, positive=positive)
    report["patients"] = len(ids)
    return report


def error_list(items, y, pred, probs, labels) -> list[dict]:
    """The misclassified images, most confident mistake first."""
    wrong = np.flatnonzero(pred != y)
    rows = [{"path": str(items[i]["path"]), "true": labels[y[i]], "pred": labels[pred[i]],
             "confidence": float(probs[i, pred[i]]), "p_true": float(probs[i, y[i]])} for i in wrong]
    return sorted(rows, key=lambda row: -row["confidence"])


# --- writing the report -------------------------------------------------------------------------

def write_report(report, items, y, pred, probs, out: Path, run_dir) -> list[str]:
    """metrics.json, metrics.md, predictions.csv and the PNGs; returns the file names written."""
    labels = report["labels"]
    files = ["metrics.json", "metrics.md", "predictions.csv"]
    files += plot_confusion(report["image_level"]["confusion_matrix"], labels, out)
    files += plot_curves(y, probs, labels, out)
    if report["errors"]:
        files.append(contact_sheet(report["errors"][:CONTACT_SHEET_SIZE], out / "errors.png"))
    history = RunDir(run_dir).history if run_dir else None
    if history and history.is_file():
        files.append(plot_history(history, out / "training_curves.png"))
    write_text(out / "predictions.csv", predictions_csv(items, labels, y, pred, probs))
    write_text(out / "metrics.md", markdown(report))
    write_json(out / "metrics.json", {**report, "files": files})
    return files


def predictions_csv(items, labels, y, pred, probs) -> str:
    lines = [",".join(["path", "true", "pred"] + [f"p_{label}" for label in labels])]
    for item, t, p, row in zip(items, y, pred, probs):
        lines.append(",".join([_csv_field(str(item["path"])), labels[t], labels[p]] + [f"{v:.6f}" for v in row]))
    return "\n".join(lines) + "\n"


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _fmt(entry) -> tuple[str, str]:
    value, ci = entry["value"], entry["ci"]
    return ("n/a" if value is None else f"{value:.3f}", "" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}")


def _metric_table(report, title_value="value") -> list[str]:
    lines = [f"| metric | {title_value} | 95 % CI |", "| --- | --- | --- |"]
    for name, entry in report["metrics"].items():
        value, ci = _fmt(entry)
        lines.append(f"| {name} | {value} | {ci} |")
    return lines


def markdown(report) -> str:
    image = report["image_level"]
    labels = report["labels"]
    lines = [f"# Evaluation of `{Path(report['model']).name}`", "",
             f"- manifest: `{report['manifest']}` (sha256 `{report['manifest_sha256']}`)",
             f"- side: {report['side']}" + (f", fold {report['fold']}" if report["fold"] is not None else ""),
             f"- images: {image['n']} ({', '.join(f'{k}: {v}' for k, v in image['support'].items())})",
             f"- model sha256: `{report['model_sha256']}`"]
    op = report["operating_point"]
    if op:
        how = f"chosen on {op.get('chosen_on', 'file')}"  # a hand-written threshold.json may not say
        if "target_sensitivity" in op:
            how += f" for sensitivity >= {op['target_sensitivity']}"
        lines.append(f"- operating point: {op['positive']} when p >= {op['value']:.4f} ({how})")
    boot = image["bootstrap"]
    lines.append(f"- CIs: percentile bootstrap, {boot['resamples']} resamples within each class "
                 f"(seed {boot['seed']}; {boot['valid_auc_resamples']} valid for AUCs)" if boot["resamples"] else "- no CIs (--bootstrap 0)")
    lines += ["", "## Image level", ""]
    lines += _metric_table(image)
    baseline = report["baseline"] or {"majority_class": "n/a (no training side)", "metrics": {}}
    lines += ["", f"Majority-class baseline (always `{baseline['majority_class']}`, the training side's most frequent):", ""]
    lines += ["| metric | model | baseline |", "| --- | --- | --- |"]
    for name in metrics.SUMMARY_METRICS:
        lines.append(f"| {name} | {_fmt(image['metrics'][name])[0]} | {_fmt(baseline['metrics'][name])[0] if baseline['metrics'] else 'n/a'} |")
    lines += ["", "## Per class", "", "| class | support | precision | recall | F1 | ROC-AUC | PR-AUC |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label in labels:
        cells = [_fmt(image["per_class"][label][name])[0] for name in ("precision", "recall", "f1", "roc_auc", "pr_auc")]
        lines.append(f"| {label} | {image['support'][label]} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ pred | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
    for label, counts, norm in zip(labels, image["confusion_matrix"]["counts"], image["confusion_matrix"]["normalized"]):
        lines.append(f"| {label} | " + " | ".join(f"{c} ({r:.0%})" for c, r in zip(counts, norm)) + " |")
    if "patient_level" in report:
        patients = report["patient_level"]
        lines += ["", f"## Patient level ({patients['patients']} patients; mean image probability per patient)", ""]
        lines += _metric_table(patients)
    if "by_magnification" in report:
        lines += ["", "## Per magnification", "",
                  "| magnification | images | accuracy | MCC | macro ROC-AUC | patients | patient accuracy | patient MCC |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mag, sub in report["by_magnification"].items():
            im, pa = sub["image_level"], sub["patient_level"]
            cells = [_cell(im["metrics"]["accuracy"]), _cell(im["metrics"]["mcc"]), _cell(im["metrics"]["macro_roc_auc"]),
                     str(pa["patients"]), _cell(pa["metrics"]["accuracy"]), _cell(pa["metrics"]["mcc"])]
            lines.append(f"| {mag} | {im['n']} | " + " | ".join(cells) + " |")
    errors = report["errors"]
    lines += ["", f"## Errors ({len(errors)} misclassified; most confident first)", ""]
    if errors:
        lines += ["| image | true | predicted | confidence | p(true) |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{Path(e['path']).name}` | {e['true']} | {e['pred']} | {e['confidence']:.3f} | {e['p_true']:.3f} |"
                  for e in errors[:ERRORS_IN_MARKDOWN]]
        if len(errors) > ERRORS_IN_MARKDOWN:
            lines.append(f"\n{len(errors) - ERRORS_IN_MARKDOWN} more in metrics.json and predictions.csv.")
        lines += ["", "![most confident errors](errors.png)"]
    lines += ["", "![confusion matrix](confusion_matrix.png) ![ROC](roc.png) ![PR](pr.png)", ""]
    return "\n".join(lines)


def _cell(entry) -> str:
    value, ci = _fmt(entry)
    return f"{value} ({ci})" if ci else value


# --- pictures -----------------------------------------------------------------------------------

def plot_confusion(cm: dict, labels, out: Path) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2 * len(labels), 2 + len(labels)), layout="constrained")
    for ax, key, fmt in zip(axes, ("counts", "normalized"), ("{:d}", "{:.2f}")):
        matrix = np.asarray(cm[key], dtype=int if key == "counts" else float)
        draw_confusion(ax, matrix, labels, fmt, vmax=1 if key == "normalized" else None)
        ax.set(xlabel="predicted", ylabel="true", title=key)
    return [save_png(fig, out / "confusion_matrix.png", dpi=110, tight=True)]


def plot_curves(y, probs, labels, out: Path) -> list[str]:
    """ROC and precision-recall curves, one line per class (one-vs-rest)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = pyplot()
    roc_fig, roc_ax = plt.subplots(figsize=(5, 5))
    pr_fig, pr_ax = plt.subplots(figsize=(5, 5))
    for k, label in enumerate(labels):
        positives = y == k
        if not 0 < positives.sum() < len(y):
            continue  # a class absent from this side has no curve
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        roc_ax.plot(fpr, tpr, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positives, probs[:, k])
        pr_ax.plot(recall, precision, label=f"{label} (prevalence {positives.mean():.2f})")
    roc_ax.plot([0, 1], [0, 1], "k:", lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one-vs-rest)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (one-vs-rest)", ylim=(0, 1.02))
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.legend(loc="lower left", fontsize=8)
    return [save_png(roc_fig, out / "roc.png", dpi=110, tight=True), save_png(pr_fig, out / "pr.png", dpi=110, tight=True)]


def plot_history(history_csv: Path, path: Path) -> str:
    """The training curves of the run, drawn by training's own plot from its history.csv."""
    from .train import plot_curves

    with open(history_csv, newline="") as f:
        rows = [{k: v if k == "phase" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    plot_curves(path, rows)
    return path.name


def contact_sheet(errors, path: Path, thumb: int = 160, columns: int = 4) -> str:
    """A grid of the given misclassified images, each captioned with true -> predicted and confidence."""
    from PIL import Image, ImageDraw

    caption = 30
    rows = math.ceil(len(errors) / columns)
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, error in enumerate(errors):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + caption)
        try:
            im = open_image(error["path"])
            scale = (thumb - 4) / max(im.size)
            # Small patches (IDC is 50 px) are enlarged with visible pixels, large images smoothed down.
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except OncoliteError:
            draw.text((x + 4, y + thumb // 2), "unreadable", fill="red")
        draw.text((x + 4, y + thumb + 2), f"{error['true']} -> {error['pred']} ({error['confidence']:.2f})", fill="black")
        draw.text((x + 4, y + thumb + 15), Path(error["path"]).name[:26], fill="gray")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path.name


# --- CLI ----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", help="a .keras or .tflite model, or a run directory")
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)  # the old spelling of RUN_DIR
    parser.add_argument("--manifest", metavar="M", help="the manifest (default: RUN_DIR/manifest.json)")
    parser.add_argument("--side", choices=("test", "val", "train"), default="test", help="which side to evaluate (default test)")
    parser.add_argument("--fold", type=int, help="cross-validation fold (its sides, and RUN_DIR/folds/<i> if present); "
                                                       "default: the fold the run trained on (its config.json)")
    parser.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/eval/<model>/, or eval/<model>/ beside the model)")
    parser.add_argument("--threshold", default="auto",
                        help="binary decision: auto (the model's or RUN_DIR/threshold.json, else argmax), none (argmax) or a probability P")
    parser.add_argument("--target-sensitivity", type=float, metavar="S",
                        help="binary: choose the threshold reaching sensitivity S on the val side, apply it here, save threshold.json")
    parser.add_argument("--positive", metavar="LABEL", help="binary: the positive class (default the second label)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs (0: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    add_output_flags(parser)


def main(args) -> int:
    given_run(args, "evaluate", attr="model",
              missing="which model? give a run directory or a .keras/.tflite model: oncolite evaluate RUN_DIR")
    threshold = args.threshold
    if threshold not in ("auto", "none"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise OncoliteError(f"--threshold {threshold!r}: use auto, none or a probability such as 0.3") from None
        if not 0.0 <= threshold <= 1.0:
            raise OncoliteError(f"--threshold {threshold}: a probability must be between 0 and 1")
    if args.target_sensitivity is not None and not 0.0 < args.target_sensitivity <= 1.0:
        raise OncoliteError(f"--target-sensitivity {args.target_sensitivity}: must be in (0, 1], e.g. 0.95")
    report = evaluate(args.model, args.manifest, side=args.side, fold=args.fold, out=args.out, threshold=threshold,
                      target_sensitivity=args.target_sensitivity, positive=args.positive, bootstrap=args.bootstrap,
                      batch_size=args.batch_size, quiet=args.quiet or args.json)
    if args.json:
        print_json(report)
        return EXIT_OK
    image = report["image_level"]
    say(args, f"{Path(report['model']).name} on {image['n']} {report['side']} images:")
    if report["operating_point"]:
        op = report["operating_point"]
        say(args, f"  operating point: {op['positive']} when p >= {op['value']:.4f} (chosen on {op.get('chosen_on', 'file')})")
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "mcc", "sensitivity", "specificity"):
        if name in image["metrics"]:
            value, ci = _fmt(image["metrics"][name])
            say(args, f"  {name:<18} {value}  [{ci}]")
    if report["baseline"]:
        say(args, f"  majority baseline accuracy {_fmt(report['baseline']['metrics']['accuracy'])[0]}")
    mcc, ci = _fmt(image["metrics"]["mcc"])
    result(args, f"report: {report['out']}/metrics.md: {Path(report['model']).name} on {image['n']} {report['side']} "
                 f"images, MCC {mcc}" + (f" [{ci}]" if ci else ""))
    return EXIT_OK
