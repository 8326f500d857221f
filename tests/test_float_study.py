"""The float-recipe study: pooled validation/test figures per recipe, paired deltas, the choice on validation.

Synthetic CV run directories (predictions CSVs, history, config) stand in for trained folds, so no
TensorFlow runs: what is tested is the pooling, the pairing and what the report says.
"""

import csv
import json

import numpy as np
import pytest

from edge_runtime.cli import run_module
from edge_runtime.errors import OncoliteError
from oncolite.benchmarks import float_study
from oncolite.train import metrics

LABELS = ["benign", "malignant", "normal"]
FOLDS = ["0", "1", "2"]


def _write_fold(fold, y, probs, side_dir, names):
    out = fold / "eval" / side_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "pred", *(f"p_{label}" for label in LABELS)])
        for name, t, p in zip(names, y, probs):
            w.writerow([f"/data/{name}", LABELS[t], LABELS[int(np.argmax(p))], *p])


def _make_run(root, name, noise, config_change, seed=0, folds=3, n=40):
    """A CV run whose float probabilities are the truth blurred by `noise` (more noise: worse)."""
    rng = np.random.default_rng(seed)
    run = root / name
    for i in range(folds):
        fold = run / "folds" / str(i)
        (fold / "train").mkdir(parents=True)
        config = {"input_size": 224, "finetune_depth": 55, "head_epochs": 10, "run": {"fold": i}, **config_change}
        (fold / "config.json").write_text(json.dumps(config))
        (fold / "train" / "history.csv").write_text("phase,epoch,seconds\nhead,1,30\nfinetune,1,90\n")
        for side, side_dir in (("val", "float_val"), ("test", "float")):
            truth_rng = np.random.default_rng(100 * i + (side == "test"))  # the same images for every recipe
            y = truth_rng.integers(0, 3, n)
            logits = np.eye(3)[y] * 2 + rng.normal(0, noise, (n, 3))
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            _write_fold(fold, y, probs, side_dir, [f"{side}-{i}-{k}.png" for k in range(n)])
    return run


def test_study_pools_every_fold_and_chooses_on_validation(tmp_path):
    base = _make_run(tmp_path, "base", noise=2.5, config_change={})
    better = _make_run(tmp_path, "deeper", noise=0.8, config_change={"finetune_depth": 154, "oversample": True}, seed=1)
    study = float_study.compare([float_study.collect(base, FOLDS, True), float_study.collect(better, FOLDS, True)], bootstrap=200)
    assert study["n"] == {"val": 120, "test": 120}
    base_row, deeper_row = study["recipes"]
    assert base_row["changes"] == {} and deeper_row["changes"] == {"finetune_depth": 154, "oversample": True}
    assert study["chosen_on_val"] == str(better)
    assert len(deeper_row["test"]["per_fold"]["accuracy"]) == 3
    assert deeper_row["train_minutes"] == 6.0  # 3 folds x 120 s
    delta = deeper_row["test"]["delta"]["accuracy"]
    assert delta["value"] > 0 and delta["ci"][0] <= delta["value"] <= delta["ci"][1]
    text = float_study.markdown(study, "cmd")
    # Spelled as --set takes the settings (JSON values), not as Python writes them.
    assert "`finetune_depth=154, oversample=true`" in text and "base recipe" in text and "chosen: `" in text


def test_recipes_on_other_images_are_refused(tmp_path):
    base = _make_run(tmp_path, "base", noise=1.0, config_change={})
    other = _make_run(tmp_path, "other", noise=1.0, config_change={}, n=30)
    with pytest.raises(OncoliteError, match="same manifest"):
        float_study.compare([float_study.collect(base, FOLDS, True), float_study.collect(other, FOLDS, True)], bootstrap=10)


def test_main_compares_recipes_on_the_folds_they_all_have(tmp_path):
    """A lever explored on two folds is compared with the base on those two, and says so."""
    base = _make_run(tmp_path, "base", noise=1.0, config_change={})
    explored = _make_run(tmp_path, "explored", noise=1.0, config_change={"ema": 0.99}, folds=2)
    assert run_module("oncolite.benchmarks.float_study",
                      [str(base), str(explored), "--out", str(tmp_path / "out"), "--bootstrap", "20", "--quiet"]) == 0
    study = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study["fold_names"] == ["0", "1"] and study["n"] == {"val": 80, "test": 80}
    assert "Folds 0, 1 of one manifest" in (tmp_path / "out" / "report.md").read_text()


def test_ensemble_row_is_the_mean_of_the_recipes_and_never_chosen(tmp_path):
    """Two noisy recipes with independent errors: their mean beats both on validation, yet the
    study still chooses a single network, the only kind the device runs."""
    runs = [_make_run(tmp_path, f"r{seed}", noise=2.0, config_change={"seed": seed}, seed=seed) for seed in (0, 1)]
    recipes = [float_study.collect(run, FOLDS, True) for run in runs]
    recipes.append(float_study.ensemble_of(recipes))
    mean = (recipes[0]["sides"]["test"]["probs"] + recipes[1]["sides"]["test"]["probs"]) / 2
    assert np.allclose(recipes[2]["sides"]["test"]["probs"], mean)
    study = float_study.compare(recipes, bootstrap=50)
    ensemble = study["recipes"][2]
    assert ensemble["ensemble"] == 2 and ensemble["train_minutes"] == 12.0
    assert ensemble["val"]["accuracy"]["value"] > max(r["val"]["accuracy"]["value"] for r in study["recipes"][:2])
    assert study["chosen_on_val"] in {str(run) for run in runs}
    assert "ensemble of the 2 recipes above" in float_study.markdown(study, "cmd")


def test_paired_deltas_of_a_model_with_itself_are_exactly_zero():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    deltas = metrics.paired_deltas(y, probs, probs, bootstrap=100)
    for key in ("accuracy", "mcc", "macro_roc_auc"):
        assert deltas[key]["value"] == 0 and deltas[key]["ci"] == [0.0, 0.0]


def test_paired_delta_ci_is_narrower_than_either_models_own():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    a = np.eye(3)[y] * 1.5 + rng.normal(0, 1, (300, 3))
    b = a + rng.normal(0, 0.2, (300, 3))  # a near copy: their difference varies far less than each
    own = metrics.classification_report(y, a, LABELS, bootstrap=300)["metrics"]["accuracy"]["ci"]
    paired = metrics.paired_deltas(y, a, b, bootstrap=300)["accuracy"]["ci"]
    assert paired[1] - paired[0] < (own[1] - own[0]) / 2


def test_hflip_averages_each_model_with_its_mirrored_images_and_reports_the_gain(tmp_path, monkeypatch):
    """--hflip: the mirrored predictions (here those of a model that is always right) are averaged
    with the plain ones, in the predictions' order, and compared with the same model without."""
    base = _make_run(tmp_path, "base", noise=3.0, config_change={})

    def mirrored(fold_dir, side, paths):
        rows = np.loadtxt(fold_dir / "eval" / {"val": "float_val", "test": "float"}[side] / "predictions.csv",
                          delimiter=",", skiprows=1, usecols=(1,), dtype=str)
        assert len(rows) == len(paths)
        return np.eye(3)[[LABELS.index(t) for t in rows]]  # the true class, with certainty

    monkeypatch.setattr(float_study, "mirrored_predictions", mirrored)
    study = float_study.compare([float_study.collect(base, FOLDS, True, hflip=True)], bootstrap=50)
    tta = study["recipes"][0]["test"]["hflip"]
    assert tta["accuracy"]["value"] > study["recipes"][0]["test"]["accuracy"]["value"]
    assert tta["delta"]["accuracy"]["value"] > 0
    assert "horizontal-flip test-time augmentation" in float_study.markdown(study, "cmd")


def test_a_run_that_is_missing_or_untrained_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "split-only" / "folds" / "0").mkdir(parents=True)
    for run, says in ((tmp_path / "nowhere", "no such run directory"), (tmp_path / "split-only", "no fold is trained yet")):
        assert run_module("oncolite.benchmarks.float_study", [str(run), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
