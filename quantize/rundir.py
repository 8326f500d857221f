"""What the quantize and export commands read from a run directory: its config, its manifest,
the input contract and the operating point (the float model: train.model.load_float_model).
The paths themselves are oncolite.train.rundir.RunDir's (`run.dir`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import OncoliteError
from edge_runtime.preprocess import Preprocessing
from oncolite.train.config import preprocessing
from oncolite.train.manifest import load_manifest
from oncolite.train.rundir import RunDir


@dataclass
class Run:
    path: Path
    config: dict
    manifest: object  # train.manifest.Manifest
    prep: Preprocessing
    fold: int | None = None  # the manifest fold this run trained on (None: its `split`)

    @property
    def dir(self) -> RunDir:
        """The run directory's paths (float_model, variant(name), export_report, ...)."""
        return RunDir(self.path)

    @property
    def models(self) -> Path:
        return self.dir.models

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    def sides(self) -> dict[str, list[dict]]:
        return self.manifest.sides(fold=self.fold)

    def threshold(self):
        """The binary operating point chosen on validation ({"positive", "value"}), or None."""
        path = self.dir.threshold_file
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"positive": data["positive"], "value": float(data["value"])} if data else None


def open_run(run_dir: str | Path) -> Run:
    """The run directory's resolved config and verified manifest; refuses a run without them."""
    layout = RunDir(run_dir)
    for path in (layout.config_file, layout.manifest_copy):
        if not path.exists():
            raise OncoliteError(f"{path}: missing; train a float model into this run directory first "
                                "(oncolite train RUN_DIR --manifest M)")
    config = layout.config()
    return Run(path=layout.path, config=config, manifest=load_manifest(layout.manifest_copy), prep=preprocessing(config),
               fold=layout.provenance().get("fold"))


@dataclass
class ModelRun(Run):
    """A model trained elsewhere (quantize.byo), exported like a run: `path` is the output
    folder, which is also the models folder (float.keras, the variants, their sidecars, the
    export report); `manifest` is a train.manifest.Manifest or a quantize.byo.FolderData;
    `given_labels` the model's output order. No operating point: argmax decides."""

    given_labels: list[str] | None = None
    source: dict | None = None  # quantize.byo.import_model's facts: the model given, what was changed

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path, models=self.path)

    @property
    def labels(self) -> list[str]:
        return list(self.given_labels or self.manifest.labels)

    def threshold(self):
        return None
