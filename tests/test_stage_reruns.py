"""Stages run again on a run directory: what is finished is left as it is (with a line saying
so), old spellings still work, and a missing run directory is named first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.atomic import write_json
from oncolite.cli import main as oncolite
from oncolite.train.config import PROVENANCE_KEY, load_config
from oncolite.train.rundir import RunDir


def finished_training(run: Path) -> RunDir:
    """A run directory as a finished `oncolite train` leaves it (its own manifest, config, summary)."""
    rd = RunDir(run)
    write_json(rd.manifest_copy, {"format": "oncolite-manifest/1", "root": "data", "labels": ["a", "b"], "items": []})
    write_json(rd.config_file, {**load_config(profile="quick"), PROVENANCE_KEY: {"profile": "quick", "fold": None, "folds": None}})
    write_json(rd.summary, {"monitor": "val_mcc", "best": {"value": 0.5, "phase": "head", "epoch": 1}})
    return rd


# ---------------------------------------------------------------- 1. train RUN_DIR

def test_train_on_a_finished_run_directory_uses_its_own_manifest_and_leaves_it(tmp_path, capsys):
    rd = finished_training(tmp_path / "run")
    assert oncolite(["train", str(rd.path)]) == 0
    out = capsys.readouterr().out
    assert "training finished before; left as it is" in out and "--force" in out


def test_train_without_a_manifest_says_so_once(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert oncolite(["train", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err
    assert "--manifest is required" in err
    assert "error: oncolite train:" not in err


def test_a_mistyped_setting_is_reported_before_a_missing_manifest(tmp_path, capsys):
    assert oncolite(["train", str(tmp_path / "r"), "--set", "nosuch_key=1"]) != 0
    err = capsys.readouterr().err
    assert "nosuch_key" in err and "--manifest is required" not in err


# ---------------------------------------------------------------- 2. quantize RUN_DIR

def tiny_run(run: Path) -> RunDir:
    from tests.test_bench_report import make_tiny_run

    return RunDir(make_tiny_run(run))


def finished_qat(rd: RunDir) -> bytes:
    from edge_runtime.hashing import file_sha256
    from oncolite.quantize.qat import qat_settings

    rd.qat_model.write_bytes(b"the QAT model")
    write_json(rd.qat_report, {"qat_model": str(rd.qat_model), "source_sha256": file_sha256(rd.float_model),
                               "settings": qat_settings(rd.config()), "best_epoch": 1})
    return rd.qat_model.read_bytes()


def test_a_finished_qat_is_left_as_it_is(tmp_path, capsys, monkeypatch):
    from oncolite.quantize import qat

    rd = tiny_run(tmp_path / "run")
    before = finished_qat(rd)
    ran = []
    monkeypatch.setattr(qat, "run_qat", lambda *a, **k: ran.append(k) or {})
    assert oncolite(["quantize", str(rd.path)]) == 0
    out = capsys.readouterr().out
    assert not ran and rd.qat_model.read_bytes() == before
    assert "QAT finished before; left as it is" in out and str(rd.qat_model) in out and "--force" in out and "--resume" in out


def test_force_runs_qat_again_and_a_changed_float_model_reruns_it(tmp_path, capsys, monkeypatch):
    from oncolite.quantize import qat

    rd = tiny_run(tmp_path / "run")
    finished_qat(rd)
    ran = []

    def fake(run, settings, resume=False, quiet=True):
        ran.append(resume)
        return {"qat_model": str(rd.qat_model), "best_epoch": 0, "epochs_run": 0,
                "validation": {"agreement": 1.0, "accuracy": 1.0}}

    monkeypatch.setattr(qat, "run_qat", fake)
    assert oncolite(["quantize", str(rd.path), "--force", "--quiet"]) == 0
    assert ran == [False] and not rd.qat_report.exists()  # the finished mark goes first
    finished_qat(rd)
    rd.float_model.write_bytes(rd.float_model.read_bytes() + b"\0")  # another float model: QAT is stale
    assert oncolite(["quantize", str(rd.path), "--quiet"]) == 0
    assert ran == [False, False]


# ---------------------------------------------------------------- 3. benchmark --no-timing after a timed one

def test_an_untimed_benchmark_keeps_the_earlier_timing_of_the_same_models_and_says_whose(tmp_path):
    rd = tiny_run(tmp_path / "run")
    assert oncolite(["benchmark", str(rd.path), "--bootstrap", "20", "--no-browser", "--quiet"]) == 0
    timed = json.loads(rd.benchmark_report.read_text())
    assert timed["variants"]["tflite_int8_ptq"]["latency_ms"] and (rd.benchmark_dir / "latency.png").exists()

    assert oncolite(["benchmark", str(rd.path), "--bootstrap", "20", "--no-timing", "--quiet"]) == 0
    again = json.loads(rd.benchmark_report.read_text())
    md = rd.benchmark_report_md.read_text()
    assert again["variants"]["tflite_int8_ptq"]["latency_ms"] == timed["variants"]["tflite_int8_ptq"]["latency_ms"]
    assert again["timing_from"]["created"] == timed["created"]
    assert f"timing from the earlier run of {timed['created']}" in md and "- timing: " not in md
    assert (rd.benchmark_dir / "latency.png").exists()

    # Another model file: the earlier timing is not its own; nothing timed is said, and no old plot stays.
    from tests import edge_models
    import shutil

    other = edge_models.model_file(tmp_path / "other", "fp32")
    shutil.copyfile(other, rd.variant("fp32"))
    shutil.copyfile(other.with_suffix(".json"), rd.sidecar("fp32"))
    assert oncolite(["benchmark", str(rd.path), "--bootstrap", "20", "--no-timing", "--quiet"]) == 0
    third = json.loads(rd.benchmark_report.read_text())
    md = rd.benchmark_report_md.read_text()
    assert not any(v.get("latency_ms") for v in third["variants"].values()) and "timing_from" not in third
    assert "warm-up" not in md and "- timing: none in this run" in md
    assert not (rd.benchmark_dir / "latency.png").exists()


# ---------------------------------------------------------------- 4, 5. old spellings; a run directory that is not there

STAGES = ("evaluate", "quantize", "export", "benchmark")


@pytest.mark.parametrize("command", STAGES)
def test_a_missing_run_directory_is_named_first(command, tmp_path, capsys):
    missing = tmp_path / "nonexist"
    assert oncolite([command, str(missing)]) != 0
    err = capsys.readouterr().err
    assert f"error: {missing}: no such run directory;" in err
    assert "manifest" not in err.split("no such run directory")[0] and "config.json" not in err


@pytest.mark.parametrize("command", STAGES)
def test_the_old_run_spelling_still_works_with_a_note(command, tmp_path, capsys):
    missing = tmp_path / "nonexist"
    assert oncolite([command, "--run", str(missing)]) != 0
    err = capsys.readouterr().err
    assert f"--run {missing} is the old spelling; write oncolite {command} {missing}" in err
    assert f"error: {missing}: no such run directory;" in err  # --run named the run (not --runs, not unknown)


# ---------------------------------------------------------------- 7. export shows progress over the variants

def test_export_shows_progress_over_the_variants_in_a_log(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from edge_runtime import console
    from oncolite.quantize import export
    from oncolite.train import model

    monkeypatch.setattr(console, "LINE_EVERY", 0.0)  # a line at every step (a log gets one every 30 s)
    monkeypatch.setattr(model, "load_float_model", lambda path: None)
    monkeypatch.setattr(export, "representative_dataset", lambda *a, **k: None)
    monkeypatch.setattr(export, "Validation", lambda *a: None)
    monkeypatch.setattr(export, "model_source", lambda *a: {})
    monkeypatch.setattr(export, "export_one", lambda run, variant, *a: {"status": "exported"})
    monkeypatch.setattr(export, "ship_int8", lambda *a: {"int8": {"status": "exported"}})
    run = SimpleNamespace(dir=RunDir(tmp_path), config={"seed": 1}, manifest=SimpleNamespace(root=tmp_path), prep=None)
    done = export.export_variants(run, ["fp32", "fp16", "int8"], [], "int8", quiet=False)
    err = capsys.readouterr().err
    assert set(done) == {"fp32", "fp16", "int8"}
    assert "exporting: 1/3 variant" in err and "variant=fp32" in err and "variant=fp16" in err
    assert "exporting: 3/3 variant" in err
