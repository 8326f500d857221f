"""Paired comparison of a variant's predictions with the float model's on the same images.

The per-model metrics with CIs come from train.metrics; this file adds what only a pair of
models has: McNemar's exact test, a CI for top-1 agreement, probability differences, per-class deltas.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import precision_recall_fscore_support

from oncolite.train import metrics


def mcnemar_exact(y_true, pred_ref, pred_other) -> dict:
    """Exact (binomial) McNemar test on the images where exactly one of the two models is right.

    `only_ref`: reference right, other wrong; `only_other`: the reverse. With no discordant
    pair there is no evidence of a difference: p = 1.
    """
    y_true, pred_ref, pred_other = (np.asarray(a) for a in (y_true, pred_ref, pred_other))
    ref_right = pred_ref == y_true
    other_right = pred_other == y_true
    only_ref = int(np.sum(ref_right & ~other_right))
    only_other = int(np.sum(~ref_right & other_right))
    n = only_ref + only_other
    p = 1.0 if n == 0 else float(binomtest(only_ref, n, 0.5, alternative="two-sided").pvalue)
    return {"only_ref_correct": only_ref, "only_other_correct": only_other, "p_value": p}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion; [0, 1] when there is nothing to count."""
    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def agreement(pred_ref, pred_other, confidence: float = 0.95) -> dict:
    """train.metrics' top-1 agreement (same class on the same image) with a Wilson CI."""
    result = metrics.agreement(pred_ref, pred_other)
    return {**result, "ci": wilson_interval(result["same"], result["n"], confidence)}


def probability_difference(probs_ref, probs_other) -> dict:
    """How far the variant's probabilities move from the reference's: mean and max over all entries."""
    diff = np.abs(np.asarray(probs_ref, dtype=np.float64) - np.asarray(probs_other, dtype=np.float64))
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


def per_class_deltas(y_true, pred_ref, pred_other, labels) -> dict:
    """Per class: precision, recall and F1 of the variant minus the reference's."""
    idx = list(range(len(labels)))
    ref = precision_recall_fscore_support(y_true, pred_ref, labels=idx, zero_division=0)[:3]
    other = precision_recall_fscore_support(y_true, pred_other, labels=idx, zero_division=0)[:3]
    return {label: {name: float(other[k][i] - ref[k][i]) for k, name in enumerate(("precision", "recall", "f1"))}
            for i, label in enumerate(labels)}


def flips(pred_ref, pred_other, ref_margins, confident: float) -> dict:
    """Images decided differently, and how many of them the reference decided with a margin of
    at least `confident` (real error, not a tie at the boundary)."""
    changed = np.asarray(pred_ref) != np.asarray(pred_other)
    return {"count": int(changed.sum()), "confident": int((changed & (np.asarray(ref_margins) >= confident)).sum()),
            "confident_margin": confident}


def compare_to_reference(y_true, probs_ref, probs_other, pred_ref, pred_other, labels, ref_margins=None,
                         confident: float = 0.2) -> dict:
    """Everything the report says about one variant against the float model.

    `pred_*` are each model's decisions and `ref_margins` the reference's decision margins
    (edge_runtime.decision: argmax or a binary operating point).
    """
    return {
        "agreement": agreement(pred_ref, pred_other),
        "flips": flips(pred_ref, pred_other, np.zeros(len(pred_ref)) if ref_margins is None else ref_margins, confident),
        "mcnemar": mcnemar_exact(y_true, pred_ref, pred_other),
        "probability_difference": probability_difference(probs_ref, probs_other),
        "per_class_delta": per_class_deltas(y_true, pred_ref, pred_other, labels),
    }
