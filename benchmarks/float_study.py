"""`python -m oncolite.benchmarks.float_study BASE RUN...`: float training recipes side by side, pooled over CV folds.

Each RUN is a cross-validation run directory (RUN/folds/<i>/ with a trained models/float.keras),
trained on the same manifest as BASE with one recipe change (`oncolite train ... --set KEY=VALUE`).
With k folds every image is held out once, so each recipe's figures pool all of the data set
(BUSI: ~760 test images, ~385 validation images instead of 153 and 77 per fold). Recipes are
*chosen* on the pooled validation figures (each fold's validation side, never its test side); the
pooled test figures are what the choice is then worth. Differences to BASE come from a paired
bootstrap over the same images, so they say whether a lever helps beyond resampling noise. The
cost column is the training time here (the sum of the epochs' seconds in train/history.csv).
`--ensemble` adds the mean of every recipe's probabilities: several networks, not deployable, but
the ceiling that distilling them into one MobileNetV2 could approach (and so whether it is worth
its cost); it is never the chosen recipe.

Each fold's validation predictions are written once to FOLD/eval/float_val/ (by `evaluate`), its
test predictions are the `evaluate` stage's FOLD/eval/float/; a re-run reads them back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from edge_runtime.atomic import write_json, write_text
from edge_runtime.console import add_output_flags, print_json, result, say
from edge_runtime.errors import EXIT_OK, OncoliteError
from oncolite.train import metrics
from oncolite.train.rundir import RunDir


SIDE_DIRS = {"val": "float_val", "test": "float"}  # FOLD/eval/<dir>/predictions.csv
REPORTED = ("accuracy", "mcc", "macro_roc_auc")
# Settings that describe how a run was made, not the recipe: left out of "what changed".
NOT_RECIPE = {"run", "folds", "tune", "qat", "export", "benchmark", "cache", "mixed_precision", "distribute"}


def side_predictions(fold_dir: Path, side: str, quiet: bool) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(image paths, labels, true class indices, probabilities) of one fold's float model on one side."""
    path = RunDir(fold_dir).eval_dir(SIDE_DIRS[side]) / "predictions.csv"
    if not path.is_file():
        if not RunDir(fold_dir).float_model.is_file():
            raise OncoliteError(f"{fold_dir}: no models/float.keras; train this fold first "
                                f"(`oncolite train {fold_dir} --manifest ... --fold N`)")
        from oncolite.train.evaluate import evaluate

        evaluate(fold_dir, side=side, out=path.parent, bootstrap=0, quiet=quiet)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = [name[2:] for name in rows[0] if name.startswith("p_")]
    y = np.array([labels.index(r["true"]) for r in rows])
    probs = np.array([[float(r[f"p_{label}"]) for label in labels] for r in rows])
    return [r["path"] for r in rows], labels, y, probs


def mirrored_predictions(fold_dir: Path, side: str, paths: list[str]) -> np.ndarray:
    """The fold's float model on the horizontally mirrored images of one side, in `paths` order:
    with the plain predictions, a flip test-time augmentation (two invokes per image)."""
    from edge_runtime.preprocess import input_pixels, normalize
    from oncolite.quantize.rundir import open_run
    from oncolite.train.model import load_float_model

    prep = open_run(fold_dir).prep
    x = np.stack([normalize(input_pixels(path, prep)[:, ::-1], prep) for path in paths])
    return load_float_model(RunDir(fold_dir).float_model).predict(x, batch_size=32, verbose=0)


def recipe_changes(config: dict, base: dict) -> dict:
    """The settings where a run's recipe differs from the base run's (nested keys dotted)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if prefix == "" and k in NOT_RECIPE:
                continue
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    mine, theirs = flat(config), flat(base)
    from oncolite.train.config import load_config

    defaults = flat(load_config())  # a setting added after the base run was made had its default then
    return {k: v for k, v in mine.items() if v != theirs.get(k, defaults.get(k))}


def train_seconds(fold_dir: Path) -> float:
    path = RunDir(fold_dir).history
    with open(path, newline="", encoding="utf-8") as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f))


def trained_folds(run: Path) -> list[str]:
    """The fold numbers of a CV run whose float model is trained."""
    if not run.is_dir():
        raise OncoliteError(f"{run}: no such run directory; give the folder of a cross-validation run "
                            "(`oncolite run RUN_DIR --profile full --until evaluate`)")
    folds = RunDir(run).folds()
    if not folds:
        raise OncoliteError(f"{run}: not a cross-validation run (no folds/<i>/); make one with "
                            f"`oncolite run {run} --folds 5 --until evaluate`")
    trained = [f.path.name for f in folds if f.float_model.is_file() or f.eval_dir("float").is_dir()]
    if not trained:
        raise OncoliteError(f"{run}: no fold is trained yet; train them with `oncolite run {run} --until evaluate`")
    return trained


def collect(run: Path, folds: list[str], quiet: bool, hflip: bool = False) -> dict:
    """One recipe on the given folds: pooled validation and test predictions (and, `hflip`, those
    averaged with the mirrored images'), config, training time."""
    folds = [RunDir(run).fold(name).path for name in folds]
    sides = {}
    for side in SIDE_DIRS:
        parts = [side_predictions(f, side, quiet) for f in folds]
        sides[side] = {"images": [(i, Path(path).name) for i, p in enumerate(parts) for path in p[0]],
                       "labels": parts[0][1], "y": np.concatenate([p[2] for p in parts]),
                       "probs": np.concatenate([p[3] for p in parts]), "fold_sizes": [len(p[0]) for p in parts]}
        if hflip:
            mirrored = np.concatenate([mirrored_predictions(f, side, p[0]) for f, p in zip(folds, parts)])
            sides[side]["hflip_probs"] = (sides[side]["probs"] + mirrored) / 2
    config = json.loads(RunDir(folds[0]).config_file.read_text(encoding="utf-8"))  # as stored, provenance included
    seconds = [train_seconds(f) for f in folds]
    return {"run": run, "folds": len(folds), "fold_names": [f.name for f in folds], "config": config, "sides": sides,
            "train_seconds": seconds}


def refuse_other_images(recipe: dict, base: dict, side: str) -> None:
    """Recipes are compared image by image: one trained on other folds or another manifest is refused."""
    if recipe["sides"][side]["images"] != base["sides"][side]["images"]:
        raise OncoliteError(f"{recipe['run']}: its {side} images differ from {base['run']}'s; "
                            "train every recipe on the same manifest and folds")


def ensemble_of(recipes: list[dict]) -> dict:
    """The mean of the recipes' probabilities on the same images, as one more row of the study."""
    base = recipes[0]
    for r in recipes[1:]:
        for side in SIDE_DIRS:
            refuse_other_images(r, base, side)
    sides = {side: {**base["sides"][side], "probs": np.mean([r["sides"][side]["probs"] for r in recipes], axis=0)}
             for side in SIDE_DIRS}
    for data in sides.values():
        data.pop("hflip_probs", None)
    return {**base, "run": f"ensemble of {len(recipes)} recipes", "ensemble": len(recipes), "sides": sides,
            "train_seconds": [sum(s) for s in zip(*(r["train_seconds"] for r in recipes))]}


def per_fold(y, probs, sizes, key) -> list[float]:
    out, start = [], 0
    for n in sizes:
        report = metrics.classification_report(y[start:start + n], probs[start:start + n], [str(k) for k in range(probs.shape[1])],
                                               bootstrap=0)
        out.append(report["metrics"][key]["value"])
        start += n
    return out


def compare(recipes: list[dict], bootstrap: int) -> dict:
    base = recipes[0]
    rows = []
    for r in recipes:
        entry = {"run": str(r["run"]), "changes": recipe_changes(r["config"], base["config"]), "folds": r["folds"],
                 "train_minutes": round(sum(r["train_seconds"]) / 60, 1), "ensemble": r.get("ensemble", 0)}
        for side, data in r["sides"].items():
            ref = base["sides"][side]
            refuse_other_images(r, base, side)
            report = metrics.classification_report(data["y"], data["probs"], data["labels"], bootstrap=bootstrap)
            entry[side] = {key: report["metrics"][key] for key in REPORTED}
            entry[side]["per_fold"] = {key: per_fold(data["y"], data["probs"], data["fold_sizes"], key) for key in REPORTED}
            entry[side]["delta"] = (None if r is base else
                                    metrics.paired_deltas(data["y"], ref["probs"], data["probs"], bootstrap=bootstrap))
            if "hflip_probs" in data:
                tta = metrics.classification_report(data["y"], data["hflip_probs"], data["labels"], bootstrap=bootstrap)
                entry[side]["hflip"] = {**{key: tta["metrics"][key] for key in REPORTED},
                                        "delta": metrics.paired_deltas(data["y"], data["probs"], data["hflip_probs"],
                                                                       bootstrap=bootstrap)}
        rows.append(entry)
    chosen = max((e for e in rows if not e["ensemble"]), key=lambda e: (e["val"]["mcc"]["value"], e["val"]["accuracy"]["value"]))
    n = {side: len(base["sides"][side]["y"]) for side in SIDE_DIRS}
    return {"base": str(base["run"]), "n": n, "folds": base["folds"], "fold_names": base["fold_names"], "recipes": rows,
            "chosen_on_val": chosen["run"]}


def _cell(v) -> str:
    ci = v.get("ci")
    return f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _delta(d) -> str:
    if d is None:
        return "—"
    ci = d.get("ci")
    return f"{d['value']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def markdown(study: dict, command: str) -> str:
    def name(e):
        if e["ensemble"]:
            return f"ensemble of the {e['ensemble']} recipes above (mean probabilities; not deployable)"
        # Spelled as --set takes them: JSON values (true, null), plain words for strings.
        changes = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in e["changes"].items())
        return f"`{changes}`" if changes else "base recipe"

    lines = [f"Made by: `{command}`", "",
             f"Folds {', '.join(study['fold_names'])} of one manifest; pooled: {study['n']['val']} validation and {study['n']['test']} "
             "test images, each held out once. 95 % CIs: stratified bootstrap; Δ: the recipe minus the base recipe "
             "on the same images (paired bootstrap). Recipes are chosen on validation (MCC, the training monitor); "
             f"chosen: `{study['chosen_on_val']}`.", "",
             "## Validation (what the choice is made on)", "",
             "| recipe | accuracy | MCC | macro ROC-AUC | Δ accuracy | Δ MCC | Δ ROC-AUC | train min (all folds) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in study["recipes"]:
        v, d = e["val"], e["val"]["delta"] or {}
        lines.append(f"| {name(e)} | {_cell(v['accuracy'])} | {_cell(v['mcc'])} | {_cell(v['macro_roc_auc'])} | "
                     f"{_delta(d.get('accuracy'))} | {_delta(d.get('mcc'))} | {_delta(d.get('macro_roc_auc'))} | "
                     f"{e['train_minutes']} |")
    lines += ["", "## Test (what it is worth)", "",
              "| recipe | accuracy | MCC | macro ROC-AUC | accuracy per fold (mean ± sd) | Δ accuracy | Δ MCC | Δ ROC-AUC |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in study["recipes"]:
        t, d = e["test"], e["test"]["delta"] or {}
        acc = t["per_fold"]["accuracy"]
        lines.append(f"| {name(e)} | {_cell(t['accuracy'])} | {_cell(t['mcc'])} | {_cell(t['macro_roc_auc'])} | "
                     f"{np.mean(acc):.3f} ± {np.std(acc):.3f} | {_delta(d.get('accuracy'))} | {_delta(d.get('mcc'))} | "
                     f"{_delta(d.get('macro_roc_auc'))} |")
    if "hflip" in study["recipes"][0]["val"]:
        lines += ["", "## With horizontal-flip test-time augmentation (two invokes per image)", "",
                  "Each recipe's own model, its probabilities averaged with the mirrored image's; Δ: against the same "
                  "model without it.", "",
                  "| recipe | val accuracy | val MCC | Δ val accuracy | Δ val MCC | test accuracy | test MCC | test ROC-AUC | "
                  "Δ test accuracy | Δ test MCC |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in (e for e in study["recipes"] if "hflip" in e["val"]):
            v, t = e["val"]["hflip"], e["test"]["hflip"]
            lines.append(f"| {name(e)} | {_cell(v['accuracy'])} | {_cell(v['mcc'])} | {_delta(v['delta']['accuracy'])} | "
                         f"{_delta(v['delta']['mcc'])} | {_cell(t['accuracy'])} | {_cell(t['mcc'])} | "
                         f"{_cell(t['macro_roc_auc'])} | {_delta(t['delta']['accuracy'])} | {_delta(t['delta']['mcc'])} |")
    lines += ["", "Runs: " + ", ".join(f"`{e['run']}`" for e in study["recipes"])]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="CV run directories; the first is the base recipe")
    parser.add_argument("--out", required=True, help="report folder (report.md, report.json)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--hflip", action="store_true",
                        help="also each recipe with horizontal-flip test-time augmentation (runs every model again)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also the mean of all recipes' probabilities: the ceiling distillation could approach")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.resources import shown

    # Recipes are compared on the folds they all have: exploring a lever on two folds before
    # confirming it on all of them is the cheap way to try many.
    folds = sorted(set.intersection(*(set(trained_folds(Path(run))) for run in args.runs)), key=int)
    if not folds:
        raise OncoliteError("the runs have no trained fold in common; train the same folds of one manifest")
    recipes = [collect(Path(run), folds, args.quiet or args.json, args.hflip) for run in args.runs]
    if args.ensemble:
        recipes.append(ensemble_of(recipes))
    study = compare(recipes, args.bootstrap)
    for e in study["recipes"]:
        e["run"] = shown(e["run"])
    study["base"], study["chosen_on_val"] = shown(study["base"]), shown(study["chosen_on_val"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", {**study, "command": args.command_line})
    write_text(out / "report.md", markdown(study, args.command_line))
    if args.json:
        print_json(study)
    else:
        say(args, markdown(study, args.command_line).rstrip("\n"))
        result(args, f"report: {out / 'report.md'}: chosen on validation: {study['chosen_on_val']}")
    return EXIT_OK


if __name__ == "__main__":
    from edge_runtime.cli import run_module

    raise SystemExit(run_module(__spec__.name))
