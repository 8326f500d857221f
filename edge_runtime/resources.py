"""Where oncolite's files are: the one module that computes a path from where the code sits.

Two layouts. A checkout keeps the data in the repository's own folders (configs/, pretrained/,
models/) beside the packages. `pip install .` installs that data inside the oncolite package
(site-packages/oncolite/configs, ...; pyproject.toml's package-dir maps the folders), and there
is no checkout: no git state, no data/busi, no web/node_modules. An edge_runtime/ folder copied
alone to a device (benchmarks/devices.py, the arm64 check) has neither: no default model.
"""

from __future__ import annotations

from pathlib import Path

_PARENT = Path(__file__).resolve().parent.parent  # the checkout, or site-packages
# The repository root when this code runs from a checkout (editable install or PYTHONPATH), else None.
CHECKOUT = _PARENT if (_PARENT / "pyproject.toml").is_file() else None
DATA_ROOT = CHECKOUT or _PARENT / "oncolite"

# The edge runtime's own source: what benchmarks/devices.py copies to a device.
EDGE_RUNTIME_DIR = Path(__file__).resolve().parent
CONFIG_DIR = DATA_ROOT / "configs"
PRETRAINED_DIR = DATA_ROOT / "pretrained"
# The model `predict`, `serve` and `info` use when given no MODEL (fold 0 of the BUSI run).
SHIPPED_MODEL = DATA_ROOT / "models" / "busi" / "int8.tflite"
# Where the folders beside the code are (data/busi, runs/ when no --run is given, models/ and
# reports/ of `oncolite run --publish`, web/node_modules): the checkout, else the current directory.
WORKSPACE = CHECKOUT or Path()


def shown(path) -> str:
    """A path inside the workspace as a path relative to it, anything else unchanged: committed
    reports and recorded commands name files the same on every machine."""
    text, root = str(path), str(WORKSPACE.resolve()) + "/"
    return text[len(root):] if text.startswith(root) else text
