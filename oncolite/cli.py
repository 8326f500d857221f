"""The `oncolite` command: one subcommand per thing a user wants to do."""

from __future__ import annotations

from edge_runtime.cli import EDGE_COMMANDS, dispatch

COMMANDS = {
    "config": ("oncolite.train.config", "every setting: its default, what it accepts and what it does (change one with --set)"),
    "run": ("oncolite.pipeline", "the whole pipeline on a dataset: audit, split, train, quantize, export, benchmark, report"),
    "audit": ("oncolite.train.audit", "audit a dataset: unreadable files, masks, exact/near duplicates, label conflicts, statistics"),
    "split": ("oncolite.train.splits", "leak-free, stratified, group-aware train/val/test split and k-fold CV, saved as a manifest"),
    "train": ("oncolite.train.train", "fine-tune MobileNetV2 on a manifest (two phases, GPU or CPU, resumable)"),
    "evaluate": ("oncolite.train.evaluate", "metrics with confidence intervals, plots and error analysis of a model on a manifest"),
    "explain": ("oncolite.train.gradcam", "Grad-CAM heatmap of the float model over an image"),
    "quantize": ("oncolite.quantize.qat", "quantization-aware fine-tuning of a run's float model"),
    "export": ("oncolite.quantize.export", "export TFLite variants (fp32, fp16, dynamic, int8 PTQ/GPTQ/GPTQ-act/QAT, the chosen int8 and its uint8 twin) with metadata"),
    "benchmark": ("oncolite.benchmarks.benchmark", "the full report: the float model against every TFLite variant (accuracy with "
                                          "CIs, agreement, size, latency, memory); `bench` only times one .tflite"),
    **EDGE_COMMANDS,
}

# `oncolite --help` lists the commands by pipeline stage (a test checks each is listed once).
GROUPS = {
    "the whole pipeline": ["run", "config"],
    "data": ["audit", "split"],
    "train": ["train", "evaluate", "explain"],
    "quantize and export": ["quantize", "export"],
    "measure": ["benchmark", "bench"],
    "on the device (edge runtime, no TensorFlow; also `python -m edge_runtime`)": ["predict", "serve", "info", "slidemap", "webapp"],
}


def main(argv=None) -> int:
    return dispatch("oncolite", COMMANDS, argv, GROUPS)
