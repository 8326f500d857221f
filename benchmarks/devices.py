"""Run the edge benchmark on another device and pull its results into the report.

ssh://user@host[:port][?python=PATH&identity=KEY&strict=no]
    Streams the edge runtime's source (edge_runtime/, and requirements.txt: the base install's
    dependencies), the .tflite variants with their sidecars and the held-out images to
    ~/.oncolite-bench/run on the device (a tar stream over ssh: only ssh and tar are needed there),
    makes ~/.oncolite-bench/venv with those dependencies (`python3 -m venv` + `pip install -r`,
    needs the device's network) unless
    `python=` names an interpreter that already has numpy, pillow and ai-edge-litert, then runs
    `python -m edge_runtime bench` (timing) and `predict --json` (agreement with this machine).
    Always BatchMode: a key, never a password prompt. `strict=no` skips host-key checking
    (throwaway test hosts only).

adb[:serial]
    Android, UNVERIFIED ON HARDWARE (no phone was available): pushes each .tflite and LiteRT's
    `benchmark_model` to /data/local/tmp/oncolite and parses its timing line. Get the binary
    from the LiteRT / TFLite performance-measurement docs ("Download or build the binary":
    the nightly prebuilt `android_aarch64_benchmark_model`), or build it with
    `bazel build -c opt --config=android_arm64 //tensorflow/lite/tools/benchmark:benchmark_model`;
    give it with `--benchmark-model PATH`, or set ONCOLITE_BENCHMARK_MODEL, or put it at
    tools/benchmark_model in the repository.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edge_runtime.errors import OncoliteError
from edge_runtime.resources import EDGE_RUNTIME_DIR, WORKSPACE

REMOTE_HOME = ".oncolite-bench"  # under the remote user's home
ADB_DIR = "/data/local/tmp/oncolite"
DEFAULT_BENCHMARK_MODEL = WORKSPACE / "tools" / "benchmark_model"


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = 22
    python: str | None = None
    identity: str | None = None
    strict: bool = True

    def ssh(self, command: str) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-p", str(self.port)]
        opts += (["-o", "StrictHostKeyChecking=accept-new"] if self.strict else
                 ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        if self.identity:
            opts += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        return ["ssh", *opts, f"{self.user}@{self.host}", command]


def parse_ssh_url(url: str) -> SshTarget:
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname or not parts.username:
        raise OncoliteError(f"--target {url}: write it as ssh://user@host[:port][?python=/path/to/python]")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SshTarget(user=parts.username, host=parts.hostname, port=parts.port or 22, python=query.get("python"),
                     identity=query.get("identity"), strict=query.get("strict", "yes") != "no")


def run_target(target: str, models: dict, images: list, probs: dict, rules: dict, items: list, *, runs: int,
               warmup: int, threads: list, benchmark_model=None, quiet: bool = True) -> dict:
    """One device's column group of the report. `probs` and `rules` (operating points) are this
    machine's, per model: the device's answers are compared with them."""
    if target.startswith("ssh://"):
        return ssh_benchmark(parse_ssh_url(target), models, probs, rules, items, runs=runs, warmup=warmup,
                             threads=threads)
    if target == "adb" or target.startswith("adb:"):
        return adb_benchmark(target.partition(":")[2] or None, models, runs=runs, warmup=warmup, threads=threads,
                             binary=benchmark_model_path(benchmark_model))
    raise OncoliteError(f"--target {target}: use ssh://user@host[:port] or adb[:serial]")


# --- ssh ------------------------------------------------------------------------------------------

def bundle(models: dict, items: list) -> bytes:
    """A gzipped tar of the runtime source, its requirements, the .tflite variants (+ sidecars) and the images."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(EDGE_RUNTIME_DIR.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                tar.add(path, arcname=str(Path("edge_runtime") / path.relative_to(EDGE_RUNTIME_DIR)))
        requirements = base_requirements().encode()
        info = tarfile.TarInfo("requirements.txt")
        info.size = len(requirements)
        tar.addfile(info, io.BytesIO(requirements))
        for path in models.values():
            if path.suffix == ".tflite":
                tar.add(path, arcname=f"models/{path.name}")
                if path.with_suffix(".json").is_file():
                    tar.add(path.with_suffix(".json"), arcname=f"models/{path.stem}.json")
        for i, it in enumerate(items):
            tar.add(it["path"], arcname=remote_image(i, it["path"]))
    return buf.getvalue()


def base_requirements() -> str:
    """The base install's dependencies, one per line: pyproject.toml's list, read back from this
    install's metadata (the device gets the edge runtime's source, not the whole project to build)."""
    return "".join(f"{r}\n" for r in metadata.requires("oncolite") or [] if "extra ==" not in r)


def remote_image(i: int, path) -> str:
    # Numbered names keep the order of `items` and avoid clashes between folders.
    return f"images/{i:05d}{Path(path).suffix.lower()}"


def ssh_run(target: SshTarget, command: str, what: str, stdin: bytes | None = None, timeout: float = 3600) -> str:
    try:
        done = subprocess.run(target.ssh(command), input=stdin, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise OncoliteError("ssh: not found on this machine; install OpenSSH's client (apt-get install openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise OncoliteError(f"{target.host}: {what} gave no answer in {timeout:.0f} s") from None
    if done.returncode != 0:
        msg = (done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1]
        raise OncoliteError(f"ssh://{target.user}@{target.host}:{target.port}: {what} failed ({msg}); "
                            "check the key (BatchMode, no password prompts) and the remote python")
    return done.stdout.decode(errors="replace")


def remote_python(target: SshTarget) -> str:
    """The interpreter to use there: the given one, or a venv with the base install (made once)."""
    if target.python:
        return target.python
    venv = f"$HOME/{REMOTE_HOME}/venv"
    ssh_run(target, f"test -x {venv}/bin/python || (python3 -m venv {venv} && "
                    f"{venv}/bin/pip install -q -r $HOME/{REMOTE_HOME}/run/requirements.txt)", "installing the base install in a venv",
            timeout=1800)
    return f"{venv}/bin/python"


def ssh_benchmark(target: SshTarget, models: dict, probs: dict, rules: dict, items: list, *, runs: int, warmup: int,
                  threads: list) -> dict:
    run = f"$HOME/{REMOTE_HOME}/run"
    ssh_run(target, f"rm -rf {run} && mkdir -p {run} && tar xzf - -C {run}", "copying the runtime, models and images",
            stdin=bundle(models, items))
    python = remote_python(target)
    # cwd first on sys.path: the copied edge_runtime is the one that runs, whatever is installed.
    prefix = f"cd {run} && {shlex.quote(python) if not python.startswith('$') else python}"
    images = " ".join(remote_image(i, it["path"]) for i, it in enumerate(items))
    variants = {}
    from oncolite.train.metrics import agreement, decisions

    from .benchmark import LATENCY_IMAGES, edge_timing

    for name, path in models.items():
        if path.suffix != ".tflite":
            continue
        bench = json.loads(ssh_run(target, f"{prefix} -m edge_runtime bench models/{path.name} "
                                           f"{' '.join(remote_image(i, it['path']) for i, it in enumerate(items[:LATENCY_IMAGES]))} "
                                           f"--threads {','.join(map(str, threads))} --runs {runs} --warmup {warmup} --json",
                                   f"bench {path.name}"))
        predicted = predict_records(ssh_run(target, f"{prefix} -m edge_runtime predict models/{path.name} {images} --json",
                                            f"predict {path.name}"))
        remote_probs = prediction_probs(predicted, len(items))
        local, labels = probs[name], predicted["labels"]
        same = agreement(decisions(remote_probs, rules[name], labels), decisions(local, rules[name], labels))
        variants[name] = {**edge_timing(bench), "agreement_with_local": same["value"],
                          "max_abs_prob_diff": float(np.max(np.abs(remote_probs - local)))}
    machine = next((v.pop("device") for v in variants.values()), {})
    for v in variants.values():
        v.pop("device", None)
    return {"kind": "ssh", "host": target.host, "machine": machine,
            "interpreter": next((v.get("interpreter") for v in variants.values()), None),
            "variants": variants, "notes": emulation_notes(machine)}


def predict_records(text: str) -> dict:
    """`predict --json` output (JSON Lines: a model record, one record per file, a summary) as
    {"labels": [...], "results": [per-file records in input order]}."""
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise OncoliteError("predict on the device printed something other than JSON Lines; "
                            "run it by hand there to see why") from None
    model = next((r for r in records if r.get("type") == "model"), {})
    return {"labels": model.get("labels", []),
            "results": [r for r in records if r.get("type") in ("result", "error")]}


def prediction_probs(predicted: dict, n: int) -> np.ndarray:
    """N x C probabilities, in input order and label order, from `predict --json` output."""
    rows = predicted["results"]
    failed = [r for r in rows if r.get("type") == "error"]
    if failed or len(rows) != n:
        raise OncoliteError(f"predict on the device classified {len(rows) - len(failed)} of {n} images"
                            + (f"; first error: {failed[0]['error']}" if failed else ""))
    return np.array([[r["probabilities"][label] for label in predicted["labels"]] for r in rows], dtype=np.float64)


def emulation_notes(machine: dict) -> list[str]:
    cpu = " ".join(str(v) for v in machine.values()).lower()
    if "qemu" in cpu:
        return ["emulated CPU (qemu): timings are not real hardware's; do not report them"]
    return []


# --- adb ------------------------------------------------------------------------------------------

_TIMINGS = re.compile(r"Inference timings in us:\s*Init:\s*([\d.]+),\s*First inference:\s*([\d.]+),"
                      r"\s*Warmup \(avg\):\s*([\d.eE+-]+),\s*Inference \(avg\):\s*([\d.eE+-]+)")
_STAT = re.compile(r"count=(\d+)((?:\s+\w+=[\d.eE+-]+)+)")
_MEMORY = re.compile(r"Memory footprint delta from the start of the tool \(MB\):\s*init=([\d.]+)\s+overall=([\d.]+)")


def parse_benchmark_model(text: str) -> dict:
    """LiteRT `benchmark_model` output -> milliseconds; raises when the timing line is absent."""
    m = _TIMINGS.search(text)
    if not m:
        raise OncoliteError("benchmark_model printed no 'Inference timings in us' line; run it by hand to see why")
    init, first, warm, avg = (float(g) / 1e3 for g in m.groups())
    result = {"init_ms": init, "first_inference_ms": first, "warmup_avg_ms": warm, "inference_avg_ms": avg}
    stats = _STAT.findall(text)
    if stats:
        # The last count= line is the timed runs'; values are microseconds.
        count, rest = stats[-1]
        fields = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.eE+-]+)", rest)}
        result["runs"] = {"count": int(count), **{f"{k}_ms": v / 1e3 for k, v in fields.items()}}
    mem = _MEMORY.search(text)
    if mem:
        result["memory_delta_mb"] = {"init": float(mem.group(1)), "overall": float(mem.group(2))}
    return result


def adb_latency(parsed: dict) -> dict:
    """The report's latency entry. benchmark_model prints no p90 (None here) but a median and a
    p95 in recent builds; without a median, p50 is the mean (and says so)."""
    runs = parsed.get("runs", {})
    return {"p50": runs.get("median_ms", parsed["inference_avg_ms"]), "p90": None, "p95": runs.get("p95_ms"),
            "max": runs.get("max_ms"), "mean": parsed["inference_avg_ms"], "min": runs.get("min_ms"),
            "std": runs.get("std_ms"), "p50_is_mean": "median_ms" not in runs}


def benchmark_model_path(given=None) -> Path:
    """The benchmark_model binary: --benchmark-model, else $ONCOLITE_BENCHMARK_MODEL, else tools/benchmark_model."""
    binary = Path(given or os.environ.get("ONCOLITE_BENCHMARK_MODEL") or DEFAULT_BENCHMARK_MODEL)
    if not binary.is_file():
        raise OncoliteError(f"{binary}: LiteRT benchmark_model binary not found; download the android_aarch64 "
                            "benchmark_model (LiteRT performance docs) and pass --benchmark-model PATH")
    return binary


def adb_benchmark(serial: str | None, models: dict, *, runs: int, warmup: int, threads: list, binary: Path) -> dict:
    adb = ["adb", *(["-s", serial] if serial else [])]

    def call(*cmd, what):
        try:
            done = subprocess.run([*adb, *cmd], capture_output=True, text=True, timeout=1800)
        except FileNotFoundError:
            raise OncoliteError("adb: not found; install Android platform-tools (apt-get install adb)") from None
        if done.returncode != 0:
            raise OncoliteError(f"adb{' -s ' + serial if serial else ''}: {what} failed: {done.stderr.strip()[-200:]}")
        return done.stdout + done.stderr

    call("shell", "mkdir", "-p", ADB_DIR, what="mkdir")
    call("push", str(binary), f"{ADB_DIR}/benchmark_model", what="pushing benchmark_model")
    call("shell", "chmod", "755", f"{ADB_DIR}/benchmark_model", what="chmod")
    model_name = call("shell", "getprop", "ro.product.model", what="getprop").strip()
    variants = {}
    for name, path in models.items():
        if path.suffix != ".tflite":
            continue
        call("push", str(path), f"{ADB_DIR}/{path.name}", what=f"pushing {path.name}")
        variants[name] = {"latency_ms": {}, "raw": {}}
        for t in threads:
            out = call("shell", f"{ADB_DIR}/benchmark_model", f"--graph={ADB_DIR}/{path.name}", f"--num_threads={t}",
                       f"--num_runs={runs}", f"--warmup_runs={warmup}", "--use_xnnpack=true", what=f"benchmark {path.name}")
            parsed = parse_benchmark_model(out)
            variants[name]["latency_ms"][str(t)] = adb_latency(parsed)
            variants[name]["raw"][str(t)] = parsed
            variants[name]["load_ms"] = parsed["init_ms"]
    return {"kind": "adb", "serial": serial, "machine": {"cpu_model": model_name, "model": model_name, "system": "Android"},
            "interpreter": "LiteRT benchmark_model (XNNPACK)", "variants": variants,
            "notes": ["adb target: code path unverified on hardware (no Android device was available); "
                      "latency from benchmark_model on random inputs, no agreement check"]}
