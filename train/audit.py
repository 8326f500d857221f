"""`oncolite audit DATA`: what is in a dataset before anyone trains on it.

Counts per class (for histology sets also patients per class, images per magnification and
patients crossing the published folds of a BreakHis Folds.csv); sizes, modes, bit depths;
unreadable, truncated or non-image files (listed, never fatal); masks; exact duplicates (sha256
of the decoded pixels); near duplicates (pHash, Hamming <= threshold); duplicate groups
(connected components of both); cross-label conflicts (a group holding more than one label);
per-class intensity statistics and histograms.
Writes audit.json, audit.md and intensity.png into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.atomic import write_json, write_text
from edge_runtime.console import add_output_flags, old_spelling, print_json, printable, progress, result, say
from edge_runtime.errors import EXIT_OK, ImageError
from edge_runtime.hashing import bytes_sha256, file_sha256
from edge_runtime.preprocess import open_image
from edge_runtime.resources import shown
from .datasets import Dataset, add_dataset_arguments, dataset_from_args, patients_crossing_folds
from .duplicates import components, equal_value_pairs, near_duplicate_pairs
from .plots import pyplot, save_png

AUDIT_FORMAT = "oncolite-audit/1"
HASH_NAME = "phash"
_BITS_PER_MODE = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "CMYK": 8, "YCbCr": 8, "LAB": 8, "HSV": 8,
                  "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_FROM = 64


@dataclass
class ImageFacts:
    ok: bool
    reason: str = ""
    file_sha256: str = ""
    pixel_sha256: str = ""
    phash: np.ndarray | None = None  # bool bits
    format: str = ""
    mode: str = ""
    bits: int = 0
    width: int = 0
    height: int = 0
    mean: float = 0.0  # grayscale intensity, 0..255
    std: float = 0.0
    histogram: np.ndarray | None = None  # 256 grayscale counts; dropped once pooled per class


def inspect_image(path: str, hash_size: int = 8) -> ImageFacts:
    """Everything the audit needs from one file; an unreadable file gives ok=False and the reason."""
    import imagehash  # heavy-ish; only the workers need it

    try:
        sha = file_sha256(path)
        with Image.open(path) as im:
            fmt, mode = im.format or "", im.mode
        rgb = open_image(path)
    except ImageError as e:
        return ImageFacts(False, str(e).split(": ", 1)[-1])
    except OSError as e:
        return ImageFacts(False, f"cannot read ({e.strerror or e})")
    except Exception as e:  # PIL raises many types for hostile files; the audit must go on
        return ImageFacts(False, f"not an image file or unsupported format ({type(e).__name__})")
    pixels = np.asarray(rgb)
    gray = np.asarray(rgb.convert("L"))
    pixel_sha = bytes_sha256(f"{pixels.shape}".encode() + pixels.tobytes())
    phash = imagehash.phash(rgb, hash_size=hash_size).hash.reshape(-1)
    return ImageFacts(True, "", sha, pixel_sha, phash, fmt, mode, _BITS_PER_MODE.get(mode, 8),
                      rgb.width, rgb.height, float(gray.mean()), float(gray.std()),
                      np.bincount(gray.reshape(-1), minlength=256))


def _inspect_star(item):
    return inspect_image(*item)


def inspect_all(paths: list[str], hash_size: int = 8, workers: int = 2, quiet: bool = True):
    """ImageFacts per path, in order; decoded and hashed by `workers` processes."""
    items = [(p, hash_size) for p in paths]
    bar = dict(total=len(items), desc="hashing images", quiet=quiet, unit="img")
    if workers <= 1 or len(items) < _PARALLEL_FROM:
        yield from progress(map(_inspect_star, items), **bar)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(256, len(items) // (workers * 16)))
        yield from progress(pool.map(_inspect_star, items, chunksize=chunk), **bar)


@dataclass
class Audit:
    dataset: Dataset
    settings: dict
    facts: list[ImageFacts]  # one per dataset record
    group: np.ndarray  # duplicate-group id per record; unreadable records have their own
    near_pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # i, j, distance
    conflicts: list[int] = field(default_factory=list)  # group ids holding more than one label
    histograms: dict = field(default_factory=dict)  # label -> 256 grayscale counts
    seconds: float = 0.0

    def members(self) -> dict[int, list[int]]:
        """group id -> record indices, for groups of more than one image."""
        out: dict[int, list[int]] = {}
        for k, g in enumerate(self.group.tolist()):
            out.setdefault(g, []).append(k)
        return {g: m for g, m in out.items() if len(m) > 1}


def audit_dataset(dataset: Dataset, threshold: int = 6, hash_size: int = 8, workers: int = 2,
                  quiet: bool = True) -> Audit:
    start = time.perf_counter()
    labels = [r.label for r in dataset.records]
    facts, histograms = [], {label: np.zeros(256, dtype=np.int64) for label in dataset.labels}
    for label, fact in zip(labels, inspect_all([r.path for r in dataset.records], hash_size, workers, quiet)):
        if fact.ok:
            histograms[label] += fact.histogram
            fact.histogram = None  # pooled: at IDC scale per-image histograms would not fit
        facts.append(fact)
    readable = [k for k, f in enumerate(facts) if f.ok]
    n_bits = hash_size * hash_size
    bits = np.array([facts[k].phash for k in readable], dtype=bool).reshape(len(readable), n_bits)
    ni, nj, nd = near_duplicate_pairs(bits, threshold)
    index = np.asarray(readable, dtype=np.int64)
    near = (index[ni], index[nj], nd)
    ei, ej = equal_value_pairs([f.pixel_sha256 if f.ok else None for f in facts])
    group = components(len(facts), np.r_[near[0], ei], np.r_[near[1], ej])
    audit = Audit(dataset, {"hash": HASH_NAME, "hash_size": hash_size, "threshold": threshold},
                  facts, group, near, histograms=histograms)
    audit.conflicts = sorted(g for g, m in audit.members().items() if len({labels[k] for k in m}) > 1)
    audit.seconds = time.perf_counter() - start
    return audit


# ---- the report ----

def _rel(audit: Audit, k: int) -> str:
    return audit.dataset.relative(audit.dataset.records[k].path)


def _group_entry(audit: Audit, members: list[int]) -> dict:
    records = audit.dataset.records
    return {"size": len(members), "labels": dict(sorted(Counter(records[k].label for k in members).items())),
            "images": [{"path": _rel(audit, k), "label": records[k].label} for k in members]}


def _exact_groups(audit: Audit) -> list[list[int]]:
    by_pixels: dict[str, list[int]] = {}
    for k, f in enumerate(audit.facts):
        if f.ok:
            by_pixels.setdefault(f.pixel_sha256, []).append(k)
    return [m for m in by_pixels.values() if len(m) > 1]


def histology(ds: Dataset) -> dict:
    """Patients per class, images per magnification and class, and patients crossing the
    published folds, for the layouts whose file names carry them (BreakHis, IDC); else {}."""
    out: dict = {}
    patients = {label: set() for label in ds.labels}
    for r in ds.records:
        if r.meta.get("patient") is not None:
            patients[r.label].add(r.meta["patient"])
    if any(patients.values()):
        out["patients"] = {"total": len(set().union(*patients.values())),
                           "per_class": {label: len(p) for label, p in patients.items()}}
    magnifications = Counter((r.meta["magnification"], r.label) for r in ds.records if "magnification" in r.meta)
    if magnifications:
        out["magnifications"] = {f"{m}X": {label: magnifications[(m, label)] for label in ds.labels}
                                 for m in sorted({m for m, _ in magnifications})}
    if any("folds" in r.meta for r in ds.records):
        out["published_folds"] = {"folds": sorted({f for r in ds.records for f in r.meta.get("folds", {})}),
                                  "patients_crossing_folds": patients_crossing_folds(ds.records)}
    return out


def report(audit: Audit, command: str = "", max_listed_pairs: int = 10_000) -> dict:
    """The audit as a JSON-ready dict (paths relative to the dataset root)."""
    ds, facts = audit.dataset, audit.facts
    ok = [f for f in facts if f.ok]
    records = ds.records
    i, j, d = audit.near_pairs
    groups = audit.members()
    counts = Counter(r.label for r in records)
    intensity = {}
    for label in ds.labels:
        means = np.array([f.mean for r, f in zip(records, facts) if f.ok and r.label == label])
        stds = np.array([f.std for r, f in zip(records, facts) if f.ok and r.label == label])
        if means.size:
            intensity[label] = {"images": int(means.size), "mean": round(float(means.mean()), 2),
                                "mean_sd": round(float(means.std()), 2), "contrast": round(float(stds.mean()), 2)}
    conflict_images = sum(len(groups[g]) for g in audit.conflicts)
    return {
        "format": AUDIT_FORMAT,
        "command": command,
        "data": shown(Path(ds.root).resolve()),
        "layout": ds.layout,
        "settings": audit.settings,
        "images": len(records),
        "readable": len(ok),
        "labels": ds.labels,
        "counts": {label: counts[label] for label in ds.labels},
        **histology(ds),
        "skipped_at_ingest": [{"path": ds.relative(s.path), "reason": s.reason} for s in ds.skipped],
        "unreadable": [{"path": _rel(audit, k), "reason": f.reason} for k, f in enumerate(facts) if not f.ok],
        "sizes": _counted(f"{f.width}x{f.height}" for f in ok),
        "modes": _counted(f.mode for f in ok),
        "bit_depths": _counted(str(f.bits) for f in ok),
        "formats": _counted(f.format for f in ok),
        "masks": {"files": len(ds.masks), "images_with_masks": sum(bool(r.meta.get("masks")) for r in records)},
        "exact_duplicates": {"groups": [[_rel(audit, k) for k in m] for m in _exact_groups(audit)]},
        "near_duplicates": {
            "pairs": int(len(i)),
            "cross_label_pairs": int(sum(records[a].label != records[b].label for a, b in zip(i.tolist(), j.tolist()))),
            "listed": [{"a": _rel(audit, a), "b": _rel(audit, b), "distance": int(dist)}
                       for a, b, dist in zip(i[:max_listed_pairs].tolist(), j[:max_listed_pairs].tolist(),
                                             d[:max_listed_pairs].tolist())],
        },
        "duplicate_groups": {"groups": len(groups), "images": sum(map(len, groups.values())),
                             "list": [_group_entry(audit, m) for m in groups.values()]},
        "conflicts": {"groups": len(audit.conflicts), "images": conflict_images,
                      "list": [_group_entry(audit, groups[g]) for g in audit.conflicts]},
        "intensity": intensity,
        "seconds": round(audit.seconds, 2),
    }


def _counted(values) -> dict:
    return dict(Counter(values).most_common())


def markdown(rep: dict) -> str:
    near, groups, conflicts = rep["near_duplicates"], rep["duplicate_groups"], rep["conflicts"]
    lines = [f"# Audit of `{rep['data']}`", "", "Made by:", "", "```", rep["command"], "```", "",
             f"Layout `{rep['layout']}`: {rep['images']} images, {rep['readable']} readable; "
             f"pHash {rep['settings']['hash_size']}x{rep['settings']['hash_size']}, near duplicate = "
             f"Hamming distance <= {rep['settings']['threshold']}.", "",
             "## Classes", ""]
    patients = rep.get("patients")
    if patients:
        lines += [f"{patients['total']} patients.", "", "| class | images | patients |", "| --- | --- | --- |"]
        lines += [f"| {label} | {n} | {patients['per_class'][label]} |" for label, n in rep["counts"].items()]
    else:
        lines += ["| class | images |", "| --- | --- |"]
        lines += [f"| {label} | {n} |" for label, n in rep["counts"].items()]
    if rep.get("magnifications"):
        lines += ["", "## Magnifications", "", "| magnification | " + " | ".join(rep["labels"]) + " | images |",
                  "| --- |" + " --- |" * (len(rep["labels"]) + 1)]
        lines += [f"| {m} | " + " | ".join(str(n) for n in row.values()) + f" | {sum(row.values())} |"
                  for m, row in rep["magnifications"].items()]
    if rep.get("published_folds"):
        crossing = rep["published_folds"]["patients_crossing_folds"]
        lines += ["", "## Published folds", "",
                  f"Folds {', '.join(map(str, rep['published_folds']['folds']))}; "
                  f"**patients on both sides of a fold: {len(crossing)}** "
                  "(`oncolite split --use-folds-csv` excludes them)."]
        lines += [f"- patient {c['patient']}: folds {', '.join(map(str, c['folds']))}" for c in crossing]
    lines += ["", "## Files", "",
              f"- sizes: {_top(rep['sizes'])}", f"- modes: {_top(rep['modes'])}",
              f"- bit depths: {_top(rep['bit_depths'])}", f"- formats: {_top(rep['formats'])}",
              f"- masks: {rep['masks']['files']} mask files, {rep['masks']['images_with_masks']} images with a mask",
              f"- unreadable, truncated or non-image: {len(rep['unreadable'])}",
              f"- skipped at ingestion (not fitting the layout): {len(rep['skipped_at_ingest'])}"]
    lines += [f"  - `{u['path']}`: {u['reason']}" for u in rep["unreadable"][:50]]
    lines += [f"  - `{s['path']}`: {s['reason']}" for s in rep["skipped_at_ingest"][:50]]
    lines += ["", "## Duplicates", "",
              f"- exact duplicates (same decoded pixels): {len(rep['exact_duplicates']['groups'])} groups",
              f"- near-duplicate pairs: {near['pairs']} ({near['cross_label_pairs']} across labels)",
              f"- duplicate groups (connected components): {groups['groups']} groups, {groups['images']} images",
              f"- **cross-label conflicts: {conflicts['groups']} groups, {conflicts['images']} images**", ""]
    for entry in conflicts["list"]:
        names = ", ".join(f"`{im['path']}` ({im['label']})" for im in entry["images"])
        lines.append(f"  - {names}")
    lines += ["", "## Intensity (grayscale 0-255, per class)", "", "| class | images | mean | sd of means | contrast (mean sd) |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {label} | {s['images']} | {s['mean']} | {s['mean_sd']} | {s['contrast']} |" for label, s in rep["intensity"].items()]
    lines += ["", "![intensity histograms](intensity.png)", "",
              f"Audit time: {rep['seconds']} s. Full lists in `audit.json`.", ""]
    return "\n".join(lines)


def _top(counts: dict, k: int = 5) -> str:
    items = list(counts.items())
    text = ", ".join(f"{key} ({n})" for key, n in items[:k])
    return text + (f", ... {len(items) - k} more" if len(items) > k else "") if items else "none"


def plot_intensity(audit: Audit, path) -> None:
    records, facts = audit.dataset.records, audit.facts
    fig, (hist_ax, box_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
    for label, counts in audit.histograms.items():
        if counts.sum():
            hist_ax.plot(np.arange(256), counts / counts.sum(), label=label)
    hist_ax.set(title="grayscale histogram per class", xlabel="intensity", ylabel="fraction of pixels")
    hist_ax.legend()
    labels = [label for label in audit.dataset.labels if audit.histograms[label].sum()]
    means = [[f.mean for r, f in zip(records, facts) if f.ok and r.label == label] for label in labels]
    box_ax.boxplot(means, tick_labels=labels)
    box_ax.set(title="mean intensity per image", ylabel="mean intensity")
    fig.tight_layout()
    save_png(fig, path)


def write_audit(audit: Audit, out_dir, command: str = "") -> dict:
    rep = report(audit, command)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "audit.json"), rep)
    # audit.json keeps non-UTF-8 names round-trippable (JSON escapes); the Markdown shows them as \\xNN.
    write_text(os.path.join(out_dir, "audit.md"), printable(markdown(rep)))
    plot_intensity(audit, os.path.join(out_dir, "intensity.png"))
    return rep


# ---- command line ----

def add_audit_arguments(parser) -> None:
    """Options shared by `audit` and `split` (which audits first)."""
    add_dataset_arguments(parser)
    parser.add_argument("--hash-distance", type=int, default=6, metavar="BITS",
                        help="near duplicate = pHash Hamming distance <= this (default 6)")
    # The old name; `--threshold` is evaluate's decision threshold (a probability).
    parser.add_argument("--threshold", dest="old_hash_distance", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hash-size", type=int, default=8, help="pHash side: 8 gives 64-bit hashes (default)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes that hash images")
    add_output_flags(parser)


def add_arguments(parser) -> None:
    add_audit_arguments(parser)
    parser.add_argument("--out", default="audit", help="report folder (default ./audit)")


def audit_from_args(args) -> Audit:
    if args.old_hash_distance is not None:
        old_spelling(args, f"--threshold {args.old_hash_distance}", f"--hash-distance {args.old_hash_distance}")
        args.hash_distance = args.old_hash_distance
    dataset = dataset_from_args(args)
    return audit_dataset(dataset, args.hash_distance, args.hash_size, args.workers, args.quiet or args.json)


def main(args) -> int:
    audit = audit_from_args(args)
    rep = write_audit(audit, args.out, args.command_line)
    crossing = rep.get("published_folds", {}).get("patients_crossing_folds", [])
    summary = {"out": args.out, "images": rep["images"], "unreadable": len(rep["unreadable"]),
               "near_duplicate_pairs": rep["near_duplicates"]["pairs"],
               "duplicate_groups": rep["duplicate_groups"]["groups"],
               "conflicts": rep["conflicts"]["groups"], "conflict_images": rep["conflicts"]["images"],
               "patients": rep.get("patients", {}).get("total"), "magnifications": rep.get("magnifications"),
               "patients_crossing_folds": crossing, "seconds": rep["seconds"]}
    # On stderr even with --quiet or --json, like split's: a leaking published split must not pass unnoticed.
    for c in crossing:
        print(f"warning: patient {c['patient']} crosses published folds {c['folds']}", file=sys.stderr)
    if args.json:
        print_json(summary)
    patients = []
    if summary["patients"]:
        mags = ", ".join(f"{m} {sum(row.values())}" for m, row in (summary["magnifications"] or {}).items())
        patients.append(f"{summary['patients']} patients" + (f"; images per magnification: {mags}" if mags else ""))
    say(args, f"{rep['images']} images ({', '.join(f'{k} {v}' for k, v in rep['counts'].items())}), "
              f"{len(rep['unreadable'])} unreadable, {len(rep['skipped_at_ingest'])} skipped", *patients)
    result(args, f"report: {os.path.join(args.out, 'audit.md')}: {summary['near_duplicate_pairs']} near-duplicate pairs, "
                 f"{summary['duplicate_groups']} duplicate groups, {summary['conflicts']} cross-label conflicts "
                 f"({summary['conflict_images']} images)")
    return EXIT_OK
