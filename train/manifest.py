"""The split manifest: every file with its sha256, label, group and side, plus how it was made.

Format `oncolite-manifest/1` (DEVELOPERS.md). `load_manifest` refuses a manifest that would
train on something other than what it says: missing files, changed files (sha256), labels
outside `labels`, or a group (duplicate group or patient) on two sides of any fold. A CSV with
`path,label[,group],split` is accepted too and checked the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.atomic import write_json
from edge_runtime.console import progress
from edge_runtime.errors import ManifestError, OncoliteError
from edge_runtime.hashing import bytes_sha256, file_sha256

MANIFEST_FORMAT = "oncolite-manifest/1"
SIDES = ("train", "val", "test")


@dataclass
class Manifest:
    path: Path
    root: Path  # absolute
    labels: list[str]
    items: list[dict]  # as stored: paths relative to root
    meta: dict = field(default_factory=dict)  # everything but the items
    sha256: str = ""  # of the manifest file's bytes

    @property
    def folds(self) -> int:
        return len(self.items[0]["cv"]) if self.items and self.items[0].get("cv") else 1

    def absolute(self, item: dict) -> str:
        return str(self.root / item["path"])

    def sides(self, fold: int | None = None) -> dict[str, list[dict]]:
        """{"train": [...], "val": [...], "test": [...]} for `fold` (None: the manifest's `split`).

        Items are copies whose `path` is absolute.
        """
        if fold is not None and not 0 <= fold < self.folds:
            raise ManifestError(f"{self.path}: fold {fold} asked, the manifest has {self.folds}; use 0..{self.folds - 1}")
        out: dict[str, list[dict]] = {side: [] for side in SIDES}
        for item in self.items:
            side = item.get("split") if fold is None else item["cv"][fold]
            if side in out:
                out[side].append({**item, "path": self.absolute(item)})
        return out


def write_manifest(manifest: dict, path) -> str:
    """Write atomically with `root` made relative to the manifest's folder; returns the file's sha256."""
    path = Path(path).resolve()
    root = Path(manifest["root"]).resolve()
    manifest = {**manifest, "root": Path(os.path.relpath(root, path.parent)).as_posix()}
    write_json(path, manifest)
    return file_sha256(path)


def load_manifest(path, verify: bool = True, check_hashes: bool = True, quiet: bool = True) -> Manifest:
    """Read a manifest (.json) or a split CSV (.csv); with `verify`, refuse anything unsafe to train on."""
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() == ".csv":
        manifest = manifest_from_csv(path, quiet=quiet)
        check_hashes = False  # just computed from the files themselves
    else:
        manifest = _read_json(path)
    if verify:
        verify_manifest(manifest, check_hashes=check_hashes, quiet=quiet)
    return manifest


def _read_json(path: Path) -> Manifest:
    try:
        data = path.read_bytes()
        obj = json.loads(data)
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; make one with `oncolite split DATA --out {path.name}`") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not a readable JSON manifest ({e}); rebuild it with `oncolite split`") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not an {MANIFEST_FORMAT} manifest; rebuild it with `oncolite split`")
    for key in ("root", "labels", "items"):
        if key not in obj:
            raise ManifestError(f"{path}: no {key!r} in the manifest; rebuild it with `oncolite split`")
    root = (path.parent / obj["root"]).resolve()
    meta = {k: v for k, v in obj.items() if k != "items"}
    return Manifest(path, root, list(obj["labels"]), obj["items"], meta, bytes_sha256(data))


def verify_manifest(manifest: Manifest, check_hashes: bool = True, quiet: bool = True) -> None:
    where = manifest.path
    if not manifest.items:
        raise ManifestError(f"{where}: lists no items; rebuild it with `oncolite split`")
    labels = set(manifest.labels)
    bad_labels = sorted({str(item.get("label")) for item in manifest.items} - labels)
    if bad_labels:
        raise ManifestError(f"{where}: labels {bad_labels} are not in the manifest's labels {manifest.labels}; "
                            "fix the items or the labels list")
    _check_sides(manifest)
    missing = [item["path"] for item in manifest.items if not os.path.isfile(manifest.absolute(item))]
    if missing:
        raise ManifestError(f"{where}: {len(missing)} listed files are missing under {manifest.root} (first: {missing[0]}); "
                            "restore them or rebuild the manifest with `oncolite split`")
    if check_hashes:
        changed = [item["path"] for item in progress(manifest.items, desc="checking sha256", quiet=quiet, unit="file")
                   if file_sha256(manifest.absolute(item)) != item.get("sha256")]
        if changed:
            raise ManifestError(f"{where}: {len(changed)} files changed since the manifest was made (sha256 differs; "
                                f"first: {changed[0]}); restore them or rebuild the manifest with `oncolite split`")
    leak = find_leak(manifest.items, manifest.meta.get("split", {}).get("test_fold", 0))
    if leak:
        raise ManifestError(f"{where}: {leak}; a duplicate group or patient must stay on one side: "
                            "rebuild the manifest with `oncolite split`")


def _check_sides(manifest: Manifest) -> None:
    folds = manifest.folds
    for item in manifest.items:
        sides = [item.get("split")] + list(item.get("cv") or [])
        if item.get("split") not in SIDES or any(s not in SIDES for s in sides) or len(item.get("cv") or [None] * folds) != folds:
            raise ManifestError(f"{manifest.path}: item {item.get('path')} has sides {sides}, expected one of "
                                f"{SIDES} for split and each of {folds} folds; rebuild it with `oncolite split`")


def find_leak(items: list[dict], test_fold: int = 0) -> str | None:
    """A description of the first group found on two sides of the split or of any fold, else None.

    With folds, `split` is fold `test_fold` (the fold a run without --fold trains on): an item's
    `split` and its side in that fold are two sightings of its group in one view, so moving any
    group (even a one-image group) in one but not the other is a group on two sides."""
    folds = len(items[0].get("cv") or []) if items else 0
    if folds:
        views = [(f"fold {k}" + (" (the manifest's split)" if k == test_fold else ""),
                  lambda item, k=k: [item["cv"][k]] + ([item["split"]] if k == test_fold else []))
                 for k in range(folds)]
    else:
        views = [("split", lambda item: [item["split"]])]
    for name, sides_of in views:
        side_by_group: dict[str, tuple[str, str]] = {}
        for item in items:
            group = item.get("group") or item["path"]
            for side in sides_of(item):
                first = side_by_group.setdefault(group, (side, item["path"]))
                if first[0] != side:
                    return (f"group {group!r} is on two sides in {name}: {first[1]} ({first[0]}) "
                            f"and {item['path']} ({side})")
    return None


def manifest_from_csv(path: Path, quiet: bool = True) -> Manifest:
    """A `path,label[,group],split` CSV as an in-memory manifest (sha256 computed now)."""
    from .datasets import load_dataset

    try:
        dataset = load_dataset(path, "csv")
    except OncoliteError as e:
        raise ManifestError(str(e)) from None
    if dataset.skipped:
        first = dataset.skipped[0]
        raise ManifestError(f"{path}: {len(dataset.skipped)} rows unusable (first: {first.path}: {first.reason}); fix the CSV")
    if any("split" not in r.meta for r in dataset.records):
        raise ManifestError(f"{path}: needs a split column (train/val/test) to be used as a manifest; "
                            "or make one with `oncolite split`")
    items = [{"path": dataset.relative(r.path),
              "sha256": file_sha256(r.path), "label": r.label, "group": r.group or dataset.relative(r.path),
              "split": r.meta["split"], "meta": {k: v for k, v in r.meta.items() if k != "split"}}
             for r in progress(dataset.records, desc="hashing files", quiet=quiet, unit="file")]
    meta = {"format": MANIFEST_FORMAT, "root": str(dataset.root), "labels": dataset.labels,
            "split": {"kind": "given", "folds": 1, "source": str(path)}}
    return Manifest(path, dataset.root, dataset.labels, items, meta, file_sha256(path))
