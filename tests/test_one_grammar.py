"""Issue 16, "one contract, one CLI grammar": a mistyped name gets the closest valid ones; `train`
and `run` share one profile default; a finished training is left as it is (`--force` trains it
again); `--quiet` prints the result line; the export report shows both |Δp| alike; the manifest
records the labels actually used and the command as given; export keeps a log as train does;
`--folds K` is K-fold cross-validation for `split` and `run` alike, `run --only-folds` a subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.errors import EXIT_OK, EXIT_USAGE
from oncolite.cli import main as oncolite
from tests.datatrees import folder_tree

LABELS = ("benign", "malignant", "normal")
TINY = ["input_size=32", "alpha=0.35", "weights=null", "batch_size=8", "head_epochs=1", "finetune_epochs=0"]
TINY_SETS = [f"--set={pair}" for pair in TINY]


def parser_of(name: str):
    import argparse
    import importlib

    from oncolite.cli import COMMANDS

    parser = argparse.ArgumentParser(prog=f"oncolite {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


# --------------------------------------------------------------------- 1, 2: names and help

def test_an_unknown_command_or_key_is_refused_with_the_closest_valid_names(capsys):
    from edge_runtime.cli import main as edge
    from oncolite.train.config import ConfigError, load_config, parse_overrides, with_overrides

    assert oncolite(["trian"]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1] == "oncolite: error: unknown command 'trian' (did you mean 'train'?)"
    assert edge(["predcit"]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1].endswith("unknown command 'predcit' (did you mean 'predict'?)")
    for pair, suggested in (("finetune_lrr=1e-5", "'finetune_lr'"), ("rotation=10", "'augment.rotation'"),
                            ("augment.zom=0.2", "'augment.zoom'")):
        with pytest.raises(ConfigError, match=rf"unknown config key '{pair.split('=')[0]}' \(did you mean {suggested}"):
            load_config(overrides=parse_overrides([pair]))
    with pytest.raises(ConfigError, match=r"unknown config key 'expot' \(did you mean 'export'"):
        with_overrides(load_config(), ["expot.gate=0.5"], "export")
    assert oncolite(["config", "rotaton"]) == EXIT_USAGE
    assert "no setting named rotaton (did you mean 'augment.rotation'?)" in capsys.readouterr().err


def test_set_help_points_at_oncolite_config():
    for name in ("train", "run"):
        text = " ".join(parser_of(name)._option_string_actions["--set"].help.split())
        assert "`oncolite config` lists and documents every key" in text and "defaults.json" not in text, name


# --------------------------------------------------------------------- 3: one profile default

def test_train_and_run_take_the_same_profile_by_the_same_default(monkeypatch, tmp_path):
    from oncolite.train import config as config_module
    from oncolite.train import train as train_module

    train, run = (parser_of(n)._option_string_actions["--profile"] for n in ("train", "run"))
    assert (train.help, train.choices) == (run.help, run.choices) and "full with a GPU, quick without" in train.help

    asked, profiles = [], []
    monkeypatch.setattr(config_module, "default_profile", lambda: asked.append("run") or "quick")
    monkeypatch.setattr(train_module, "default_profile", lambda: asked.append("train") or "quick")
    loader = train_module.load_config
    monkeypatch.setattr(train_module, "load_config", lambda **kw: profiles.append(kw["profile"]) or loader(**kw))
    # Both stop before any work (no manifest, no dataset), after choosing the profile.
    assert oncolite(["train", str(tmp_path / "r"), "--manifest", str(tmp_path / "missing.json"), "--quiet"]) == EXIT_USAGE
    assert oncolite(["run", str(tmp_path / "r"), "--data", str(tmp_path / "missing"), "--quiet"]) == EXIT_USAGE
    assert asked == ["train", "run"] and profiles[-1] == "quick"


# --------------------------------------------------------------------- 7, 9: the manifest

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return folder_tree(tmp_path_factory.mktemp("data") / "tiny", {label: 15 for label in LABELS})


def test_split_folds_1_is_one_split_the_sides_of_fold_0_of_5_and_the_manifest_says_what_it_used(data, tmp_path, capsys):
    one, five = tmp_path / "out" / "one.json", tmp_path / "five.json"
    assert oncolite(["split", str(data), "--out", str(one), "--folds", "1", "--quiet"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"manifest: {one} (sha256 ")  # 5: the result line under --quiet
    assert oncolite(["split", str(data), "--out", str(five), "--quiet"]) == EXIT_OK
    one_m, five_m = (json.loads(p.read_text()) for p in (one, five))
    assert one_m["split"]["folds"] == 1 and not any("cv" in item for item in one_m["items"])
    assert [i["split"] for i in one_m["items"]] == [i["split"] for i in five_m["items"]]
    assert {i["split"] for i in one_m["items"]} == {"train", "val", "test"}
    # 7: three class folders are the data's own labels, not "binary"; the command is the one typed.
    assert one_m["dataset"]["label_scheme"] == "as-is" and one_m["labels"] == list(LABELS)
    assert one_m["command"] == f"oncolite split {data} --out {one} --folds 1 --quiet"
    assert five_m["command"].endswith(f"--out {five} --quiet")


def test_a_breakhis_manifest_records_its_label_scheme(tmp_path):
    from tests.datatrees import breakhis_tree

    breakhis_tree(tmp_path / "bh")
    for scheme in ("binary", "subtype"):
        out = tmp_path / f"{scheme}.json"
        assert oncolite(["split", str(tmp_path / "bh"), "--out", str(out), "--label-scheme", scheme, "--folds", "3",
                         "--val-fraction", "0.25", "--quiet"]) == EXIT_OK
        assert json.loads(out.read_text())["dataset"]["label_scheme"] == scheme


def test_audit_prints_its_result_line_under_quiet(data, tmp_path, capsys):
    assert oncolite(["audit", str(data), "--out", str(tmp_path / "audit"), "--quiet"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"report: {tmp_path / 'audit' / 'audit.md'}: ") and "conflicts" in out


# --------------------------------------------------------------------- 4, 5, 8: train and export

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trained")
    assert oncolite(["split", str(data), "--out", str(work / "manifest.json"), "--folds", "1", "--quiet"]) == EXIT_OK
    assert oncolite(["train", str(work / "run"), "--manifest", str(work / "manifest.json"), "--quiet", *TINY_SETS]) == EXIT_OK
    return work / "run"


@pytest.mark.slow
def test_a_finished_training_is_left_as_it_is_unless_forced(trained, tmp_path, capsys):
    from oncolite.pipeline import forget

    run = shutil.copytree(trained, tmp_path / "run")
    manifest = str(trained.parent / "manifest.json")
    model = run / "models" / "float.keras"
    made = model.stat().st_mtime_ns
    capsys.readouterr()
    for again in (["--manifest", manifest, *TINY_SETS], ["--resume"]):
        assert oncolite(["train", str(run), *again, "--quiet"]) == EXIT_OK
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and "training finished before; left as it is" in out and str(model) in out
        assert "--force" in out and "new RUN_DIR" in out
        assert model.stat().st_mtime_ns == made
    # Other settings on a finished run: refused, naming --force, not mixed in.
    assert oncolite(["train", str(run), "--manifest", manifest, *TINY_SETS, "--set", "dropout=0.5", "--quiet"]) == EXIT_USAGE
    assert "another config" in capsys.readouterr().err and model.stat().st_mtime_ns == made
    assert oncolite(["train", str(run), "--manifest", manifest, *TINY_SETS, "--force", "--quiet"]) == EXIT_OK
    assert model.stat().st_mtime_ns != made
    history = (run / "train" / "history.csv").read_text().splitlines()
    assert len(history) == 2  # one epoch, from scratch: not appended to the first training's
    # `oncolite run --from train` forgets a finished training, so the pipeline trains again.
    forget(run, ["train"])
    assert not (run / "train" / "summary.json").exists() and not (run / "train" / "state").exists()


@pytest.mark.slow
def test_export_prints_its_result_under_quiet_and_logs_as_train_does(trained, capsys):
    capsys.readouterr()
    assert oncolite(["export", str(trained), "--variants", "fp32", "--quiet"]) == EXIT_OK
    out = capsys.readouterr().out
    report = trained / "models" / "export_report.md"
    assert out == f"report: {report}\n" and report.exists()
    log = (trained / "logs" / "export.log").read_text().splitlines()
    assert "oncolite export" in log[0] and "fp32" in log[0]
    assert any(" fp32 " in line and "agreement" in line for line in log) and log[-1].endswith(f"report: {report}")
    assert (trained / "logs" / "train.log").exists()


# --------------------------------------------------------------------- 6: the export report

def test_the_export_report_shows_mean_and_max_prob_change_with_the_same_precision():
    from oncolite.quantize.debug import report_markdown

    row = {"size_vs_fp32": 0.27, "size_bytes": 2.7e6, "io": "int8", "accuracy": 0.81, "mcc": 0.7, "agreement": 0.98,
           "mean_abs_prob_diff": 0.01234, "max_prob_diff": 0.45678, "uncertain_margin": None, "float_ops": [],
           "ops": [], "selective": None}
    text = report_markdown({"n_val": 10, "float": {"accuracy": 0.8, "mcc": 0.7}, "gate": 0.01, "variants": {"int8_ptq": row},
                            "int8": None, "warnings": [], "debugger": None})
    assert "| 0.0123 | 0.4568 |" in text


# --------------------------------------------------------------------- 9: run's --folds and --only-folds

class Planned(Exception):
    """Raised once `oncolite run` has gone through its plan (stages replaced by a recorder)."""


def plan_of(monkeypatch, *argv) -> list[list[str]]:
    """The stage commands `oncolite run ARGV` runs, without running them."""
    import edge_runtime.cli
    from oncolite import pipeline

    calls = []
    monkeypatch.setattr(edge_runtime.cli, "dispatch", lambda prog, commands, stage, groups=None: calls.append(stage) or 0)
    monkeypatch.setattr(pipeline, "summarize", lambda *a: (_ for _ in ()).throw(Planned()))
    with pytest.raises(Planned):
        oncolite(["run", *map(str, argv), "--profile", "quick", "--quiet"])
    return calls


def test_run_folds_k_splits_into_k_folds_and_trains_them_all_or_only_some(data, tmp_path, monkeypatch, capsys):
    from oncolite.pipeline import CV_VARIANTS, FIRST_FOLD_VARIANTS

    one = plan_of(monkeypatch, tmp_path / "one", "--data", data)  # quick: folds 1, one split
    split = next(c for c in one if c[0] == "split")
    assert split[split.index("--folds") + 1] == "1"
    assert [c for c in one if c[0] == "train"] and all("--fold" not in c for c in one if c[0] == "train")

    three = plan_of(monkeypatch, tmp_path / "three", "--data", data, "--folds", "3")
    split = next(c for c in three if c[0] == "split")
    assert split[split.index("--folds") + 1] == "3"
    assert [c[c.index("--fold") + 1] for c in three if c[0] == "train"] == ["0", "1", "2"]

    some = plan_of(monkeypatch, tmp_path / "some", "--data", data, "--folds", "3", "--only-folds", "2,1")
    assert [c[1] for c in some if c[0] == "train"] == [str(tmp_path / "some" / "folds" / i) for i in ("1", "2")]
    assert [c[c.index("--variants") + 1] for c in some if c[0] == "export"] == [FIRST_FOLD_VARIANTS, CV_VARIANTS]

    assert oncolite(["run", str(tmp_path / "bad"), "--data", str(data), "--profile", "quick", "--folds", "3",
                     "--only-folds", "3"]) == EXIT_USAGE
    assert "--only-folds 3: give fold numbers among 0..2 (--folds 3)" in capsys.readouterr().err
    assert parser_of("run")._option_string_actions["--folds"].help.startswith(
        parser_of("split")._option_string_actions["--folds"].help.split(";")[0])


def test_a_run_made_before_only_folds_existed_keeps_its_finished_stages(data, tmp_path, monkeypatch):
    run = tmp_path / "old"
    run.mkdir()
    from oncolite.pipeline import _dataset_name

    settings = {"data": str(data.resolve()), "profile": "quick", "dataset": _dataset_name(data), "folds": 1, "seed": 0,
                "random": False, "set": []}  # as `oncolite run` wrote them before --only-folds
    (run / "stages.json").write_text(json.dumps({"settings": settings, "audit": {"status": "done"},
                                                 "split": {"status": "done"}}))
    stages = [c[0] for c in plan_of(monkeypatch, run, "--data", data)]
    assert "audit" not in stages and "split" not in stages and "train" in stages


# --------------------------------------------------------------------- 10: one rendering of the answer

def test_the_answer_markup_and_its_style_are_answer_js_and_app_css_alone():
    import re

    import edge_runtime
    from edge_runtime.webapp import ASSETS_DIR, SERVER_PAGE_FILES

    parts = ("prediction", "probability", "uncertain", "bars", "rule", "meta")
    for page in (Path(edge_runtime.__file__).parent / "static" / "index.html", ASSETS_DIR / "index.html"):
        html = page.read_text()
        assert '<div class="answer" id="answer"></div>' in html and "Predicted class" not in html, page
        assert not re.findall(rf'id="({"|".join(parts)})"', html), page
    script = SERVER_PAGE_FILES["answer.js"].read_text()
    assert all(f'"{part}"' in script for part in parts) and "Predicted class" in script
    # The in-browser page adds to the server page's stylesheet, never restyles the answer.
    answer_rules = r"^\.(caption|label|probability|uncertain|bars|rule|meta)\b"
    assert not re.findall(answer_rules, (ASSETS_DIR / "field.css").read_text(), re.M)
