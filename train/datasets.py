"""One loader for every dataset layout oncolite knows; the layout is detected or forced.

Layouts:
- `folders`: class folders at any depth, label = the image's folder name.
- `busi`: the original BUSI release, class folders with `<image>_mask[_N].png` lesion masks
  beside the images: masks are not inputs, they are remembered per image in `meta["masks"]`.
- `breakhis`: the BreakHis release, `.../benign|malignant/SOB/<subtype>/<patient>/<mag>X/`
  `SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png`; patient, magnification and subtype come
  from the file name; group = patient.
- `breakhis-folds`: a BreakHis `Folds.csv` (columns fold, mag, grp, filename; filename relative
  to the CSV), every image once with its published fold sides in `meta["folds"]`.
- `idc`: IDC patches, `<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`; group = patient.
- `csv`: `path,label[,group][,split]`, paths relative to the CSV.

Ingestion only reads names (never pixels), so 280,000 IDC patches load in seconds. Files that
do not fit the layout are listed in `Dataset.skipped` with the reason, never fatal.
"""

from __future__ import annotations

import csv
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.errors import OncoliteError
from edge_runtime.idc import IDC_LABELS, parse_idc_name
from edge_runtime.preprocess import is_image_name

LAYOUTS = ("folders", "busi", "breakhis", "breakhis-folds", "idc", "csv")
LABEL_SCHEMES = ("binary", "subtype")
# The layouts whose labels come from a label scheme (BreakHis' file names carry both); every other
# layout's labels are the data's own (class folders, a CSV's label column, IDC's class digit).
SCHEMED_LAYOUTS = ("breakhis", "breakhis-folds")
AS_IS = "as-is"

# BreakHis tumour types: code in the file name -> (binary label, subtype folder name).
BREAKHIS_TYPES = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
BREAKHIS_MAGNIFICATIONS = (40, 100, 200, 400)
_BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<tumor>[BM])_(?P<code>[A-Z]+)-(?P<patient>\d+-[A-Za-z0-9]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE)
BREAKHIS_NAME_FORM = "SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png"
_MASK_STEM = re.compile(r"^(?P<image>.+?)_mask(?:_\d+)?$")
FOLDS_CSV_COLUMNS = ("fold", "mag", "grp", "filename")


class DatasetError(OncoliteError):
    """A dataset folder or CSV that cannot be read as any layout."""


@dataclass
class Record:
    path: str  # absolute
    label: str
    group: str | None = None  # patient (or CSV group); None: the image is its own group
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Dataset:
    root: Path
    layout: str
    labels: list[str]
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    label_scheme: str = AS_IS  # how `labels` were made: a LABEL_SCHEMES name, or the data's own labels

    def relative(self, path: str) -> str:
        """A record's path relative to the dataset root, with forward slashes (reports, manifests)."""
        return Path(os.path.relpath(path, self.root)).as_posix()


@dataclass
class _Folder:
    path: str  # absolute
    parts: tuple[str, ...]  # relative to the root
    files: list[str]


def load_dataset(root, layout: str | None = None, *, label_scheme: str = "binary",
                 magnification=None) -> Dataset:
    """Read a dataset's file names and labels. `layout=None` detects it.

    `label_scheme` and `magnification` (ints, e.g. [40, 100]; None = all) apply to BreakHis.
    """
    root = Path(root).expanduser().resolve()
    if layout is not None and layout not in LAYOUTS:
        raise DatasetError(f"{root}: unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    if label_scheme not in LABEL_SCHEMES:
        raise DatasetError(f"{root}: unknown label scheme {label_scheme!r}; use one of {', '.join(LABEL_SCHEMES)}")
    if not root.exists():
        raise DatasetError(f"{root}: not found; give a dataset folder or CSV")
    magnifications = _magnifications(magnification)
    # A folder holding a Folds.csv is read through it unless a folder layout is forced.
    if root.is_file() or layout in ("csv", "breakhis-folds") or (layout is None and _table(root) is not None):
        dataset = _load_table(root, layout, label_scheme, magnifications)
    else:
        skipped: list[Skipped] = []
        folders = list(walk_folders(root, skipped))
        layout = layout or detect_layout(root, folders)
        parse = {"folders": _parse_folders, "busi": _parse_busi, "breakhis": _parse_breakhis, "idc": _parse_idc}
        if layout not in parse:
            raise DatasetError(f"{root}: layout {layout!r} needs a CSV file, not a folder")
        records, masks = parse[layout](folders, skipped, label_scheme=label_scheme, magnifications=magnifications)
        dataset = _finish(root, layout, records, skipped, masks)
    if dataset.layout in SCHEMED_LAYOUTS:
        dataset.label_scheme = label_scheme
    return dataset


def _finish(root: Path, layout: str, records, skipped, masks) -> Dataset:
    if not records:
        raise DatasetError(f"{root}: no images found for layout {layout!r} ({len(skipped)} files skipped); "
                           f"check the folder, or force a layout ({', '.join(LAYOUTS)})")
    records.sort(key=lambda r: r.path)
    skipped.sort(key=lambda s: s.path)
    return Dataset(root, layout, label_order(layout, {r.label for r in records}), records, skipped, sorted(masks))


def label_order(layout: str, labels: set[str]) -> list[str]:
    """Model output order. Sorted, except IDC: its file names' class<0|1> fix ("non_idc", "idc"),
    which also makes "idc" the positive class of binary metrics and thresholds."""
    if layout == "idc":
        return [label for label in IDC_LABELS if label in labels]
    return sorted(labels)


def _magnifications(value) -> tuple[int, ...] | None:
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        mags = tuple(sorted({int(str(m).strip().upper().rstrip("X")) for m in items}))
    except ValueError:
        raise DatasetError(f"magnification {value!r}: give numbers such as 40,100") from None
    unknown = [m for m in mags if m not in BREAKHIS_MAGNIFICATIONS]
    if unknown:
        raise DatasetError(f"magnification {unknown}: BreakHis has {BREAKHIS_MAGNIFICATIONS}")
    return mags


def walk_folders(root: Path, skipped: list[Skipped]):
    """Every folder under root with its file names; symlink loops and unreadable folders are skipped.

    os.scandir reads names and types without a stat per file, which is what makes IDC fast.
    """
    seen: set[tuple[int, int]] = set()
    stack = [(str(root), ())]
    while stack:
        path, parts = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:  # a symlink back into the tree
                skipped.append(Skipped(path, "folder already visited (symlink loop); not read twice"))
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as entries:
                files, subdirs = [], []
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir, is_file = entry.is_dir(), entry.is_file()
                    except OSError as e:  # a self-looping symlink: ELOOP on stat; the folder's other files stay
                        reason = "symlink loop" if e.errno == errno.ELOOP else f"cannot read ({e.strerror or e})"
                        skipped.append(Skipped(entry.path, f"{reason}; fix or remove it"))
                        continue
                    if is_dir:
                        subdirs.append(entry.name)
                    elif is_file:
                        files.append(entry.name)
                    else:
                        skipped.append(Skipped(entry.path, "broken symlink or special file"))
        except OSError as e:
            skipped.append(Skipped(path, f"cannot read folder ({e.strerror or e})"))
            continue
        yield _Folder(path, parts, sorted(files))
        stack.extend((os.path.join(path, d), parts + (d,)) for d in sorted(subdirs, reverse=True))


def _table(root: Path) -> Path | None:
    """The CSV a dataset path stands for: the file itself, or a folder's Folds.csv."""
    if root.is_file():
        return root
    return root / "Folds.csv" if (root / "Folds.csv").is_file() else None


def detect_layout(root, folders: list[_Folder] | None = None) -> str:
    """The layout of a dataset path: a CSV's by its columns, a folder's by what most image names fit
    (IDC or BreakHis names, BUSI masks, else class folders). `folders`: an existing walk of root.
    """
    root = Path(root).expanduser().resolve()
    table = _table(root)
    if table is not None:
        return "breakhis-folds" if set(FOLDS_CSV_COLUMNS) <= _read_csv(table)[1] else "csv"
    if folders is None:
        folders = list(walk_folders(root, []))
    names = [n for f in folders for n in f.files if is_image_name(n)]
    if not names:
        raise DatasetError(f"{root}: no image files found; layouts: {', '.join(LAYOUTS)} "
                           "(a CSV or Folds.csv is given as the file itself)")
    if sum(parse_idc_name(n) is not None for n in names) * 2 > len(names):
        return "idc"
    if sum(parse_breakhis_name(n) is not None for n in names) * 2 > len(names):
        return "breakhis"
    if any(_MASK_STEM.match(os.path.splitext(n)[0]) for n in names):
        return "busi"
    return "folders"


def _class_folder_images(folders, skipped, is_input=is_image_name):
    """(folder, name) for every image in a class folder; others are skipped with the reason."""
    for folder in folders:
        for name in folder.files:
            path = os.path.join(folder.path, name)
            if not is_image_name(name):
                if folder.parts:  # a README at the root is not a dataset file
                    skipped.append(Skipped(path, "not an image file extension"))
                continue
            if not folder.parts:
                skipped.append(Skipped(path, "image at the root, not in a class folder; move it into one"))
                continue
            if is_input(name):
                yield folder, name


def _parse_folders(folders, skipped, **_):
    records = [Record(os.path.join(f.path, n), f.parts[-1]) for f, n in _class_folder_images(folders, skipped)]
    return records, []


def _is_mask(name: str) -> bool:
    return _MASK_STEM.match(os.path.splitext(name)[0]) is not None


def _parse_busi(folders, skipped, **_):
    records = {}
    for folder, name in _class_folder_images(folders, skipped, is_input=lambda n: not _is_mask(n)):
        path = os.path.join(folder.path, name)
        records[path] = Record(path, folder.parts[-1], meta={"masks": []})
    masks = []
    for folder, name in _class_folder_images(folders, [], is_input=_is_mask):
        path = os.path.join(folder.path, name)
        stem, ext = os.path.splitext(name)
        image = os.path.join(folder.path, _MASK_STEM.match(stem)["image"] + ext)
        masks.append(path)
        if image in records:
            records[image].meta["masks"].append(path)
        else:
            skipped.append(Skipped(path, "mask with no image beside it"))
    return list(records.values()), masks


def parse_breakhis_name(name: str) -> dict | None:
    """`SOB_B_A-14-22549AB-40-001.png` -> tumor, subtype, patient `14-22549AB`, magnification 40, seq 1."""
    match = _BREAKHIS_NAME.match(os.path.basename(name))
    if match is None:
        return None
    code = match["code"].upper()
    if code not in BREAKHIS_TYPES or int(match["mag"]) not in BREAKHIS_MAGNIFICATIONS:
        return None
    tumor, subtype = BREAKHIS_TYPES[code]
    if tumor[0].upper() != match["tumor"].upper():
        return None  # e.g. SOB_B_DC: a benign code letter with a malignant type
    return {"tumor": tumor, "subtype": subtype, "patient": match["patient"],
            "magnification": int(match["mag"]), "seq": int(match["seq"])}


def _breakhis_record(path: str, parts, label_scheme, magnifications, skipped) -> Record | None:
    facts = parse_breakhis_name(path)
    if facts is None:
        skipped.append(Skipped(path, f"not a BreakHis file name ({BREAKHIS_NAME_FORM})"))
        return None
    lowered = {p.lower() for p in parts}
    other = {"benign": "malignant", "malignant": "benign"}[facts["tumor"]]
    if other in lowered and facts["tumor"] not in lowered:
        skipped.append(Skipped(path, f"file name says {facts['tumor']} but it is in a {other} folder"))
        return None
    folder_mags = {p.upper() for p in parts if re.fullmatch(r"\d+X", p, re.IGNORECASE)}
    if folder_mags and f"{facts['magnification']}X" not in folder_mags:
        skipped.append(Skipped(path, f"file name says {facts['magnification']}X but its folder says {sorted(folder_mags)}"))
        return None
    if magnifications is not None and facts["magnification"] not in magnifications:
        return None
    label = facts["tumor"] if label_scheme == "binary" else facts["subtype"]
    return Record(path, label, facts["patient"], facts)


def _parse_breakhis(folders, skipped, *, label_scheme, magnifications, **_):
    records = []
    for folder in folders:
        for name in folder.files:
            if not is_image_name(name):
                continue
            record = _breakhis_record(os.path.join(folder.path, name), folder.parts, label_scheme, magnifications, skipped)
            if record is not None:
                records.append(record)
    return records, []


def _parse_idc(folders, skipped, **_):
    records = []
    for folder in folders:
        in_class_folder = bool(folder.parts) and folder.parts[-1] in ("0", "1")
        for name in folder.files:
            if not is_image_name(name):
                continue
            path = os.path.join(folder.path, name)
            parsed = parse_idc_name(name)
            if parsed is None:
                skipped.append(Skipped(path, "not an IDC patch name (<patient>_idx5_x<X>_y<Y>_class<0|1>.png)"))
                continue
            patient, x, y, cls = parsed
            if in_class_folder and int(folder.parts[-1]) != cls:
                skipped.append(Skipped(path, f"file name says class {cls} but it is in folder {folder.parts[-1]}/"))
                continue
            if len(folder.parts) >= 2 and in_class_folder and folder.parts[-2] != patient:
                skipped.append(Skipped(path, f"file name says patient {patient} but it is in folder {folder.parts[-2]}/"))
                continue
            records.append(Record(path, IDC_LABELS[cls], patient, {"patient": patient, "x": x, "y": y}))
    return records, []


# ---- tables: a CSV of paths and labels, or BreakHis' Folds.csv ----

def _load_table(root: Path, layout, label_scheme, magnifications) -> Dataset:
    table = _table(root)
    if table is None:
        raise DatasetError(f"{root}: layout {layout!r} needs a CSV file; give its path")
    rows, columns = _read_csv(table)
    layout = layout or detect_layout(table)
    if layout == "breakhis-folds":
        records, skipped = _parse_folds_csv(table, rows, columns, label_scheme, magnifications)
    elif layout == "csv":
        records, skipped = _parse_path_csv(table, rows, columns)
    else:
        raise DatasetError(f"{table}: a CSV file is read as layout csv or breakhis-folds, not {layout!r}")
    return _finish(table.parent, layout, records, skipped, [])


def _read_csv(table: Path):
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
            columns = {(c or "").strip().lower() for c in reader.fieldnames or []}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{table}: cannot read the CSV ({e}); save it as UTF-8 comma-separated text") from None
    return rows, columns


def _parse_path_csv(table: Path, rows, columns):
    if not {"path", "label"} <= columns:
        raise DatasetError(f"{table}: needs a header with columns path,label[,group][,split]; found {sorted(columns)}")
    records, skipped = [], []
    for number, row in enumerate(rows, start=2):
        path = str((table.parent / row["path"]).resolve()) if row.get("path") else f"{table}:{number}"
        split = {"validation": "val", "valid": "val"}.get(row.get("split", "").lower(), row.get("split", "").lower())
        if not row.get("label"):
            skipped.append(Skipped(path, f"row {number}: no label"))
        elif not row.get("path") or not os.path.isfile(path):
            skipped.append(Skipped(path, f"row {number}: file not found"))
        elif "split" in columns and split not in ("train", "val", "test"):
            skipped.append(Skipped(path, f"row {number}: split {row.get('split')!r} is not train, val or test"))
        else:
            meta = {k: v for k, v in row.items() if k not in ("path", "label", "group") and k}
            if "split" in meta:
                meta["split"] = split
            records.append(Record(path, row["label"], row.get("group") or None, meta))
    return records, skipped


def _parse_folds_csv(table: Path, rows, columns, label_scheme, magnifications):
    if not set(FOLDS_CSV_COLUMNS) <= columns:
        raise DatasetError(f"{table}: a BreakHis Folds.csv needs columns {','.join(FOLDS_CSV_COLUMNS)}; found {sorted(columns)}")
    by_file: dict[str, dict] = {}
    skipped = []
    for number, row in enumerate(rows, start=2):
        path = str((table.parent / row["filename"]).resolve())
        entry = by_file.setdefault(path, {"folds": {}, "mag": row["mag"], "row": number})
        try:
            fold = int(row["fold"])
        except ValueError:
            skipped.append(Skipped(path, f"row {number}: fold {row['fold']!r} is not a number"))
            continue
        if row["grp"].lower() not in ("train", "test"):
            skipped.append(Skipped(path, f"row {number}: grp {row['grp']!r} is not train or test"))
            continue
        entry["folds"][fold] = row["grp"].lower()
    records = []
    for path, entry in by_file.items():
        if not os.path.isfile(path):
            skipped.append(Skipped(path, f"row {entry['row']}: file not found"))
            continue
        record = _breakhis_record(path, Path(path).parts, label_scheme, magnifications, skipped)
        if record is None:
            continue
        if str(record.meta["magnification"]) != entry["mag"].upper().rstrip("X"):
            skipped.append(Skipped(path, f"row {entry['row']}: mag {entry['mag']} but the file name says {record.meta['magnification']}"))
            continue
        record.meta["folds"] = dict(sorted(entry["folds"].items()))
        records.append(record)
    return records, skipped


def patients_crossing_folds(records, keep=None) -> list[dict]:
    """Patients with images on both sides of a published fold (`meta["folds"]` of breakhis-folds
    records; `keep`: record indices to look at, default all): [{"patient", "folds"}], by patient."""
    sides: dict[tuple[str, int], set] = {}
    for k in range(len(records)) if keep is None else keep:
        for fold, side in records[k].meta.get("folds", {}).items():
            sides.setdefault((records[k].group, fold), set()).add(side)
    crossing: dict[str, list[int]] = {}
    for (patient, fold), seen in sorted(sides.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if len(seen) > 1:
            crossing.setdefault(patient, []).append(fold)
    return [{"patient": p, "folds": f} for p, f in crossing.items()]


# ---- command-line options shared by audit and split ----

def add_dataset_arguments(parser) -> None:
    parser.add_argument("data", help="dataset folder, CSV (path,label[,group][,split]) or BreakHis Folds.csv")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="force a layout instead of detecting it")
    parser.add_argument("--label-scheme", choices=LABEL_SCHEMES, default="binary",
                        help="BreakHis: benign/malignant (binary) or the 8 tumour types (subtype)")
    parser.add_argument("--magnification", default=None,
                        help="BreakHis: keep these magnifications, e.g. 40 or 40,100 (default: all)")


def dataset_from_args(args) -> Dataset:
    return load_dataset(args.data, args.layout, label_scheme=args.label_scheme, magnification=args.magnification)
