"""In-browser latency in `oncolite benchmark` (issue 18): the variants LiteRT.js can run (uint8
I/O, static batch 1: the int8_uint8 export) are timed in headless Chromium beside the Python
runtime's latency of the same file from the same run, as a ratio, in report.json and report.md;
`--no-browser` turns it off and says so. Shapes and values from the JSON, never speeds."""

from __future__ import annotations

import json

import pytest

from edge_runtime import webapp
from oncolite.cli import main as oncolite
from test_bench_report import make_tiny_run, row, section


def test_no_browser_is_said_in_the_report(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    assert oncolite(["benchmark", str(run), "--threads", "none", "--no-browser", "--bootstrap", "20", "--quiet"]) == 0
    report = json.loads((run / "benchmark" / "report.json").read_text())
    assert report["browser"] == {"skipped": "turned off (--no-browser)"} and report["settings"]["browser"] is False
    assert "Not measured: turned off (--no-browser)." in section((run / "benchmark" / "report.md").read_text(),
                                                                 "In the browser")


@pytest.mark.browser
def test_the_uint8_model_is_timed_in_the_browser_beside_the_python_runtime(tmp_path):
    problem = webapp.browser_unavailable()
    if problem:
        pytest.skip(problem)
    from webapp_models import tiny_model

    run = make_tiny_run(tmp_path / "run")
    tiny_model(run / "models")  # models/int8_uint8.tflite + sidecar: uint8 I/O, batch 1, the run's labels and size
    # Timing settings from the run's config: 1 thread, 1 warm-up, 3 runs.
    assert oncolite(["benchmark", str(run), "--bootstrap", "20", "--quiet"]) == 0
    report = json.loads((run / "benchmark" / "report.json").read_text())
    browser = report["browser"]
    assert "skipped" not in browser, browser
    assert set(browser["refused"]) == {"tflite_fp32", "tflite_int8_ptq"}  # dynamic batch; int8 I/O
    assert set(browser["variants"]) == {"tflite_int8_uint8"}
    v = browser["variants"]["tflite_int8_uint8"]
    python = report["variants"]["tflite_int8_uint8"]["latency_ms"]["1"]
    assert v["python_latency_ms"] == python and v["threads"] == 1
    assert v["latency_ms"]["p50"] > 0 and v["ratio_to_python"] == pytest.approx(v["latency_ms"]["p50"] / python["p50"])
    # Every latency image was classified in the page, as a user picks a file.
    assert v["page"]["images"] == report["settings"]["latency_images"] and v["page"]["inference_ms"] > 0
    assert "SIMD" in v["wasm"] and v["litertjs"] and v["browser"].startswith("Chromium ")

    lines = section((run / "benchmark" / "report.md").read_text(), "In the browser")
    assert row(lines, "tflite_int8_uint8") == (
        f"| tflite_int8_uint8 | {v['latency_ms']['p50']:.2f} / {v['latency_ms']['p90']:.2f} | {python['p50']:.2f} | "
        f"{v['ratio_to_python']:.2f}× | {v['page']['preprocess_ms']:.1f} / {v['page']['inference_ms']:.1f} "
        f"over {v['page']['images']} images |")
    assert any(line.startswith(v["browser"]) and v["litertjs"] in line for line in lines)
    assert any(line.startswith("Not runnable by LiteRT.js") and line.endswith("tflite_fp32, tflite_int8_ptq.") for line in lines)
