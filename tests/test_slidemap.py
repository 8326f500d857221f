"""IDC slide map: patches go back to their x/y; the probability and truth panels show the right cells."""

import json

import numpy as np
import pytest
from PIL import Image

from edge_models import model_file
from edge_runtime.cli import main
from edge_runtime.errors import EXIT_SOME_FAILED
from edge_runtime.idc import IDC_LABELS
from edge_runtime.model import EdgeModel
from edge_runtime.slidemap import HEADER, PATCH_SIZE, TINT, find_patches, heat, layers, predict_patches

PATIENT = "10253"
PLANTED = (351, 151)  # x, y of the planted IDC patch
ORIGIN = (51, 1)  # the smallest x and y in the grid below


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    root = tmp_path_factory.mktemp("idc") / PATIENT
    rng = np.random.default_rng(0)
    for x in range(ORIGIN[0], 400, 50):
        for y in range(ORIGIN[1], 250, 50):
            cls = int((x, y) == PLANTED)
            pixels = np.full((50, 50, 3), 235, np.uint8) if cls else rng.integers(0, 120, (50, 50, 3), dtype=np.uint8)
            if cls:
                pixels[:, :, 1:] = 20  # a red square: easy to find in the mosaic
            (root / str(cls)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / str(cls) / f"{PATIENT}_idx5_x{x}_y{y}_class{cls}.png")
    (root / "0" / "10253_idx5_xbad.png").write_bytes(b"malformed name")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_file(tmp_path_factory.mktemp("idc-model"), "int8", labels=IDC_LABELS)


def test_planted_patch_is_at_its_place(patient, model):
    patches, malformed = find_patches(patient)
    assert len(patches) == 35 and len(malformed) == 1
    edge = EdgeModel.load(model)
    predict_patches(edge, patches, positive=1, quiet=True)
    tissue, predicted, truth, origin = layers(patches)
    assert origin == ORIGIN and tissue.shape == (250, 350, 3)
    x, y = PLANTED[0] - ORIGIN[0], PLANTED[1] - ORIGIN[1]
    assert (tissue[y:y + PATCH_SIZE, x:x + PATCH_SIZE] == [235, 20, 20]).all()
    assert (truth == 1).sum() == PATCH_SIZE * PATCH_SIZE and (truth[y:y + PATCH_SIZE, x:x + PATCH_SIZE] == 1).all()
    planted = next(p for p in patches if (p.x, p.y) == PLANTED)
    expected = edge.predict_file(planted.path)[1]
    assert planted.probability == pytest.approx(expected)
    np.testing.assert_allclose(predicted[y:y + PATCH_SIZE, x:x + PATCH_SIZE], expected)


def test_cli_writes_the_png_with_both_panels(patient, model, tmp_path, capsys):
    out = tmp_path / "map.png"
    code = main(["slidemap", str(patient), "--model", str(model), "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == EXIT_SOME_FAILED  # the malformed name is skipped and listed
    assert summary["patches"] == 35 and summary["true_idc"] == 1 and len(summary["malformed"]) == 1
    image = np.asarray(Image.open(out).convert("RGB"))
    width = 350
    assert image.shape == (250 + HEADER, 2 * width + 10, 3)
    # Ground-truth panel: the planted cell is tinted red (IDC), a cell elsewhere blue.
    x, y = PLANTED[0] - ORIGIN[0], PLANTED[1] - ORIGIN[1]
    cell = image[HEADER + y + 25, width + 10 + x + 25].astype(float)
    np.testing.assert_allclose(cell, (1 - TINT) * np.array([235, 20, 20]) + TINT * heat(1.0), atol=1)


def test_no_patches_is_a_clear_error(tmp_path, model, capsys):
    assert main(["slidemap", str(tmp_path), "--model", str(model)]) == 2
    assert "no IDC patches" in capsys.readouterr().err
