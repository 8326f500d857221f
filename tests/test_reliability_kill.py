"""Nothing lost: real `oncolite` subprocesses killed with SIGKILL at seeded random moments.

The pipeline runs once, on a tiny dataset (3 classes x 8 noise images, MobileNetV2 alpha 0.35 at
32 px, weights=None), each stage killed twice before it is allowed to finish:
audit -> split -> train -> quantize -> export -> benchmark. After every kill the output folder
holds no half-written artifact: every .json parses, every .tflite passes EdgeModel.load's
checks, every .keras loads (safe_mode=True), every .png decodes; the only other files allowed
are the atomic writer's temporaries `.<stem>.<random>.tmp<suffix>` and TensorFlow's own
checkpoint files under the resume-state folders. Then the stage re-runs (with --resume where
it has one) and must finish with a valid result. The process group is killed, as a power cut
would: worker processes die too.

Also here: model loading is safe (no pickle, Keras safe_mode) — checked on the source itself.

With ONCOLITE_WRITE_REPORTS=1 the figures go to reports/reliability/kills.json.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import badinputs

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
       "TF_USE_LEGACY_KERAS": "1"}
SEED = 9
KILLS = 2
# `atomic_path`'s temporary: .<stem>.<mkstemp random>.tmp<suffix>
ATOMIC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")
# Resume state written by TensorFlow's checkpoint writer (its own temp names); state.json there
# is ours, written atomically after the checkpoint, and is checked like any .json.
CHECKPOINT_DIRS = ("train/state", "models/qat_state")
TINY_TRAIN = ["--set", "input_size=32", "--set", "alpha=0.35", "--set", "weights=null", "--set", "batch_size=8",
              "--set", "head_epochs=2", "--set", "finetune_epochs=1", "--set", "finetune_depth=10",
              "--set", "patience=100", "--set", "qat.epochs=1", "--set", "qat.settle_steps=4",
              "--set", "export.calibration_images=8", "--set", 'export.variants=["fp32","int8_ptq","int8_qat"]']

FIGURES: dict = {"stages": {}}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1":
        from edge_runtime.atomic import write_json

        write_json(REPO_ROOT / "reports" / "reliability" / "kills.json",
                   {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability_kill.py", "seed": SEED,
                    "kills_per_stage": KILLS, **FIGURES})


# ---------------------------------------------------------------- killing

def oncolite_command(*argv) -> list[str]:
    return [sys.executable, "-m", "oncolite", *map(str, argv)]


def run_killed(cmd: list[str], delay: float, ready=None, ready_timeout: float = 120) -> dict:
    """Start `cmd`; once `ready()` holds (or at once), wait `delay` s, then SIGKILL its process
    group. Returns what happened: killed, or finished first (with its exit code)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while ready is not None and not ready() and proc.poll() is None and time.monotonic() - started < ready_timeout:
            time.sleep(0.05)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            return {"killed": True, "after_s": round(time.monotonic() - started, 1)}
        return {"killed": False, "exit_code": proc.returncode, "stderr": proc.stderr.read().decode(errors="replace")[-400:]}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def kill_then_finish(name: str, folder: Path, cmd, resume_cmd=None, delays=(1.0, 10.0), ready=None) -> dict:
    """KILLS seeded random kills of `cmd`, each followed by the artifact check, then the
    completing run (`resume_cmd()` when it gives a command: the stage's --resume form).
    `ready`: one condition per kill (None: from the start) after which the random delay runs,
    so that later kills land later in the work."""
    rng = random.Random(f"{SEED}-{name}")
    attempts, checked, temps = [], 0, set()
    for ready_now in list(ready or [None] * KILLS)[:KILLS]:
        command = (resume_cmd and resume_cmd()) or cmd
        outcome = run_killed(command, rng.uniform(*delays), ready_now)
        assert outcome["killed"] or outcome["exit_code"] == 0, outcome
        state = check_artifacts(folder)
        checked += state["checked"]
        temps |= set(state["atomic_temps"])
        attempts.append({**{k: v for k, v in outcome.items() if k != "stderr"}, "artifacts_valid": state["checked"],
                         "atomic_temps_left": len(state["atomic_temps"])})
    result = finish((resume_cmd and resume_cmd()) or cmd)
    # Every stage here works on good inputs: after the kills the completing run must succeed outright.
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    final = check_artifacts(folder)
    figures = {"kills": sum(a["killed"] for a in attempts), "attempts": attempts, "artifacts_checked": checked + final["checked"],
               "atomic_temps_after_kills": len(temps), "atomic_temps_after_rerun": len(final["atomic_temps"]),
               "final_exit_code": result.returncode}
    FIGURES["stages"][name] = figures
    return {**figures, "final": final, "result": result}


# ---------------------------------------------------------------- the artifact check

def check_artifacts(folder: Path) -> dict:
    """Every artifact under `folder` complete and loadable; returns counts and the atomic temps found."""
    checked, temps = 0, []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if ATOMIC_TEMP.match(path.name):
            temps.append(relative)
            continue
        if any(f"/{d}/" in f"/{relative}" for d in CHECKPOINT_DIRS) and path.suffix != ".json":
            continue
        check_file(path)
        checked += 1
    return {"checked": checked, "atomic_temps": temps}


def check_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".tflite":
        from edge_runtime.model import EdgeModel

        EdgeModel.load(path)
    elif suffix == ".keras":
        load_keras(path)
    elif suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif suffix in (".md", ".csv", ".log", ".txt"):
        path.read_text(encoding="utf-8")
    else:
        raise AssertionError(f"{path}: unexpected file after a kill")


def load_keras(path: Path) -> None:
    import oncolite.train  # noqa: F401
    import tf_keras as keras

    if path.name == "qat.keras":  # tfmot cannot reload its own archives; quantize/qat.py rebuilds it
        from oncolite.quantize.qat import load_qat_model

        load_qat_model(path, keras.models.load_model(path.with_name("float.keras"), compile=False, safe_mode=True))
    else:
        keras.models.load_model(path, compile=False, safe_mode=True)


# ---------------------------------------------------------------- the pipeline, killed stage by stage

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("killed")
    for c, label in enumerate(("benign", "malignant", "normal")):
        (root / "data" / label).mkdir(parents=True)
        for k in range(8):
            pixels = np.random.default_rng(100 * c + k).integers(0, 256, (40, 40, 3), dtype=np.uint8)
            pixels[10:30, 10:30] = badinputs.RED if c == 0 else badinputs.GREEN if c == 1 else badinputs.BLUE
            Image.fromarray(pixels).save(root / "data" / label / f"{label}{k}.png")
    return root


def test_audit_survives_kills(work):
    out = work / "audit"
    kill_then_finish("audit", out, oncolite_command("audit", work / "data", "--out", out, "--quiet"), delays=(0.2, 1.0))
    assert json.loads((out / "audit.json").read_text())["images"] == 24


@pytest.fixture(scope="module")
def manifest(work) -> Path:
    out = work / "split"
    path = out / "manifest.json"
    cmd = oncolite_command("split", work / "data", "--out", path, "--folds", "2", "--val-fraction", "0.25", "--quiet")
    out.mkdir()
    kill_then_finish("split", out, cmd, delays=(0.2, 1.0))
    return path


def test_split_survives_kills(manifest):
    from oncolite.train.manifest import load_manifest

    assert len(load_manifest(manifest).items) == 24
    assert FIGURES["stages"]["split"]["final_exit_code"] == 0


@pytest.fixture(scope="module")
def trained(work, manifest) -> Path:
    run = work / "run"
    cmd = oncolite_command("train", "--manifest", manifest, "--run", run, "--quiet", *TINY_TRAIN)

    def resume():  # --resume once the run directory records its config; before that, start again
        return oncolite_command("train", "--resume", run, "--quiet") if (run / "config.json").exists() else None

    kill_then_finish("train", run, cmd, resume, delays=(0, 3),
                     ready=[lambda: (run / "logs" / "train.log").exists(),  # training has started
                            lambda: (run / "train" / "state" / "state.json").exists()])  # an epoch is done
    return run


@pytest.mark.slow
def test_train_survives_kills_and_resumes(trained):
    state = json.loads((trained / "train" / "state" / "state.json").read_text())
    assert state["phase"] == "done"
    assert len(state["history"]) == 3  # 2 head + 1 fine-tune epochs, none lost or repeated
    assert (trained / "models" / "float.keras").is_file()
    assert FIGURES["stages"]["train"]["kills"] >= 1


@pytest.fixture(scope="module")
def quantized(trained) -> Path:
    def resume():
        if (trained / "models" / "qat_state" / "state.json").exists():
            return oncolite_command("quantize", trained, "--resume", "--quiet")
        return None

    kill_then_finish("quantize", trained, oncolite_command("quantize", trained, "--quiet"), resume, delays=(0, 12),
                     ready=[None, lambda: (trained / "models" / "qat_state" / "state.json").exists()])
    return trained


@pytest.mark.slow
def test_quantize_survives_kills_and_resumes(quantized):
    report = json.loads((quantized / "models" / "qat_report.json").read_text())
    assert report["epochs_run"] == 1
    assert FIGURES["stages"]["quantize"]["kills"] >= 1


@pytest.fixture(scope="module")
def exported(quantized) -> Path:
    kill_then_finish("export", quantized, oncolite_command("export", quantized, "--quiet"), delays=(3, 25))
    return quantized


@pytest.mark.slow
def test_export_survives_kills(exported):
    from edge_runtime.model import EdgeModel

    for variant in ("fp32", "int8_ptq", "int8_qat"):
        model = EdgeModel.load(exported / "models" / f"{variant}.tflite")
        assert model.labels == ["benign", "malignant", "normal"]
    assert FIGURES["stages"]["export"]["kills"] >= 1


@pytest.mark.slow
def test_benchmark_survives_kills(exported):
    cmd = oncolite_command("benchmark", exported, "--threads", "1", "--runs", "3", "--warmup", "1",
                           "--bootstrap", "50", "--quiet")
    stage = kill_then_finish("benchmark", exported, cmd, delays=(2, 15))
    report = json.loads((exported / "benchmark" / "report.json").read_text())
    assert {"keras_float", "tflite_fp32", "tflite_int8_ptq", "tflite_int8_qat"} <= set(report["variants"])
    assert stage["final_exit_code"] == 0


# ---------------------------------------------------------------- temporaries left by a kill

@pytest.mark.slow
def test_a_temporary_left_by_a_kill_is_ignored_by_the_next_stage(exported):
    from oncolite.benchmarks.benchmark import find_models

    data = (exported / "models" / "fp32.tflite").read_bytes()
    stray = exported / "models" / ".fp32.k1ll3d.tmp.tflite"
    stray.write_bytes(data[: len(data) // 3])  # what SIGKILL mid-write leaves behind
    try:
        assert all(not ATOMIC_TEMP.match(p.name) for p in find_models(exported).values())
    finally:
        stray.unlink()


def test_atomic_temp_pattern_matches_what_atomic_path_makes(tmp_path):
    from edge_runtime.atomic import atomic_path

    with atomic_path(tmp_path / "float.keras") as tmp:
        assert ATOMIC_TEMP.match(tmp.name), tmp.name
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["float.keras"]


# ---------------------------------------------------------------- safe deserialization

SOURCE_DIRS = ("edge_runtime", "train", "quantize", "benchmarks", "oncolite")


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unsafe_deserialization_in_the_code():
    """No pickle, no np.load(allow_pickle=True), no yaml.load, no torch/joblib loads; every Keras
    load_model passes safe_mode=True."""
    problems = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            where = path.relative_to(REPO_ROOT)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve", "marshal") for n in names):
                        problems.append(f"{where}:{node.lineno}: imports {names}")
            for call, name in _calls(tree):
                keywords = {k.arg: k.value for k in call.keywords}
                if name.endswith("load_model"):
                    safe = keywords.get("safe_mode")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        problems.append(f"{where}:{call.lineno}: {name} without safe_mode=True")
                if name in ("np.load", "numpy.load") and not (isinstance(keywords.get("allow_pickle"), ast.Constant)
                                                              and keywords["allow_pickle"].value is False):
                    if "allow_pickle" in keywords:
                        problems.append(f"{where}:{call.lineno}: np.load with allow_pickle")
                if name in ("yaml.load", "yaml.unsafe_load", "torch.load", "eval", "exec") or \
                        name.endswith("enable_unsafe_deserialization"):
                    problems.append(f"{where}:{call.lineno}: {name}")
    assert not problems, "\n".join(problems)
    FIGURES["safe_loading"] = {"checked": list(SOURCE_DIRS), "problems": problems}
