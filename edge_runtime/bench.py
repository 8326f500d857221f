"""`python -m edge_runtime bench MODEL [IMAGES...]`: time a .tflite model on this device.

Reports load time, preprocessing (decode, resize, normalize, quantize) separately from
inference (set input, invoke, read output), latency percentiles, throughput and peak RSS, per
thread count. This is what runs on a Raspberry Pi over SSH with the base install only; run it in
a fresh process per model when comparing memory (peak RSS only ever grows within a process).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import numpy as np

from edge_runtime.backends import BACKENDS, RESOLVERS
from edge_runtime.console import add_output_flags, print_json, progress, say
from edge_runtime.errors import EXIT_OK, OncoliteError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .tflite model to time")
    parser.add_argument("images", nargs="*", help="images to feed (default: seeded random inputs; "
                                                  "images also time the preprocessing)")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2,4 (default 1)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per thread count (default 100)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter")
    parser.add_argument("--resolver", choices=RESOLVERS, default="default")
    add_output_flags(parser)


def main(args) -> int:
    threads = parse_threads(args.threads)
    report = bench(args.model, args.images, threads, warmup=args.warmup, runs=args.runs,
                   backend=args.backend, resolver=args.resolver, quiet=args.quiet or args.json)
    if args.json:
        print_json(report)
    else:
        say(args, *format_report(report))
    return EXIT_OK


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise OncoliteError(f"--threads {text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return threads


def bench(model_path, images=(), threads=(1,), *, warmup=10, runs=100, backend=None, resolver="default",
          quiet=False) -> dict:
    """Time `model_path` at each thread count; returns the report as a dict (JSON-ready)."""
    from edge_runtime.model import EdgeModel

    if runs < 1 or warmup < 0:
        raise OncoliteError(f"--runs {runs} / --warmup {warmup}: runs must be >= 1 and warmup >= 0")
    results = []
    preprocessing = None
    for count in threads:
        started = time.perf_counter()
        model = EdgeModel.load(model_path, backend=backend, threads=count, resolver=resolver)
        load_ms = (time.perf_counter() - started) * 1000
        if preprocessing is None:
            inputs, preprocessing = prepare_inputs(model, images)
        result = time_model(model, inputs, count, warmup, runs, quiet=quiet)
        result["load_ms"] = round(load_ms, 3)
        results.append(result)
    return {"model": os.fsdecode(model.path), "size_bytes": model.size_bytes, "sha256": model.sha256,
            "kind": model.kind, "variant": model.facts.get("variant"), "backend": model.backend,
            "resolver": resolver, "input": model.input.to_dict(), "device": device_facts(),
            "inputs": "images" if images else "random", "preprocessing": preprocessing, "threads": results,
            "peak_rss_mb": peak_rss_mb()}


def prepare_inputs(model, images) -> tuple[list[np.ndarray], dict | None]:
    """Input tensors for the timed runs, and the per-image preprocessing timing when images are given."""
    if not images:
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (1, model.prep.height, model.prep.width, 3)).astype(np.float32)
        return [model.quantize_input(x)], None
    model.prepare(images[0])  # untimed: the first decode pays for PIL's lazy plugin imports
    tensors, times = [], []
    for image in images:
        started = time.perf_counter()
        tensors.append(model.quantize_input(model.prepare(image)[None]))
        times.append((time.perf_counter() - started) * 1000)
    return tensors, {"images": len(times), **latency_stats(times)}


def time_model(model, inputs, threads, warmup=10, runs=100, quiet=True) -> dict:
    """Latency of `runs` inferences of an EdgeModel over `inputs` (tensors from quantize_input), cycled.

    `threads` is recorded as given: the model was loaded with it.
    """
    for i in range(warmup):
        model.run(inputs[i % len(inputs)])
    times = []
    for i in progress(range(runs), desc=f"{threads} thread(s)", quiet=quiet, unit="run"):
        tensor = inputs[i % len(inputs)]
        started = time.perf_counter()
        model.run(tensor)
        times.append((time.perf_counter() - started) * 1000)
    stats = latency_stats(times)
    return {"threads": threads, "warmup": warmup, "runs": runs, "latency_ms": stats,
            "throughput_per_s": round(1000.0 / stats["mean"], 2) if stats["mean"] > 0 else None,
            "peak_rss_mb": peak_rss_mb()}


def latency_stats(times_ms) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(t.mean()), 4), "std": round(float(t.std()), 4),
            "min": round(float(t.min()), 4), "max": round(float(t.max()), 4)}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    On Linux, VmHWM: ru_maxrss of a child starts at its parent's peak (a subprocess of a 700 MB
    TensorFlow process would report 700 MB). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def device_facts() -> dict:
    """What a timing depends on: machine, CPU count and (on Linux) the CPU model and flags that matter."""
    facts = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
             "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpuinfo = f.read()
    except OSError:
        return facts
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and "cpu_model" not in facts:
            facts["cpu_model"] = value.strip()
        if key in ("flags", "features") and "cpu_flags" not in facts:
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd", "asimddp", "i8mm")
            facts["cpu_flags"] = [flag for flag in value.split() if flag in wanted]
    return facts


def format_report(report: dict) -> list[str]:
    lines = [f"model    {report['model']} ({report['kind']}, {report['size_bytes']} bytes), "
             f"backend {report['backend']}, resolver {report['resolver']}",
             f"device   {report['device'].get('cpu_model', report['device']['machine'])}, "
             f"{report['device']['cpus']} CPUs"]
    if report["preprocessing"]:
        p = report["preprocessing"]
        lines.append(f"preprocessing  p50 {p['p50']:.3f} ms  mean {p['mean']:.3f} ms over {p['images']} image(s)")
    lines.append(f"{'threads':>7}  {'load ms':>8}  {'p50':>8}  {'p90':>8}  {'p99':>8}  {'mean':>8}  {'img/s':>8}")
    for r in report["threads"]:
        s = r["latency_ms"]
        lines.append(f"{r['threads']:>7}  {r['load_ms']:8.2f}  {s['p50']:8.3f}  {s['p90']:8.3f}  {s['p99']:8.3f}  "
                     f"{s['mean']:8.3f}  {r['throughput_per_s'] or 0:8.1f}")
    lines.append(f"peak RSS {report['peak_rss_mb']} MB (whole process)")
    return lines
