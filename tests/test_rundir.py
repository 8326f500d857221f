"""Issue 16, "one contract": the run directory's layout is spelled in one place,
oncolite.train.rundir.RunDir, and it is the layout DEVELOPERS.md documents."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edge_runtime.errors import OncoliteError
from oncolite.train.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("train", "quantize", "benchmarks", "oncolite")  # the layers that know run directories


def documented_layout() -> list[str]:
    """The first word of every line of DEVELOPERS.md's "Run directory" block (RUN_DIR/...)."""
    text = (REPO / "DEVELOPERS.md").read_text(encoding="utf-8")
    block = text[text.index("- Run directory"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    return [line.split()[0] for line in block.strip().splitlines()]


def test_the_layout_is_the_documented_one(tmp_path):
    run = RunDir(tmp_path / "r1")
    at = lambda doc: tmp_path / "r1" / doc.removeprefix("RUN_DIR/")  # noqa: E731
    expected = {
        "RUN_DIR/config.json": run.config_file,
        "RUN_DIR/manifest.json": run.manifest_copy,
        "RUN_DIR/versions.json": run.versions_file,
        "RUN_DIR/logs/<stage>.log": run.log("<stage>"),
        "RUN_DIR/audit/": run.audit_dir,
        "RUN_DIR/train/": run.train_dir,
        "RUN_DIR/models/float.keras": run.float_model,
        "RUN_DIR/models/qat.keras": run.qat_model,
        "RUN_DIR/models/<variant>.tflite": run.variant("<variant>"),
        "RUN_DIR/threshold.json": run.threshold_file,
        "RUN_DIR/eval/<model>/": run.eval_dir("<model>"),
        "RUN_DIR/benchmark/": run.benchmark_dir,
        "RUN_DIR/stages.json": run.stages_file,
        "RUN_DIR/folds/<i>/": run.fold("<i>").path,
    }
    documented = documented_layout()
    for doc, path in expected.items():
        assert doc in documented, f"DEVELOPERS.md's run directory no longer lists {doc}"
        assert path == at(doc), (doc, path)
    # What the block's descriptions name inside those folders.
    assert run.sidecar("int8") == tmp_path / "r1" / "models" / "int8.json"
    assert run.train_state == tmp_path / "r1" / "train" / "state"
    assert run.history == tmp_path / "r1" / "train" / "history.csv"
    assert run.summary == tmp_path / "r1" / "train" / "summary.json"
    assert run.qat_state == tmp_path / "r1" / "models" / "qat_state"
    assert run.export_report == tmp_path / "r1" / "models" / "export_report.json"
    assert run.benchmark_report == tmp_path / "r1" / "benchmark" / "report.json"
    assert run.fold(2).float_model == tmp_path / "r1" / "folds" / "2" / "models" / "float.keras"
    # A bring-your-own export folder is its own models folder.
    out = RunDir(tmp_path / "byo", models=tmp_path / "byo")
    assert out.float_model == tmp_path / "byo" / "float.keras" and out.variant("fp32") == tmp_path / "byo" / "fp32.tflite"


def test_quantize_runs_take_their_paths_from_the_run_directory(tmp_path):
    from oncolite.quantize.rundir import ModelRun, Run

    run = Run(path=tmp_path, config={}, manifest=None, prep=None)
    assert run.models == RunDir(tmp_path).models and run.dir.float_model == RunDir(tmp_path).float_model
    assert run.threshold() is None
    RunDir(tmp_path).threshold_file.write_text(json.dumps({"positive": "malignant", "value": 0.3}))
    assert run.threshold() == {"positive": "malignant", "value": 0.3}
    byo = ModelRun(path=tmp_path, config={}, manifest=None, prep=None)
    assert byo.models == tmp_path and byo.dir.float_model == tmp_path / "float.keras"


def test_folds_are_listed_in_number_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.folds() == []
    for name in ("10", "2", "0", "notes"):
        (tmp_path / "folds" / name).mkdir(parents=True)
    assert [f.path.name for f in run.folds()] == ["0", "2", "10"]


def test_the_stored_config_is_read_as_stored(tmp_path):
    """config(): the run's own settings win, today's defaults only fill what it lacks, and a key
    today's defaults no longer have is not refused (the run was started with it)."""
    run = RunDir(tmp_path)
    with pytest.raises(OncoliteError, match="config.json: missing; .* is not a run directory of `oncolite train`"):
        run.config()
    run.config_file.write_text(json.dumps({"seed": 7, "a_key_from_the_past": 1,
                                           "run": {"fold": 3, "manifest": "m.json"}}))
    config = run.config()
    assert config["seed"] == 7 and config["a_key_from_the_past"] == 1
    assert "input_size" in config and "run" not in config  # filled by the defaults; provenance apart
    assert run.provenance() == {"fold": 3, "manifest": "m.json"}
    from oncolite.train.train import read_run_config

    assert read_run_config(tmp_path) == (config, run.provenance())


# The file names only RunDir may spell as a string of their own (or ending a path in one).
SPELLED = re.compile(r"""(["'])[\w./<>-]*\b(float|qat)\.keras\1""")
# Files allowed to spell them anyway, and why.
ALLOWED = {
    "train/rundir.py": "the one place the layout is spelled",
}


def test_model_file_names_are_spelled_only_by_the_run_directory():
    found = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if name in ALLOWED:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if SPELLED.search(line):
                    found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "spell these paths with oncolite.train.rundir.RunDir:\n" + "\n".join(found)
    assert SPELLED.search('model = run / "models" / "float.keras"') and SPELLED.search("'models/qat.keras'")
    assert not SPELLED.search('help="run directory holding models/float.keras"')  # prose may name them
