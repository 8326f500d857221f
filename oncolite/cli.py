"""The `oncolite` command: one subcommand per thing a user wants to do."""

from __future__ import annotations

from edge_runtime.cli import EDGE_COMMANDS, dispatch

COMMANDS = {
    "run": ("oncolite.pipeline", "the whole pipeline on a dataset: audit, split, train, quantize, export, benchmark, report"),
    "audit": ("train.audit", "audit a dataset: unreadable files, masks, exact/near duplicates, label conflicts, statistics"),
    "split": ("train.splits", "leak-free, stratified, group-aware train/val/test split and k-fold CV, saved as a manifest"),
    "train": ("train.train", "fine-tune MobileNetV2 on a manifest (two phases, GPU or CPU, resumable)"),
    "evaluate": ("train.evaluate", "metrics with confidence intervals, plots and error analysis of a model on a manifest"),
    "explain": ("train.gradcam", "Grad-CAM heatmap of the float model over an image"),
    "quantize": ("quantize.qat", "quantization-aware fine-tuning of a run's float model"),
    "export": ("quantize.export", "export TFLite variants (fp32, fp16, dynamic, int8 PTQ/GPTQ/QAT, the chosen int8 and its uint8 twin) with metadata"),
    "benchmark": ("benchmarks.benchmark", "float Keras model against every TFLite variant: accuracy, size, latency, memory"),
    **EDGE_COMMANDS,
}


def main(argv=None) -> int:
    return dispatch("oncolite", COMMANDS, argv)
