"""`oncolite split DATA`: a leak-free, stratified, group-aware split and k-fold CV, saved as a manifest.

A group is a duplicate group from the audit (pHash / identical pixels) joined with the patient
(BreakHis, IDC, a CSV's group column): no group is ever on two sides. Outer folds come from
StratifiedGroupKFold; for fold i the test side is fold i and the validation side is the first
held-out part of an inner StratifiedGroupKFold over the rest. Groups holding more than one label
are excluded by default. `--random` makes every image its own group: the naive split of the
literature, to show how much leakage inflates results.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from edge_runtime.console import print_json, result, say
from edge_runtime.errors import EXIT_OK, OncoliteError
from .audit import Audit, add_audit_arguments, audit_from_args
from .config import FOLDS_HELP, ONE_SPLIT_PARTS
from .datasets import patients_crossing_folds
from .duplicates import components
from .manifest import MANIFEST_FORMAT, find_leak, write_manifest


class SplitError(OncoliteError):
    """A dataset that cannot be split as asked (too few groups, no published folds...)."""


def merged_groups(audit: Audit, keep: list[int], use_duplicates: bool = True, use_patients: bool = True) -> list[str]:
    """Group name per kept record: duplicate groups and patients joined (connected components).

    A group is named after its patient(s) when it has any, else `g<k>` in record order.
    """
    records = audit.dataset.records
    n = len(keep)
    dup_ids = {g: n + k for k, g in enumerate(dict.fromkeys(audit.group[keep].tolist()))} if use_duplicates else {}
    patients = [records[k].group for k in keep] if use_patients else [None] * n
    patient_ids = {p: n + len(dup_ids) + k for k, p in enumerate(dict.fromkeys(p for p in patients if p is not None))}
    i, j = [], []
    for local, k in enumerate(keep):
        if use_duplicates:
            i.append(local), j.append(dup_ids[int(audit.group[k])])
        if patients[local] is not None:
            i.append(local), j.append(patient_ids[patients[local]])
    component = components(n + len(dup_ids) + len(patient_ids), np.asarray(i, dtype=np.int64),
                           np.asarray(j, dtype=np.int64))[:n]
    names_of: dict[int, set] = {}
    for local, c in enumerate(component.tolist()):
        names_of.setdefault(c, set())
        if patients[local] is not None:
            names_of[c].add(patients[local])
    numbered = {c: f"g{k}" for k, c in enumerate(dict.fromkeys(component.tolist()))}
    return ["+".join(sorted(names_of[c])) if names_of[c] else numbered[c] for c in component.tolist()]


def _strata(labels: list[str], magnifications: list | None) -> np.ndarray:
    keys = labels if magnifications is None else [f"{label}@{m}" for label, m in zip(labels, magnifications)]
    return np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1)


def _held_out(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, what: str, asked_by: str, fix):
    """Index arrays (rest, held_out) of each fold of a StratifiedGroupKFold.

    asked_by: the option that set n_splits, as the user typed it; fix(most): what to change when
    at most `most` folds can be made."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(f"{what}: {n_groups} groups cannot make {n_splits} folds ({asked_by}); {fix(n_groups)}")
    largest = int(np.bincount(y).max())
    if largest < n_splits:
        raise SplitError(f"{what}: no class has {n_splits} images to spread over {n_splits} folds ({asked_by}); "
                         f"{fix(largest)}")
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)


def inner_folds(folds: int, val_fraction: float) -> int:
    """How many inner folds make the first one about `val_fraction` of the whole data."""
    return max(2, round((1 - 1 / folds) / val_fraction))


def _val_side(sides: np.ndarray, y, groups, val_fraction: float, seed: int, folds: int, what: str) -> None:
    """Turn part of the train side into the val side, group-aware (in place)."""
    if val_fraction <= 0:
        return
    rest = np.flatnonzero(sides == "train")
    n = inner_folds(folds, val_fraction)

    def fix(most: int) -> str:
        # inner_folds <= most once val_fraction >= (1 - 1/folds) / most
        if most < 2:
            return "add data"
        return f"use --val-fraction {math.ceil(100 * (1 - 1 / folds) / most) / 100:g} or more, or add data"

    asked_by = f"--val-fraction {val_fraction:g} makes the val side 1 of {n} parts of the training side"
    _, val = next(iter(_held_out(y[rest], groups[rest], n, seed, what, asked_by, fix)))
    sides[rest[val]] = "val"


def group_kfold_sides(y: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float, seed: int) -> list[np.ndarray]:
    """Per fold, the side of every item ("train", "val" or "test"). `folds` 1 is one split: fold 0
    of ONE_SPLIT_PARTS, the very sides that fold has in a ONE_SPLIT_PARTS-fold split."""
    if folds < 1:
        raise SplitError(f"--folds {folds}: need at least 1 (1: one train/val/test split; K: K-fold cross-validation)")
    parts = folds if folds > 1 else ONE_SPLIT_PARTS
    asked_by = f"--folds {folds}" if folds > 1 else f"--folds 1 holds 1 of {parts} parts out for test"
    outer = _held_out(y, groups, parts, seed, "outer split", asked_by,
                      lambda most: f"use --folds {most} or fewer, or add data" if most >= 2 and folds > 1 else "add data")
    out = []
    for fold, (_, test) in zip(range(folds), outer):
        sides = np.full(len(y), "train", dtype=object)
        sides[test] = "test"
        _val_side(sides, y, groups, val_fraction, seed, parts, f"fold {fold} validation split")
        out.append(sides)
    return out


def published_fold_sides(records, keep, y, groups, val_fraction: float, seed: int):
    """BreakHis Folds.csv: its train/test sides as given, val carved from train by group."""
    fold_ids = sorted({f for k in keep for f in records[k].meta.get("folds", {})})
    if not fold_ids:
        raise SplitError("--use-folds-csv needs a BreakHis Folds.csv (layout breakhis-folds)")
    out = []
    for fold in fold_ids:
        sides = np.array([records[k].meta["folds"][fold] for k in keep], dtype=object)
        _val_side(sides, y, groups, val_fraction, seed, len(fold_ids), f"published fold {fold} validation split")
        out.append(sides)
    return fold_ids, out


def _excluded(audit: Audit, keep_conflicts: bool) -> dict[int, str]:
    """record index -> why it is left out of the manifest."""
    ds = audit.dataset
    out = {k: f"unreadable: {f.reason}" for k, f in enumerate(audit.facts) if not f.ok}
    if not keep_conflicts:
        members = audit.members()
        for g in audit.conflicts:
            listing = ", ".join(f"{ds.relative(ds.records[k].path)} ({ds.records[k].label})" for k in members[g])
            for k in members[g]:
                out[k] = f"cross-label duplicate group: {listing}"
    return out


def build_manifest(audit: Audit, folds: int = 5, val_fraction: float = 0.1, seed: int = 0, random: bool = False,
                   keep_conflicts: bool = False, use_folds_csv: bool = False, command: str = "",
                   magnification=None) -> dict:
    ds = audit.dataset
    records = ds.records
    excluded = _excluded(audit, keep_conflicts)
    crossing: list[dict] = []
    if use_folds_csv:
        keep = [k for k in range(len(records)) if k not in excluded]
        crossing = patients_crossing_folds(records, keep)
        crossers = {c["patient"] for c in crossing}
        for k in keep:
            if records[k].group in crossers:
                excluded[k] = "patient crosses the published folds (on train and test of one fold)"
    keep = [k for k in range(len(records)) if k not in excluded]
    if not keep:
        raise SplitError(f"{ds.root}: every image was excluded ({len(excluded)}); see `oncolite audit`")
    labels = [records[k].label for k in keep]
    mags = [records[k].meta.get("magnification") for k in keep]
    stratify_mag = ds.layout.startswith("breakhis") and len(set(mags)) > 1
    y = _strata(labels, mags if stratify_mag else None)
    audit_groups = merged_groups(audit, keep)
    given = [records[k].meta.get("split") for k in keep]
    if random:
        groups = [f"i{k}" for k in range(len(keep))]
    elif use_folds_csv:
        groups = merged_groups(audit, keep, use_duplicates=False)
    else:
        groups = audit_groups
    group_array = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    if use_folds_csv:
        kind, fold_ids, cv = "published", *published_fold_sides(records, keep, y, group_array, val_fraction, seed)
        folds = len(cv)
    elif all(given):
        kind, fold_ids, cv = "given", None, [np.asarray(given, dtype=object)]
        folds = 1
    else:
        kind, fold_ids = ("random" if random else "group"), None
        cv = group_kfold_sides(y, group_array, folds, val_fraction, seed)
    items = []
    for local, k in enumerate(keep):
        record = records[k]
        meta = {key: value for key, value in record.meta.items() if key not in ("split",)}
        if "masks" in meta:
            meta["masks"] = [ds.relative(m) for m in meta["masks"]]
        if random:
            meta["audit_group"] = audit_groups[local]
        item = {"path": ds.relative(record.path), "sha256": audit.facts[k].file_sha256, "label": record.label,
                "group": groups[local], "split": str(cv[0][local]), "meta": meta}
        if folds > 1:
            item["cv"] = [str(sides[local]) for sides in cv]
        items.append(item)
    if kind == "given":
        leak = find_leak(items)
        if leak:
            raise SplitError(f"{ds.root}: the given split leaks: {leak}; drop the split column to let oncolite split")
    n_conflict = sum(reason.startswith("cross-label") for reason in excluded.values())
    return {
        "format": MANIFEST_FORMAT,
        "command": command,
        "root": str(ds.root),
        "labels": ds.labels,
        "seed": seed,
        "split": {"kind": kind, "folds": folds, "val_fraction": val_fraction, "test_fold": 0,
                  "stratify": ["label", "magnification"] if stratify_mag else ["label"],
                  "groups": "none (each image its own)" if random else
                            ("patient" if use_folds_csv else "duplicate groups joined with patients"),
                  **({"published_folds": fold_ids, "patients_crossing_folds": crossing} if use_folds_csv else {})},
        "dataset": {"layout": ds.layout, "label_scheme": ds.label_scheme, "magnification": magnification,
                    "images": len(records), "skipped_at_ingest": len(ds.skipped)},
        "audit": {**audit.settings, "conflicts_excluded": not keep_conflicts, "conflict_groups": len(audit.conflicts),
                  "conflict_images_excluded": n_conflict, "near_duplicate_pairs": int(len(audit.near_pairs[0]))},
        "excluded": [{"path": ds.relative(records[k].path), "reason": reason} for k, reason in sorted(excluded.items())],
        "summary": summarize(items, ds.labels, folds),
        "items": items,
    }


def missing_label_warnings(manifest: dict) -> list[str]:
    """One line per fold and side that holds images but none of some labels: a train side like
    that cannot learn them (`oncolite train` refuses it), a val side cannot select a model for
    them, a test side cannot measure them."""
    split = manifest["split"]
    published = split.get("published_folds")
    assigned = {"published": "as Folds.csv assigns it", "given": "as the CSV's split column assigns it"}.get(split["kind"])
    consequence = {"train": "`oncolite train` refuses it", "val": "early stopping cannot see them",
                   "test": "its metrics cannot cover them"}
    # Published folds: train and test as given, val carved from train here; given: all as the CSV says.
    remedy = {"train": assigned or "fewer --folds or another --seed",
              "val": assigned if split["kind"] == "given" else "a larger --val-fraction or another --seed",
              "test": assigned or "fewer --folds or another --seed"}
    warnings = []
    for fold, sides in enumerate(manifest["summary"]):
        name = "the split" if split["folds"] == 1 else f"fold {fold}"
        if published:
            name += f" (Folds.csv fold {published[fold]})"
        for side, counts in sides.items():
            missing = [label for label, n in counts.items() if not n]
            if missing and any(counts.values()):
                warnings.append(f"{name}: the {side} side has no images of {', '.join(missing)}; {consequence[side]} "
                                f"({remedy[side]}, or more data)")
    return warnings


def summarize(items: list[dict], labels: list[str], folds: int) -> list[dict]:
    """Per fold: images per side and per label on each side."""
    out = []
    for fold in range(folds):
        side_of = (lambda item: item["split"]) if folds == 1 else (lambda item, f=fold: item["cv"][f])
        counts = Counter((side_of(item), item["label"]) for item in items)
        out.append({side: {label: counts[(side, label)] for label in labels} for side in ("train", "val", "test")})
    return out


# ---- command line ----

def add_arguments(parser) -> None:
    add_audit_arguments(parser)
    parser.add_argument("--out", default="manifest.json", help="manifest to write (default manifest.json)")
    parser.add_argument("--folds", type=int, default=5, metavar="K",
                        help=f"{FOLDS_HELP}; fold 0 is the manifest's split (default 5)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of all images on the val side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", action="store_true", help="ignore duplicate groups and patients (the naive, leaky split)")
    parser.add_argument("--keep-conflicts", action="store_true", help="keep duplicate groups that hold more than one label")
    parser.add_argument("--use-folds-csv", action="store_true", help="BreakHis Folds.csv: keep its published folds")


def main(args) -> int:
    audit = audit_from_args(args)
    manifest = build_manifest(audit, args.folds, args.val_fraction, args.seed, args.random, args.keep_conflicts,
                              args.use_folds_csv, args.command_line, args.magnification)
    sha = write_manifest(manifest, args.out)
    first = manifest["summary"][0]
    sides = {side: sum(counts.values()) for side, counts in first.items()}
    crossing = manifest["split"].get("patients_crossing_folds", [])
    warnings = [f"patient {c['patient']} crosses published folds {c['folds']}: excluded" for c in crossing]
    warnings += missing_label_warnings(manifest)
    summary = {"out": args.out, "sha256": sha, "kind": manifest["split"]["kind"], "folds": manifest["split"]["folds"],
               "items": len(manifest["items"]), "excluded": len(manifest["excluded"]),
               "conflict_images_excluded": manifest["audit"]["conflict_images_excluded"], "fold0": sides,
               "patients_crossing_folds": crossing, "warnings": warnings}
    # On stderr even with --quiet or --json: a split that cannot train must not pass unnoticed.
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(summary)
    say(args, f"{'the split' if summary['folds'] == 1 else 'fold 0'}: train {sides['train']}, val {sides['val']}, "
              f"test {sides['test']}",
        f"excluded {summary['excluded']} images ({summary['conflict_images_excluded']} in cross-label duplicate groups)")
    folds = "one split" if summary["folds"] == 1 else f"{summary['folds']} folds"
    result(args, f"manifest: {args.out} (sha256 {sha[:12]}...): {summary['items']} images, {folds} ({summary['kind']})")
    return EXIT_OK
