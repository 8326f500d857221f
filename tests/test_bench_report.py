"""`oncolite benchmark` end to end on a tiny run directory: report schema, plots, --compare, adb parser."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import devices, report as report_mod
from benchmarks.benchmark import find_models, model_preprocessing, parse_threads, validate_report
from edge_runtime.atomic import write_json
from oncolite.cli import main as oncolite

LABELS = ["benign", "malignant", "normal"]


def make_tiny_run(run: Path) -> Path:
    """RUN_DIR with models/float.keras, fp32 and int8_ptq .tflite (+ sidecars) and a 12-image manifest."""
    from tests import edge_models

    models = run / "models"
    models.mkdir(parents=True)
    edge_models.keras_model(3).save(models / "float.keras")
    edge_models.model_file(models, "fp32", labels=tuple(LABELS))
    built = edge_models.model_file(run / "int8", "int8", labels=tuple(LABELS))
    shutil.copyfile(built, models / "int8_ptq.tflite")
    shutil.copyfile(built.with_suffix(".json"), models / "int8_ptq.json")

    images = edge_models.write_images(run / "data", n=12, size=24)
    items = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "label": LABELS[i % 3],
              "group": f"g{i}", "split": "test" if i < 6 else "train", "meta": {}} for i, p in enumerate(images)]
    write_json(run / "manifest.json", {
        "format": "oncolite-manifest/1", "root": "data", "labels": LABELS, "seed": 7,
        "split": {"kind": "group", "folds": 1, "val_fraction": 0.0, "test_fold": 0},
        "audit": {"hash": "phash", "threshold": 6, "conflicts_excluded": True}, "excluded": [], "items": items})
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def benchmarked(tiny_run):
    code = oncolite(["benchmark", str(tiny_run), "--threads", "1", "--runs", "3", "--warmup", "1",
                     "--bootstrap", "50", "--quiet"])
    return code, json.loads((tiny_run / "benchmark" / "report.json").read_text())


def test_report_has_the_shape_issue_8_requires(tiny_run, benchmarked):
    code, report = benchmarked
    assert code == 0, report.get("failures")
    assert validate_report(report) == []
    assert set(report["variants"]) == {"keras_float", "tflite_fp32", "tflite_int8_ptq", "majority_baseline"}
    assert report["split"] == {**report["split"], "kind": "group", "seed": 7, "n_test": 6, "conflicts_excluded": True}
    fp32, int8 = report["variants"]["tflite_fp32"], report["variants"]["tflite_int8_ptq"]
    # fp32 TFLite is the same function as the Keras model: same top-1 on every image.
    assert fp32["agreement_with_float"] == 1.0 and fp32["mean_abs_prob_diff"] < 1e-4
    assert fp32["mcnemar"]["p_value"] == 1.0
    assert int8["size_bytes"] < fp32["size_bytes"] and int8["size_ratio_fp32"] < 1
    assert report["variants"]["majority_baseline"]["mcc"] == 0.0
    for name in ("keras_float", "tflite_fp32", "tflite_int8_ptq"):
        v = report["variants"][name]
        assert v["latency_ms"]["1"]["p50"] > 0 and len(v["sha256"]) == 64
        assert v["confusion_matrix"] and np.sum(v["confusion_matrix"]) == 6
    assert fp32["speedup_vs_keras"]["1"] > 0
    assert report["split"]["manifest_sha256"] and report["machine"]["cpu_model"] and "cpu_flags" in report["machine"]


def test_markdown_and_plots_are_written(tiny_run, benchmarked):
    out = tiny_run / "benchmark"
    md = (out / "report.md").read_text()
    for heading in ("## Accuracy", "## Cost", "## Confusion matrices", "Published reference numbers", "Raspberry Pi 4"):
        assert heading in md
    for png in ("accuracy_vs_size.png", "latency.png", "confusion_matrices.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_report_names_what_is_wrong(benchmarked):
    _, report = benchmarked
    broken = copy.deepcopy(report)
    broken["variants"]["tflite_fp32"]["latency_ms"] = {"1": {"p50": 1.0}}
    del broken["variants"]["tflite_int8_ptq"]["mcc"]
    broken["split"]["kind"] = "stratified"
    problems = validate_report(broken)
    assert any("tflite_fp32.latency_ms.1" in p for p in problems)
    assert any("tflite_int8_ptq.mcc" in p for p in problems)
    assert any("split.kind" in p for p in problems)
    assert validate_report({"split": {}}) != []


def test_compare_merges_reports_from_several_machines(tiny_run, benchmarked, tmp_path):
    _, report = benchmarked
    other = copy.deepcopy(report)
    other["machine"]["cpu_model"] = "Raspberry Pi 4 Model B (Cortex-A72)"
    other["run"] = "pi-run"
    other_path = tmp_path / "pi.json"
    other_path.write_text(json.dumps(other))
    assert oncolite(["benchmark", str(tiny_run), "--compare", str(other_path), "--quiet"]) == 0
    merged = json.loads((tiny_run / "benchmark" / "compare.json").read_text())
    sources = {row["source"] for row in merged["rows"]}
    assert len(sources) == 2 and len(merged["rows"]) == 2 * len(report["variants"])
    assert "Raspberry Pi 4" in (tiny_run / "benchmark" / "compare.md").read_text()
    assert report_mod.published_matches(other["machine"]["cpu_model"])[0]["int8_ms"] == 17


def test_atomic_temporaries_left_by_a_kill_are_not_models(tiny_run):
    """A kill mid-write leaves hidden `.<stem>.<random>.tmp<suffix>` files: never a variant, never a sidecar."""
    models = tiny_run / "models"
    strays = [models / ".fp32.k1ll3d.tmp.tflite", models / ".a.k1ll3d.tmp.json"]
    strays[0].write_bytes((models / "fp32.tflite").read_bytes()[:100])
    write_json(strays[1], {"preprocessing": {"height": 99, "width": 99}})  # sorts before every sidecar
    try:
        assert set(find_models(tiny_run)) == {"keras_float", "tflite_fp32", "tflite_int8_ptq"}
        assert model_preprocessing(tiny_run).height == 16
    finally:
        for stray in strays:
            stray.unlink()


def test_threads_are_capped_at_the_cores(monkeypatch):
    monkeypatch.setattr("benchmarks.benchmark.available_cores", lambda: 2)
    assert parse_threads("1,2,4") == [1, 2]
    assert parse_threads("none") == []
    assert parse_threads("8") == [1]


BENCHMARK_MODEL_OUTPUT = """\
INFO: STARTING!
INFO: Graph: [/data/local/tmp/oncolite/int8_qat.tflite]
INFO: #threads used for CPU inference: [4]
INFO: Loaded model /data/local/tmp/oncolite/int8_qat.tflite
INFO: The input model file size (MB): 2.71
INFO: Initialized session in 5.685ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=35 first=18535 curr=14162 min=13987 max=18535 avg=14462.3 std=741

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=71 first=14203 curr=14098 min=13950 max=15321 avg=14154.1 std=201 p5=13990 median=14120 p95=14480

INFO: Inference timings in us: Init: 5685, First inference: 18535, Warmup (avg): 14462.3, Inference (avg): 14154.1
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=2.84766 overall=9.50391
"""


def test_benchmark_model_output_is_parsed():
    parsed = devices.parse_benchmark_model(BENCHMARK_MODEL_OUTPUT)
    assert parsed["init_ms"] == pytest.approx(5.685)
    assert parsed["first_inference_ms"] == pytest.approx(18.535)
    assert parsed["warmup_avg_ms"] == pytest.approx(14.4623)
    assert parsed["inference_avg_ms"] == pytest.approx(14.1541)
    assert parsed["runs"]["count"] == 71 and parsed["runs"]["median_ms"] == pytest.approx(14.12)
    assert parsed["memory_delta_mb"] == {"init": pytest.approx(2.84766), "overall": pytest.approx(9.50391)}
    latency = devices.adb_latency(parsed)
    assert latency["p50"] == pytest.approx(14.12) and latency["p90"] == pytest.approx(14.48)
    with pytest.raises(Exception, match="Inference timings"):
        devices.parse_benchmark_model("ERROR: Could not open model")


def test_ssh_url_parsing():
    t = devices.parse_ssh_url("ssh://pi@raspberrypi.local:2200?python=/usr/bin/python3&strict=no")
    assert (t.user, t.host, t.port, t.python, t.strict) == ("pi", "raspberrypi.local", 2200, "/usr/bin/python3", False)
    assert "StrictHostKeyChecking=no" in t.ssh("true") and "BatchMode=yes" in t.ssh("true")
    assert devices.parse_ssh_url("ssh://pi@host").port == 22
    with pytest.raises(Exception, match="ssh://user@host"):
        devices.parse_ssh_url("ssh://host-without-user")
