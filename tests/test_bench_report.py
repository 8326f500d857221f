"""`oncolite benchmark` end to end on tiny run directories: report schema, plots, --compare, a CV
fold's own test side, operating points, settings from the run's config, the adb parser."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oncolite.benchmarks import devices, report as report_mod
from oncolite.benchmarks.benchmark import find_models, model_preprocessing, parse_threads, usable_threads
from oncolite.benchmarks.report import validate_report
from edge_runtime.atomic import write_json
from oncolite.cli import main as oncolite
from oncolite.train.config import load_config

LABELS = ["benign", "malignant", "normal"]
# The run's config section `oncolite benchmark` falls back to when no timing flag is given.
BENCHMARK_SETTINGS = {"threads": [1], "warmup": 1, "runs": 3}
FOLD0_TEST, FOLD1_TEST = 6, 4  # test images of the 12 in fold 0 (the manifest's `split`) and fold 1


def fold_sides(i: int) -> list[str]:
    """Image i's side in fold 0 and fold 1: different test sides of different sizes."""
    return ["test" if i < FOLD0_TEST else "train", "test" if FOLD0_TEST <= i < FOLD0_TEST + FOLD1_TEST else "train"]


def make_tiny_run(run: Path, fold=None, labels=tuple(LABELS), threshold=None) -> Path:
    """RUN_DIR as `oncolite train` + `export` leave it: config.json (the fold trained on in its
    provenance), threshold.json when given, models/float.keras, fp32 and int8_ptq .tflite
    (+ sidecars carrying `threshold`) and a 12-image manifest with two CV folds."""
    from tests import edge_models

    models = run / "models"
    models.mkdir(parents=True)
    edge_models.keras_model(len(labels)).save(models / "float.keras")
    edge_models.model_file(models, "fp32", labels=labels, threshold=threshold)
    built = edge_models.model_file(run / "int8", "int8", labels=labels, threshold=threshold)
    shutil.copyfile(built, models / "int8_ptq.tflite")
    shutil.copyfile(built.with_suffix(".json"), models / "int8_ptq.json")
    # The tiny stand-in models are 16 px, below what MobileNetV2 trains at (so below what a
    # config accepts): the run's stored config says what its models really are.
    config = {**load_config(overrides={"benchmark": BENCHMARK_SETTINGS}), "input_size": edge_models.SIZE}
    write_json(run / "config.json", {**config, "run": {"fold": fold}})
    if threshold:
        write_json(run / "threshold.json", {**threshold, "chosen_on": "val"})

    images = edge_models.write_images(run / "data", n=12, size=24)
    items = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "label": labels[i % len(labels)],
              "group": f"g{i}", "split": fold_sides(i)[0], "cv": fold_sides(i), "meta": {}} for i, p in enumerate(images)]
    write_json(run / "manifest.json", {
        "format": "oncolite-manifest/1", "root": "data", "labels": list(labels), "seed": 7,
        "split": {"kind": "group", "folds": 2, "val_fraction": 0.0, "test_fold": 0},
        "audit": {"hash": "phash", "threshold": 6, "conflicts_excluded": True}, "excluded": [], "items": items})
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def benchmarked(tiny_run):
    # No --threads/--runs/--warmup: the run's config.json `benchmark` section decides.
    code = oncolite(["benchmark", str(tiny_run), "--bootstrap", "50", "--quiet"])
    return code, json.loads((tiny_run / "benchmark" / "report.json").read_text())


def test_report_has_the_shape_issue_8_requires(tiny_run, benchmarked):
    code, report = benchmarked
    assert code == 0, report.get("failures")
    assert validate_report(report) == []
    assert set(report["variants"]) == {"keras_float", "tflite_fp32", "tflite_int8_ptq", "majority_baseline"}
    assert report["split"] == {**report["split"], "kind": "group", "seed": 7, "n_test": FOLD0_TEST,
                               "conflicts_excluded": True, "fold": None, "test_fold": 0}
    assert {k: report["settings"][k] for k in BENCHMARK_SETTINGS} == BENCHMARK_SETTINGS
    fp32, int8 = report["variants"]["tflite_fp32"], report["variants"]["tflite_int8_ptq"]
    # fp32 TFLite is the same function as the Keras model: same top-1 on every image.
    assert fp32["agreement_with_float"] == 1.0 and fp32["mean_abs_prob_diff"] < 1e-4
    assert fp32["mcnemar"]["p_value"] == 1.0
    assert int8["size_bytes"] < fp32["size_bytes"] and int8["size_ratio_fp32"] < 1
    assert report["variants"]["majority_baseline"]["mcc"] == 0.0
    for name in ("keras_float", "tflite_fp32", "tflite_int8_ptq"):
        v = report["variants"][name]
        assert v["latency_ms"]["1"]["p50"] > 0 and len(v["sha256"]) == 64
        assert v["confusion_matrix"] and np.sum(v["confusion_matrix"]) == FOLD0_TEST
        assert v["operating_point"] is None  # three classes: argmax
    assert fp32["speedup_vs_keras"]["1"] > 0
    assert report["split"]["manifest_sha256"] and report["machine"]["cpu_model"] and "cpu_flags" in report["machine"]


def test_markdown_and_plots_are_written(tiny_run, benchmarked):
    out = tiny_run / "benchmark"
    md = (out / "report.md").read_text()
    for heading in ("## Accuracy", "## Cost", "## Confusion matrices"):
        assert heading in md
    # The published MobileNetV2 figures are for 224 px models: this tiny run's are not comparable.
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["preprocessing"]["height"] != 224 and "Published reference numbers" not in md
    report["settings"]["preprocessing"].update(height=224, width=224)
    assert "Raspberry Pi 4" in report_mod.markdown(report)
    for png in ("accuracy_vs_size.png", "latency.png", "confusion_matrices.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def section(md: str, heading: str) -> list[str]:
    """The lines under a report.md heading, up to the next heading."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start + 1:end]


def row(lines: list[str], *cells: str) -> str:
    return next(line for line in lines if line.startswith("| " + " | ".join(cells) + " |"))


def test_markdown_renders_every_timing_from_the_json(tiny_run, benchmarked):
    """Issue 17's timings in report.md, each value the JSON's: the CPU's int8 features, the float
    model's ways of calling with speed-ups against the fastest, batch throughput, the image-to-
    answer split with its bound; and why the browser was not timed (no variant it can run)."""
    _, report = benchmarked
    md = (tiny_run / "benchmark" / "report.md").read_text()
    v = report["variants"]
    if "int8_features" in report["machine"]:
        assert f"- int8 features: {report['machine']['int8_features']}" in md

    modes, fastest = v["keras_float"]["keras_modes"]["1"], v["keras_float"]["keras_mode"]["1"]
    calls = section(md, "ways of calling")
    cells = [report_mod.fmt(modes[m]["inference_ms"]["p50"], 2) if "inference_ms" in modes[m] else "failed:"
             for m in report_mod.KERAS_MODES]
    line = row(calls, "1")
    assert all(c in line for c in cells) and line.endswith(f"| {report_mod.KERAS_MODES[fastest]} |")
    # The fastest way is the reference: the float model's own latency is that way's.
    assert v["keras_float"]["latency_ms"]["1"] == modes[fastest]["inference_ms"]
    for name in ("tflite_fp32", "tflite_int8_ptq"):
        assert row(calls, name) == (f"| {name} | {v[name]['speedup_vs_keras']['1']:.2f}× | "
                                    f"{v[name]['speedup_vs_keras_eager']['1']:.2f}× |")

    batch = section(md, "Batch-32 throughput")
    for name in ("keras_float", "tflite_fp32", "tflite_int8_ptq"):
        b = v[name]["batch"]["1"]
        line = row(batch, name, "1")
        assert f"| {v[name]['throughput_per_s']['1']:.1f} |" in line
        assert (f"| {b['images_per_s']:.1f} |" if b["supported"] else f"not supported: {b['reason']}") in line

    stages = section(md, "Image to answer")
    assert v["tflite_int8_ptq"]["kind"] == "integer" and v["tflite_fp32"]["kind"] == "float"
    for name in ("tflite_fp32", "tflite_int8_ptq"):
        st = v[name]["stages_ms"]["1"]
        ratio = st["image_to_answer_over_invoke"]
        expected = [st["input_path"], *(f"{st[k]['p50']:.3f}" for k in report_mod.STAGE_NAMES),
                    f"{st['image_to_answer']['p50']:.3f}", f"{ratio:.2f}×"]
        line = row(stages, name, "1")
        assert line.startswith(f"| {name} | 1 | " + " | ".join(expected) + " | "), line
        verdict = ("met" if ratio <= report_mod.IMAGE_TO_ANSWER_BOUND else "**not met**") if name == "tflite_int8_ptq" \
            else "— (not an integer model)"
        assert line.endswith(f"| {verdict} |")

    browser = report["browser"]
    assert set(browser["refused"]) == {"tflite_fp32", "tflite_int8_ptq"}  # dynamic batch; int8 I/O
    assert "int8_uint8" in browser["skipped"] and "int8_uint8" in browser["refused"]["tflite_int8_ptq"]
    assert f"Not measured: {browser['skipped']}." in section(md, "In the browser")


def test_the_bound_and_failed_ways_are_said(benchmarked):
    """The renderings a quiet tiny run does not produce: a ratio over the bound, XLA refusing."""
    _, report = benchmarked
    report = copy.deepcopy(report)
    report["variants"]["tflite_int8_ptq"]["stages_ms"]["1"]["image_to_answer_over_invoke"] = 2.0
    report["variants"]["keras_float"]["keras_modes"]["1"]["xla"] = {"error": "XLA compilation refused"}
    md = report_mod.markdown(report)
    assert row(section(md, "Image to answer"), "tflite_int8_ptq", "1").endswith("| 2.00× | **not met** |")
    assert "failed: XLA compilation refused" in row(section(md, "ways of calling"), "1")


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
    for kind in ("published", "given"):  # BreakHis' Folds.csv, a CSV's own split column
        assert validate_report({**report, "split": {**report["split"], "kind": kind}}) == []


def test_a_malformed_report_is_refused_before_anything_is_written(benchmarked, tmp_path):
    _, report = benchmarked
    broken = {**copy.deepcopy(report), "split": {**report["split"], "n_test": None}}
    with pytest.raises(ValueError, match="split.n_test"):
        report_mod.write_report(tmp_path / "out", broken, {}, [])
    assert not (tmp_path / "out").exists()


def test_a_cv_fold_run_is_benchmarked_on_its_own_test_side(tmp_path):
    run = make_tiny_run(tmp_path / "fold1", fold=1)
    # --threads none (the old spelling of --no-timing) wins over the config's [1]
    assert oncolite(["benchmark", str(run), "--threads", "none", "--bootstrap", "20", "--quiet"]) == 0
    report = json.loads((run / "benchmark" / "report.json").read_text())
    assert report["split"]["fold"] == report["split"]["test_fold"] == 1
    assert report["split"]["n_test"] == FOLD1_TEST != FOLD0_TEST
    assert np.sum(report["variants"]["keras_float"]["confusion_matrix"]) == FOLD1_TEST
    assert report["settings"]["threads"] == [] and report["settings"]["runs"] == BENCHMARK_SETTINGS["runs"]
    assert "sides of CV fold 1" in (run / "benchmark" / "report.md").read_text()


def test_binary_operating_points_decide_for_every_model(tmp_path):
    """threshold 0: the positive class for every image, where argmax would not call it for all."""
    from edge_runtime.model import EdgeModel
    from edge_runtime.preprocess import preprocess
    from tests import edge_models

    labels = tuple(edge_models.BINARY_LABELS)
    rule = {"positive": labels[1], "value": 0.0}
    run = make_tiny_run(tmp_path / "binary", labels=labels, threshold=rule)
    assert oncolite(["benchmark", str(run), "--threads", "none", "--bootstrap", "20", "--quiet"]) == 0
    report = json.loads((run / "benchmark" / "report.json").read_text())
    tested = [p for i, p in enumerate(sorted((run / "data").glob("*.png"), key=lambda p: int(p.stem[3:])))
              if fold_sides(i)[0] == "test"]
    x = np.stack([preprocess(p, edge_models.PREP) for p in tested])
    assert (EdgeModel.load(run / "models" / "fp32.tflite").predict(x).argmax(1) == 0).any()  # so the check below can tell a threshold from argmax
    for name in ("keras_float", "tflite_fp32", "tflite_int8_ptq"):
        v = report["variants"][name]
        assert v["operating_point"] == rule
        assert [row[0] for row in v["confusion_matrix"]] == [0, 0], name  # nothing called negative
        assert v["agreement_with_float"] == 1.0
    assert "idc when p >= 0" in (run / "benchmark" / "report.md").read_text()


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
    monkeypatch.setattr("oncolite.benchmarks.benchmark.available_cores", lambda: 2)
    assert parse_threads("1,2,4") == [1, 2]
    assert parse_threads("none") == []
    assert parse_threads("8") == [1]
    assert usable_threads([2, 1, 2]) == [1, 2] and usable_threads([]) == []


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
    # benchmark_model prints no p90: none is made up from p95 or max
    assert latency["p50"] == pytest.approx(14.12) and latency["p90"] is None
    assert latency["p95"] == pytest.approx(14.48) and latency["max"] == pytest.approx(15.321)
    with pytest.raises(Exception, match="Inference timings"):
        devices.parse_benchmark_model("ERROR: Could not open model")


def test_benchmark_model_binary_flag_then_env_then_tools(tmp_path, monkeypatch):
    given, from_env = tmp_path / "given", tmp_path / "env"
    given.write_bytes(b"\x7fELF")
    from_env.write_bytes(b"\x7fELF")
    monkeypatch.setenv("ONCOLITE_BENCHMARK_MODEL", str(from_env))
    assert devices.benchmark_model_path(str(given)) == given
    assert devices.benchmark_model_path(None) == from_env
    monkeypatch.delenv("ONCOLITE_BENCHMARK_MODEL")
    monkeypatch.setattr(devices, "DEFAULT_BENCHMARK_MODEL", tmp_path / "tools" / "benchmark_model")
    with pytest.raises(Exception, match=r"tools/benchmark_model: .*--benchmark-model PATH"):
        devices.benchmark_model_path(None)


def test_ssh_url_parsing():
    t = devices.parse_ssh_url("ssh://pi@raspberrypi.local:2200?python=/usr/bin/python3&strict=no")
    assert (t.user, t.host, t.port, t.python, t.strict) == ("pi", "raspberrypi.local", 2200, "/usr/bin/python3", False)
    assert "StrictHostKeyChecking=no" in t.ssh("true") and "BatchMode=yes" in t.ssh("true")
    assert devices.parse_ssh_url("ssh://pi@host").port == 22
    with pytest.raises(Exception, match="ssh://user@host"):
        devices.parse_ssh_url("ssh://host-without-user")


def test_timing_subprocesses_run_where_the_user_is(tmp_path, monkeypatch):
    """A relative RUN_DIR or image path is the user's: the timing subprocess must see the same
    working directory (it used to run in the repository and lost every latency figure)."""
    import sys

    from oncolite.benchmarks.benchmark import run_json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.txt").write_text("x")
    out = run_json([sys.executable, "-c", "import json, os; print(json.dumps({'cwd': os.getcwd(), "
                    "'sees': os.path.exists('here.txt')}))"], "probe")
    assert out == {"cwd": str(tmp_path), "sees": True}
