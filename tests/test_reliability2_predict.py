"""Issue 19 class 7 and the predict side of the display items: rows are written (and flushed) as
each image is classified, a killed run resumes with --skip-done, files skipped by suffix are
reported, and every answer shows its decision rule and uncertain flag.

With ONCOLITE_WRITE_REPORTS=1 the kill-and-resume figures go to reports/reliability/resume.json.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_models import BINARY_LABELS, LABELS, model_file, tflite_bytes, write_images
from edge_runtime.atomic import write_bytes, write_json, write_text
from edge_runtime.cli import main
from edge_runtime.errors import OncoliteError
from edge_runtime.model import EdgeModel
from edge_runtime.predict import read_done, resume_key

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
REPORT = REPO_ROOT / "reports" / "reliability" / "resume.json"
FIGURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1" and FIGURES:
        write_json(REPORT, {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability2_predict.py -k resumes",
                            **FIGURES})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_file(tmp_path_factory.mktemp("model"), "int8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root, n=4, size=24)
    (root / "img1b.png").write_bytes(b"not an image")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------- streaming

@pytest.mark.parametrize("fmt", ["--csv", "--json", "table"])
def test_rows_already_written_survive_an_interruption(fmt, model, folder, monkeypatch, capsys):
    """Ctrl+C while the third image is inferred: the first two are already out."""
    real_run, calls = EdgeModel.run, []

    def interrupted(self, tensor):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(self, tensor)

    monkeypatch.setattr(EdgeModel, "run", interrupted)
    argv = ["predict", str(model), str(folder)] + ([fmt] if fmt != "table" else [])
    code, out, err = run(argv, capsys)
    assert code == 130 and "interrupted" in err
    if fmt == "--csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [Path(r["file"]).name for r in rows] == ["img0.png", "img1.png", "img1b.png"]
        assert rows[0]["label"] in LABELS and rows[2]["error"]
    elif fmt == "--json":
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["type"] for r in records] == ["model", "result", "result", "error"]
    else:
        assert sum(line.startswith(str(folder)) for line in out.splitlines()) == 2


@pytest.mark.parametrize("fmt", ["--csv", "--json"])
def test_a_killed_run_resumes_where_it_stopped(fmt, model, tmp_path):
    """SIGKILL a real run once rows are coming, then `--skip-done OUT >> OUT`: every image is in OUT
    exactly once, the bad one is tried again, and no line is broken."""
    images = tmp_path / "images"
    good = write_images(images, n=300, size=16)
    (images / "zz_bad.png").write_bytes(b"truncated")
    out = tmp_path / ("out.csv" if fmt == "--csv" else "out.jsonl")
    command = [sys.executable, "-m", "edge_runtime", "predict", os.fspath(model), os.fspath(images), fmt, "--quiet"]
    with open(out, "w") as stdout:
        proc = subprocess.Popen(command, env=ENV, cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and out.read_text().count("\n") < 6:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = _results(out, fmt)
    with open(out, "a") as stdout:
        resumed = subprocess.run([*command, "--skip-done", os.fspath(out)], env=ENV, cwd=REPO_ROOT, stdout=stdout,
                                 stderr=subprocess.PIPE, text=True, timeout=300)
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr  # the bad file fails again
    after = _results(out, fmt)
    assert sorted(after) == sorted(str(p) for p in good)  # each good image exactly once
    assert set(before) <= set(after)
    if fmt == "--csv":
        assert out.read_text().count("file,path,label,probability") == 1  # no second header
    FIGURES[fmt.lstrip("-")] = {"images": len(good) + 1, "rows_before_the_kill": len(before),
                                "killed_mid_run": len(before) < len(good), "classified_on_resume": len(after) - len(before),
                                "classified_twice": len(after) - len(set(after)), "missing": len(good) - len(set(after))}


def _results(out: Path, fmt: str) -> list[str]:
    """Files with a result in OUT; every line but a last one cut by the kill must parse."""
    text = out.read_text()
    lines = text.splitlines()
    if fmt == "--json":
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                assert number == len(lines) or not text.endswith("\n"), line
        return [r["file"] for r in records if r.get("type") == "result"]
    rows = list(csv.reader(io.StringIO(text)))
    width, label = len(rows[0]), rows[0].index("label")
    return [r[0] for r in rows[1:] if len(r) == width and r[label] and r[label] != "label" and not r[-1]]


def test_a_shell_redirect_that_emptied_the_skip_file_is_said(model, folder, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("file,label\n")
    with open(out, "w") as stdout:  # what `> out.csv` does before predict starts
        done = subprocess.run([sys.executable, "-m", "edge_runtime", "predict", os.fspath(model), os.fspath(folder),
                               "--csv", "--quiet", "--skip-done", os.fspath(out)], env=ENV, cwd=REPO_ROOT,
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
    assert "emptied it" in done.stderr and "'>>'" in done.stderr
    assert len(list(csv.DictReader(out.open()))) == 5


# --------------------------------------------------------------------- --skip-done files

def test_skip_done_reads_json_lines_and_ignores_a_line_cut_by_a_kill(tmp_path):
    done = tmp_path / "out.jsonl"
    done.write_text('{"type": "model"}\n{"type": "result", "file": "a.png"}\n{"type": "error", "file": "b.png", "error": "x"}\n'
                    '{"type": "result", "file": "c.png"}\n{"type": "result", "fi')
    assert read_done(str(done)) == {resume_key("a.png"), resume_key("c.png")}  # b.png failed: tried again


def test_skip_done_refuses_a_broken_line_in_the_middle(tmp_path):
    done = tmp_path / "out.jsonl"
    done.write_text('{"type": "result", "file": "a.png"}\nnot json\n{"type": "result", "file": "c.png"}\n')
    with pytest.raises(OncoliteError, match="line 2 is not JSON"):
        read_done(str(done))


def test_skip_done_reads_csv_and_ignores_a_row_cut_by_a_kill(tmp_path):
    done = tmp_path / "out.csv"
    done.write_text("file,label,probability,uncertain,decision_rule,preprocess_ms,inference_ms,error\n"
                    "a.png,benign,0.9,,highest probability,1.0,2.0,\n"
                    "b.png,,,,,,,b.png: cannot decode\n"
                    "c.png,benign,0.8,,highest probability,1.0,2")
    assert read_done(str(done)) == {resume_key("a.png")}


@pytest.mark.parametrize("content, match", [("hello\nworld\n", "neither predict --csv output"),
                                            (None, "file not found")])
def test_skip_done_refuses_what_is_not_a_predict_output(tmp_path, content, match):
    path = tmp_path / "out.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(OncoliteError, match=match):
        read_done(str(path))


def test_skip_done_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(OncoliteError, match="not a regular file"):
        read_done(str(tmp_path / "pipe.csv"))


def test_skip_done_skips_and_says_so(model, folder, capsys):
    code, out, _ = run(["predict", str(model), str(folder), "--json"], capsys)
    first = folder.parent / "first.jsonl"
    first.write_text(out)
    code, out, _ = run(["predict", str(model), str(folder), "--json", "--skip-done", str(first)], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == ["model", "error", "summary"]  # only the bad file again
    assert records[-1]["already_done"] == 4 and code == 1
    code, out, _ = run(["predict", str(model), str(folder), "--skip-done", str(first)], capsys)
    assert "4 file(s) already classified in --skip-done, not repeated" in out


@pytest.mark.parametrize("fmt", ["--csv", "--json"])
def test_skip_done_matches_from_another_folder_and_spelling(fmt, model, tmp_path, monkeypatch, capsys):
    """Issue 20: the first run was typed in the data's folder with relative paths, the resume in
    its parent with other spellings (absolute; through a symlinked folder): every image matches."""
    write_images(tmp_path / "site" / "scans", n=3, size=16)
    (tmp_path / "link").symlink_to(tmp_path / "site")
    monkeypatch.chdir(tmp_path / "site")
    code, out, _ = run(["predict", str(model), "scans", fmt], capsys)
    assert code == 0
    (tmp_path / "site" / "out").write_text(out)
    monkeypatch.chdir(tmp_path)
    for spelling in ("site/scans", str(tmp_path / "site" / "scans"), "link/./scans/"):
        code, out, _ = run(["predict", str(model), spelling, "--json", "--skip-done", "site/out"], capsys)
        summary = json.loads(out.splitlines()[-1])
        assert code == 0 and summary["already_done"] == 3 and summary["images"] == 0, (spelling, summary)


def test_skip_done_reads_outputs_without_the_path_column_relative_to_here(model, tmp_path, monkeypatch, capsys):
    """An output from before the path column: its file names are taken relative to the current folder."""
    write_images(tmp_path / "scans", n=2, size=16)
    old = tmp_path / "old.csv"
    old.write_text("file,label,probability,error\nscans/img0.png,benign,0.9,\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["predict", str(model), "scans", "--json", "--skip-done", str(old)], capsys)
    assert json.loads(out.splitlines()[-1])["already_done"] == 1


# --------------------------------------------------------------------- skipped by suffix

def test_files_skipped_by_suffix_are_reported_in_every_format(model, tmp_path, capsys):
    write_images(tmp_path, n=1)
    for name in ("scan.dcm", "notes.txt"):
        write_text(tmp_path / name, "x")
    _, out, err = run(["predict", str(model), str(tmp_path)], capsys)
    assert "skipped 2 file(s) that are not images by their suffix (.dcm: 1, .txt: 1)" in out
    _, out, err = run(["predict", str(model), str(tmp_path), "--csv"], capsys)
    assert "skipped 2 file(s)" in err and "notes.txt" not in out
    _, out, _ = run(["predict", str(model), str(tmp_path), "--json"], capsys)
    skipped = [r for r in map(json.loads, out.splitlines()) if r["type"] == "skipped"]
    assert {Path(r["file"]).name for r in skipped} == {"scan.dcm", "notes.txt"}


def test_a_folder_without_images_says_what_it_skipped(model, tmp_path, capsys):
    for k in range(3):
        write_text(tmp_path / f"slice{k}.dcm", "DICM")
    code, _, err = run(["predict", str(model), str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "no images found" in lines[0] and "skipped 3 file(s) that are not images by their suffix (.dcm: 3)" in lines[0]


# --------------------------------------------------------------------- the rule and the flag

def binary_model(folder: Path, margin) -> Path:
    data = tflite_bytes("fp32", 2)
    path = write_bytes(folder / "idc.tflite", data)
    write_json(path.with_suffix(".json"), {"format": "oncolite-model/1", "labels": BINARY_LABELS,
                                           "sha256": hashlib.sha256(data).hexdigest(),
                                           "threshold": {"positive": "idc", "value": 0.5}, "uncertain_margin": margin})
    return path


@pytest.mark.parametrize("margin, flag", [(1.0, "true"), (0.0, "false"), (None, "")])
def test_every_output_shows_the_rule_and_the_flag(tmp_path, capsys, margin, flag):
    path = binary_model(tmp_path, margin)
    images = [str(p) for p in write_images(tmp_path / "images", n=2)]
    rule = "idc if p(idc) >= 0.5, else non-idc"
    _, out, _ = run(["predict", str(path), *images], capsys)
    lines = out.splitlines()
    assert lines[0].startswith(f"model: {path} (") and lines[1].startswith(f"decision rule: {rule}")
    rows = [line for line in lines if line.startswith(images[0]) or line.startswith(images[1])]
    assert len(rows) == 2 and all(("uncertain" in row) == (flag == "true") for row in rows), out
    _, out, _ = run(["predict", str(path), *images, "--csv"], capsys)
    for row in csv.DictReader(io.StringIO(out)):
        assert row["uncertain"] == flag and row["decision_rule"] == rule
    _, out, _ = run(["predict", str(path), *images, "--json"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["decision_rule"] == rule and records[0]["uncertain_margin"] == margin
    assert [r["uncertain"] for r in records if r["type"] == "result"] == [{"true": True, "false": False, "": None}[flag]] * 2


def test_top_k_below_one_is_a_one_line_error(model, folder, capsys):
    code, _, err = run(["predict", str(model), str(folder), "--top-k", "0"], capsys)
    assert code == 2 and "--top-k 0" in err and len(err.strip().splitlines()) == 1
