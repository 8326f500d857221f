"""Tiny synthetic dataset trees that copy the real layouts' naming exactly (for the data tests)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def noise(seed: int, size: int = 32) -> np.ndarray:
    """A random RGB image: its pHash is far (about 32 bits) from any other seed's."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def near_copy(pixels: np.ndarray) -> np.ndarray:
    """The same picture slightly brighter: a near duplicate (pHash distance 0-2), not an exact one."""
    return np.clip(pixels.astype(int) + 3, 0, 255).astype(np.uint8)


def folder_tree(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for c, (label, n) in enumerate(counts.items()):
        for k in range(n):
            save(root / label / f"{label} ({k + 1}).png", noise(seed + 1000 * c + k))
    return root


def busi_tree(root: Path) -> Path:
    """The original BUSI release: `benign (1).png` with `benign (1)_mask.png` (and `_mask_1`) beside it."""
    for c, label in enumerate(("benign", "malignant", "normal")):
        for k in range(1, 4):
            save(root / label / f"{label} ({k}).png", noise(100 * c + k))
            save(root / label / f"{label} ({k})_mask.png", np.zeros((32, 32, 3), dtype=np.uint8))
    save(root / "benign" / "benign (1)_mask_1.png", np.zeros((32, 32, 3), dtype=np.uint8))
    return root


BREAKHIS_PATIENTS = [  # (tumour code letter, type code, subtype folder, patient)
    ("B", "A", "adenosis", "14-22549AB"),
    ("B", "F", "fibroadenoma", "14-9133"),
    ("B", "PT", "phyllodes_tumor", "14-21998CD"),
    ("B", "TA", "tubular_adenoma", "14-3411F"),
    ("B", "F", "fibroadenoma", "14-23060AB"),
    ("B", "A", "adenosis", "14-29960CD"),
    ("M", "DC", "ductal_carcinoma", "14-2523"),
    ("M", "LC", "lobular_carcinoma", "14-12204"),
    ("M", "MC", "mucinous_carcinoma", "14-19979"),
    ("M", "PC", "papillary_carcinoma", "15-9146"),
    ("M", "DC", "ductal_carcinoma", "14-10926"),
    ("M", "DC", "ductal_carcinoma", "13-8914"),
]


def breakhis_path(root: Path, tumor: str, code: str, subtype: str, patient: str, mag: int, seq: int) -> Path:
    klass = {"B": "benign", "M": "malignant"}[tumor]
    return (root / "BreaKHis_v1" / "histology_slides" / "breast" / klass / "SOB" / subtype
            / f"SOB_{tumor}_{code}_{patient}" / f"{mag}X" / f"SOB_{tumor}_{code}-{patient}-{mag}-{seq:03d}.png")


def breakhis_tree(root: Path, mags=(40, 100), per_mag: int = 2) -> list[Path]:
    paths = []
    for p, (tumor, code, subtype, patient) in enumerate(BREAKHIS_PATIENTS):
        for m, mag in enumerate(mags):
            for seq in range(1, per_mag + 1):
                paths.append(save(breakhis_path(root, tumor, code, subtype, patient, mag, seq),
                                  noise(10_000 + 100 * p + 10 * m + seq)))
    return paths


def write_folds_csv(root: Path, paths: list[Path], folds: int = 5, seed: int = 0) -> Path:
    """A BreakHis Folds.csv (fold, mag, grp, filename): patient-wise train/test per fold."""
    rng = np.random.default_rng(seed)
    patients = sorted({p.parent.parent.name for p in paths})
    rows = []
    for fold in range(1, folds + 1):
        test = set(rng.choice(patients, size=len(patients) // 3, replace=False).tolist())
        for path in paths:
            mag = path.parent.name[:-1]
            grp = "test" if path.parent.parent.name in test else "train"
            rows.append([fold, mag, grp, path.relative_to(root).as_posix()])
    table = root / "Folds.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "mag", "grp", "filename"])
        writer.writerows(rows)
    return table


def idc_tree(root: Path, patients=("10253", "8863"), per_class: int = 3) -> list[tuple[str, int, int, int]]:
    """`<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`, 50x50 patches; returns what was planted."""
    planted = []
    for p, patient in enumerate(patients):
        for cls in (0, 1):
            for k in range(per_class):
                x, y = 1 + 50 * k, 51 + 50 * (cls + 2 * p)
                save(root / patient / str(cls) / f"{patient}_idx5_x{x}_y{y}_class{cls}.png", noise(p * 100 + cls * 10 + k, 50))
                planted.append((patient, x, y, cls))
    return planted
