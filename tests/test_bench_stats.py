"""benchmarks.stats on cases whose answers are known by hand."""

from math import comb

import numpy as np
import pytest

from oncolite.benchmarks import stats


def _pairs(only_ref: int, only_other: int, both: int = 5):
    """Labels and two prediction vectors with the given discordant counts (2 classes)."""
    y = np.zeros(only_ref + only_other + both, dtype=int)
    ref = np.concatenate([np.zeros(only_ref), np.ones(only_other), np.zeros(both)]).astype(int)
    other = np.concatenate([np.ones(only_ref), np.zeros(only_other), np.zeros(both)]).astype(int)
    return y, ref, other


def test_mcnemar_10_vs_2_is_the_two_sided_binomial_tail():
    y, ref, other = _pairs(10, 2)
    result = stats.mcnemar_exact(y, ref, other)
    by_hand = 2 * sum(comb(12, k) for k in range(3)) / 2 ** 12  # 158 / 4096
    assert result["only_ref_correct"] == 10 and result["only_other_correct"] == 2
    assert result["p_value"] == pytest.approx(by_hand, rel=1e-12)
    assert result["p_value"] == pytest.approx(0.0385742, abs=1e-6)


def test_mcnemar_is_symmetric_and_one_when_all_agree():
    y, ref, other = _pairs(2, 10)
    assert stats.mcnemar_exact(y, ref, other)["p_value"] == pytest.approx(158 / 4096)
    y = np.array([0, 1, 1, 0])
    assert stats.mcnemar_exact(y, y, y)["p_value"] == 1.0
    # Both wrong in different ways is not discordant on correctness.
    assert stats.mcnemar_exact(np.array([0, 0]), np.array([1, 2]), np.array([2, 1]))["p_value"] == 1.0


def test_agreement_and_wilson_interval():
    a = stats.agreement([0, 1, 2, 1], [0, 1, 2, 0])
    assert a["value"] == 0.75 and a["same"] == 3 and a["n"] == 4
    lo, hi = a["ci"]
    # Wilson 95 % for 3/4, computed by hand from the score formula.
    z, p, n = 1.959963984540054, 0.75, 4
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half, abs=1e-9)
    full = stats.agreement([1] * 20, [1] * 20)
    assert full["value"] == 1.0 and full["ci"][1] == pytest.approx(1.0) and full["ci"][0] < 1.0


def test_probability_difference_and_per_class_deltas():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    other = np.array([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    d = stats.probability_difference(ref, other)
    assert d["mean_abs"] == pytest.approx((0.2 * 2 + 0 + 0.2 * 2) / 6)
    assert d["max_abs"] == pytest.approx(0.2)
    y = np.array([0, 1, 0])
    deltas = stats.per_class_deltas(y, ref.argmax(1), other.argmax(1), ["benign", "malignant"])
    # ref: all right; other: image 3 (class 0) called class 1.
    assert deltas["benign"]["recall"] == pytest.approx(-0.5)
    assert deltas["malignant"]["precision"] == pytest.approx(-0.5)
    assert deltas["malignant"]["recall"] == pytest.approx(0.0)
    full = stats.compare_to_reference(y, ref, other, ref.argmax(1), other.argmax(1), ["benign", "malignant"])
    assert full["agreement"]["same"] == 2 and full["mcnemar"]["only_ref_correct"] == 1
    # Decisions, not argmax, are compared: calling class 1 from p >= 0.35 makes image 3 agree, and wrong for both.
    called_ref, called_other = (ref[:, 1] >= 0.35).astype(int), (other[:, 1] >= 0.35).astype(int)
    at_035 = stats.compare_to_reference(y, ref, other, called_ref, called_other, ["benign", "malignant"])
    assert at_035["agreement"]["same"] == 3 and at_035["mcnemar"]["p_value"] == 1.0


def test_pooled_cv_counts_every_held_out_image_once_with_flips_and_the_uncertain_band():
    from oncolite.benchmarks.pooled import flipped_images, pool

    labels = ["a", "b", "c"]

    def fold(ref, other, y, band):
        return {"labels": labels, "images": [f"img{i}.png" for i in range(len(y))], "y": y,
                "probs": {"keras_float": ref, "tflite_int8": other}, "rules": {"keras_float": None, "tflite_int8": None},
                "uncertain_margin": {"keras_float": None, "tflite_int8": band}}

    # fold 0: one confident flip (float margin 0.6); fold 1: one tie flip (float margin 0.02)
    f0 = fold([[0.8, 0.2, 0.0], [0.1, 0.8, 0.1]], [[0.3, 0.7, 0.0], [0.1, 0.8, 0.1]], [0, 1], 0.05)
    f1 = fold([[0.0, 0.51, 0.49], [0.0, 0.0, 1.0]], [[0.0, 0.49, 0.51], [0.0, 0.0, 1.0]], [1, 2], 0.05)
    pooled = pool([f0, f1], bootstrap=0)
    int8 = pooled["models"]["tflite_int8"]
    assert pooled["n"] == 4 and int8["n"] == 4
    assert int8["flips"] == 2 and int8["confident_flips"] == 1 and int8["agreement"] == 0.5
    assert int8["agreement_per_fold"] == [0.5, 0.5]
    # the tie (int8 margin 0.02 < band 0.05) is flagged; outside the band 2 of 3 agree
    assert int8["uncertain"]["flagged"] == 1 and abs(int8["uncertain"]["agreement_outside"] - 2 / 3) < 1e-12
    assert int8["delta_accuracy"] == -0.5
    rows = flipped_images([f0, f1], "tflite_int8")
    assert [(r["fold"], r["image"], r["float_margin"]) for r in rows] == [(0, "img0.png", 0.6), (1, "img0.png", 0.02)]


def test_benchmark_markdown_lists_each_flipped_image():
    from oncolite.benchmarks.pooled import flipped_images
    from oncolite.benchmarks.report import flipped_table

    fold = {"labels": ["a", "b"], "images": ["x.png", "y.png"], "y": [0, 1],
            "probs": {"keras_float": [[0.9, 0.1], [0.2, 0.8]], "tflite_int8": [[0.4, 0.6], [0.2, 0.8]]},
            "rules": {"keras_float": None, "tflite_int8": None}, "uncertain_margin": {}}
    report = {"labels": ["a", "b"], "flipped": {"tflite_int8": flipped_images([fold], "tflite_int8")}}
    lines = flipped_table(report)
    assert any(line.startswith("| x.png | a | a | b | 0.900, 0.100 | 0.400, 0.600 | 0.800 |") for line in lines), lines
    assert not any("y.png" in line for line in lines)
