"""`pip install .` (not -e) into a fresh venv outside the checkout, used from another directory.

The wheel is built from a copy of the checkout without the folders no package reads (.git, .venv,
data/, runs/, tests/, ...), so the build leaves nothing behind in the checkout. It is built by
this venv's pip and installed by the fresh venv's own pip, without dependencies: the fresh venv
sees this venv's site-packages through a .pth file (nothing is downloaded), but not its editable
install of oncolite, so every oncolite module, config, weight file and model comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import TL_VS_BR, planted_manifest

REPO = Path(__file__).resolve().parent.parent
NOT_PACKAGED = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "data", "docs", "reports",
                                      "runs", "scripts", "tests", "web")
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "CUDA_VISIBLE_DEVICES": "",
       "TF_CPP_MIN_LOG_LEVEL": "3"}
# The [train] extra's modules: an edge-only install has none of them.
TRAIN_EXTRA_MODULES = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "sklearn", "scipy", "matplotlib",
                       "imagehash", "h5py", "keras_tuner")

pytestmark = pytest.mark.slow


def run(cmd, cwd, timeout=600):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's python, its site-packages, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("pip-install")
    shutil.copytree(REPO, root / "src", ignore=NOT_PACKAGED)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", root / "dist", "./src"], cwd=root)
    run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    python = root / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *sorted((root / "dist").glob("*.whl"))],
        cwd=root)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    (site / "checkout-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return python, site, elsewhere


def test_the_install_is_one_namespace_with_its_data(installed):
    python, site, elsewhere = installed
    probe = ("import importlib.util, json, edge_runtime.resources as r, oncolite.train.config as c; "
             "print(json.dumps({'top': [n for n in ('train', 'quantize', 'benchmarks') if importlib.util.find_spec(n)], "
             "'checkout': str(r.CHECKOUT), 'weights': str(c.resolve_weights(1.0, 'imagenet')), "
             "'model': str(r.SHIPPED_MODEL), 'config': str(c.DEFAULTS_PATH)}))")
    found = json.loads(run([python, "-c", probe], cwd=elsewhere))
    assert found["top"] == []  # nothing named train, quantize or benchmarks in site-packages
    assert found["checkout"] == "None"
    for key in ("weights", "model", "config"):
        assert Path(found[key]).is_file() and Path(found[key]).is_relative_to(site / "oncolite"), found


def test_pip_install_trains_one_epoch_from_another_directory(installed, tmp_path):
    python, site, elsewhere = installed
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(4, 2, 2))
    sets = {"input_size": 32, "batch_size": 8, "head_epochs": 1, "finetune_epochs": 0}  # alpha 1.0: the shipped weights
    oncolite = python.parent / "oncolite"  # the console script the wheel installed
    out = run([oncolite, "train", "run", "--manifest", manifest, "--quiet", "--json",
               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], cwd=elsewhere)
    summary = json.loads(out)
    assert summary["epochs"] == {"head": 1, "finetune": 0}
    assert (elsewhere / "run" / "models" / "float.keras").is_file()
    config = json.loads((elsewhere / "run" / "config.json").read_text())
    assert config["weights"] == "imagenet" and config["input_size"] == 32
    assert json.loads((elsewhere / "run" / "versions.json").read_text())["git_commit"] is None  # not a checkout


def test_edge_only_install_predicts_with_the_default_model_from_any_directory(installed, tmp_path):
    python, site, elsewhere = installed
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80), dtype=np.uint8)).save(image)
    # `python -m edge_runtime` with the [train] extra's modules made unimportable, as on a device.
    edge_only = (f"import runpy, sys; sys.modules.update(dict.fromkeys({TRAIN_EXTRA_MODULES!r})); "
                 "sys.argv[0] = 'edge_runtime'; runpy.run_module('edge_runtime', run_name='__main__', alter_sys=True)")
    records = [json.loads(line) for line in
               run([python, "-c", edge_only, "predict", image, "--json", "--quiet"], cwd=elsewhere).splitlines()]
    model = next(r for r in records if r["type"] == "model")
    result = next(r for r in records if r["type"] == "result")
    assert Path(model["model"]) == site / "oncolite" / "models" / "busi" / "int8.tflite"
    assert model["labels"] == ["benign", "malignant", "normal"]
    assert result["label"] in model["labels"] and sum(result["probabilities"].values()) == pytest.approx(1, abs=0.02)
