"""Classification metrics with bootstrap confidence intervals, operating points, patient-level results.

numpy + scikit-learn only (no TensorFlow): the benchmarks and the edge side import this too.
Point estimates come from scikit-learn. The bootstrap recomputes every metric on B resamples at
once: threshold metrics from B confusion matrices, ROC-AUC and average precision from per-sample
resampling counts over the once-sorted scores, so 1000 resamples of 800 images take about a second.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from edge_runtime.decision import decisions, positive_index  # noqa: F401  (the one decision rule)
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score,
                             cohen_kappa_score, confusion_matrix, matthews_corrcoef,
                             precision_recall_fscore_support, roc_auc_score)

CONFIDENCE = 0.95

# The scalars that every report (and every benchmark row) carries, in display order.
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                   "macro_roc_auc", "macro_pr_auc", "mcc", "cohen_kappa")


# --- predictions and operating points ----------------------------------------------------------

def predictions(probs, threshold=None, positive=None) -> np.ndarray:
    """Predicted class indices: argmax, or for a binary task `positive` (an index) when its
    probability >= threshold. The rule itself is edge_runtime.decision's, the device's."""
    probs = np.asarray(probs)
    rule = None if threshold is None else {"positive": 1 if positive is None else int(positive), "value": threshold}
    return decisions(probs, rule, list(range(probs.shape[1])))


def agreement(pred_a, pred_b) -> dict:
    """Top-1 agreement of two models on the same images: the share with the same class, and the counts."""
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    same, n = int(np.sum(pred_a == pred_b)), int(pred_a.size)
    return {"value": same / n if n else float("nan"), "same": same, "n": n}


def choose_threshold(y_val, p_val_positive, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on the validation side reaches the target.

    `y_val` is 1 (or True) for positives. The highest such threshold keeps specificity as high as
    the target allows. Only validation data may come in here: choosing on the test side leaks.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    y_val = np.asarray(y_val).astype(bool)
    scores = np.sort(np.asarray(p_val_positive, dtype=np.float64)[y_val])[::-1]
    if scores.size == 0:
        raise ValueError("the validation side has no positive image: cannot choose a threshold")
    # The epsilon keeps 0.95 * 20 = 19.000000000000004 from asking for a 20th positive.
    needed = max(1, math.ceil(target_sensitivity * scores.size - 1e-9))
    return float(scores[needed - 1])


def sensitivity_specificity(y, p_pos, threshold: float) -> dict:
    """Sensitivity and specificity of `p_pos >= threshold` against `y` (1 or True = positive)."""
    y = np.asarray(y).astype(bool)
    called = np.asarray(p_pos) >= threshold
    tp, fn = int(np.sum(called & y)), int(np.sum(~called & y))
    tn, fp = int(np.sum(~called & ~y)), int(np.sum(called & ~y))
    return {"threshold": float(threshold),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


# --- grouping -----------------------------------------------------------------------------------

def aggregate_by_group(probs, groups, y):
    """Patient-level results: mean of each group's image probabilities, majority of its labels.

    Returns (group_probs, group_y, group_ids) with groups in sorted order. A tie between labels
    goes to the lowest class index (a patient has one diagnosis in the datasets we know).
    """
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    ids, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_classes = probs.shape[1]
    sums = np.zeros((ids.size, n_classes))
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=ids.size)
    votes = np.zeros((ids.size, n_classes), dtype=np.int64)
    np.add.at(votes, (inverse, y), 1)
    return sums / counts[:, None], np.argmax(votes, axis=1), ids.tolist()


def by_subset(items, meta_key: str) -> dict:
    """Indices of the items per value of `item["meta"][meta_key]` (e.g. BreakHis magnification).

    Items without that key are left out; values are sorted (numerically when they are numbers).
    """
    subsets: dict = {}
    for i, item in enumerate(items):
        value = (item.get("meta") or {}).get(meta_key)
        if value is not None:
            subsets.setdefault(value, []).append(i)
    return {k: np.asarray(subsets[k]) for k in sorted(subsets, key=_natural)}


def _natural(value):
    text = str(value)
    digits = "".join(c for c in text if c.isdigit())
    return (int(digits) if digits else math.inf, text)


# --- the report ---------------------------------------------------------------------------------

def classification_report(y_true, probs, labels, *, bootstrap: int = 1000, seed: int = 0,
                          threshold=None, positive=None) -> dict:
    """Every metric of a classifier on one set of images, each scalar with a bootstrap 95 % CI.

    `y_true`: class indices; `probs`: N x C probabilities (columns in `labels` order);
    `threshold` (binary only): call `positive` (label or index, default the second label) when its
    probability reaches it, instead of argmax. CIs: percentile bootstrap with resampling within
    each class (class counts fixed), `bootstrap` resamples (0 = no CIs).
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = [str(label) for label in labels]
    n_classes = len(labels)
    if probs.ndim != 2 or probs.shape != (y.size, n_classes):
        raise ValueError(f"probs must be {y.size} x {n_classes}, got {probs.shape}")
    pos = positive_index(labels, positive) if threshold is not None else None
    pred = predictions(probs, threshold, pos)

    point = _point_estimates(y, pred, probs, n_classes)
    draws = bootstrap_indices(y, bootstrap, seed) if bootstrap else None
    boot = _bootstrap_estimates(y, pred, probs, n_classes, draws) if bootstrap else None

    def entry(name, k=None):
        value = point[name] if k is None else point[name][k]
        ci = None
        if boot is not None:
            samples = boot[name] if k is None else boot[name][:, k]
            ci = percentile_ci(samples)
        return {"value": _scalar(value), "ci": ci}

    counts = confusion_matrix(y, pred, labels=range(n_classes))
    metrics = {name: entry(name) for name in SUMMARY_METRICS}
    positive_class = None
    if n_classes == 2:
        positive_class = positive_index(labels, positive)
        metrics["sensitivity"] = entry("recall", positive_class)
        metrics["specificity"] = entry("recall", 1 - positive_class)
    return {
        "n": int(y.size),
        "labels": labels,
        "positive": None if positive_class is None else labels[positive_class],
        "support": {label: int(np.sum(y == k)) for k, label in enumerate(labels)},
        "operating_point": None if threshold is None else {"positive": labels[pos], "value": float(threshold)},
        "metrics": metrics,
        "per_class": {label: {name: entry(name, k) for name in ("precision", "recall", "f1", "roc_auc", "pr_auc")}
                      for k, label in enumerate(labels)},
        "confusion_matrix": {"counts": counts.tolist(), "normalized": _row_normalize(counts).tolist()},
        "bootstrap": {"resamples": int(bootstrap), "seed": int(seed), "stratified": True,
                      "confidence": CONFIDENCE,
                      "valid_auc_resamples": int(boot["valid_auc"]) if boot is not None else 0},
    }


def majority_baseline(y_train, y_test, n_classes: int, *, labels=None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """The report of a model that always answers the training side's most frequent class.

    It outputs the training class frequencies as its probabilities for every image: argmax is the
    majority class, MCC and kappa are 0, ROC-AUC 0.5, average precision the class prevalence.
    """
    prior = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if prior.sum() == 0:
        raise ValueError("the training side is empty: no majority class")
    prior /= prior.sum()
    probs = np.tile(prior, (len(y_test), 1))
    labels = labels if labels is not None else [str(k) for k in range(n_classes)]
    report = classification_report(y_test, probs, labels, bootstrap=bootstrap, seed=seed)
    report["majority_class"] = labels[int(np.argmax(prior))]
    return report


def percentile_ci(samples, confidence: float = CONFIDENCE):
    """Percentile interval over the finite bootstrap values; None when there are none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def bootstrap_indices(y, resamples: int, seed: int = 0) -> np.ndarray:
    """resamples x N indices drawn with replacement within each class (class counts kept).

    Public so that paired comparisons (benchmarks) can score several models on the same draws.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, y.size), dtype=np.int64)
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        draws[:, members] = members[rng.integers(0, members.size, size=(resamples, members.size))]
    return draws


def paired_deltas(y_true, probs_ref, probs_other, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Two models on the same images: other minus reference in accuracy, MCC and macro ROC-AUC,
    each with a percentile CI from the *same* resamples for both (a paired bootstrap, so the CI is
    of the difference, far narrower than the two models' own CIs would suggest)."""
    y = np.asarray(y_true, dtype=np.int64)
    ref, other = np.asarray(probs_ref, dtype=np.float64), np.asarray(probs_other, dtype=np.float64)
    n_classes = ref.shape[1]
    draws = bootstrap_indices(y, bootstrap, seed)
    deltas = {}
    point = {name: _point_estimates(y, p.argmax(axis=1), p, n_classes) for name, p in (("ref", ref), ("other", other))}
    boot = {name: _bootstrap_estimates(y, p.argmax(axis=1), p, n_classes, draws) for name, p in (("ref", ref), ("other", other))}
    for key in ("accuracy", "mcc", "macro_roc_auc"):
        deltas[key] = {"value": _scalar(point["other"][key] - point["ref"][key]),
                       "ci": percentile_ci(boot["other"][key] - boot["ref"][key])}
    return deltas


# --- point estimates (scikit-learn) -----------------------------------------------------------

def _point_estimates(y, pred, probs, n_classes) -> dict:
    # Undefined cases (a class never predicted, one class only) are reported as None/0 in the
    # report itself; scikit-learn's warnings about them would only be noise on stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _sklearn_estimates(y, pred, probs, n_classes)


def _sklearn_estimates(y, pred, probs, n_classes) -> dict:
    idx = list(range(n_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    roc, pr = np.full(n_classes, np.nan), np.full(n_classes, np.nan)
    for k in idx:
        positives = y == k
        if 0 < positives.sum() < y.size:
            roc[k] = roc_auc_score(positives, probs[:, k])
            pr[k] = average_precision_score(positives, probs[:, k])
    present = np.unique(y)
    return {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "precision": precision, "recall": recall, "f1": f1,
        "macro_precision": precision.mean(), "macro_recall": recall.mean(), "macro_f1": f1.mean(),
        "roc_auc": roc, "pr_auc": pr,
        "macro_roc_auc": _mean_or_nan(roc, present), "macro_pr_auc": _mean_or_nan(pr, present),
        "mcc": matthews_corrcoef(y, pred),
        "cohen_kappa": _kappa_or_nan(y, pred),
    }


def _mean_or_nan(per_class, present):
    # Undefined when a class of the task is missing from the test set, like scikit-learn's OvR macro.
    return float(np.mean(per_class)) if np.all(np.isfinite(per_class)) and present.size == per_class.size else float("nan")


def _kappa_or_nan(y, pred):
    if np.unique(np.concatenate([y, pred])).size < 2:
        return float("nan")  # a single class everywhere: chance agreement is 1, kappa undefined
    return cohen_kappa_score(y, pred)


# --- bootstrap (vectorised over resamples) ------------------------------------------------------

def _bootstrap_estimates(y, pred, probs, n_classes, draws) -> dict:
    resamples = draws.shape[0]
    cm = _confusion_matrices(y[draws], pred[draws], n_classes)
    out = _from_confusion(cm)
    # How often each original image appears in each resample: the weights of the AUCs.
    codes = (np.arange(resamples)[:, None] * y.size + draws).ravel()
    counts = np.bincount(codes, minlength=resamples * y.size).reshape(resamples, y.size).astype(np.float64)
    roc = np.full((resamples, n_classes), np.nan)
    pr = np.full((resamples, n_classes), np.nan)
    for k in range(n_classes):
        roc[:, k], pr[:, k] = weighted_auc_and_ap(y == k, probs[:, k], counts)
    valid = np.all(np.isfinite(roc), axis=1)
    out["roc_auc"], out["pr_auc"] = roc, pr
    out["macro_roc_auc"], out["macro_pr_auc"] = roc.mean(axis=1), pr.mean(axis=1)  # NaN where a class is missing
    out["valid_auc"] = int(valid.sum())
    return out


def _confusion_matrices(y, pred, n_classes) -> np.ndarray:
    """B x N true and predicted indices -> B x C x C confusion matrices (rows: true)."""
    resamples = y.shape[0]
    codes = (np.arange(resamples)[:, None] * n_classes * n_classes + y * n_classes + pred).ravel()
    return np.bincount(codes, minlength=resamples * n_classes * n_classes).reshape(
        resamples, n_classes, n_classes).astype(np.float64)


def _from_confusion(cm) -> dict:
    """Threshold metrics of B confusion matrices at once, with scikit-learn's conventions
    (precision of a never-predicted class is 0; balanced accuracy over the classes present)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true = cm.sum(axis=2)
    called = cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(called > 0, tp / called, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = true > 0
        balanced = np.where(present, recall, 0.0).sum(axis=1) / present.sum(axis=1)
        correct = tp.sum(axis=1)
        chance = (true * called).sum(axis=1)
        mcc_den = np.sqrt((total ** 2 - (called ** 2).sum(axis=1)) * (total ** 2 - (true ** 2).sum(axis=1)))
        mcc = np.where(mcc_den > 0, (correct * total - chance) / mcc_den, 0.0)
        expected = chance / total ** 2
        kappa = np.where(expected < 1, (correct / total - expected) / (1 - expected), np.nan)
    return {"accuracy": correct / total, "balanced_accuracy": balanced,
            "precision": precision, "recall": recall, "f1": f1,
            "macro_precision": precision.mean(axis=1), "macro_recall": recall.mean(axis=1),
            "macro_f1": f1.mean(axis=1), "mcc": mcc, "cohen_kappa": kappa}


def weighted_auc_and_ap(is_positive, scores, weights):
    """ROC-AUC and average precision of one score against a 0/1 truth, for B weight vectors at once.

    `weights` (B x N) are how many times each image was drawn. Equal scores are handled as
    scikit-learn does: a tie counts one half in ROC-AUC and is one threshold step in AP. A row
    with no positive or no negative weight gives NaN.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos_w = np.add.reduceat(w * is_positive[order], starts, axis=1)  # B x distinct scores, high to low
    neg_w = np.add.reduceat(w * ~is_positive[order], starts, axis=1)
    n_pos, n_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    tp, fp = np.cumsum(pos_w, axis=1), np.cumsum(neg_w, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # A positive beats every negative with a lower score (below it in this order) and ties half.
        negatives_below = n_neg[:, None] - fp
        auc = (pos_w * (negatives_below + 0.5 * neg_w)).sum(axis=1) / (n_pos * n_neg)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos_w * precision).sum(axis=1) / n_pos
    undefined = (n_pos == 0) | (n_neg == 0)
    return np.where(undefined, np.nan, auc), np.where(n_pos == 0, np.nan, ap)


# --- small helpers ------------------------------------------------------------------------------

def _row_normalize(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def _scalar(value):
    value = float(value)
    return value if math.isfinite(value) else None
