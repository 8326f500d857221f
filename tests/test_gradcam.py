"""Grad-CAM: on a model trained to find a bright square, the heatmap peaks where the square is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.cli import dispatch
from edge_runtime.preprocess import Preprocessing, preprocess
from test_train import PRETRAINED, planted_image, planted_manifest
from oncolite.train.config import load_config
from oncolite.train.manifest import load_manifest

QUADRANTS = ("tl", "tr", "bl", "br")
# "square": a bright square in a random quadrant; "none": noise only. The class evidence is the
# square itself, wherever it is, so its Grad-CAM must point at it.
SQUARE_OR_NOT = {"none": lambda rng: None, "square": lambda rng: QUADRANTS[rng.integers(4)]}


@pytest.fixture(scope="module")
def square_run(tmp_path_factory):
    from oncolite.train.train import train_run

    folder = tmp_path_factory.mktemp("gradcam")
    manifest = load_manifest(planted_manifest(folder, SQUARE_OR_NOT, counts=(40, 12, 0)))
    train_run(folder / "run", manifest, load_config(overrides={**PRETRAINED, "input_size": SIZE}), {"manifest": str(manifest.path)}, quiet=True)
    return folder


SIZE = 128  # MobileNetV2's last feature map is SIZE/32 cells a side: 4x4 resolves quadrants


def quadrant_heat(heatmap: np.ndarray) -> dict:
    """Mean heat per quadrant: at 4x4 cells the single hottest pixel may sit on a quadrant's
    edge, the quadrant's mass does not."""
    h, w = heatmap.shape[0] // 2, heatmap.shape[1] // 2
    return {f"{v}{u}": float(heatmap[i:i + h, j:j + w].mean()) for v, i in (("t", 0), ("b", h)) for u, j in (("l", 0), ("r", w))}


@pytest.mark.parametrize("quadrant", QUADRANTS)
def test_heatmap_peaks_in_the_planted_quadrant(square_run, quadrant):
    import tf_keras as keras
    from oncolite.train.gradcam import gradcam

    model = keras.models.load_model(square_run / "run" / "models" / "float.keras", safe_mode=True)
    image = square_run / f"probe_{quadrant}.png"
    planted_image(image, quadrant, np.random.default_rng(7))
    x = preprocess(image, Preprocessing(SIZE, SIZE))
    assert model.predict(x[None], verbose=0)[0].argmax() == 1  # "square"
    heatmap = gradcam(model, x, class_index=1)
    assert heatmap.shape == (SIZE, SIZE) and 0.0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)
    heat = quadrant_heat(heatmap)
    others = [v for k, v in heat.items() if k != quadrant]
    assert max(heat, key=heat.get) == quadrant and heat[quadrant] > 1.3 * max(others), heat


def test_explain_cli_writes_the_overlay(square_run, capsys):
    from oncolite.cli import COMMANDS

    image = square_run / "probe_cli.png"
    planted_image(image, "tr", np.random.default_rng(3))
    out = square_run / "explained.png"
    code = dispatch("oncolite", COMMANDS, ["explain", str(square_run / "run"), str(image), "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "square" and result["out"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The old spelling, IMAGE --run RUN_DIR, still works (here up to the layer it refuses).
    bad = dispatch("oncolite", COMMANDS, ["explain", str(image), "--run", str(square_run / "run"), "--layer", "nope"])
    assert bad == 2
