"""train.metrics against scikit-learn, hand-worked numbers, and the bootstrap's own properties."""

import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                             confusion_matrix, f1_score, matthews_corrcoef, precision_score, recall_score,
                             roc_auc_score)

from oncolite.train import metrics

LABELS3 = ["benign", "malignant", "normal"]


def fixed_three_class(n=240, seed=3):
    """Fixed noisy 3-class predictions, scores rounded so that ties occur (they must be handled)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.2
    logits = np.round(logits, 1)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def fixed_binary(n=200, seed=5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p1 = np.clip(np.round(0.3 + 0.35 * y + rng.normal(0, 0.2, n), 2), 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


def value(report, name):
    return report["metrics"][name]["value"]


def test_point_estimates_equal_scikit_learn_three_classes():
    y, probs = fixed_three_class()
    pred = probs.argmax(axis=1)
    r = metrics.classification_report(y, probs, LABELS3, bootstrap=0)
    assert value(r, "accuracy") == pytest.approx(accuracy_score(y, pred))
    assert value(r, "balanced_accuracy") == pytest.approx(balanced_accuracy_score(y, pred))
    assert value(r, "macro_precision") == pytest.approx(precision_score(y, pred, average="macro"))
    assert value(r, "macro_recall") == pytest.approx(recall_score(y, pred, average="macro"))
    assert value(r, "macro_f1") == pytest.approx(f1_score(y, pred, average="macro"))
    assert value(r, "mcc") == pytest.approx(matthews_corrcoef(y, pred))
    assert value(r, "cohen_kappa") == pytest.approx(cohen_kappa_score(y, pred))
    assert value(r, "macro_roc_auc") == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[y]
    assert value(r, "macro_pr_auc") == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    per_f1 = f1_score(y, pred, average=None)
    for k, label in enumerate(LABELS3):
        assert r["per_class"][label]["f1"]["value"] == pytest.approx(per_f1[k])
        assert r["per_class"][label]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
        assert r["per_class"][label]["pr_auc"]["value"] == pytest.approx(average_precision_score(y == k, probs[:, k]))
    assert r["confusion_matrix"]["counts"] == confusion_matrix(y, pred).tolist()
    assert np.allclose(r["confusion_matrix"]["normalized"], confusion_matrix(y, pred, normalize="true"))
    assert "sensitivity" not in r["metrics"]


def test_binary_report_equals_scikit_learn_and_has_sensitivity_specificity():
    y, probs = fixed_binary()
    pred = probs.argmax(axis=1)
    r = metrics.classification_report(y, probs, ["benign", "malignant"], bootstrap=0)
    assert value(r, "macro_roc_auc") == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert r["per_class"]["malignant"]["pr_auc"]["value"] == pytest.approx(average_precision_score(y, probs[:, 1]))
    assert value(r, "sensitivity") == pytest.approx(recall_score(y, pred))
    assert value(r, "specificity") == pytest.approx(recall_score(y, pred, pos_label=0))
    assert r["positive"] == "malignant"


def test_hand_worked_mcc_and_kappa():
    # 4 positives, 6 negatives; the model finds 3 of the positives (TP 3, FN 1) and calls 2 of
    # the negatives positive (FP 2, TN 4).
    #   MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #       = (3*4 - 2*1) / sqrt(5 * 4 * 6 * 5) = 10 / sqrt(600) = 1 / sqrt(6) = 0.40825
    #   kappa: observed agreement 7/10 = 0.7; chance = (5 called pos * 4 true pos
    #          + 5 called neg * 6 true neg) / 10^2 = 50/100 = 0.5; (0.7 - 0.5) / (1 - 0.5) = 0.4
    #   accuracy 0.7; sensitivity 3/4; specificity 4/6; balanced accuracy (0.75 + 0.6667)/2 = 0.70833
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p1 = np.array([.9, .8, .7, .2, .6, .55, .3, .2, .1, .05])
    r = metrics.classification_report(y, np.stack([1 - p1, p1], axis=1), ["neg", "pos"], bootstrap=0)
    assert value(r, "mcc") == pytest.approx(1 / math.sqrt(6))
    assert value(r, "cohen_kappa") == pytest.approx(0.4)
    assert value(r, "accuracy") == pytest.approx(0.7)
    assert value(r, "sensitivity") == pytest.approx(0.75)
    assert value(r, "specificity") == pytest.approx(4 / 6)
    assert value(r, "balanced_accuracy") == pytest.approx((0.75 + 4 / 6) / 2)
    assert r["confusion_matrix"]["counts"] == [[4, 2], [1, 3]]


def test_vectorised_bootstrap_equals_scikit_learn_on_each_resample():
    y, probs = fixed_three_class(n=90)
    resamples = 40
    r = metrics.classification_report(y, probs, LABELS3, bootstrap=resamples, seed=7)
    draws = metrics.bootstrap_indices(y, resamples, seed=7)
    pred = probs.argmax(axis=1)
    slow = {"mcc": [], "cohen_kappa": [], "balanced_accuracy": [], "macro_f1": [], "macro_roc_auc": [], "macro_pr_auc": []}
    for idx in draws:
        yy, pp, pr = y[idx], probs[idx], pred[idx]
        slow["mcc"].append(matthews_corrcoef(yy, pr))
        slow["cohen_kappa"].append(cohen_kappa_score(yy, pr))
        slow["balanced_accuracy"].append(balanced_accuracy_score(yy, pr))
        slow["macro_f1"].append(f1_score(yy, pr, average="macro"))
        slow["macro_roc_auc"].append(roc_auc_score(yy, pp, multi_class="ovr"))
        slow["macro_pr_auc"].append(average_precision_score(np.eye(3)[yy], pp, average="macro"))
    for name, samples in slow.items():
        assert r["metrics"][name]["ci"] == pytest.approx(np.percentile(samples, [2.5, 97.5]).tolist()), name
    assert r["bootstrap"]["valid_auc_resamples"] == resamples


def test_weighted_auc_and_ap_equal_scikit_learn_on_repeated_samples():
    y, probs = fixed_binary(n=60)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 60, 60)
    counts = np.bincount(idx, minlength=60)[None].astype(float)
    auc, ap = metrics.weighted_auc_and_ap(y == 1, probs[:, 1], counts)
    assert auc[0] == pytest.approx(roc_auc_score(y[idx], probs[idx, 1]))
    assert ap[0] == pytest.approx(average_precision_score(y[idx], probs[idx, 1]))


def test_ci_contains_point_estimate_and_narrows_with_more_samples():
    def width(n):
        y, probs = fixed_three_class(n=n, seed=11)
        r = metrics.classification_report(y, probs, LABELS3, bootstrap=400)
        for name in ("accuracy", "mcc", "macro_roc_auc", "macro_f1"):
            low, high = r["metrics"][name]["ci"]
            assert low <= r["metrics"][name]["value"] <= high, name
        low, high = r["metrics"]["mcc"]["ci"]
        return high - low

    assert width(1600) < width(100) / 2


def test_missing_class_makes_aucs_undefined_not_wrong():
    y, probs = fixed_three_class(n=60)
    keep = y != 2
    r = metrics.classification_report(y[keep], probs[keep], LABELS3, bootstrap=50)
    assert r["per_class"]["normal"]["roc_auc"]["value"] is None
    assert r["metrics"]["macro_roc_auc"]["value"] is None
    assert r["metrics"]["macro_roc_auc"]["ci"] is None
    assert r["bootstrap"]["valid_auc_resamples"] == 0
    assert r["per_class"]["benign"]["roc_auc"]["ci"] is not None


def test_threshold_changes_predictions_for_the_positive_class_only():
    probs = np.array([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    assert metrics.predictions(probs).tolist() == [0, 0, 1, 0]
    assert metrics.predictions(probs, threshold=0.25, positive=1).tolist() == [1, 1, 1, 0]
    assert metrics.predictions(probs, threshold=0.6, positive=0).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError):
        metrics.predictions(np.full((2, 3), 1 / 3), threshold=0.5)


def test_choose_threshold_reaches_target_on_val_with_highest_threshold():
    y_val = np.array([1] * 10 + [0] * 10)
    p_val = np.r_[np.linspace(0.95, 0.05, 10), np.linspace(0.6, 0.0, 10)]
    t = metrics.choose_threshold(y_val, p_val, 0.8)
    # the 8th highest positive score: 0.95 - 7 * 0.1 = 0.25
    assert t == pytest.approx(0.25)
    stats = metrics.sensitivity_specificity(y_val, p_val, t)
    assert stats["sensitivity"] >= 0.8
    assert metrics.sensitivity_specificity(y_val, p_val, t + 1e-6)["sensitivity"] < 0.8
    assert metrics.choose_threshold(y_val, p_val, 1.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        metrics.choose_threshold(np.zeros(4), np.zeros(4), 0.9)


def test_sensitivity_specificity_counts():
    s = metrics.sensitivity_specificity([1, 1, 1, 0, 0], [0.9, 0.4, 0.6, 0.7, 0.1], 0.5)
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (2, 1, 1, 1)
    assert s["sensitivity"] == pytest.approx(2 / 3) and s["specificity"] == pytest.approx(0.5)


def test_aggregate_by_group_means_probabilities_and_takes_majority_label():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7], [0.2, 0.8]])
    groups = ["p2", "p2", "p1", "p1", "p1"]
    y = np.array([0, 0, 1, 1, 0])
    group_probs, group_y, ids = metrics.aggregate_by_group(probs, groups, y)
    assert ids == ["p1", "p2"]
    assert np.allclose(group_probs, [[0.2, 0.8], [0.7, 0.3]])
    assert group_y.tolist() == [1, 0]


def test_by_subset_groups_items_by_meta_value_in_natural_order():
    items = [{"meta": {"magnification": "400X"}}, {"meta": {"magnification": "40X"}}, {"meta": {}},
             {"meta": {"magnification": "100X"}}, {"meta": {"magnification": "40X"}}]
    subsets = metrics.by_subset(items, "magnification")
    assert list(subsets) == ["40X", "100X", "400X"]
    assert subsets["40X"].tolist() == [1, 4]


def test_majority_baseline_predicts_the_training_majority():
    y_train = [0, 0, 0, 1, 2]
    y_test = np.array([0, 1, 1, 2, 0, 1])
    r = metrics.majority_baseline(y_train, y_test, 3, labels=LABELS3, bootstrap=20)
    assert r["majority_class"] == "benign"
    assert value(r, "accuracy") == pytest.approx(2 / 6)
    assert value(r, "mcc") == 0.0
    assert value(r, "macro_roc_auc") == pytest.approx(0.5)
    assert value(r, "balanced_accuracy") == pytest.approx(1 / 3)


def test_thousand_resamples_of_eight_hundred_images():
    # Not a timing assertion: a per-resample scikit-learn loop would make this test take minutes.
    y, probs = fixed_three_class(n=800)
    r = metrics.classification_report(y, probs, LABELS3, bootstrap=1000)
    assert r["bootstrap"]["resamples"] == 1000
    assert r["metrics"]["macro_roc_auc"]["ci"][0] < r["metrics"]["macro_roc_auc"]["value"]


def test_decisions_follow_the_operating_point_or_argmax():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    assert metrics.decisions(probs, None, ["benign", "malignant"]).tolist() == [0, 0, 1]
    rule = {"positive": "malignant", "value": 0.35}
    assert metrics.decisions(probs, rule, ["benign", "malignant"]).tolist() == [0, 1, 1]
    # the positive class is named, not positional: benign as positive at 0.7
    assert metrics.decisions(probs, {"positive": "benign", "value": 0.7}, ["benign", "malignant"]).tolist() == [0, 1, 1]


def test_agreement_counts_same_classes():
    assert metrics.agreement([0, 1, 2, 1], [0, 1, 2, 0]) == {"value": 0.75, "same": 3, "n": 4}
    assert math.isnan(metrics.agreement([], [])["value"])
