"""Time the desktop float Keras model the way a desktop user runs it at its fastest, in a process of its own.

`python -m oncolite.benchmarks.latency MODEL IMAGE... --threads N --runs R --warmup W`
loads the model, preprocesses each image (timed on its own), then times one image at a time
(batch 1) in three ways, W warm-up calls and R timed calls each: the plain Keras call
`model(x, training=False)` ("eager": Keras' per-call overhead included), a compiled
`tf.function` with a fixed input signature ("tf_function"), and the same with XLA
(`jit_compile=True`, "xla") where it compiles. `inference_ms` is the fastest of them (its name in
`mode`): speed-ups are stated against it, never against the eager call alone. The fastest way
is also timed at batch 32 (`batch`: images/s). It prints the same kind of JSON as
`python -m edge_runtime bench`, so both sides of a speed-up are measured alike. One thread count
per process: TensorFlow fixes its thread pools when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# The same statistics and memory probe as the edge bench, so both sides are measured alike.
from edge_runtime.bench import BATCH, latency_stats, peak_rss_mb
from edge_runtime.preprocess import Preprocessing, preprocess

MODES = ("eager", "tf_function", "xla")


def callables(model, tf, height: int, width: int) -> dict:
    """mode -> a function of one input batch returning a numpy array (the result materialized,
    as a caller would use it). Any batch size: the signature's batch dimension is None."""
    spec = tf.TensorSpec([None, height, width, 3], tf.float32)
    compiled = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    xla = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=True)
    return {"eager": lambda x: np.asarray(model(x, training=False)),
            "tf_function": lambda x: compiled(x).numpy(),
            "xla": lambda x: xla(x).numpy()}


def time_calls(fn, inputs: list, runs: int, warmup: int) -> dict:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(runs):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return latency_stats(times)


def time_keras(model_path: str, images: list[str], prep: Preprocessing, threads: int, runs: int, warmup: int,
               modes=MODES, batch: int = BATCH) -> dict:
    start = time.perf_counter()
    import tensorflow as tf  # noqa: E402  (after the thread settings' environment is ready)

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_keras as keras

    import_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    path = Path(model_path)
    model = keras.models.load_model(path, compile=False, safe_mode=True)  # .h5 / SavedModel ignore safe_mode
    load_ms = (time.perf_counter() - start) * 1e3

    inputs, prep_ms = [], []
    for image in images:
        start = time.perf_counter()
        inputs.append(preprocess(image, prep)[None])
        prep_ms.append((time.perf_counter() - start) * 1e3)
    fns = callables(model, tf, prep.height, prep.width)
    results = {}
    for mode in modes:
        try:
            stats = time_calls(fns[mode], inputs, runs, warmup)
        except Exception as e:  # noqa: BLE001 - XLA may not compile a model (or be absent): say so, time the others
            results[mode] = {"error": " ".join(str(e).split())[:200] or type(e).__name__}
            continue
        results[mode] = {"inference_ms": stats, "throughput_per_s": 1e3 / stats["mean"]}
    timed = {m: r for m, r in results.items() if "inference_ms" in r}
    if not timed:
        raise RuntimeError(f"{model_path}: no way of calling the model could be timed: {results}")
    fastest = min(timed, key=lambda m: timed[m]["inference_ms"]["p50"])
    batch_result = None
    if batch:
        stacked = [np.concatenate([inputs[(k + i) % len(inputs)] for i in range(batch)]) for k in range(2)]
        stats = time_calls(fns[fastest], stacked, max(3, runs // 10), max(1, warmup // 5))
        batch_result = {"batch": batch, "mode": fastest, "supported": True, "latency_ms": stats,
                        "images_per_s": batch * 1e3 / stats["mean"]}
    return {"model": model_path, "interpreter": f"tf_keras {keras.__version__} (TensorFlow {tf.__version__})",
            "threads": threads, "runs": runs, "warmup": warmup, "import_ms": import_ms, "load_ms": load_ms,
            "preprocess_ms": {"images": len(prep_ms), **latency_stats(prep_ms)},
            "mode": fastest, "modes": results, "inference_ms": timed[fastest]["inference_ms"],
            "throughput_per_s": timed[fastest]["throughput_per_s"], "batch": batch_result, "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oncolite.benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--prep", required=True, help="preprocessing as JSON (Preprocessing.to_dict())")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES), help=f"ways of calling the model, from {','.join(MODES)}")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch of the throughput run (0: none)")
    args = parser.parse_args(argv)
    import oncolite.train  # noqa: F401  (TensorFlow's environment: legacy Keras, log level; imports no TensorFlow)
    prep = Preprocessing.from_dict(json.loads(args.prep))
    modes = [m for m in args.modes.split(",") if m in MODES] or list(MODES)
    result = time_keras(str(Path(args.model)), args.images, prep, args.threads, args.runs, args.warmup,
                        modes=modes, batch=args.batch)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
