"""Issue 16, "one contract, one CLI grammar": a mistyped name gets the closest valid ones; `train`
and `run` share one profile default; a finished training is left as it is (`--force` trains it
again); `--quiet` prints the result line; the export report shows both |Δp| alike; the manifest
records the labels actually used and the command as given; export keeps a log as train does;
`--folds K` is K-fold cross-validation for `split` and `run` alike, `run --only-folds` a subset,
and `train --folds K` refuses a manifest with another fold count; every command prints its one
result line under `--quiet` (predict: one per image) and JSON alone under `--json`."""

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
    # The one line and where the list is, not the whole command list before it.
    assert capsys.readouterr().err.splitlines() == ["oncolite: error: unknown command 'trian' (did you mean 'train'?)",
                                                    "`oncolite --help` lists the commands"]
    assert edge(["predcit"]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[0].endswith("unknown command 'predcit' (did you mean 'predict'?)")
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


def test_run_until_a_stage_stops_after_it_and_a_later_run_goes_on(data, tmp_path, monkeypatch, capsys):
    """`--until evaluate` trains and evaluates the float models and stops (no quantize, no
    report); `--publish` needs the whole run and is refused with --until."""
    import edge_runtime.cli

    calls = []
    monkeypatch.setattr(edge_runtime.cli, "dispatch", lambda prog, commands, stage, groups=None: calls.append(stage) or 0)
    run = tmp_path / "floats"
    assert oncolite(["run", str(run), "--data", str(data), "--profile", "quick", "--folds", "3", "--only-folds", "0",
                     "--until", "evaluate"]) == 0
    assert [c[0] for c in calls] == ["audit", "split", "train", "evaluate"]
    assert "stopped after evaluate" in capsys.readouterr().out and not (run / "report.md").exists()
    calls.clear()
    assert oncolite(["run", str(run), "--data", str(data), "--profile", "quick", "--folds", "3", "--only-folds", "0",
                     "--until", "export"]) == 0
    assert [c[0] for c in calls] == ["quantize", "export"]  # the finished stages are not redone
    assert oncolite(["run", str(run), "--data", str(data), "--profile", "quick", "--until", "train",
                     "--publish", "x"]) == EXIT_USAGE
    assert "--publish needs the whole run" in capsys.readouterr().err


def test_train_folds_k_must_be_the_manifests_fold_count(data, tmp_path, capsys):
    """`train --folds K` trains folds 0..K-1 of the manifest: another K is refused in one line naming
    the manifest, its fold count and the fix, before anything is written (and before TensorFlow)."""
    three, one = tmp_path / "three.json", tmp_path / "one.json"
    assert oncolite(["split", str(data), "--out", str(three), "--folds", "3", "--quiet"]) == EXIT_OK
    assert oncolite(["split", str(data), "--out", str(one), "--folds", "1", "--quiet"]) == EXIT_OK
    capsys.readouterr()
    for manifest, folds, says in ((three, "2", "3 cross-validation folds, and --folds 2 asks for 2; give --folds 3"),
                                  (three, "5", "3 cross-validation folds, and --folds 5 asks for 5; give --folds 3"),
                                  (one, "3", "one train/val/test split, no cross-validation folds, and --folds 3")):
        run = tmp_path / f"run-{manifest.stem}-{folds}"
        assert oncolite(["train", str(run), "--manifest", str(manifest), "--folds", folds, "--profile", "quick",
                         "--quiet", *TINY_SETS]) == EXIT_USAGE
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith(f"oncolite train: error: {manifest}: {says}") and f"oncolite split DATA --folds {folds}" in err
        assert not run.exists()


# --------------------------------------------------------------------- 11: --quiet is the result line, --json only JSON

@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> dict:
    """A tiny uint8-I/O model (what info, predict, bench and webapp take), an image, a tiny IDC
    model and patient folder (slidemap), stand-ins for the LiteRT.js files (webapp)."""
    from PIL import Image

    from edge_runtime.idc import IDC_LABELS
    from edge_runtime.webapp import RUNTIME_FILES
    from tests.edge_models import write_images
    from tests.webapp_models import tiny_model

    root = tmp_path_factory.mktemp("edge")
    patient = root / "10253"
    for x, y, cls in ((1, 1, 0), (51, 1, 0), (1, 51, 1)):
        (patient / str(cls)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (50, 50), (200, 40 * cls, 90)).save(patient / str(cls) / f"10253_idx5_x{x}_y{y}_class{cls}.png")
    runtime = root / "node_modules"
    for name in RUNTIME_FILES:
        path = runtime / "@litertjs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": "9.9.9"}) if name.endswith("package.json") else f"// {name}\n")
    return {"model": str(tiny_model(root / "models")), "image": str(write_images(root / "images", n=1)[0]),
            "idc": str(tiny_model(root / "idc", labels=IDC_LABELS)), "patient": str(patient),
            "runtime": str(runtime), "root": root}


# (program, argv from the `edge` fixture, stdout under --json is JSON Lines)
CHEAP = {
    "config": ("oncolite", lambda e: ["config", "export.gate"], False),
    "info": ("edge", lambda e: ["info", e["model"]], False),
    "predict": ("edge", lambda e: ["predict", e["model"], e["image"]], True),
    "bench": ("edge", lambda e: ["bench", e["model"], "--runs", "2", "--warmup", "0", "--batch", "0"], False),
    "slidemap": ("edge", lambda e: ["slidemap", e["idc"], e["patient"], "--out", str(e["root"] / "map.png")], False),
    "webapp": ("edge", lambda e: ["webapp", e["model"], "--out", str(e["root"] / "app"), "--runtime", e["runtime"]], False),
}


@pytest.mark.parametrize("name", list(CHEAP))
def test_quiet_prints_one_result_line_and_json_only_json(name, edge, capsys):
    from edge_runtime.cli import main as edge_main

    program, argv, json_lines = CHEAP[name]
    run = oncolite if program == "oncolite" else edge_main
    capsys.readouterr()
    assert run([*argv(edge), "--quiet"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.strip() and err == "", (out, err)
    assert run([*argv(edge), "--json"]) == EXIT_OK
    out = capsys.readouterr().out
    parsed = [json.loads(line) for line in out.splitlines()] if json_lines else json.loads(out)
    assert parsed


def test_the_result_lines_say_what_was_written_and_the_headline(edge, capsys):
    from edge_runtime.cli import main as edge_main
    from oncolite.train.config import DEFAULTS_PATH, read_config_file

    results = {}
    for name, (program, argv, _) in CHEAP.items():
        (oncolite if program == "oncolite" else edge_main)([*argv(edge), "--quiet"])
        results[name] = capsys.readouterr().out.rstrip("\n")
    assert results["config"] == f"export.gate = {json.dumps(read_config_file(DEFAULTS_PATH)['export']['gate'])}"
    assert results["info"].startswith(f"{edge['model']}: checks passed; ") and "labels benign, malignant, normal" in results["info"]
    assert results["predict"].startswith(f"{edge['image']}: ") and "(p 0." in results["predict"]
    assert results["bench"].startswith(f"{edge['model']}: p50 latency ") and "@1 thread" in results["bench"]
    assert results["slidemap"].startswith(f"{edge['root'] / 'map.png'}: 3 patches of patient 10253")
    assert results["webapp"].startswith(f"{edge['root'] / 'app'}: web app of ") and "LiteRT.js 9.9.9" in results["webapp"]


def test_predict_under_quiet_prints_one_answer_per_image_and_failures_on_stderr(edge, tmp_path, capsys):
    from edge_runtime.cli import main as edge_main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert edge_main(["predict", edge["model"], edge["image"], str(bad), "--quiet"]) == 1
    out, err = capsys.readouterr()
    [answer] = out.splitlines()  # the good image's answer alone; the failure is an error, on stderr
    assert answer.startswith(f"{edge['image']}: ") and "(p 0." in answer
    assert "1 of 2 file(s) could not be classified" in err and str(bad) in err


def test_serve_under_quiet_prints_where_it_serves_in_one_line(capsys):
    import argparse

    from edge_runtime import server

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    server.announce(parser.parse_args(["--quiet"]), Path("m.tflite"), ["http://127.0.0.1:8000/"])
    out, err = capsys.readouterr()
    assert out == "m.tflite: serving at http://127.0.0.1:8000/ (Ctrl+C stops)\n" and err == ""


def test_run_under_quiet_prints_its_result_line_and_under_json_only_json(data, tmp_path, monkeypatch, capsys):
    """The stages run with --quiet, their stdout swallowed; the run's own result is one line: where
    it stopped (--until), or report.md and the headline MCCs."""
    import edge_runtime.cli
    from oncolite import pipeline

    monkeypatch.setattr(edge_runtime.cli, "dispatch", lambda prog, commands, stage, groups=None: print("stage says") or 0)
    run = tmp_path / "r"
    argv = ["run", str(run), "--data", str(data), "--profile", "quick"]
    assert oncolite([*argv, "--until", "evaluate", "--quiet"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == f"stopped after evaluate; run directory: {run} (the same command without --until goes on)\n" and err == ""
    mcc = {"mean": 0.5, "std": 0.0, "folds": [0.5]}
    summary = {"variants": {"keras_float": {"mcc": mcc}, "tflite_int8": {"mcc": {**mcc, "mean": 0.25}}}, "pooled": {},
               "split": None, "folds": 1, "run": str(run), "stages": {}}
    monkeypatch.setattr(pipeline, "summarize", lambda *a: dict(summary))
    monkeypatch.setattr(pipeline, "int8_warnings", lambda ran: [])
    assert oncolite([*argv, "--quiet"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == f"report: {run / 'report.md'}: keras_float MCC 0.500, tflite_int8 MCC 0.250\n" and err == ""
    assert oncolite([*argv, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["variants"]["tflite_int8"]["mcc"]["mean"] == 0.25


@pytest.mark.slow
def test_evaluate_explain_and_benchmark_print_one_result_line_under_quiet(trained, data, capsys):
    image = str(next(data.rglob("*.png")))
    capsys.readouterr()
    assert oncolite(["export", str(trained), "--variants", "fp32", "--quiet"]) == EXIT_OK
    capsys.readouterr()
    commands = {"evaluate": ["evaluate", str(trained), "--bootstrap", "0"],
                "explain": ["explain", str(trained), image],
                "benchmark": ["benchmark", str(trained), "--no-timing", "--no-browser", "--bootstrap", "0"]}
    for name, argv in commands.items():
        assert oncolite([*argv, "--quiet"]) == EXIT_OK, name
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and err == "", (name, out, err)
        results = out.rstrip("\n")
        assert oncolite([*argv, "--json"]) == EXIT_OK, name
        json.loads(capsys.readouterr().out)
        if name == "evaluate":
            assert results.startswith(f"report: {trained / 'eval'}") and "images, MCC " in results
        elif name == "explain":
            assert results.startswith(f"{trained / 'explain'}") and "Grad-CAM of " in results
        else:
            assert results.startswith(f"report: {trained / 'benchmark' / 'report.md'}: ") and "keras_float MCC" in results


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


# --------------------------------------------------------------------- new-user trial: run, messages, --version

def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    from edge_runtime.cli import main as edge

    assert oncolite(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"oncolite {version('oncolite')}\n"
    assert edge(["--version"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == f"python -m edge_runtime {version('oncolite')}\n" and err == ""


def test_a_version_without_an_installed_package_is_pyprojects(monkeypatch):
    import importlib.metadata

    from edge_runtime import cli

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    text = (Path(cli.__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert cli.version() != "unknown" and f'version = "{cli.version()}"' in text


def test_a_stage_set_of_another_stages_section_names_the_command_that_reads_it():
    from oncolite.train.config import ConfigError, load_config, with_overrides

    with pytest.raises(ConfigError) as refused:
        with_overrides(load_config(), ["benchmark.runs=3"], "export")
    text = str(refused.value)
    assert text.startswith("--set benchmark.runs:") and "`oncolite benchmark`" in text and "when training" not in text
    with pytest.raises(ConfigError, match="input_size is fixed when the run trains: `oncolite train` and `oncolite run`"):
        with_overrides(load_config(), ["input_size=40"], "qat")


def test_an_unknown_key_lists_the_valid_ones_by_their_dotted_names():
    from oncolite.train.config import ConfigError, load_config, parse_overrides, with_overrides

    with pytest.raises(ConfigError) as refused:
        with_overrides(load_config(), ["qat.epoch=2"], "qat")
    valid = str(refused.value).split("valid keys here: ")[1].split(", ")
    assert "qat.epochs" in valid and all(k.startswith("qat.") for k in valid)
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=parse_overrides(["finetune_lrr=1e-5"]))
    valid = str(refused.value).split("valid keys here: ")[1].split(", ")
    assert "augment.*" in valid and "finetune_lr" in valid and "augment" not in valid


def test_only_folds_and_changed_settings_errors_give_valid_advice():
    from edge_runtime.errors import OncoliteError
    from oncolite.pipeline import check_same_settings, only_folds

    with pytest.raises(OncoliteError, match=r"among 0\.\.0 \(--folds 1\), comma-separated, e.g. --only-folds 0$"):
        only_folds("1", 1)
    with pytest.raises(OncoliteError, match=r"e.g. --only-folds 0,1$"):
        only_folds("5", 3)
    state = {"settings": {"seed": 0}, "split": {"status": "done"}}
    with pytest.raises(OncoliteError, match="--from split .*or give another RUN_DIR$"):
        check_same_settings(Path("r"), state, {"seed": 1}, None)


def recorded_run(monkeypatch, stage_output=()):
    """`oncolite run` with every stage replaced by a recorder that prints `stage_output`, and a
    fixed summary; returns the list the stage commands are recorded in."""
    import edge_runtime.cli
    from oncolite import pipeline

    calls = []

    def stage(prog, commands, argv, groups=None):
        calls.append(argv)
        for line in stage_output:
            print(line)
        return 0

    monkeypatch.setattr(edge_runtime.cli, "dispatch", stage)
    mcc = {"mean": 0.5, "std": 0.0, "folds": [0.5]}
    summary = {"variants": {"keras_float": {"mcc": mcc, "accuracy": mcc}}, "pooled": {}, "folds": 1, "stages": {},
               "split": {"kind": "group", "seed": 0, "side": "test", "n_test": 153, "manifest": "m.json",
                         "manifest_sha256": "eca38bda" + "0" * 56}}
    monkeypatch.setattr(pipeline, "summarize", lambda run, ran: {**summary, "run": str(run)})
    monkeypatch.setattr(pipeline, "int8_warnings", lambda ran: [])
    return calls


def test_the_progress_counter_counts_the_planned_steps_and_the_report_is_the_last(data, tmp_path, monkeypatch, capsys):
    recorded_run(monkeypatch)
    argv = ["run", str(tmp_path / "r"), "--data", str(data), "--profile", "quick"]
    assert oncolite([*argv, "--until", "split"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "[1/2] audit:" in err and "[2/2] split:" in err
    assert oncolite(argv) == EXIT_OK
    err = capsys.readouterr().err
    assert "[1/8] audit: done before" in err and "[7/8] benchmark:" in err and "[8/8] report:" in err


def test_run_shows_each_stages_result_line_and_a_short_summary_not_whole_reports(data, tmp_path, monkeypatch, capsys):
    """A stage's stdout (benchmark prints its whole report.md) is captured: its last line shows.
    The run prints the summary table and the report path; report.md says the split in words and
    records the command without its output flags."""
    report = [f"report line {i}" for i in range(200)] + ["report: somewhere.md: the headline"]
    recorded_run(monkeypatch, report)
    run = tmp_path / "r"
    assert oncolite(["run", str(run), "--data", str(data), "--profile", "quick"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "report line 5" not in out and out.count("report: somewhere.md: the headline") == 7
    assert len(out.splitlines()) < 30 and "## Pooled" not in out
    assert out.splitlines()[-1].startswith(f"report: {run / 'report.md'}:")
    assert oncolite(["run", str(run), "--data", str(data), "--profile", "quick", "--json"]) == EXIT_OK
    json.loads(capsys.readouterr().out)  # --json: JSON alone, as before
    md = (run / "report.md").read_text()
    assert "split: group (leak-free), seed 0, 153 test images, manifest m.json (sha256 eca38bda…)" in md
    assert "{" not in md.split("split:")[1].splitlines()[0]
    made = md.splitlines()[0]
    assert made.startswith("Made by: `oncolite run ") and "--json" not in made and "--quiet" not in made


def test_a_done_stage_whose_models_changed_since_is_redone(data, tmp_path, monkeypatch, capsys):
    """A user re-ran `oncolite quantize` and `export` by hand: the next `oncolite run` redoes the
    benchmark (and export, when the QAT model is newer than the export report), saying why; and
    an export that lacks a variant the plan now names (a newer default) is run again, keeping
    what it made."""
    import os

    from oncolite.pipeline import FIRST_FOLD_VARIANTS
    from oncolite.train.rundir import RunDir

    calls = recorded_run(monkeypatch)
    run = tmp_path / "r"
    argv = ["run", str(run), "--data", str(data), "--profile", "quick"]
    assert oncolite(argv) == EXIT_OK
    calls.clear()
    d = RunDir(run)

    def made(path, when, text="{}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, ns=(when * 10**9, when * 10**9))

    planned = FIRST_FOLD_VARIANTS.split(",")
    report = json.dumps({"variants": {name: {} for name in planned}})
    made(d.float_model, 100)
    made(d.eval_dir("float") / "metrics.json", 200)
    made(d.qat_model, 150)
    made(d.export_report, 300, report)
    made(d.variant("int8"), 300)
    made(d.benchmark_report, 250)
    capsys.readouterr()
    assert oncolite(argv) == EXIT_OK
    assert [c[0] for c in calls] == ["benchmark"]
    err = capsys.readouterr().err
    assert "evaluate: done before, skipped" in err and "export: done before, skipped" in err
    assert "benchmark: oncolite benchmark" in err and "redone: its models changed since: int8.tflite" in err

    calls.clear()
    made(d.benchmark_report, 400)
    made(d.qat_model, 500)
    assert oncolite(argv) == EXIT_OK
    assert [c[0] for c in calls] == ["export"]  # the recorder makes no new models: the benchmark stays current
    assert "export: oncolite export" in capsys.readouterr().err

    calls.clear()
    made(d.benchmark_report, 600)
    made(d.export_report, 600, report)
    assert oncolite(argv) == EXIT_OK
    assert calls == []

    made(d.export_report, 600, json.dumps({"variants": {name: {} for name in planned if name != "int8_gptq_act"}}))
    made(d.sidecar("int8_ptq"), 600)
    made(d.variant("int8_ptq"), 600)
    capsys.readouterr()
    assert oncolite(argv) == EXIT_OK
    assert [c[0] for c in calls] == ["export"]
    assert "(redone: it did not make int8_gptq_act)" in capsys.readouterr().err
    assert d.sidecar("int8_ptq").exists()  # the variants it made stay, found up to date by export
