"""The run directory: the one place its layout is spelled (DEVELOPERS.md, "Run directory").

Every command that reads or writes a run directory asks a RunDir for its paths instead of
joining names by hand:

    run = RunDir("runs/busi")
    run.float_model          # runs/busi/models/float.keras
    run.variant("int8")      # runs/busi/models/int8.tflite
    run.fold(2).eval_dir("float")  # runs/busi/folds/2/eval/float
    run.config()             # the run's own settings, as stored

A fold of a cross-validation run is a run directory of its own (folds/<i>/). A RunDir only
names paths; it creates nothing and checks nothing, except config() and provenance(), which
read config.json and refuse a folder without one.

A bring-your-own model's export folder (quantize.byo) is laid out like a models folder at its
top: RunDir(out, models=out).
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.console import old_spelling
from edge_runtime.errors import OncoliteError
from .config import PROVENANCE_KEY, stored_config

# File names that are also recorded or written outside a run directory (export's sidecars
# record "models/<FLOAT_MODEL>"; evaluate saves a threshold beside a foreign model's report).
FLOAT_MODEL = "float.keras"
QAT_MODEL = "qat.keras"
THRESHOLD = "threshold.json"
PREDICTIONS = "predictions.json"  # a benchmark folder's per-image probabilities (benchmarks.pooled)
RESUME_POINT = "state.json"  # a state folder's commit point (train.checkpoints)


class RunDir:
    def __init__(self, path: str | Path, models: str | Path | None = None):
        self.path = Path(path)
        # The models folder: RUN_DIR/models, or given (a bring-your-own export folder is its own).
        self.models = Path(models) if models is not None else self.path / "models"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- what the run was made from

    @property
    def config_file(self) -> Path:
        """Resolved config, one section per stage that ran, plus provenance (PROVENANCE_KEY)."""
        return self.path / "config.json"

    @property
    def manifest_copy(self) -> Path:
        """The copy of the manifest used (its sha256 in config.json)."""
        return self.path / "manifest.json"

    @property
    def versions_file(self) -> Path:
        return self.path / "versions.json"

    def config(self) -> dict:
        """The run's own config: its stored settings, today's defaults only filling keys it lacks.
        Never re-validated against today's defaults: the run was started with these settings."""
        return stored_config(self._config_file())

    def provenance(self) -> dict:
        """config.json's provenance section: manifest, profile, overrides, fold, folds..."""
        return json.loads(self._config_file().read_text(encoding="utf-8")).get(PROVENANCE_KEY, {})

    def _config_file(self) -> Path:
        if not self.config_file.exists():
            raise OncoliteError(f"{self.config_file}: missing; {self.path} is not a run directory of `oncolite train`")
        return self.config_file

    # -- logs and the data audit

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def log(self, stage: str) -> Path:
        return self.logs_dir / f"{stage}.log"

    @property
    def audit_dir(self) -> Path:
        """audit.json, audit.md, *.png"""
        return self.path / "audit"

    # -- training

    @property
    def train_dir(self) -> Path:
        """history.csv, curves.png, state/, tune/, summary.json"""
        return self.path / "train"

    @property
    def train_state(self) -> Path:
        """Resume checkpoints of the training (train.checkpoints)."""
        return self.train_dir / "state"

    @property
    def train_state_file(self) -> Path:
        return self.train_state / RESUME_POINT

    @property
    def history(self) -> Path:
        return self.train_dir / "history.csv"

    @property
    def curves(self) -> Path:
        return self.train_dir / "curves.png"

    @property
    def summary(self) -> Path:
        """Written last by a finished training (train.train.finished_mark)."""
        return self.train_dir / "summary.json"

    @property
    def tune_dir(self) -> Path:
        return self.train_dir / "tune"

    @property
    def workers_dir(self) -> Path:
        """Multi-worker training: what the workers other than the chief write."""
        return self.path / "workers"

    def worker_state(self, task: int) -> Path:
        return self.workers_dir / str(task) / "state"

    def worker_float_model(self, task: int) -> Path:
        return self.workers_dir / str(task) / FLOAT_MODEL

    @property
    def cv_summary(self) -> Path:
        """`oncolite train --folds K`: mean and spread over the folds, written last."""
        return self.path / "cv.json"

    # -- models

    @property
    def float_model(self) -> Path:
        return self.models / FLOAT_MODEL

    @property
    def qat_model(self) -> Path:
        return self.models / QAT_MODEL

    @property
    def qat_state(self) -> Path:
        """Resume checkpoints of quantization-aware training."""
        return self.models / "qat_state"

    @property
    def qat_state_file(self) -> Path:
        return self.qat_state / RESUME_POINT

    @property
    def qat_report(self) -> Path:
        return self.models / "qat_report.json"

    def variant(self, name: str) -> Path:
        """models/<name>.tflite: one per row of edge_runtime.variants.VARIANTS."""
        return self.models / f"{name}.tflite"

    def sidecar(self, name: str) -> Path:
        """models/<name>.json beside the variant (edge_runtime.model.sidecar_path)."""
        from edge_runtime.model import sidecar_path  # the edge runtime's rule; imported only when asked

        return sidecar_path(self.variant(name))

    @property
    def export_report(self) -> Path:
        return self.models / "export_report.json"

    @property
    def export_report_md(self) -> Path:
        return self.models / "export_report.md"

    @property
    def threshold_file(self) -> Path:
        """The float model's binary operating point, chosen on validation (`evaluate --target-sensitivity`)."""
        return self.path / THRESHOLD

    # -- evaluation, explanations, benchmark

    @property
    def eval_root(self) -> Path:
        return self.path / "eval"

    def eval_dir(self, model: str) -> Path:
        """metrics.json, metrics.md, predictions.csv and plots of one model ("float", a variant)."""
        return self.eval_root / model

    @property
    def explain_dir(self) -> Path:
        """Grad-CAM overlays of `oncolite explain`."""
        return self.path / "explain"

    @property
    def benchmark_dir(self) -> Path:
        """report.json, report.md, predictions.json and plots of `oncolite benchmark`."""
        return self.path / "benchmark"

    @property
    def benchmark_report(self) -> Path:
        return self.benchmark_dir / "report.json"

    @property
    def benchmark_report_md(self) -> Path:
        return self.benchmark_dir / "report.md"

    @property
    def benchmark_predictions(self) -> Path:
        return self.benchmark_dir / PREDICTIONS

    # -- `oncolite run`

    @property
    def stages_file(self) -> Path:
        """Which stages of `oncolite run` finished."""
        return self.path / "stages.json"

    @property
    def report(self) -> Path:
        """`oncolite run`'s summary over the folds."""
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    # -- cross-validation folds

    def fold(self, i: int | str) -> RunDir:
        """folds/<i>/, a run directory of its own."""
        return RunDir(self.path / "folds" / str(i))

    def folds(self) -> list[RunDir]:
        """The folds present (folds/<number>/), in number order; [] for a run of one split."""
        found = [p for p in (self.path / "folds").glob("[0-9]*") if p.is_dir() and p.name.isdigit()]
        return [RunDir(p) for p in sorted(found, key=lambda p: int(p.name))]


def given_run(args, command: str, attr: str = "run_dir", missing: str | None = None) -> str:
    """The RUN_DIR (or MODEL, `attr`) a stage command was given, from its place or from the old
    spelling `--run RUN_DIR` (with a note); refused at once when it does not exist, naming a
    missing model file as such."""
    given = getattr(args, attr)
    if args.old_run:
        if given:
            raise OncoliteError(f"--run {args.old_run} and {given}: give the run directory once, first")
        old_spelling(args, f"--run {args.old_run}", f"oncolite {command} {args.old_run} ...")
        given = args.old_run
        setattr(args, attr, given)
    if not given:
        raise OncoliteError(missing or f"which run? give its directory: oncolite {command} RUN_DIR")
    path = Path(given)
    if not path.exists():
        if path.suffix.lower() in (".keras", ".h5", ".tflite"):
            raise OncoliteError(f"{path}: no such model file; check the path")
        raise OncoliteError(f"{path}: no such run directory; check the path, or train one with "
                            f"`oncolite train {path} --manifest M`")
    return given
