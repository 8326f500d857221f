"""What produced a result: installed package versions and the git commit of this checkout (if any).

Recorded in every run directory (versions.json) and benchmark report. Imports no TensorFlow:
the versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from edge_runtime.resources import CHECKOUT

# versions.json key -> distribution name
RUN_PACKAGES = {"tensorflow": "tensorflow", "tf_keras": "tf-keras", "tfmot": "tensorflow-model-optimization",
                "litert": "ai-edge-litert", "numpy": "numpy", "scikit_learn": "scikit-learn"}


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    """{"commit": HEAD or None outside a git checkout, "dirty": tracked files changed (None without a commit)}."""
    if CHECKOUT is None:  # installed with `pip install .`: the code is no git checkout's
        return {"commit": None, "dirty": None}

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions() -> dict:
    """A run directory's versions.json: python, platform, the stack's versions, git commit (+"-dirty")."""
    git = git_state()
    commit = git["commit"] and git["commit"] + ("-dirty" if git["dirty"] else "")
    return {"python": platform.python_version(), "platform": platform.platform(),
            **{name: package_version(dist) for name, dist in RUN_PACKAGES.items()},
            "git_commit": commit}
