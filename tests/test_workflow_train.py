"""Issue 20, items 5 and 8 on the training side: a split whose training side lacks a label is
refused before anything is written; `oncolite train --help` answers without TensorFlow; TensorFlow's
import noise is filtered; every epoch shows a per-batch progress bar unless --quiet/--json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.errors import ManifestError
from edge_runtime.hashing import file_sha256
from tests.datatrees import noise, save
from oncolite.train.config import load_config
from oncolite.train.manifest import load_manifest, write_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = {"input_size": 32, "alpha": 0.35, "weights": None, "batch_size": 4, "head_epochs": 1, "finetune_epochs": 0}
# The environment of a user who has not set TF_CPP_MIN_LOG_LEVEL (the tests' conftest sets it).
USER_ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
            "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}


def two_fold_manifest(folder: Path) -> Path:
    """Labels a, b, c, 4 images each; fold 1 has every c image on its val side, none in training."""
    items = []
    for label in ("a", "b", "c"):
        for i in range(4):
            path = save(folder / "images" / f"{label}{i}.png", noise(len(items)))
            fold0 = "val" if i == 0 else "train"
            fold1 = "val" if label == "c" or i == 1 else "train"
            items.append({"path": f"images/{path.name}", "sha256": file_sha256(path), "label": label,
                          "group": path.name, "split": fold0, "cv": [fold0, fold1], "meta": {}})
    manifest = {"format": "oncolite-manifest/1", "root": str(folder), "labels": ["a", "b", "c"], "seed": 0,
                "split": {"kind": "group", "folds": 2, "test_fold": 0}, "items": items}
    write_manifest(manifest, folder / "manifest.json")
    return folder / "manifest.json"


def oncolite(*argv, env=USER_ENV, cwd=REPO_ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "oncolite", *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- a label with no training images

def test_a_fold_without_training_images_of_a_label_is_refused_before_anything_is_written(tmp_path):
    from oncolite.train.train import train_folds, train_run

    manifest = load_manifest(two_fold_manifest(tmp_path))
    config = load_config(overrides=TINY)
    with pytest.raises(ManifestError) as caught:
        train_run(tmp_path / "run", manifest, config, {"manifest": str(manifest.path)}, fold=1, quiet=True)
    assert str(caught.value) == (
        f"{manifest.path}: fold 1 has no training images of c; rebuild it with `oncolite split` "
        "(fewer --folds, another --seed) or add images of those labels")
    with pytest.raises(ManifestError, match="fold 1 has no training images of c"):
        train_folds(tmp_path / "cv", manifest, config, {"manifest": str(manifest.path)}, 2, quiet=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cv").exists()


def test_the_command_refuses_it_in_one_line(tmp_path):
    path = two_fold_manifest(tmp_path)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    result = oncolite("train", tmp_path / "run", "--manifest", path, "--folds", 2, *sets, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"oncolite train: error: {path}: fold 1 has no training images of c; rebuild it with " \
                            "`oncolite split` (fewer --folds, another --seed) or add images of those labels\n"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- TensorFlow only when needed, and quiet

def test_train_help_imports_no_tensorflow_and_prints_nothing_on_stderr():
    probe = ("import sys\nfrom oncolite.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('tensorflow', 'tf_keras', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], env=USER_ENV, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--manifest" in result.stdout
    assert result.stdout.splitlines()[-1] == "LOADED []" and result.stderr == ""


def test_tensorflows_own_import_lines_obey_the_log_level(capfd):
    from edge_runtime.console import native_stderr_filtered

    lines = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"I0000 00:00:1.5 7701 port.cc:153] oneDNN custom operations are on.\n"
             b"W0000 00:00:1.6 7701 x.cc:1] a warning\n"
             b"E0000 00:00:1.7 7701 x.cc:2] an error\n"
             b"a line of its own\n")
    shown = {}
    for level in (0, 1, 3):
        with native_stderr_filtered(level):
            os.write(2, lines)
        shown[level] = capfd.readouterr().err
    assert shown[0] == lines.decode()
    assert shown[1] == "W0000 00:00:1.6 7701 x.cc:1] a warning\nE0000 00:00:1.7 7701 x.cc:2] an error\na line of its own\n"
    assert shown[3] == "a line of its own\n"


def test_tensorflow_found_before_it_is_imported_still_imports_quietly():
    """A command that first only asks whether TensorFlow is installed (the .tflite backends do)
    and imports it later prints none of its import-time INFO lines either."""
    probe = ("import importlib.util\n"
             "from edge_runtime.cli import quiet_tensorflow_logs\n"
             "with quiet_tensorflow_logs():\n"
             "    assert importlib.util.find_spec('tensorflow') is not None\n"
             "    import tensorflow\n")
    env = {k: v for k, v in USER_ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "oneDNN" not in result.stderr and "cuda" not in result.stderr, result.stderr[-2000:]


def test_the_users_log_level_is_kept(monkeypatch):
    from edge_runtime.cli import quiet_tensorflow_logs

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    with quiet_tensorflow_logs():
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    with quiet_tensorflow_logs():
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


def planted_manifest(folder: Path) -> Path:
    items = []
    for label in ("a", "b"):
        for side, count in (("train", 8), ("val", 4)):
            for i in range(count):
                path = save(folder / "images" / f"{label}_{side}_{i}.png", noise(len(items)))
                items.append({"path": f"images/{path.name}", "sha256": file_sha256(path), "label": label,
                              "group": path.name, "split": side, "meta": {}})
    write_manifest({"format": "oncolite-manifest/1", "root": str(folder), "labels": ["a", "b"], "seed": 0,
                    "split": {"kind": "given", "folds": 1}, "items": items}, folder / "manifest.json")
    return folder / "manifest.json"


def test_quiet_training_prints_its_result_line_and_nothing_on_stderr_not_even_tensorflows_import_lines(tmp_path):
    """--quiet: nothing but errors and the result, the one line naming the model and its headline
    figure (issue 16's contract)."""
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    result = oncolite("train", tmp_path / "run", "--manifest", planted_manifest(tmp_path), "--quiet", *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    model = tmp_path / "run" / "models" / "float.keras"
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1, result.stdout
    assert result.stdout.startswith(f"{model}: best val_mcc ") and result.stdout.endswith("(head epoch 1, val 8 images)\n")
    assert model.exists()


def test_each_epoch_shows_a_per_batch_progress_bar_unless_quiet(tmp_path, capsys, monkeypatch):
    from edge_runtime import console
    from oncolite.train.train import train_run

    monkeypatch.setattr(console, "_is_terminal", lambda stream: True)  # a bar is for a terminal (see test_cli)
    manifest = load_manifest(planted_manifest(tmp_path))
    config = load_config(overrides={**TINY, "finetune_epochs": 1})
    train_run(tmp_path / "run", manifest, config, {"manifest": str(manifest.path)}, quiet=False)
    err = capsys.readouterr().err
    # 16 training images in batches of 4, 8 validation images: bars of 4 and 2 batches, moving
    # within the epoch (the first batch, which traces the graph, takes far over tqdm's 0.1 s).
    for bar in ("head epoch 1/1", "finetune epoch 1/1"):
        assert f"{bar}:   0%" in err and f"{bar}:  25%" in err and "1/4 [" in err, err[-2000:]
        assert f"{bar} validation:   0%" in err and "0/2 [" in err
    train_run(tmp_path / "quiet", manifest, config, {"manifest": str(manifest.path)}, quiet=True)
    assert capsys.readouterr().err == ""
