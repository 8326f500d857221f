"""`oncolite run` end to end on a tiny class-folder dataset: every stage, resume, --from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY = ["input_size=32", "alpha=0.35", "weights=null", "head_epochs=1", "finetune_epochs=1", "batch_size=8",
        "qat.epochs=1", "qat.settle_steps=2", "export.calibration_images=8",
        "benchmark.threads=[1]", "benchmark.runs=2", "benchmark.warmup=1"]


def make_dataset(root: Path) -> Path:
    """Three classes told apart by a bright square's position; 12 distinct images each."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(("alpha", "beta", "gamma")):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            pixels[4 + 10 * k: 14 + 10 * k, 4 + i: 14 + i] = 255
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.png")
    return root


def oncolite(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oncolite", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1500)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four tiny pipelines in a row; on a shared 2-core machine more than the default
def test_run_makes_every_stage_then_skips_and_redoes_from_a_stage(tmp_path):
    data = make_dataset(tmp_path / "tiny")
    run = tmp_path / "run"
    sets = [f"--set={pair}" for pair in TINY]
    first = oncolite("run", data, "--run", run, "--profile", "quick", "--json", *sets, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert {"keras_float", "tflite_fp32", "tflite_int8_ptq", "tflite_int8_gptq", "tflite_int8_gptq_act",
            "tflite_int8_qat", "tflite_int8"} <= set(summary["variants"])
    assert summary["split"]["kind"] == "group"
    stages = json.loads((run / "stages.json").read_text())
    assert [k for k in stages if k != "settings"] == ["audit", "split", "train", "evaluate", "quantize", "export", "benchmark"]
    for path in ("models/float.keras", "models/int8_qat.tflite", "models/int8.tflite", "models/int8_uint8.tflite",
                 "eval", "benchmark/report.json", "benchmark/predictions.json", "report.md"):
        assert (run / path).exists(), path
    # The shipped int8 model is never less faithful on validation than plain PTQ of the same run.
    export = json.loads((run / "models" / "export_report.json").read_text())
    candidates = export["int8"]["candidates"]
    assert candidates[export["int8"]["from"]]["agreement"] >= candidates["int8_ptq"]["agreement"]
    assert summary["pooled"]["models"]["tflite_int8"]["n"] == summary["split"]["n_test"]
    assert "oncolite run" in (run / "report.md").read_text()

    float_mtime = (run / "models" / "float.keras").stat().st_mtime_ns
    sidecar_mtime = (run / "models" / "int8_qat.json").stat().st_mtime_ns
    again = oncolite("run", data, "--run", run, "--profile", "quick", *sets, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before, skipped") == 7
    assert (run / "models" / "float.keras").stat().st_mtime_ns == float_mtime

    # Other settings never reuse the finished stages silently: refused, naming what to redo.
    changed = oncolite("run", data, "--run", run, "--profile", "quick", *sets, "--set=input_size=40", cwd=tmp_path)
    assert changed.returncode != 0 and "--from train" in changed.stderr and "skipped" not in changed.stderr
    assert (run / "models" / "float.keras").stat().st_mtime_ns == float_mtime

    redo = oncolite("run", data, "--run", run, "--profile", "quick", "--from", "export", "--quiet", *sets, cwd=tmp_path)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert (run / "models" / "float.keras").stat().st_mtime_ns == float_mtime  # train was kept
    assert (run / "models" / "int8_qat.json").stat().st_mtime_ns != sidecar_mtime  # export was redone

    # A model remade by hand (`oncolite export RUN` again) is newer than the benchmark: the next
    # run redoes the benchmark instead of skipping it, and says why.
    bench_mtime = (run / "benchmark" / "report.json").stat().st_mtime_ns
    later = bench_mtime + 10**9
    os.utime(run / "models" / "int8.tflite", ns=(later, later))
    stale = oncolite("run", data, "--run", run, "--profile", "quick", *sets, cwd=tmp_path)
    assert stale.returncode == 0, stale.stderr[-3000:]
    assert "benchmark: oncolite benchmark" in stale.stderr and "redone: its models changed since: int8.tflite" in stale.stderr
    assert stale.stderr.count("done before, skipped") == 6
    assert (run / "benchmark" / "report.json").stat().st_mtime_ns > bench_mtime
    assert len(stale.stdout.splitlines()) < 40  # stage result lines, the table and the report path


def test_published_reports_name_workspace_files_relative_to_it(tmp_path):
    """--publish copies reports into the repository: a recorded command or image path inside the
    workspace comes out relative to it; a manifest stays byte for byte (its sha256 names the split)."""
    from edge_runtime.resources import WORKSPACE
    from oncolite.pipeline import _copy

    inside = f"{WORKSPACE.resolve()}/data/busi/benign/benign (1).png"
    for name in ("predictions.csv", "metrics.json", "manifest.json", "plot.png"):
        (tmp_path / name).write_text(f"path,{inside}\n")
        _copy(tmp_path / name, tmp_path / "out" / name)
    for name in ("predictions.csv", "metrics.json"):
        assert (tmp_path / "out" / name).read_text() == "path,data/busi/benign/benign (1).png\n"
    for name in ("manifest.json", "plot.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / name).read_bytes()
