"""Raspberry Pi check: `edge_runtime predict` inside an arm64 Debian userland (qemu) gives the
same int8 outputs as on x86, bit for bit.

Uses the project's own scripts/pi-rootfs (its `build`, run once as root, makes the userland in
$ONCOLITE_PI_ROOTFS, default /var/tmp/pi-rootfs). ai-edge-litert runs with its default resolver
(XNNPACK, bit-identical across CPUs); tflite-runtime 2.14 only with the reference kernels,
because under qemu its optimized paths crash (an emulation limit: it runs on real Pis). Skips, saying why, where the userland is not built, not root, or no binfmt.

Documented command (from the project's root):
    scripts/pi-rootfs/run --env litert -- python -m edge_runtime predict MODEL.tflite IMG.png --json
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_models import model_file, write_images
from edge_runtime.model import EdgeModel

pytestmark = pytest.mark.arm64

REPO = Path(__file__).resolve().parent.parent
ROOTFS = Path(os.environ.get("ONCOLITE_PI_ROOTFS", "/var/tmp/pi-rootfs"))
TOOLS = REPO / "scripts" / "pi-rootfs"
# env -> (backend inside the userland, resolver that is bit-identical across CPUs for it)
ENVS = {"litert": ("ai-edge-litert", "default"), "tflite": ("tflite-runtime", "reference")}
INTERPRETER_MODULE = {"litert": "ai_edge_litert.interpreter", "tflite": "tflite_runtime.interpreter"}
# What `python -m edge_runtime predict` imports in the userland (the base install's runtime part).
RUNTIME_MODULES = "numpy, PIL, flatbuffers, tqdm"


def reason_to_skip(env: str) -> str | None:
    if sys.platform != "linux":
        return "arm64 emulation needs Linux (binfmt_misc + qemu-user)"
    if os.geteuid() != 0:
        return "needs root (chroot, bind mounts, binfmt registration)"
    if not (ROOTFS / "opt" / env / "bin" / "python").exists():
        return (f"{ROOTFS}/opt/{env} not built; run `{TOOLS}/build` as root once (~10 min), "
                "or set ONCOLITE_PI_ROOTFS to where it is")
    binfmt = subprocess.run([str(TOOLS / "binfmt")], capture_output=True, text=True)
    if binfmt.returncode != 0 or not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return f"qemu-aarch64 binfmt not registered ({(binfmt.stderr or binfmt.stdout).strip()[-200:]})"
    probe = run_in_pi(env, ["python", "-c", f"import {RUNTIME_MODULES}, {INTERPRETER_MODULE[env]}"], REPO)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (f"the {env} userland lacks a runtime module ({last}); "
                f"`{TOOLS}/run --env {env} -- pip install tqdm flatbuffers` once")
    return None


def run_in_pi(env: str, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / "run"), "--rootfs", str(ROOTFS), "--env", env, "--", *cmd],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder the userland sees as /work: this checkout's edge_runtime, an int8 model, images."""
    root = tmp_path_factory.mktemp("arm64")
    shutil.copytree(REPO / "edge_runtime", root / "edge_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    model_file(root, "int8")
    write_images(root / "images", n=4, size=40)
    return root


@pytest.mark.parametrize("env", sorted(ENVS))
def test_arm64_predictions_are_identical_to_x86(env, workdir):
    reason = reason_to_skip(env)
    if reason:
        pytest.skip(reason)
    backend, resolver = ENVS[env]
    images = sorted(p.relative_to(workdir).as_posix() for p in (workdir / "images").iterdir())
    done = run_in_pi(env, ["python", "-m", "edge_runtime", "predict", "int8.tflite", *images, "--json", "--quiet",
                           "--backend", backend, "--resolver", resolver], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]  # JSON Lines, one record per file
    arm = {r["file"]: r for r in records if r["type"] == "result"}
    # x86: ai-edge-litert with the same resolver (BUILTIN_REF is bit-identical across runtimes too).
    model = EdgeModel.load(workdir / "int8.tflite", backend="ai-edge-litert", resolver=resolver)
    assert sorted(arm) == images
    for name in images:
        probs = model.predict_file(workdir / name)
        assert arm[name]["probabilities"] == {label: float(p) for label, p in zip(model.labels, probs)}, name
        assert arm[name]["label"] == model.labels[model.decide(probs)]
