"""Quantization layer: QAT, PTQ, TFLite export with metadata, model checks."""

import oncolite.train  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
