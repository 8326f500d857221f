"""Issue 20's done-when: the README's examples, typed as a user types them (relative paths, the
`oncolite` and `python` of the install on PATH), from a folder outside the repository.

EXAMPLES lists every command the README shows: the ones run here, and for each of the others why
not and which test covers it. `test_the_list_is_the_readmes` fails when the README gains, loses
or changes a command, so the two cannot drift. A run command is the README's words with its
optional [parts] left out, its PLACEHOLDERS filled and, for the costly ones, settings that keep
it small appended (a tiny training config, few timing runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
BIN = Path(sys.executable).parent
TINY_TRAIN = ("--set input_size=32 --set alpha=0.35 --set weights=null --set batch_size=8 "
              "--set head_epochs=1 --set finetune_epochs=0")
# Placeholders in the README's commands and what this test types for them.
PLACEHOLDERS = {"IMAGE": "'data/busi/benign/benign (1).png'", "RUN_DIR": "runs/r1",
                "MODEL": "models/busi/int8.tflite"}


class Run:
    """A README command this test runs: `extra` appended; `check(folder, result)` looks at what it wrote."""

    def __init__(self, extra: str = "", check=None, expect: int = 0):
        self.extra, self.check, self.expect = extra, check, expect


def _exists(*paths):
    def check(folder: Path, result) -> None:
        for path in paths:
            assert (folder / path).exists(), f"{path} not written in the user's folder"
    return check


def _lists_every_setting(folder: Path, result) -> None:
    for key in ("input_size", "augment.hflip", "qat.lr", "export.variants", "benchmark.runs"):
        assert f"\n{key} = " in "\n" + result.stdout, key


def _predict_json(folder: Path, result) -> None:
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["type"] == "model" and (records[-1]["classified"], records[-1]["failed"]) == (3, 0)


def _info(folder: Path, result) -> None:
    # Without MODEL: the shipped int8 model, found from a folder outside the repository.
    assert "labels       benign, malignant, normal" in result.stdout and "checks passed" in result.stdout, result.stdout


def _results_csv(folder: Path, result) -> None:
    rows = (folder / "results.csv").read_text().splitlines()
    assert rows[0].startswith("file,path,label,") and len(rows) == 4


def _quiet_export(folder: Path, result) -> None:
    _exists("runs/r1/models/int8_ptq.tflite", "runs/r1/models/export_report.md")(folder, result)
    # Issue 20: nothing on stderr under --quiet, not TensorFlow's, the converter's or LiteRT's own lines;
    # issue 16: stdout holds the result alone, one line.
    assert result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith("report: runs/r1/models/export_report.md") and result.stdout.count("\n") == 1, result.stdout


def _benchmark(folder: Path, result) -> None:
    report = json.loads((folder / "runs/r1/benchmark/report.json").read_text())
    assert report["failures"] == []
    for name in ("tflite_fp32", "tflite_int8_ptq"):  # issue 20.1: timing of a relative RUN from elsewhere
        assert report["variants"][name]["latency_ms"]["1"]["p50"] > 0


NOT_RUN_PIPELINE = "the whole pipeline: tests/test_pipeline.py runs `oncolite run` on a tiny config"
NOT_RUN_DATASETS = "needs the BreakHis or IDC download: tests/test_histology_e2e.py runs it on generated trees"
NOT_RUN_BYO = "bring-your-own model: tests/test_byo_export.py and tests/test_byo_benchmark.py run these on models built there"
NOT_RUN_MENTION = "a command named in prose, not an example to type"

# Every command the README shows (as `readme_commands` reads it) -> a Run, or why it is not run.
# Runs go in this order, in one folder: each may use what an earlier one wrote.
EXAMPLES: dict[str, Run | str] = {
    "oncolite config [KEY ...]": Run(check=_lists_every_setting),
    "oncolite audit data/busi --out reports/busi/audit": Run(check=_exists("reports/busi/audit/audit.json")),
    "oncolite split data/busi --out manifest.json [--folds 5] [--random]": Run(check=_exists("manifest.json")),
    "oncolite train runs/r1 --manifest manifest.json [--profile full] [--fold i \\| --folds K]":
        Run(TINY_TRAIN, _exists("runs/r1/models/float.keras")),
    "oncolite train RUN_DIR --resume": Run("--quiet"),
    "oncolite evaluate runs/r1 [--side test]": Run("--bootstrap 20", _exists("runs/r1/eval")),
    "oncolite explain runs/r1 IMAGE": Run(check=_exists("runs/r1/explain/benign (1).png.gradcam.png")),
    "oncolite quantize runs/r1": "QAT costs minutes even on a tiny run: tests/test_quantize.py runs it",
    "oncolite export runs/r1": Run("--variants fp32,int8_ptq --set export.calibration_images=16 --set export.gate=1 --quiet",
                                   _quiet_export),
    "oncolite benchmark runs/r1 [--target ssh://pi@host]":
        Run("--no-browser --bootstrap 20 --set benchmark.runs=3 --set benchmark.warmup=1 --set benchmark.threads=[1]",
            _benchmark),
    "oncolite info [MODEL]": Run(check=_info),
    "oncolite predict [MODEL] images/ --json": Run(check=_predict_json),
    "~/venv/bin/python -m edge_runtime predict models/busi/int8.tflite scans/ --csv > results.csv": Run(check=_results_csv),
    "python -m edge_runtime bench MODEL": Run("--runs 3 --warmup 1 --batch 0"),
    "oncolite serve [MODEL] [--host 0.0.0.0 --token T] [--webapp DIR]": "serve",
    "~/venv/bin/python -m edge_runtime serve models/busi/int8.tflite --host 0.0.0.0 --token \"$(openssl rand -hex 8)\"":
        "serve",
    "python -m edge_runtime webapp models/busi/int8_uint8.tflite --out field-app": Run(check=_exists("field-app/index.html")),
    "python -m edge_runtime webapp runs/r1/models/int8_uint8.tflite --out field-app":
        "needs the int8_uint8 export of the test's run; the same command runs on the shipped models/busi/int8_uint8.tflite",
    "oncolite run [RUN_DIR] [--data DATA] [--profile quick\\|full] [--folds K] [--only-folds 0,1] [--from STAGE]":
        NOT_RUN_PIPELINE,
    "oncolite run": NOT_RUN_PIPELINE,
    "oncolite run --profile full": NOT_RUN_PIPELINE,
    "oncolite run --profile full --publish busi": NOT_RUN_PIPELINE,
    "python3 -m venv .venv && .venv/bin/pip install -e \".[train]\" && .venv/bin/oncolite run":
        "the install itself: the tests run inside it (scripts/test)",
    "oncolite export my_model.keras --data images/ --out my_model_export/": NOT_RUN_BYO,
    "oncolite export my_model.h5 --data images/ --labels benign,malignant,normal": NOT_RUN_BYO,
    "oncolite export saved_model_dir/ --manifest manifest.json": NOT_RUN_BYO,
    "oncolite export my_model.keras --data images/ --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4": NOT_RUN_BYO,
    "oncolite benchmark --float my_model.keras my_model_export/int8.tflite my_model_export/fp32.tflite --data test_images/":
        NOT_RUN_BYO,
    "oncolite benchmark --float my_model.h5 plain_int8.tflite --data test_images/ --labels benign,malignant --mean 127.5 --std 127.5":
        NOT_RUN_BYO,
    "python -m edge_runtime bench my_model_export/int8.tflite test_images/benign/*.png --threads 1,2":
        "needs the bring-your-own export above; `python -m edge_runtime bench MODEL` runs here",
    "oncolite audit BreaKHis_v1/ --out runs/breakhis-audit": NOT_RUN_DATASETS,
    "oncolite split BreaKHis_v1/ --out breakhis.json [--label-scheme subtype] [--magnification 40,100]": NOT_RUN_DATASETS,
    "oncolite split Folds.csv --use-folds-csv --out breakhis-published.json": NOT_RUN_DATASETS,
    "oncolite train runs/breakhis --manifest breakhis.json --dataset breakhis": NOT_RUN_DATASETS,
    "oncolite evaluate runs/breakhis --target-sensitivity 0.95": NOT_RUN_DATASETS,
    "oncolite split IDC/ --out idc.json --folds 5": NOT_RUN_DATASETS,
    "oncolite train runs/idc --manifest idc.json --dataset idc": NOT_RUN_DATASETS,
    "oncolite slidemap runs/idc/models/int8.tflite IDC/10253 --out 10253.png": NOT_RUN_DATASETS,
    "oncolite evaluate RUN --target-sensitivity 0.95": "binary tasks only: tests/test_evaluate.py",
    "oncolite benchmark RUN --target adb[:serial]": "needs an Android device: tests/test_ssh_target.py parses adb output",
    "python -m edge_runtime predict|serve|bench|info|slidemap": NOT_RUN_MENTION,
    "oncolite train RUN_DIR": NOT_RUN_MENTION,
    "oncolite export": NOT_RUN_MENTION,
}


def readme_commands() -> list[str]:
    """Every command line in the README: lines of its code blocks and inline code that start
    with a command, shell comments removed, whitespace collapsed."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        found += [line.split("  #")[0] for line in block.splitlines() if not line.lstrip().startswith("#")]
    found += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = [" ".join(c.split()) for c in found]
    return [c for c in commands if re.match(r"(\S*/)?(oncolite|python3?) ", c)
            and re.search(r"\boncolite \w|-m edge_runtime \w", c)]


def test_the_list_is_the_readmes():
    shown = set(readme_commands())
    assert sorted(shown - set(EXAMPLES)) == [], "README commands this test does not know: add them to EXAMPLES"
    assert sorted(set(EXAMPLES) - shown) == [], "EXAMPLES the README no longer shows: remove or update them"


def typed(command: str, extra: str = "") -> str:
    """What a user types for a README command: optional [parts] left out, placeholders filled."""
    words = re.sub(r"\s*\[[^\]]*\]", "", command).replace("~/venv/bin/python", "python")
    for placeholder, value in PLACEHOLDERS.items():
        words = re.sub(rf"\b{placeholder}\b", value, words)
    return f"{words} {extra}".strip()


def _user_folder(folder: Path) -> Path:
    """What the README's relative paths name, in a folder outside the repository: 12 BUSI images
    per class in data/busi/, a few in images/ and scans/, the shipped models in models/busi/."""
    for label in ("benign", "malignant", "normal"):
        names = sorted(p for p in (REPO_ROOT / "data" / "busi" / label).glob("*.png") if "_mask" not in p.name)
        (folder / "data" / "busi" / label).mkdir(parents=True)
        for path in names[:12]:
            shutil.copy(path, folder / "data" / "busi" / label / path.name)
    for name in ("images", "scans"):
        (folder / name).mkdir()
        for label in ("benign", "malignant", "normal"):
            shutil.copy(REPO_ROOT / "data" / "busi" / label / f"{label} (2).png", folder / name)
    shutil.copytree(REPO_ROOT / "models" / "busi", folder / "models" / "busi")
    return folder


def _environment() -> dict:
    # The install's `oncolite` and `python` first on PATH; nothing pointing into the checkout, and
    # none of the variables conftest sets for the tests (a user has not set them).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_the_readmes_examples_run_from_a_folder_outside_the_repository(tmp_path):
    if not (BIN / "oncolite").exists():
        pytest.skip(f"no `oncolite` beside {sys.executable}: install the package (pip install -e .) first")
    folder = _user_folder(tmp_path / "work")
    assert not folder.resolve().is_relative_to(REPO_ROOT)
    env = _environment()
    for command, how in EXAMPLES.items():
        if how == "serve":
            _check_serve(command, folder, env)
            continue
        if not isinstance(how, Run):
            continue
        if "webapp" in command and not (REPO_ROOT / "web" / "node_modules" / "@litertjs").is_dir():
            continue  # the LiteRT.js runtime comes from `npm ci --prefix web` (tests/test_webapp.py says so)
        line = typed(command, how.extra)
        result = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == how.expect and "Traceback" not in result.stderr, \
            f"$ {line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if how.check:
            how.check(folder, result)


def _check_serve(command: str, folder: Path, env: dict) -> None:
    """Start the server as typed (on a free port), ask /api/health with the printed URL's token, stop it."""
    line = typed(command, "--port 0")
    server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        printed = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl+C" in p for p in printed):
            output = server.stdout.readline()
            if not output:
                break
            printed.append(output)
        url = next((p.strip() for p in printed if p.strip().startswith("http://127.0.0.1:")), None)
        assert url, f"$ {line}\n{''.join(printed)}"
        health = urllib.parse.urlsplit(url)._replace(path="/api/health").geturl()  # keeps ?token=
        with urllib.request.urlopen(health, timeout=30) as response:
            assert json.load(response)["status"] == "ok"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        server.stdout.close()
        server.stderr.close()
