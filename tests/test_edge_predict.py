"""predict and bench commands: outputs, exit codes, bad files in a batch, no TensorFlow on the device path."""

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_models import LABELS, model_file, write_images
from edge_runtime.cli import main
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge-predict")
    model = model_file(root, "int8")
    images = root / "images"
    good = write_images(images / "nested", n=3)
    (images / "notes.txt").write_text("not an image, and not an image suffix: ignored in folders")
    bad = [images / "broken.png", images / "empty.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad[1].write_bytes(b"")
    odd = Path(os.fsdecode(bytes(images) + b"/caf\xe9.png"))  # not UTF-8
    odd.write_bytes(good[0].read_bytes())
    # What a kill leaves from an atomic write: hidden, so never an input (the counts below exclude it).
    (images / ".img9.k1ll3d.tmp.png").write_bytes(b"\x89PNG\r\n\x1a\n half")
    return {"root": root, "model": model, "images": images, "good": good, "bad": bad, "odd": odd}


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def json_lines(out: str) -> dict:
    """predict --json output (JSON Lines) as {"model": ..., "results": [...], "skipped": [...], "summary": ...}."""
    records = [json.loads(line) for line in out.splitlines()]
    [model] = [r for r in records if r["type"] == "model"]
    [summary] = [r for r in records if r["type"] == "summary"]
    return {"model": model, "summary": {k: v for k, v in summary.items() if k != "type"},
            "results": [r for r in records if r["type"] in ("result", "error")],
            "skipped": [r for r in records if r["type"] == "skipped"]}


def test_json_lists_good_and_bad_files_and_exits_some_failed(setup, capsys):
    code, out, _ = run(["predict", str(setup["model"]), str(setup["images"]), "--json"], capsys)
    assert code == EXIT_SOME_FAILED
    report = json_lines(out)
    results = report["results"]
    assert report["summary"] == {"images": 6, "classified": 4, "failed": 2, "skipped": 2, "already_done": 0}
    # Not silently dropped: the text file and the kill's hidden temporary are listed with the reason.
    assert {Path(r["file"]).name: r["reason"] for r in report["skipped"]} == {
        "notes.txt": "not an image by its suffix", ".img9.k1ll3d.tmp.png": "hidden file"}
    failed = {Path(r["file"]).name for r in results if "error" in r}
    assert failed == {"broken.png", "empty.jpg"}
    ok = [r for r in results if "error" not in r]
    for r in ok:
        assert r["label"] in LABELS and abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["top"][0]["probability"] == max(r["probabilities"].values()) and len(r["top"]) == 3
        assert r["decision_rule"] == "highest probability" and r["uncertain"] is None
        for key in ("inference_ms", "preprocess_ms"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r.get(key))
    assert any("caf\\xe9.png" in r["file"] for r in ok)  # shown safely, not dropped


def test_all_good_exits_ok_and_prints_a_table(setup, capsys):
    code, out, _ = run(["predict", str(setup["model"]), *map(str, setup["good"]), "--top-k", "2"], capsys)
    assert code == EXIT_OK
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith(f"model: {setup['model']} (") and "integer" in lines[0]  # which model answered
    assert lines[1] == "decision rule: highest probability"
    assert lines[2].split()[:3] == ["file", "label", "p"]
    assert sum(Path(p).name in out for p in setup["good"]) == 3 and "3 image(s) classified" in out


def test_csv_has_one_row_per_file_and_errors_in_their_column(setup, capsys):
    code, out, _ = run(["predict", str(setup["model"]), str(setup["images"]), "--csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == EXIT_SOME_FAILED and len(rows) == 6
    assert [f"p_{label}" for label in LABELS] == [k for k in rows[0] if k.startswith("p_")]
    assert sum(bool(r["error"]) for r in rows) == 2 and all(r["label"] for r in rows if not r["error"])


def test_glob_and_model_flag(setup, capsys):
    pattern = str(setup["images"] / "**" / "img*.png")
    code, out, _ = run(["predict", "--model", str(setup["model"]), pattern, "--json"], capsys)
    assert code == EXIT_OK and json_lines(out)["summary"]["classified"] == 3


def test_all_bad_exits_some_failed(setup, capsys):
    code, out, _ = run(["predict", str(setup["model"]), *map(str, setup["bad"]), str(setup["root"] / "gone.png")], capsys)
    assert code == EXIT_SOME_FAILED and "3 of 3 file(s) could not be classified" in out


def test_no_inputs_is_a_usage_error(setup, capsys):
    empty = setup["root"] / "empty-folder"
    empty.mkdir(exist_ok=True)
    code, _, err = run(["predict", str(setup["model"]), str(empty), str(setup["root"] / "*.nothing")], capsys)
    assert code == EXIT_USAGE and "no images found" in err


def test_bad_model_is_a_usage_error_with_one_line(setup, capsys):
    code, _, err = run(["predict", str(setup["bad"][0]).replace("broken.png", "nope.tflite"), str(setup["good"][0])], capsys)
    assert code == EXIT_USAGE and "nope.tflite: model file not found" in err and len(err.strip().splitlines()) == 1


def test_predict_never_imports_tensorflow(setup):
    """The device path: `python -m edge_runtime predict` with ai-edge-litert, checked at exit."""
    wrapper = ("import atexit, runpy, sys\n"
               "atexit.register(lambda: print('TENSORFLOW_MODULES=%d' % sum(m == 'tensorflow' or m.startswith("
               "('tensorflow.', 'tf_keras', 'keras')) for m in sys.modules), file=sys.stderr))\n"
               "sys.argv = ['edge_runtime', *sys.argv[1:]]\n"
               "runpy.run_module('edge_runtime', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", wrapper, "predict", str(setup["model"]), *map(str, setup["good"]),
                           "--json", "--backend", "ai-edge-litert"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json_lines(done.stdout)["model"]["backend"] == "ai-edge-litert"
    assert "TENSORFLOW_MODULES=0" in done.stderr


def test_bench_reports_latency_preprocessing_and_memory(setup, capsys):
    code, out, _ = run(["bench", str(setup["model"]), *map(str, setup["good"]), "--threads", "1,2",
                        "--warmup", "2", "--runs", "5", "--json"], capsys)
    report = json.loads(out)
    assert code == EXIT_OK and [t["threads"] for t in report["threads"]] == [1, 2]
    for t in report["threads"]:
        s = t["latency_ms"]
        assert t["runs"] == 5 and s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert t["throughput_per_s"] > 0 and t["load_ms"] > 0
    assert report["preprocessing"]["images"] == 3 and report["peak_rss_mb"] > 10
    assert report["kind"] == "integer" and report["device"]["cpus"] >= 1


def test_time_model_on_random_inputs(setup):
    from edge_runtime.bench import prepare_inputs, time_model
    from edge_runtime.model import EdgeModel

    model = EdgeModel.load(setup["model"], threads=1)
    inputs, prep_stats = prepare_inputs(model, [])
    result = time_model(model, inputs, threads=1, warmup=0, runs=3)
    assert prep_stats is None and result["runs"] == 3 and result["latency_ms"]["mean"] > 0


def test_bench_rejects_bad_thread_list(setup, capsys):
    code, _, err = run(["bench", str(setup["model"]), "--threads", "two"], capsys)
    assert code == EXIT_USAGE and "--threads" in err


def test_two_models_or_two_output_formats_are_refused_in_one_line(setup, capsys):
    code, _, err = run(["predict", str(setup["model"]), *map(str, setup["good"]), "--model", str(setup["model"])], capsys)
    assert code == 2 and "two models" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["predict", str(setup["model"]), *map(str, setup["good"]), "--csv", "--json"], capsys)
    assert code == 2 and "--csv and --json" in err and len(err.strip().splitlines()) == 1
