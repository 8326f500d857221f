"""What the quantize and export commands read from a run directory: its config, its manifest,
the input contract and the operating point (the float model: train.model.load_float_model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import OncoliteError
from edge_runtime.preprocess import Preprocessing
from oncolite.train.config import preprocessing
from oncolite.train.manifest import load_manifest
from oncolite.train.train import read_run_config


@dataclass
class Run:
    path: Path
    config: dict
    manifest: object  # train.manifest.Manifest
    prep: Preprocessing
    fold: int | None = None  # the manifest fold this run trained on (None: its `split`)

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    def sides(self) -> dict[str, list[dict]]:
        return self.manifest.sides(fold=self.fold)

    def threshold(self):
        """The binary operating point chosen on validation ({"positive", "value"}), or None."""
        path = self.path / "threshold.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"positive": data["positive"], "value": float(data["value"])} if data else None


def open_run(run_dir: str | Path) -> Run:
    """The run directory's resolved config and verified manifest; refuses a run without them."""
    path = Path(run_dir)
    for name in ("config.json", "manifest.json"):
        if not (path / name).exists():
            raise OncoliteError(f"{path / name}: missing; train a float model into this run directory first "
                                "(oncolite train RUN_DIR --manifest M)")
    config, provenance = read_run_config(path)
    return Run(path=path, config=config, manifest=load_manifest(path / "manifest.json"), prep=preprocessing(config),
               fold=provenance.get("fold"))


@dataclass
class ModelRun(Run):
    """A model trained elsewhere (quantize.byo), exported like a run: `path` is the output
    folder, which is also the models folder (float.keras, the variants, their sidecars, the
    export report); `manifest` is a train.manifest.Manifest or a quantize.byo.FolderData;
    `given_labels` the model's output order. No operating point: argmax decides."""

    given_labels: list[str] | None = None
    source: dict | None = None  # quantize.byo.import_model's facts: the model given, what was changed

    @property
    def models(self) -> Path:
        return self.path

    @property
    def labels(self) -> list[str]:
        return list(self.given_labels or self.manifest.labels)

    def threshold(self):
        return None
