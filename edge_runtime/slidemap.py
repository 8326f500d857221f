"""`oncolite slidemap PATIENT_DIR --model MODEL`: an IDC patient's patches back in place, as a PNG.

Each patch `<patient>_idx5_x<X>_y<Y>_class<C>.png` goes back at its (X, Y) in the slide; two
panels side by side show the tissue tinted by the model's predicted IDC probability and by the
ground-truth class, on the same blue (no IDC) -> red (IDC) scale, so a pathologist sees where
the model thinks IDC is and where it is. Pillow only: it runs on the edge install.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edge_runtime.atomic import atomic_path
from edge_runtime.backends import BACKENDS
from edge_runtime.console import add_output_flags, print_json, progress, result
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, ImageError, ModelError, OncoliteError
from edge_runtime.idc import IDC_POSITIVE, parse_idc_name
from edge_runtime.preprocess import open_image

PATCH_SIZE = 50  # the IDC release's patch side, in slide pixels
TINT = 0.45  # how much of the colour shows over the tissue
HEADER = 28
# Blue (0, no IDC) -> yellow (0.5) -> red (1, IDC).
_STOPS = np.array([0.0, 0.5, 1.0])
_COLOURS = np.array([[40, 90, 230], [250, 220, 60], [220, 30, 30]], dtype=np.float64)


@dataclass
class Patch:
    path: str
    x: int
    y: int
    truth: int
    probability: float | None = None
    predicted_idc: bool | None = None  # the model's decision (threshold-aware)


def add_arguments(parser) -> None:
    # The model first, as in predict, serve, bench, info and webapp; or --model, as in predict.
    parser.add_argument("paths", nargs="+", metavar="MODEL PATIENT_DIR",
                        help="an IDC .tflite model (labels include 'idc', or binary), then one IDC patient's folder "
                             "(its 0/ and 1/ subfolders are searched)")
    parser.add_argument("--model", help="the .tflite model (instead of giving it first)")
    parser.add_argument("--out", help="output PNG (default: slidemap_<patient>.png in the current folder)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter")
    parser.add_argument("--threads", type=int, help="interpreter threads")
    parser.add_argument("--max-side", type=int, default=4096, help="shrink the PNG so no side exceeds this (default 4096)")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.model import EdgeModel

    given = ([args.model] if args.model else []) + args.paths
    if len(given) != 2:
        raise OncoliteError("give the model and one patient's folder: slidemap MODEL PATIENT_DIR")
    args.model, args.patient_dir = given
    patches, malformed = find_patches(args.patient_dir)
    model = EdgeModel.load(args.model, backend=args.backend, threads=args.threads)
    positive = positive_index(model)
    failed = predict_patches(model, patches, positive, quiet=args.quiet or args.json)
    placed = [p for p in patches if p.probability is not None]
    if not placed:
        raise OncoliteError(f"{args.patient_dir}: none of the {len(patches)} patches could be read; check the files")
    patient = parse_idc_name(placed[0].path)[0]
    out = Path(args.out or f"slidemap_{patient}.png")
    image = render(placed)
    if max(image.size) > args.max_side:
        image.thumbnail((args.max_side, args.max_side), Image.Resampling.LANCZOS)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    summary = summarize(patient, placed, model)
    summary.update(out=os.fsdecode(out), malformed=malformed, failed=failed)
    if args.json:
        print_json(summary)
    else:
        result(args, f"{out}: {len(placed)} patches of patient {patient}, {summary['width']}x{summary['height']} slide px; "
                     f"predicted IDC in {summary['predicted_idc']}, ground truth IDC in {summary['true_idc']}, "
                     f"agreement {summary['agreement']:.1%}")
        for line in malformed + [f["error"] for f in failed]:
            # Under --quiet stdout holds the result alone: what was skipped is said on stderr.
            print(f"  skipped: {line}", file=sys.stderr if args.quiet else sys.stdout)
    return EXIT_SOME_FAILED if failed or malformed else EXIT_OK


def find_patches(patient_dir) -> tuple[list[Patch], list[str]]:
    """Every IDC-named PNG under the folder (sorted), and the PNG names that do not parse."""
    patches, malformed = [], []
    if not os.path.isdir(patient_dir):
        raise OncoliteError(f"{patient_dir}: not a folder; pass one IDC patient's folder (e.g. IDC_regular_ps50_idx5/10253)")
    for root, dirs, names in os.walk(patient_dir, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if not name.lower().endswith(".png"):
                continue
            parsed = parse_idc_name(name)
            path = os.path.join(root, name)
            if parsed is None:
                malformed.append(f"{path}: name is not <patient>_idx5_x<X>_y<Y>_class<C>.png")
            else:
                patches.append(Patch(path, parsed[1], parsed[2], parsed[3]))
    if not patches:
        raise OncoliteError(f"{patient_dir}: no IDC patches (<patient>_idx5_x<X>_y<Y>_class<C>.png) found; "
                            "pass one patient's folder")
    return patches, malformed


def positive_index(model) -> int:
    if IDC_POSITIVE in model.labels:
        return model.labels.index(IDC_POSITIVE)
    if model.num_classes == 2:
        return 1  # the IDC release's class 1
    raise ModelError(f"{model.path}: labels {model.labels} have no {IDC_POSITIVE!r}; pass an IDC model")


def predict_patches(model, patches: list[Patch], positive: int, quiet: bool = False) -> list[dict]:
    """Fill each patch's predicted IDC probability; return the unreadable ones (the rest go on)."""
    failed = []
    for patch in progress(patches, desc="slidemap", quiet=quiet, unit="patch"):
        try:
            probs = model.predict_file(patch.path)
            patch.probability = float(probs[positive])
            patch.predicted_idc = model.decide(probs) == positive
        except ImageError as e:
            failed.append({"file": patch.path, "error": str(e)})
    return failed


def heat(values: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> RGB colours (float), blue -> yellow -> red."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    return np.stack([np.interp(values, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def layers(patches: list[Patch]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(tissue RGB, predicted probability, ground truth) on the slide grid, NaN where no patch,
    and the slide coordinates of the grid's top-left corner."""
    left, top = min(p.x for p in patches), min(p.y for p in patches)
    width = max(p.x for p in patches) - left + PATCH_SIZE
    height = max(p.y for p in patches) - top + PATCH_SIZE
    tissue = np.full((height, width, 3), 255, dtype=np.uint8)
    predicted = np.full((height, width), np.nan)
    truth = np.full((height, width), np.nan)
    for p in patches:
        pixels = np.asarray(open_image(p.path), dtype=np.uint8)[:PATCH_SIZE, :PATCH_SIZE]
        h, w = pixels.shape[:2]
        y, x = p.y - top, p.x - left
        tissue[y:y + h, x:x + w] = pixels
        predicted[y:y + h, x:x + w] = p.probability
        truth[y:y + h, x:x + w] = p.truth
    return tissue, predicted, truth, (left, top)


def tint(tissue: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Tissue with the heat colour of `values` blended in where a patch is."""
    out = tissue.astype(np.float64)
    covered = ~np.isnan(values)
    out[covered] = (1 - TINT) * out[covered] + TINT * heat(values[covered])
    return np.round(out).astype(np.uint8)


def render(patches: list[Patch]) -> Image.Image:
    """Two panels with a title strip each: predicted IDC probability | ground truth."""
    tissue, predicted, truth, _ = layers(patches)
    height, width = tissue.shape[:2]
    gap = 10
    canvas = Image.new("RGB", (2 * width + gap, height + HEADER), "white")
    canvas.paste(Image.fromarray(tint(tissue, predicted)), (0, HEADER))
    canvas.paste(Image.fromarray(tint(tissue, truth)), (width + gap, HEADER))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "predicted P(IDC)", fill="black")
    draw.text((width + gap + 4, 2), "ground truth (red = IDC)", fill="black")
    bar = heat(np.linspace(0, 1, 64))
    for i, colour in enumerate(bar):
        draw.line([(4 + i, HEADER - 9), (4 + i, HEADER - 3)], fill=tuple(int(c) for c in colour))
    draw.text((72, HEADER - 14), "0 -> 1", fill="black")
    return canvas


def summarize(patient: str, patches: list[Patch], model) -> dict:
    truth = [bool(p.truth) for p in patches]
    decided = [bool(p.predicted_idc) for p in patches]
    xs, ys = [p.x for p in patches], [p.y for p in patches]
    return {"patient": patient, "patches": len(patches), "width": max(xs) - min(xs) + PATCH_SIZE,
            "height": max(ys) - min(ys) + PATCH_SIZE, "true_idc": sum(truth), "predicted_idc": sum(decided),
            "agreement": float(np.mean([d == t for d, t in zip(decided, truth)])), "threshold": model.threshold}
