"""Pool a cross-validation's held-out predictions: with k folds every image is held out once.

One fold of BUSI holds ~153 test images, so one image is 0.65 pt and recipes cannot be told
apart fold by fold. Pooling the folds' held-out predictions gives every metric over the whole
data set (~760 images) with a bootstrap CI, and the float-vs-variant comparison over all of
them: agreement (Wilson CI), flips, confident flips (float margin >= CONFIDENT), accuracy / MCC /
ROC-AUC deltas, and for a model with an uncertain band the share of images flagged and the
agreement outside the band. Each fold's benchmark writes the predictions it pools
(benchmark/predictions.json, `fold_predictions` below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.decision import decisions, margins, uncertain
from oncolite.train import metrics
from oncolite.train.rundir import PREDICTIONS  # in each run's benchmark/ folder (RunDir.benchmark_predictions)

FLOAT = "keras_float"
CONFIDENT = 0.2  # a flip of an image whose float decision margin is at least this is a "confident flip"


def fold_predictions(labels: list[str], items: list[dict], y, probs: dict, rules: dict, bands: dict) -> dict:
    """What one benchmark run contributes to a pooled table (JSON-ready)."""
    return {"labels": list(labels), "images": [Path(str(it["path"])).name for it in items],
            "y": [int(v) for v in y], "probs": {k: np.round(np.asarray(p, dtype=np.float64), 6).tolist() for k, p in probs.items()},
            "rules": rules, "uncertain_margin": bands}


def load_folds(benchmark_dirs: list[Path]) -> list[dict]:
    return [json.loads((Path(d) / PREDICTIONS).read_text(encoding="utf-8")) for d in benchmark_dirs
            if (Path(d) / PREDICTIONS).is_file()]


def compare_pooled(y, ref, probs, labels, ref_rule=None, rule=None, flagged=None, bootstrap: int = 1000) -> dict:
    """A model against the reference on the same images: its metrics with CIs, and what differs
    (`flagged`: which images fall in the model's uncertain band, if it has one)."""
    from .stats import agreement, flips as count_flips

    ref_pred, pred = decisions(ref, ref_rule, labels), decisions(probs, rule, labels)
    full = metrics.classification_report(y, probs, labels, bootstrap=bootstrap,
                                         threshold=(rule or {}).get("value"), positive=(rule or {}).get("positive"))
    base = metrics.classification_report(y, ref, labels, bootstrap=0,
                                         threshold=(ref_rule or {}).get("value"), positive=(ref_rule or {}).get("positive"))
    flips = ref_pred != pred
    together, flipped = agreement(ref_pred, pred), count_flips(ref_pred, pred, margins(ref, ref_rule, labels), CONFIDENT)
    value = lambda report, key: report["metrics"][key]["value"]  # noqa: E731
    entry = {"n": int(len(y)), **{key: {"value": value(full, key), "ci": full["metrics"][key]["ci"]}
                                  for key in ("accuracy", "mcc", "macro_roc_auc", "macro_f1", "balanced_accuracy")},
             "agreement": together["value"], "agreement_ci": together["ci"],
             "flips": flipped["count"], "confident_flips": flipped["confident"],
             "delta_accuracy": value(full, "accuracy") - value(base, "accuracy"),
             "delta_mcc": value(full, "mcc") - value(base, "mcc"),
             "delta_roc_auc": (value(full, "macro_roc_auc") - value(base, "macro_roc_auc"))
             if value(full, "macro_roc_auc") is not None and value(base, "macro_roc_auc") is not None else None,
             "mean_abs_prob_diff": float(np.abs(np.asarray(ref) - np.asarray(probs)).mean())}
    if flagged is not None:
        flagged = np.asarray(flagged, dtype=bool)
        outside = ~flagged
        entry["uncertain"] = {"flagged": int(flagged.sum()), "share": float(flagged.mean()),
                              "agreement_outside": float((~flips[outside]).mean()) if outside.any() else None,
                              "flips_outside": int(flips[outside].sum())}
    return entry


def pool(folds: list[dict], bootstrap: int = 1000) -> dict:
    """Per model: pooled metrics against float over every fold that has it, and per-fold agreement."""
    if not folds:
        return {"folds": 0, "models": {}}
    labels = folds[0]["labels"]
    names = [name for name in folds[0]["probs"] if all(name in f["probs"] for f in folds)]
    y = np.concatenate([f["y"] for f in folds])
    ref = np.concatenate([f["probs"][FLOAT] for f in folds])
    ref_rules = [f["rules"].get(FLOAT) for f in folds]
    models = {}
    for name in names:
        probs = np.concatenate([f["probs"][name] for f in folds])
        rules = [f["rules"].get(name) for f in folds]
        # A rule or band differs per fold (each fold chose its own): decide fold by fold.
        per_fold_pred = [decisions(f["probs"][name], r, labels) for f, r in zip(folds, rules)]
        per_fold_ref = [decisions(f["probs"][FLOAT], r, labels) for f, r in zip(folds, ref_rules)]
        agreement_per_fold = [float(np.mean(a == b)) for a, b in zip(per_fold_pred, per_fold_ref)]
        bands = [f.get("uncertain_margin", {}).get(name) for f in folds]
        flagged = None
        if any(b is not None for b in bands):
            flagged = np.concatenate([uncertain(f["probs"][name], b, r, labels) for f, b, r in zip(folds, bands, rules)])
        same_rules = all(r == rules[0] for r in rules) and all(r == ref_rules[0] for r in ref_rules)
        entry = compare_pooled(y, ref, probs, labels, ref_rules[0] if same_rules else None,
                               rules[0] if same_rules else None, flagged, bootstrap)
        if not same_rules:  # decisions fold by fold, so the pooled flips use each fold's own rule
            pred, ref_pred = np.concatenate(per_fold_pred), np.concatenate(per_fold_ref)
            entry["agreement"] = float(np.mean(pred == ref_pred))
        entry.update({"agreement_per_fold": agreement_per_fold, "agreement_mean": float(np.mean(agreement_per_fold)),
                      "agreement_sd": float(np.std(agreement_per_fold)), "uncertain_margin_per_fold": bands})
        models[name] = entry
    return {"folds": len(folds), "n": int(len(y)), "labels": labels, "confident_margin": CONFIDENT, "models": models}


def flipped_images(folds: list[dict], name: str) -> list[dict]:
    """Every image where `name` decides differently from the float model, with both models' probabilities."""
    rows = []
    for i, f in enumerate(folds):
        labels, ref, probs = f["labels"], np.asarray(f["probs"][FLOAT]), np.asarray(f["probs"][name])
        ref_rule, rule = f["rules"].get(FLOAT), f["rules"].get(name)
        ref_pred, pred = decisions(ref, ref_rule, labels), decisions(probs, rule, labels)
        ref_margin = margins(ref, ref_rule, labels)
        for j in np.flatnonzero(ref_pred != pred):
            rows.append({**({"fold": i} if len(folds) > 1 else {}), "image": f["images"][j], "label": labels[f["y"][j]],
                         "float": labels[ref_pred[j]], "variant": labels[pred[j]],
                         "float_probs": [round(float(v), 4) for v in ref[j]],
                         "variant_probs": [round(float(v), 4) for v in probs[j]],
                         "float_margin": round(float(ref_margin[j]), 4)})
    return rows


def markdown(pooled: dict) -> list[str]:
    """The pooled table as Markdown lines."""
    if not pooled.get("models"):
        return []
    lines = [f"Pooled over {pooled['folds']} folds: {pooled['n']} held-out images, each held out once. "
             f"95 % CIs: bootstrap for metrics, Wilson for agreement. Confident flip: float margin >= "
             f"{pooled['confident_margin']}.", "",
             "| model | accuracy | MCC | macro ROC-AUC | agreement with float | per fold | flips (confident) | Δacc (pt) | ΔMCC | ΔROC-AUC | uncertain: flagged, agreement outside |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def metric(e, key):
        v = e[key]
        if v["value"] is None:
            return "—"
        ci = v.get("ci")
        return f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    for name, e in pooled["models"].items():
        lo, hi = e["agreement_ci"]
        unc = e.get("uncertain")
        band = "—" if not unc else (f"{unc['share']:.1%}, " + ("—" if unc["agreement_outside"] is None
                                                                 else f"{unc['agreement_outside']:.1%}"))
        auc = "—" if e["delta_roc_auc"] is None else f"{e['delta_roc_auc']:+.4f}"
        lines.append(f"| {name} | {metric(e, 'accuracy')} | {metric(e, 'mcc')} | {metric(e, 'macro_roc_auc')} | "
                     f"{e['agreement']:.1%} [{lo:.1%}, {hi:.1%}] | {e['agreement_mean']:.1%} ± {e['agreement_sd']:.1%} | "
                     f"{e['flips']} ({e['confident_flips']}) | {100 * e['delta_accuracy']:+.2f} | {e['delta_mcc']:+.4f} | "
                     f"{auc} | {band} |")
    return lines
