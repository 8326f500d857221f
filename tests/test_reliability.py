"""Bad input wherever input enters: preprocessing, model loading, manifests, train data loading,
and the `audit`, `split`, `train` and `predict` commands run as real subprocesses.

The contract (issue 9, DEVELOPERS.md): a good-but-odd file decodes to RGB the right way up; a
bad one is refused with ONE line naming the file (ImageError / ModelError / ManifestError, or a
row in the report), never a traceback; one bad file never stops a batch; exit codes say what
happened (0 all done, 1 some inputs failed, 2 nothing done). The corpus is tests/badinputs.py.

With ONCOLITE_WRITE_REPORTS=1 the figures go to reports/reliability/bad_inputs.json (the
source of docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import badinputs
from edge_runtime.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, ImageError, ManifestError, ModelError, OncoliteError
from edge_runtime.preprocess import Preprocessing, open_image, preprocess

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
       "TF_USE_LEGACY_KERAS": "1"}
DECODES = ("sixteen_bit_gray", "palette_transparency", "cmyk_jpeg", "exif_rotated", "animated_gif", "one_pixel",
           "non_utf8_name", "mpo_photo")
REFUSED = ("zero_bytes", "truncated_png", "truncated_jpeg", "text_as_png", "bomb_png", "memory_bomb_16bit",
           "tiff_decoder_type_error", "eps_as_png", "ppm_as_png")
SPECIAL = ("folder_named_png", "symlink_self_loop", "char_device", "fifo")
LABELS = ["benign", "malignant", "normal"]
# Lines TensorFlow's and LiteRT's C++ runtimes print on their own (absl "I0000 00:00:..." lines,
# "INFO: Created TensorFlow Lite XNNPACK delegate"): not ours to format.
NATIVE_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|INFO: |WARNING: All log messages before absl)")

FIGURES: dict = {"inputs": {}, "models": {}, "commands": {}, "skipped": {}}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1":
        from edge_runtime.atomic import write_json

        write_json(REPO_ROOT / "reports" / "reliability" / "bad_inputs.json",
                   {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability.py", **FIGURES})


def note(section: str, key: str, value) -> None:
    FIGURES[section][key] = value


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("corpus")
    samples = badinputs.image_corpus(folder / "images")
    special, skipped = badinputs.special_files(folder / "special")
    FIGURES["skipped"].update(skipped)
    return {s.name: s for s in samples + special}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A good int8 model with metadata and sidecar, and the broken ones made from it."""
    import edge_models

    folder = tmp_path_factory.mktemp("models")
    good = edge_models.model_file(folder / "good", "int8")
    bad = badinputs.model_corpus(folder / "bad", good)
    bad += badinputs.wrong_label_models(folder / "wrong", edge_models.tflite_bytes("fp32", 3), edge_models.LABELS)
    bad += badinputs.unhashed_sidecar_models(folder / "unhashed", edge_models.tflite_bytes("fp32", 3), edge_models.LABELS)
    return {"good": good, "bad": {s.name: s for s in bad}, "plain": edge_models.tflite_bytes("fp32", 3)}


def run_cli(*argv, timeout: float = 240, module: str = "oncolite") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(os.fsdecode, argv)], env=ENV, capture_output=True,
                          text=True, errors="backslashreplace", cwd=REPO_ROOT, timeout=timeout)


def our_stderr_lines(stderr: str) -> list[str]:
    """stderr without progress bars (carriage-return redrawn) and the native runtime's log lines."""
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and not NATIVE_LOG.match(line)]


def assert_one_line_error(result: subprocess.CompletedProcess, exit_code: int, names: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = our_stderr_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert result.returncode == exit_code, result.stderr
    assert names in lines[0], lines[0]
    return lines[0]


def in_thread(fn, timeout: float = 10):
    """(finished, result or exception): a call that may block forever (a FIFO) is abandoned."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box


def test_corpus_names_cover_every_sample(corpus):
    assert set(corpus) - set(FIGURES["skipped"]) <= set(DECODES) | set(REFUSED) | set(SPECIAL) | {"unreadable_chmod_000"}
    assert set(DECODES) | set(REFUSED) | set(SPECIAL) <= set(corpus)


# ---------------------------------------------------------------- preprocessing

def _rgb(corpus, name) -> np.ndarray:
    im = open_image(corpus[name].path)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_exif_rotated_jpeg_is_shown_the_right_way_up(corpus):
    pixels = _rgb(corpus, "exif_rotated")
    assert pixels.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated 90 degrees
    top_right, top_left = pixels[2, -3], pixels[2, 2]
    assert top_right[0] > 200 and top_right[1:].max() < 60, top_right  # the planted red corner
    assert abs(top_left - 128).max() < 30, top_left


def test_sixteen_bit_gray_maps_the_full_range(corpus):
    pixels = _rgb(corpus, "sixteen_bit_gray")
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == 128).all()


def test_transparent_palette_pixels_go_on_black(corpus):
    pixels = _rgb(corpus, "palette_transparency")
    assert (pixels[:, :4] == 0).all() and (pixels[:, 4:] == badinputs.GREEN).all()


def test_cmyk_jpeg_becomes_rgb(corpus):
    pixels = _rgb(corpus, "cmyk_jpeg")
    assert pixels[..., 2].min() > 200 and pixels[..., :2].max() < 60


def test_animated_gif_gives_its_first_frame(corpus):
    assert (_rgb(corpus, "animated_gif") == badinputs.BLUE).all()


@pytest.mark.parametrize("name", DECODES)
def test_odd_but_good_images_give_model_input(corpus, name):
    x = preprocess(corpus[name].path, Preprocessing(height=16, width=12))
    assert x.shape == (16, 12, 3) and x.dtype == np.float32 and -1.0 <= x.min() <= x.max() <= 1.0
    note("inputs", name, {"what": corpus[name].what, "expected": "decodes", "result": "decoded"})


@pytest.mark.parametrize("name", REFUSED + ("folder_named_png", "symlink_self_loop", "char_device"))
def test_bad_images_raise_one_line_image_error_naming_the_file(corpus, name):
    path = corpus[name].path
    with pytest.raises(ImageError) as caught:
        open_image(path)
    message = str(caught.value)
    assert message.startswith(os.fsdecode(path)) and "\n" not in message
    shown = message.split(": ", 1)[-1].replace(os.fsdecode(path), path.name)  # no machine-specific paths
    note("inputs", name, {"what": corpus[name].what, "expected": "refused", "result": shown})


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(corpus):
    path = corpus["fifo"].path
    finished, box = in_thread(lambda: open_image(path), timeout=5)
    if not finished:
        badinputs.release_fifo(path)
    message = str(box.get("error", ""))
    note("inputs", "fifo", {"what": corpus["fifo"].what, "expected": "refused",
                            "result": message.split(": ", 1)[-1] if finished else "BLOCKED (bug)"})
    assert finished and isinstance(box.get("error"), ImageError)
    assert message == f"{os.fsdecode(path)}: not a regular file; remove it"


def test_unreadable_file_is_refused(corpus):
    if "unreadable_chmod_000" not in corpus:
        pytest.skip(FIGURES["skipped"]["unreadable_chmod_000"])
    with pytest.raises(ImageError, match="permission denied"):
        open_image(corpus["unreadable_chmod_000"].path)


# ---------------------------------------------------------------- model loading

def test_every_broken_model_is_refused_with_one_line_naming_it(models):
    from edge_runtime.model import EdgeModel

    for name, sample in models["bad"].items():
        with pytest.raises(ModelError) as caught:
            EdgeModel.load(sample.path)
        message = str(caught.value)
        assert message.startswith(os.fsdecode(sample.path)) and "\n" not in message, message
        note("models", name, {"what": sample.what, "result": message.split(": ", 1)[-1]})


def fuzzed_models(folder: Path, plain: bytes, count: int = 16, flips: int = 20) -> list[Path]:
    """Copies of a valid model with `flips` random bytes overwritten (identifier kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        data = bytearray(plain)
        for k in rng.choice(np.arange(8, len(data)), flips, replace=False):
            data[int(k)] = int(rng.integers(0, 256))
        path = folder / f"fuzzed{seed}.tflite"
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def test_fuzzed_models_never_crash_the_loader(models, tmp_path):
    """Each loads or raises ModelError: never another exception (run in a child: a native crash shows as a signal)."""
    paths = fuzzed_models(tmp_path, models["plain"])
    script = ("import sys, json\nfrom edge_runtime.model import EdgeModel\nfrom edge_runtime.errors import ModelError\n"
              "out = {}\nfor p in sys.argv[1:]:\n    try:\n        EdgeModel.load(p); out[p] = 'loaded'\n"
              "    except ModelError as e:\n        out[p] = str(e)\nprint(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, paths)], env=ENV, capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    outcomes = json.loads(result.stdout)
    assert len(outcomes) == len(paths) and all("\n" not in m for m in outcomes.values())
    note("models", "fuzzed", {"what": f"{len(paths)} valid models with 20 random bytes overwritten",
                              "refused": sum(m != "loaded" for m in outcomes.values()),
                              "loaded": sum(m == "loaded" for m in outcomes.values())})


def test_fuzzed_model_errors_name_the_file(models, tmp_path):
    from edge_runtime.model import EdgeModel

    for path in fuzzed_models(tmp_path, models["plain"]):
        try:
            EdgeModel.load(path)
        except ModelError as e:
            assert str(e).startswith(str(path)), str(e)


def test_sidecar_labels_disagreeing_with_the_metadata_are_refused(models, tmp_path):
    import shutil

    from edge_runtime.atomic import write_json
    from edge_runtime.model import EdgeModel

    path = Path(shutil.copy(models["good"], tmp_path / "int8.tflite"))
    sidecar = json.loads(models["good"].with_suffix(".json").read_text())
    write_json(path.with_suffix(".json"), {**sidecar, "labels": list(reversed(sidecar["labels"]))})
    with pytest.raises(ModelError, match="label"):
        EdgeModel.load(path)


# ---------------------------------------------------------------- predict (subprocess)

@pytest.fixture(scope="module")
def mixed_folder(corpus, tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """Good images, the corpus (no FIFO: see its own test) in one folder tree: (folder, good, bad)."""
    import shutil

    folder = tmp_path_factory.mktemp("mixed")
    good = [badinputs.noise_png(folder / f"good{k}.png", seed=k) for k in range(3)]
    good_names, bad_names = [os.fsdecode(p) for p in good], []
    for sample in corpus.values():
        if sample.name in ("fifo", "folder_named_png", "unreadable_chmod_000"):
            continue
        target = os.path.join(os.fsencode(folder), os.fsencode(sample.path.name))
        if os.path.islink(sample.path):
            os.symlink(os.readlink(sample.path), target)
        else:
            shutil.copy(os.fsencode(sample.path), target)
        (good_names if sample.decodes else bad_names).append(os.fsdecode(target))
    return folder, good_names, bad_names


def test_predict_batch_goes_on_past_every_bad_file(models, mixed_folder):
    from edge_runtime.console import printable

    folder, good, bad = mixed_folder
    result = run_cli("predict", models["good"], folder, "--json", module="edge_runtime", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    rows = {r["file"]: r for r in json_lines(result.stdout) if r["type"] in ("result", "error")}
    assert set(rows) == {printable(p) for p in good + bad}
    for path in good:
        assert rows[printable(path)].get("label") in badinputs_labels(models), rows[printable(path)]
    for path in bad:
        error = rows[printable(path)].get("error", "")
        assert error.startswith(printable(path)) and "\n" not in error, rows[printable(path)]
    note("commands", "predict_mixed_folder", {"images": len(rows), "classified": len(good), "refused": len(bad),
                                              "exit_code": result.returncode})


def json_lines(stdout: str) -> list[dict]:
    """predict --json prints JSON Lines: one record per line."""
    return [json.loads(line) for line in stdout.splitlines()]


def badinputs_labels(models) -> list[str]:
    return json.loads(models["good"].with_suffix(".json").read_text())["labels"]


def test_predict_table_lists_each_failure_on_one_line(models, mixed_folder):
    from edge_runtime.console import printable

    folder, good, bad = mixed_folder
    result = run_cli("predict", models["good"], folder, module="edge_runtime", timeout=120)
    assert result.returncode == EXIT_SOME_FAILED and "Traceback" not in result.stderr
    assert f"{len(bad)} of {len(good) + len(bad)} file(s) could not be classified" in result.stdout
    for path in bad:
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith(printable(path) + ": ")]
        assert len(lines) == 1, (path, result.stdout)


def test_predict_all_good_exits_0(models, mixed_folder):
    _, good, _ = mixed_folder
    result = run_cli("predict", models["good"], *good, "--json", module="edge_runtime", timeout=120)
    assert result.returncode == EXIT_OK, result.stderr
    assert json_lines(result.stdout)[-1] == {"type": "summary", "images": len(good), "classified": len(good), "failed": 0,
                                             "skipped": 0, "already_done": 0}


def test_predict_with_a_broken_model_exits_2_with_one_line(models, mixed_folder):
    _, good, _ = mixed_folder
    for name in ("truncated", "wrong_label_count", "random_bytes"):
        path = models["bad"][name].path
        assert_one_line_error(run_cli("predict", path, good[0], module="edge_runtime", timeout=120), EXIT_USAGE, str(path))


def test_predict_with_nothing_to_do_exits_2(models, tmp_path):
    assert_one_line_error(run_cli("predict", models["good"], tmp_path, module="edge_runtime", timeout=120),
                          EXIT_USAGE, "no images found")


def test_predict_does_not_hang_on_a_fifo(models, corpus, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    badinputs.noise_png(tmp_path / "good.png")
    try:
        result = run_cli("predict", models["good"], tmp_path, "--json", module="edge_runtime", timeout=30)
    except subprocess.TimeoutExpired:
        note("commands", "predict_fifo", {"result": "BLOCKED (bug)"})
        pytest.fail("predict blocked on a FIFO")
    assert result.returncode == EXIT_SOME_FAILED


# ---------------------------------------------------------------- audit and split (subprocess)

def dataset_tree(root: Path, corpus: dict, non_utf8_bad: bool = False) -> dict[str, list[str]]:
    """benign/: good images + every regular corpus file; normal/: good images, a folder named
    x.png, a FIFO, a symlink back to the root. Returns {"good": [...], "bad": [...]} (relative)."""
    import shutil

    out = {"good": [], "bad": []}
    for c, label in enumerate(("benign", "normal")):
        (root / label).mkdir(parents=True)
        for k in range(4):
            badinputs.noise_png(root / label / f"{label}{k}.png", size=32, seed=100 * c + k)
            out["good"].append(f"{label}/{label}{k}.png")
    for sample in corpus.values():
        if sample.path.is_file() and not sample.path.is_symlink() and sample.name != "unreadable_chmod_000":
            shutil.copy(os.fsencode(sample.path), os.path.join(os.fsencode(root / "benign"), os.fsencode(sample.path.name)))
            out["good" if sample.decodes else "bad"].append(f"benign/{sample.path.name}")
    if non_utf8_bad:  # listed in the report by a name that is not UTF-8
        raw = os.path.join(os.fsencode(root / "benign"), b"trunc_\xff.png")
        with open(raw, "wb") as f:
            f.write(badinputs.good_png()[:100])
        out["bad"].append("benign/" + os.fsdecode(b"trunc_\xff.png"))
    (root / "normal" / "folder.png").mkdir()
    os.mkfifo(root / "normal" / "pipe.png")
    badinputs.symlink_loop(root / "normal")
    return out


def test_audit_lists_every_bad_file_and_keeps_every_good_one(corpus, tmp_path):
    expected = dataset_tree(tmp_path / "data", corpus)
    result = run_cli("audit", tmp_path / "data", "--out", tmp_path / "audit", "--json", "--workers", "1", timeout=120)
    assert result.returncode == EXIT_OK and "Traceback" not in result.stderr, result.stderr
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    listed = {u["path"] for u in report["unreadable"]} | {s["path"] for s in report["skipped_at_ingest"]}
    for path in expected["bad"]:
        assert path in listed, (path, listed)
    unreadable = {u["path"] for u in report["unreadable"]}
    assert not unreadable & set(expected["good"])
    assert report["readable"] == len(expected["good"])
    assert (tmp_path / "audit" / "audit.md").stat().st_size > 0
    note("commands", "audit", {"files": len(expected["good"]) + len(expected["bad"]) + 3, "readable": report["readable"],
                               "listed_as_unreadable_or_skipped": len(listed), "exit_code": result.returncode})


def test_audit_reports_a_bad_file_whose_name_is_not_utf8(corpus, tmp_path):
    dataset_tree(tmp_path / "data", corpus, non_utf8_bad=True)
    result = run_cli("audit", tmp_path / "data", "--out", tmp_path / "audit", "--json", "--workers", "1", timeout=120)
    assert result.returncode == EXIT_OK and "Traceback" not in result.stderr, result.stderr[-500:]


def test_audit_keeps_the_images_beside_a_self_looping_symlink(tmp_path):
    data = tmp_path / "data"
    for c, label in enumerate(("benign", "malignant")):
        (data / label).mkdir(parents=True)
        for k in range(3):
            badinputs.noise_png(data / label / f"{label}{k}.png", seed=10 * c + k)
    os.symlink("selfloop.png", data / "malignant" / "selfloop.png")
    result = run_cli("audit", data, "--out", tmp_path / "audit", "--json", "--workers", "1", timeout=120)
    assert result.returncode == EXIT_OK, result.stderr
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["counts"].get("malignant") == 3, report["counts"]


def test_split_leaves_bad_files_out_of_the_manifest(corpus, tmp_path):
    from oncolite.train.manifest import load_manifest

    expected = dataset_tree(tmp_path / "data", corpus)
    out = tmp_path / "manifest.json"
    result = run_cli("split", tmp_path / "data", "--out", out, "--folds", "2", "--val-fraction", "0.2", "--json",
                     "--workers", "1", timeout=120)
    assert result.returncode == EXIT_OK and "Traceback" not in result.stderr, result.stderr
    manifest = load_manifest(out)
    paths = {item["path"] for item in manifest.items}
    assert not paths & set(expected["bad"])
    assert paths <= set(expected["good"])
    note("commands", "split", {"items": len(paths), "bad_files_in_manifest": len(paths & set(expected["bad"])),
                               "exit_code": result.returncode})


# ---------------------------------------------------------------- manifests and train data

def test_manifest_with_a_missing_file_is_refused_naming_it(tmp_path):
    from oncolite.train.manifest import load_manifest

    manifest, missing = badinputs.manifest_with_missing_file(tmp_path)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert missing in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_train_on_a_manifest_with_a_missing_file_exits_2_with_one_line(tmp_path):
    manifest, missing = badinputs.manifest_with_missing_file(tmp_path)
    result = run_cli("train", "--manifest", manifest, "--run", tmp_path / "run", "--quiet", timeout=240)
    line = assert_one_line_error(result, EXIT_USAGE, missing)
    note("commands", "train_missing_file", {"exit_code": result.returncode, "stderr": line.replace(str(tmp_path), "TMP")})


def test_manifest_whose_file_was_replaced_is_refused_naming_it(tmp_path):
    from oncolite.train.manifest import load_manifest

    manifest, _ = badinputs.manifest_with_missing_file(tmp_path)
    badinputs.noise_png(tmp_path / "images" / "img2.png", seed=2)  # restore the missing one
    (tmp_path / "images" / "img0.png").write_bytes(b"overwritten by a failed copy")
    with pytest.raises(ManifestError, match="img0.png"):
        load_manifest(manifest)


def _items(tmp_path: Path, bad_bytes: bytes) -> list[dict]:
    items = []
    for k in range(4):
        path = badinputs.noise_png(tmp_path / f"img{k}.png", seed=k)
        items.append({"path": str(path), "label": LABELS[k % 2]})
    Path(items[1]["path"]).write_bytes(bad_bytes)
    return items


def test_train_arrays_name_an_unreadable_file(tmp_path):
    from oncolite.train.data import load_arrays

    items = _items(tmp_path, b"")
    with pytest.raises(OncoliteError, match="img1.png"):
        load_arrays(items, LABELS, Preprocessing(height=8, width=8), quiet=True)


def test_train_pipeline_names_a_file_that_became_unreadable(tmp_path):
    """Training and evaluation iterate datasets inside image_errors() (train/train.py, quantize/qat.py)."""
    from oncolite.train.data import image_errors, make_dataset

    items = _items(tmp_path, b"truncated after the manifest was made")
    ds = make_dataset(items, LABELS, Preprocessing(height=8, width=8), batch_size=2, cache=False)
    with pytest.raises(OncoliteError, match="img1.png") as caught:
        with image_errors():
            for _ in ds:
                pass
    assert str(caught.value).startswith(str(tmp_path / "img1.png")) and "\n" not in str(caught.value)
