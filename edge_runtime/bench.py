"""`python -m edge_runtime bench MODEL [IMAGES...]`: time a .tflite model on this device.

Reports load time, preprocessing (decode, resize, uint8 pixels to the input tensor:
EdgeModel.input_tensor, what predict and the server run) separately from inference (set input,
invoke, read output), latency percentiles, throughput and peak RSS, per thread count. This is
what runs on a Raspberry Pi over SSH with the base install only; run it in a fresh process per
model when comparing memory (peak RSS only ever grows within a process).

Per thread count it also times image to answer as the device runs it, stage by stage
(`stages_ms`): decode and resize (the one preprocessing's input_pixels), quantize (uint8
pixels to the input tensor through edge_runtime.pixels, no float round trip, and set into the
interpreter), invoke, read-out (output, dequantize, probabilities, decision); and the
throughput at batch 32 (`batch`: the input resized to 32 where the model allows, else the
reason). `oncolite benchmark` runs this very command for every .tflite file, so both report
the same latency for a model; both print the CPU features that decide int8 speed.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import numpy as np

from edge_runtime.backends import BACKENDS, RESOLVERS
from edge_runtime.console import add_output_flags, print_json, progress, result, say
from edge_runtime.errors import EXIT_OK, OncoliteError

BATCH = 32  # the throughput batch
# /proc/cpuinfo flags that decide int8 (and float) speed: x86 AVX2 / AVX-512 / VNNI / AMX, Arm
# NEON (asimd), dot product (asimddp), int8 matrix multiply (i8mm), SVE.
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "neon", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .tflite model to time")
    parser.add_argument("images", nargs="*", help="images, folders or globs to feed (default: seeded random "
                                                  "inputs; images also time the preprocessing)")
    parser.add_argument("--threads", default="1", metavar="N,...",
                        help="interpreter thread counts to time, comma-separated, e.g. 1,2,4 (default 1)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per thread count (default 100)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter")
    parser.add_argument("--resolver", choices=RESOLVERS, default="default")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch of the throughput run (default {BATCH}; 0 skips it)")
    parser.add_argument("--labels", metavar="A,B,...", help="class names of a bare model (no metadata, no sidecar)")
    parser.add_argument("--mean", help="normalization mean of a bare model, one value or R,G,B (default 127.5)")
    parser.add_argument("--std", help="normalization std of a bare model, one value or R,G,B (default 127.5)")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.predict import find_inputs

    threads = parse_threads(args.threads)
    images = find_inputs(args.images)[0] if args.images else []  # folders and globs as predict takes them
    report = bench(args.model, images, threads, warmup=args.warmup, runs=args.runs,
                   backend=args.backend, resolver=args.resolver, quiet=args.quiet or args.json, batch=args.batch,
                   labels=bare_labels(args.labels), prep=bare_prep(args.mean, args.std))
    if args.json:
        print_json(report)
    else:
        say(args, *format_report(report))
        result(args, result_line(report))
    return EXIT_OK


def result_line(report: dict) -> str:
    """The one result line: the model and its median latency (and throughput) per thread count."""
    timings = ", ".join(f"{r['latency_ms']['p50']:.3f} ms @{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
                        + (f" ({r['throughput_per_s']:.1f} img/s)" if r.get("throughput_per_s") else "")
                        for r in report["threads"])
    return f"{report['model']}: p50 latency {timings}; peak RSS {report['peak_rss_mb']} MB"


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise OncoliteError(f"--threads {text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return threads


def bare_labels(text):
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def bare_prep(mean, std):
    """The normalization of a bare model (its size comes from its input tensor), or None."""
    if mean is None and std is None:
        return None
    from edge_runtime.preprocess import MOBILENET_MEAN, MOBILENET_STD, Preprocessing

    def values(text, default, flag):
        if text is None:
            return default
        try:
            v = tuple(float(t) for t in str(text).split(",") if t.strip())
        except ValueError:
            v = ()
        if len(v) not in (1, 3) or (flag == "--std" and min(v) <= 0):
            raise OncoliteError(f"{flag} {text!r}: give one value or three comma-separated values (R,G,B)")
        return v

    return Preprocessing(mean=values(mean, MOBILENET_MEAN, "--mean"), std=values(std, MOBILENET_STD, "--std"))


def bench(model_path, images=(), threads=(1,), *, warmup=10, runs=100, backend=None, resolver="default",
          quiet=False, batch=BATCH, labels=None, prep=None) -> dict:
    """Time `model_path` at each thread count; returns the report as a dict (JSON-ready).
    `labels`/`prep`: for a bare model without metadata or sidecar."""
    from edge_runtime.model import EdgeModel

    for flag, value, least in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--batch", batch, 0)):
        if value < least:
            raise OncoliteError(f"{flag} {value}: give {least} or more")
    results = []
    preprocessing = None
    for count in threads:
        started = time.perf_counter()
        model = EdgeModel.load(model_path, backend=backend, threads=count, resolver=resolver, labels=labels, prep=prep)
        load_ms = (time.perf_counter() - started) * 1000
        if preprocessing is None:
            inputs, preprocessing = prepare_inputs(model, images)
        result = time_model(model, inputs, count, warmup, runs, quiet=quiet)
        result["load_ms"] = round(load_ms, 3)
        result["stages_ms"] = time_stages(model, images, warmup, runs, quiet=quiet)
        if batch:
            result["batch"] = time_batch(model, inputs, count, batch, warmup, runs, backend=backend, resolver=resolver)
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
    model.input_tensor(images[0])  # untimed: the first decode pays for PIL's lazy plugin imports
    tensors, times = [], []
    for image in images:
        started = time.perf_counter()
        tensors.append(model.input_tensor(image))
        times.append((time.perf_counter() - started) * 1000)
    return tensors, {"images": len(times), **latency_stats(times)}


STAGES = ("decode", "resize", "quantize", "invoke", "read_out")


def time_stages(model, images, warmup=10, runs=100, quiet=True) -> dict:
    """Image to answer, stage by stage, over `runs` images (cycled): decode, resize (the two
    steps of the one preprocessing's input_pixels), quantize (pixels to the input tensor, set
    into the interpreter), invoke, read-out (output, dequantize, probabilities, decision). The
    first three are EdgeModel.input_tensor, the input path of predict and the server, split in
    its steps. Without images: seeded random pixels at the input size, no decode or resize.
    Returns {stage: stats, "image_to_answer": stats, "image_to_answer_over_invoke": p50 ratio}."""
    from edge_runtime.model import to_probabilities
    from edge_runtime.preprocess import decode_image, dequantize, resize

    interpreter, inp, out = model.interpreter, model.input, model.output
    if images:
        sources, decode = list(images), True
    else:
        rng = np.random.default_rng(0)
        sources = [rng.integers(0, 256, (model.prep.height, model.prep.width, 3), dtype=np.uint8)]
        decode = False
    times = {stage: [] for stage in STAGES}
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        image = decode_image(sources[i % len(sources)], model.prep) if decode else None
        t1 = time.perf_counter()
        pixels = resize(image, model.prep) if decode else sources[0]
        t2 = time.perf_counter()
        interpreter.set_tensor(inp.index, model.input_from_pixels(pixels))
        t3 = time.perf_counter()
        interpreter.invoke()
        t4 = time.perf_counter()
        y = interpreter.get_tensor(out.index)[0]
        if out.quantized:
            y = dequantize(y, out.scale, out.zero_point)
        model.decide(to_probabilities(y))
        t5 = time.perf_counter()
        if i >= warmup:
            for stage, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
                times[stage].append((b - a) * 1000)
    total = [sum(parts) for parts in zip(*(times[s] for s in STAGES))]
    result = {stage: latency_stats(times[stage]) if (decode or stage not in ("decode", "resize")) else None
              for stage in STAGES}
    result["image_to_answer"] = latency_stats(total)
    invoke = result["invoke"]["p50"]
    result["image_to_answer_over_invoke"] = round(result["image_to_answer"]["p50"] / invoke, 3) if invoke > 0 else None
    result["input_path"] = model._pixel_input.kind if model._pixel_input is not None else None
    return result


def time_batch(model, inputs, threads, batch=BATCH, warmup=10, runs=100, backend=None, resolver="default") -> dict:
    """Throughput at `batch` images per invoke: a second interpreter with its input resized to
    `batch` x H x W x 3. A model that cannot take it (a static shape inside, a runtime that
    refuses) gives {"supported": False, "reason"}; so does one whose batched answers differ
    from its batch-1 answers."""
    from edge_runtime.backends import make_interpreter

    name = os.fsdecode(model.path)
    try:
        interpreter, _ = make_interpreter(model.path, backend=backend or model.backend, threads=threads,
                                          resolver=resolver, name=name)
        shape = [batch, *model.input.shape[1:]]
        interpreter.resize_tensor_input(model.input.index, shape, strict=False)
        interpreter.allocate_tensors()
        x = np.concatenate([inputs[i % len(inputs)] for i in range(batch)]).astype(model.input.dtype)
        interpreter.set_tensor(model.input.index, x)
        interpreter.invoke()
        y = interpreter.get_tensor(model.output.index)
        if y.shape[0] != batch:
            return {"batch": batch, "supported": False, "reason": f"output has shape {list(y.shape)} for {batch} inputs"}
        with model._lock:
            model.interpreter.set_tensor(model.input.index, inputs[0])
            model.interpreter.invoke()
            single = np.array(model.interpreter.get_tensor(model.output.index)[0], dtype=np.float64)
        tolerance = 1.0 if model.output.quantized else 1e-4 + 1e-3 * float(np.abs(single).max())  # 1 step / float noise
        if np.abs(single - y[0].astype(np.float64)).max() > tolerance:
            return {"batch": batch, "supported": False, "reason": "batched outputs differ from batch-1 outputs"}
    except Exception as e:  # noqa: BLE001 - any refusal of the runtime means: not at this batch
        text = " ".join(str(e).split())[:160] or type(e).__name__
        return {"batch": batch, "supported": False, "reason": text}
    batch_runs = max(3, runs // 10)
    for _ in range(max(1, warmup // 10)):
        interpreter.invoke()
    times = []
    for _ in range(batch_runs):
        started = time.perf_counter()
        interpreter.set_tensor(model.input.index, x)
        interpreter.invoke()
        interpreter.get_tensor(model.output.index)
        times.append((time.perf_counter() - started) * 1000)
    stats = latency_stats(times)
    return {"batch": batch, "supported": True, "runs": batch_runs, "latency_ms": stats,
            "images_per_s": round(batch * 1000.0 / stats["mean"], 2) if stats["mean"] > 0 else None}


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
            facts["cpu_flags"] = [flag for flag in value.split() if flag in CPU_FEATURES]
    if "cpu_flags" in facts:
        facts["int8_features"] = int8_features(facts["cpu_flags"])
    return facts


def int8_features(flags) -> str:
    """What the CPU offers int8 inference, in words (the fastest int8 dot-product path)."""
    flags = set(flags)
    if "amx_int8" in flags:
        return "AMX int8 tiles (+ AVX-512 VNNI)"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI int8 dot products"
    if "avx_vnni" in flags:
        return "AVX-VNNI int8 dot products (256-bit)"
    if "avx512bw" in flags:
        return "AVX-512BW, no VNNI: int8 via 16-bit multiplies"
    if "avx2" in flags:
        return "AVX2, no VNNI: int8 via 16-bit multiplies"
    if "i8mm" in flags:
        return "Arm i8mm int8 matrix multiply (+ dot product)"
    if "asimddp" in flags:
        return "Arm dot product (sdot/udot)"
    if flags & {"asimd", "neon"}:
        return "Arm NEON, no dot product"
    return "no SIMD int8 features listed"


def format_report(report: dict) -> list[str]:
    lines = [f"model    {report['model']} ({report['kind']}, {report['size_bytes']} bytes), "
             f"backend {report['backend']}, resolver {report['resolver']}",
             f"device   {report['device'].get('cpu_model', report['device']['machine'])}, "
             f"{report['device']['cpus']} CPUs",
             f"cpu      {cpu_line(report['device'])}"]
    if report["preprocessing"]:
        p = report["preprocessing"]
        lines.append(f"preprocessing  p50 {p['p50']:.3f} ms  mean {p['mean']:.3f} ms over {p['images']} image(s)")
    lines.append(f"{'threads':>7}  {'load ms':>8}  {'p50':>8}  {'p90':>8}  {'p99':>8}  {'mean':>8}  {'img/s':>8}")
    for r in report["threads"]:
        s = r["latency_ms"]
        lines.append(f"{r['threads']:>7}  {r['load_ms']:8.2f}  {s['p50']:8.3f}  {s['p90']:8.3f}  {s['p99']:8.3f}  "
                     f"{s['mean']:8.3f}  {r['throughput_per_s'] or 0:8.1f}")
    for r in report["threads"]:
        lines += stage_lines(r)
    lines.append(f"peak RSS {report['peak_rss_mb']} MB (whole process)")
    return lines


def cpu_line(device: dict) -> str:
    flags = device.get("cpu_flags")
    if flags is None:
        return "features unknown (no /proc/cpuinfo)"
    return f"{device.get('int8_features')}; flags: {' '.join(flags) or 'none of ' + ','.join(CPU_FEATURES[:4])}"


def stage_lines(r: dict) -> list[str]:
    """Image to answer and batch throughput of one thread count, for the text report."""
    lines = []
    s = r.get("stages_ms")
    if s:
        parts = "  ".join(f"{stage} {s[stage]['p50']:.3f}" for stage in STAGES if s.get(stage))
        # Without images nothing is decoded or resized: not an image-to-answer figure.
        what = "image to answer" if s.get("decode") else "pixels to answer (random pixels; give images for decode and resize)"
        lines.append(f"@{r['threads']} thread(s): {what} p50 {s['image_to_answer']['p50']:.3f} ms = {parts} "
                     f"(x{s['image_to_answer_over_invoke']} of invoke; input {s.get('input_path')})")
    b = r.get("batch")
    if b:
        lines.append(f"@{r['threads']} thread(s): batch {b['batch']}: " + (
            f"{b['images_per_s']} images/s" if b["supported"] else f"not supported ({b['reason']})"))
    return lines
