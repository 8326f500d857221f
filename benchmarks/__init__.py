"""Benchmarks layer: every variant's accuracy, size, latency and memory, here and on devices."""

import oncolite.train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
