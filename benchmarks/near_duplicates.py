"""How long the near-duplicate search takes at IDC scale: 200,000 synthetic 64-bit hashes.

Random hashes plus planted near pairs (1..threshold bits flipped); the search must find every
planted pair (recall 1.0, by the pigeonhole argument in train/duplicates.py).

    python -m oncolite.benchmarks.near_duplicates [--n 200000] [--threshold 6] [--out reports/near_duplicates.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from edge_runtime.atomic import write_json
from oncolite.train.duplicates import near_duplicate_pairs


def synthetic_hashes(n: int, planted: int, threshold: int, bits: int = 64, seed: int = 0):
    """n random hashes whose last `planted` rows are copies of earlier rows with 1..threshold bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.random((n, bits)) < 0.5
    sources = rng.choice(n - planted, size=planted, replace=False)
    targets = np.arange(n - planted, n)
    for source, target in zip(sources, targets):
        hashes[target] = hashes[source]
        flip = rng.choice(bits, size=rng.integers(1, threshold + 1), replace=False)
        hashes[target, flip] ^= True
    return hashes, np.stack([sources, targets], axis=1)


def run(n: int = 200_000, threshold: int = 6, planted: int = 1000, seed: int = 0) -> dict:
    hashes, truth = synthetic_hashes(n, planted, threshold, seed=seed)
    start = time.perf_counter()
    i, j, _ = near_duplicate_pairs(hashes, threshold)
    seconds = time.perf_counter() - start
    found = set(zip(i.tolist(), j.tolist()))
    recall = sum((min(a, b), max(a, b)) in found for a, b in truth.tolist()) / len(truth)
    return {"hashes": n, "bits": 64, "threshold": threshold, "planted_pairs": planted,
            "pairs_found": len(found), "recall": recall, "seconds": round(seconds, 3),
            "method": "multi-index hashing: threshold+1 exact bands, sorted runs, vectorized popcount",
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "numpy": np.__version__}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--threshold", type=int, default=6)
    parser.add_argument("--planted", type=int, default=1000)
    parser.add_argument("--out", default="reports/near_duplicates.json")
    args = parser.parse_args(argv)
    result = run(args.n, args.threshold, args.planted)
    write_json(args.out, result)
    print(f"{result['hashes']} hashes, threshold {result['threshold']}: {result['seconds']} s, "
          f"{result['pairs_found']} pairs, recall of planted pairs {result['recall']:.3f} -> {args.out}")
    return 0 if result["recall"] == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
