"""Time the desktop float Keras model the way a user calls it, in a process of its own.

`python -m benchmarks.latency MODEL IMAGE... --threads N --runs R --warmup W --json`
loads the model, preprocesses each image (timed on its own), then calls
`model(x, training=False)` on one image at a time: W warm-up calls, R timed calls. It prints the
same kind of JSON as `python -m edge_runtime bench`, so both sides of the speed-up are measured
alike. One thread count per process: TensorFlow fixes its thread pools when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# The same statistics and memory probe as the edge bench, so both sides are measured alike.
from edge_runtime.bench import latency_stats, peak_rss_mb
from edge_runtime.preprocess import Preprocessing, preprocess


def time_keras(model_path: str, images: list[str], prep: Preprocessing, threads: int, runs: int, warmup: int) -> dict:
    start = time.perf_counter()
    import tensorflow as tf  # noqa: E402  (after the thread settings' environment is ready)

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_keras as keras

    import_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    load_ms = (time.perf_counter() - start) * 1e3

    inputs, prep_ms = [], []
    for path in images:
        start = time.perf_counter()
        inputs.append(preprocess(path, prep)[None])
        prep_ms.append((time.perf_counter() - start) * 1e3)
    for i in range(warmup):
        model(inputs[i % len(inputs)], training=False)
    infer_ms = []
    for i in range(runs):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        np.asarray(model(x, training=False))  # materialize the result, as a caller would
        infer_ms.append((time.perf_counter() - start) * 1e3)
    inference = latency_stats(infer_ms)
    return {"model": model_path, "interpreter": f"tf_keras {keras.__version__} (TensorFlow {tf.__version__})",
            "threads": threads, "runs": runs, "warmup": warmup, "import_ms": import_ms, "load_ms": load_ms,
            "preprocess_ms": {"images": len(prep_ms), **latency_stats(prep_ms)}, "inference_ms": inference,
            "throughput_per_s": 1e3 / inference["mean"], "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--prep", required=True, help="preprocessing as JSON (Preprocessing.to_dict())")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    import train  # noqa: F401  (TensorFlow's environment: legacy Keras, log level; imports no TensorFlow)
    prep = Preprocessing.from_dict(json.loads(args.prep))
    result = time_keras(str(Path(args.model)), args.images, prep, args.threads, args.runs, args.warmup)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
