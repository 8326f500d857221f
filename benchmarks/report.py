"""The benchmark report: report.json, report.md and PNG plots; --compare tables across devices/runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.atomic import write_json, write_text
from oncolite.train.plots import draw_confusion, pyplot, save_png

# Report names of the reference model and of the majority-class baseline row.
FLOAT = "keras_float"
BASELINE = "majority_baseline"
SPLIT_KINDS = ("group", "random", "published", "given")  # train.manifest's split kinds
# Issue 17: an integer model's image to answer (decode, resize, pixels to input, invoke,
# read-out) is at most this many times its invoke alone.
IMAGE_TO_ANSWER_BOUND = 1.5
# benchmarks.latency's ways of calling the float model, as the report names them.
KERAS_MODES = {"eager": "plain Keras call model(x)", "tf_function": "tf.function", "xla": "tf.function + XLA"}
STAGE_NAMES = {"decode": "decode", "resize": "resize", "quantize": "pixels → input", "invoke": "invoke",
               "read_out": "read-out"}  # edge_runtime.bench.STAGES
# Published MobileNetV2 (1.0, 224 px) latencies, batch 1, with their sources: the XNNPACK
# README's "Performance" tables (end2end-bench, random weights, Feb 2022; int8 per-channel) and
# the TensorFlow Lite "Model optimization" page (Pixel 2, one big core; float vs QAT int8).
# `match` holds lowercase fragments of a device's CPU / model description.
PUBLISHED = [
    {"device": "Raspberry Pi 4 (Cortex-A72, ARM64, multi-thread XNNPACK)", "match": ["raspberry pi 4", "cortex-a72"],
     "fp32_ms": 46, "int8_ms": 17, "source": "XNNPACK README, Performance: Raspberry Pi (RPi 4, ARM64 build)"},
    {"device": "Raspberry Pi 3B+ (Cortex-A53, 32-bit Raspbian, multi-thread XNNPACK)",
     "match": ["raspberry pi 3", "cortex-a53"],
     "fp32_ms": 79, "int8_ms": 30, "source": "XNNPACK README, Performance: Raspberry Pi (RPi 3+)"},
    {"device": "Pixel 2", "match": ["pixel 2"], "fp32_ms": 89, "int8_ms": 54,
     "source": "TensorFlow Lite docs, Model optimization: latency results (float vs QAT int8)"},
]


def fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def with_ci(v: dict, key: str) -> str:
    ci = (v.get("ci") or {}).get(key)
    text = fmt(v.get(key))
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and v.get(key) is not None else text


def fmt_share(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def published_matches(device_text: str) -> list[dict]:
    text = (device_text or "").lower()
    return [p for p in PUBLISHED if any(m in text for m in p["match"])]


def accuracy_table(report: dict) -> list[str]:
    lines = ["| model | accuracy | balanced acc. | macro F1 | ROC-AUC | PR-AUC | MCC | agreement with float | "
             "mean abs Δp | McNemar p (only float right / only this right) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in report["variants"].items():
        a = v.get("agreement_ci") or [None, None]
        m = v.get("mcnemar") or {}
        agreement = f"{v['agreement_with_float']:.1%} [{a[0]:.1%}, {a[1]:.1%}]" if a[0] is not None else "—"
        lines.append(f"| {name} | {with_ci(v, 'accuracy')} | {with_ci(v, 'balanced_accuracy')} | {with_ci(v, 'f1_macro')} | "
                     f"{with_ci(v, 'roc_auc_macro')} | {with_ci(v, 'pr_auc_macro')} | {with_ci(v, 'mcc')} | {agreement} | "
                     f"{fmt(v.get('mean_abs_prob_diff'), 4)} | {fmt(m.get('p_value'), 4)} "
                     f"({m.get('only_ref_correct', '—')} / {m.get('only_other_correct', '—')}) |")
    return lines


def fidelity_table(report: dict) -> list[str]:
    """Per variant: flips against float, confident ones, and its uncertain band on this side."""
    lines = ["| model | flips | confident flips (float margin ≥ 0.2) | max abs Δp | uncertain band | "
             "flagged | agreement outside the band |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in report["variants"].items():
        if name == FLOAT or v.get("flips") is None:
            continue
        unc = v.get("uncertain") or {}
        outside = unc.get("agreement_outside")
        lines.append(f"| {name} | {v['flips']} | {v['confident_flips']} | {fmt(v.get('max_abs_prob_diff'), 3)} | "
                     f"{fmt(v.get('uncertain_margin'), 3)} | "
                     f"{fmt_share(unc.get('share'))} | "
                     f"{'—' if outside is None else f'{outside:.1%}'} |")
    return lines


def flipped_table(report: dict, limit: int = 40) -> list[str]:
    """Each image an int8 variant decides differently from float, with both models' probabilities."""
    labels = report["labels"]
    lines = []
    for name, rows in (report.get("flipped") or {}).items():
        if not name.startswith("tflite_int8") or not rows:
            continue
        lines += ["", f"### {name}: {len(rows)} flipped", "",
                  f"| image | true | float | {name} | float p ({', '.join(labels)}) | {name} p | float margin |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: -r["float_margin"])[:limit]:
            lines.append(f"| {r['image']} | {r['label']} | {r['float']} | {r['variant']} | "
                         f"{', '.join(f'{p:.3f}' for p in r['float_probs'])} | "
                         f"{', '.join(f'{p:.3f}' for p in r['variant_probs'])} | {r['float_margin']:.3f} |")
        if len(rows) > limit:
            lines.append(f"| … {len(rows) - limit} more in report.json | | | | | | |")
    return lines


def per_class_table(report: dict) -> list[str]:
    labels = report["labels"]
    lines = ["| model | " + " | ".join(f"{label} ΔF1 / Δrecall" for label in labels) + " |",
             "| --- |" + " --- |" * len(labels)]
    for name, v in report["variants"].items():
        if name == FLOAT or not v.get("per_class_delta"):
            continue
        d = v["per_class_delta"]
        lines.append(f"| {name} | " + " | ".join(f"{d[label]['f1']:+.3f} / {d[label]['recall']:+.3f}" for label in labels) + " |")
    return lines


def cost_table(report: dict) -> list[str]:
    threads = [str(t) for t in report["settings"]["threads"]]
    columns = ["model", "size (KB)", "×fp32", "×Keras", "load (ms)", "peak RSS (MB)",
               *(f"p50 / p90 / p99 ms @{t}" for t in threads), *(f"× faster than float @{t}" for t in threads)]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, v in report["variants"].items():
        if v.get("size_bytes") is None:
            continue
        lat = v.get("latency_ms") or {}
        speed = v.get("speedup_vs_keras") or {}
        cells = [f"{fmt(lat[t]['p50'], 2)} / {fmt(lat[t]['p90'], 2)} / {fmt(lat[t].get('p99'), 2)}" if t in lat else "—"
                 for t in threads]
        cells += [f"{speed[t]:.1f}×" if t in speed else "—" for t in threads]
        lines.append(" | ".join([f"| {name}", f"{v['size_bytes'] / 1024:.0f}", fmt(v.get("size_ratio_fp32"), 2),
                                 fmt(v.get("size_ratio_keras"), 2), fmt(v.get("load_ms"), 1),
                                 fmt(v.get("peak_rss_mb"), 0), *cells]) + " |")
    return lines


def timed_threads(report: dict) -> list[str]:
    return [str(t) for t in report["settings"]["threads"]]


def float_modes_section(report: dict) -> list[str]:
    """The float model at batch 1 in each way of calling it; the fastest is the reference of
    every "× faster than float", the plain Keras call shown beside it."""
    v = report["variants"][FLOAT]
    modes, fastest = v.get("keras_modes") or {}, v.get("keras_mode") or {}
    if not modes:
        return []
    lines = ["", "### The float model's ways of calling it (batch 1)", "",
             "Every “× faster than float” in this report is against the fastest way at that thread count, "
             "not against the plain Keras call (whose per-call overhead would flatter every TFLite model).", "",
             "| threads | " + " | ".join(f"{label} p50 ms" for label in KERAS_MODES.values()) + " | fastest |",
             "| --- |" + " --- |" * (len(KERAS_MODES) + 1)]
    for t in timed_threads(report):
        if t not in modes:
            continue
        cells = []
        for mode in KERAS_MODES:
            r = modes[t].get(mode)
            cells.append("—" if r is None else f"failed: {r['error'][:80]}" if "error" in r
                         else fmt(r["inference_ms"]["p50"], 2))
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {KERAS_MODES.get(fastest.get(t), fastest.get(t))} |")
    lines += ["", "| model | " + " | ".join(f"× faster than fastest float @{t} | × faster than plain Keras call @{t}"
                                            for t in timed_threads(report)) + " |",
              "| --- |" + " --- | --- |" * len(timed_threads(report))]
    for name, entry in report["variants"].items():
        if name in (FLOAT, BASELINE) or not entry.get("latency_ms"):
            continue
        fast, eager = entry.get("speedup_vs_keras") or {}, entry.get("speedup_vs_keras_eager") or {}
        lines.append(f"| {name} | " + " | ".join(f"{_times(fast.get(t))} | {_times(eager.get(t))}"
                                                 for t in timed_threads(report)) + " |")
    return lines


def _times(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def batch_section(report: dict) -> list[str]:
    """Throughput at the bench's batch (32) beside batch 1: desktops batch."""
    rows = []
    for name, v in report["variants"].items():
        for t in timed_threads(report):
            b = (v.get("batch") or {}).get(t)
            if not b:
                continue
            single = (v.get("throughput_per_s") or {}).get(t)
            if b.get("supported"):
                ratio = b["images_per_s"] / single if single else None
                rows.append(f"| {name} | {t} | {fmt(single, 1)} | {fmt(b['images_per_s'], 1)} | "
                            f"{_times(ratio)} | {b.get('mode', '')} |")
            else:
                rows.append(f"| {name} | {t} | {fmt(single, 1)} | not supported: {b.get('reason')} | — | |")
    if not rows:
        return []
    size = next(b["batch"] for v in report["variants"].values() for b in (v.get("batch") or {}).values() if b)
    return ["", f"### Batch-{size} throughput", "",
            f"| model | threads | images/s at batch 1 | images/s at batch {size} | × batch 1 | float way |",
            "| --- | --- | --- | --- | --- | --- |", *rows]


def stages_section(report: dict) -> list[str]:
    """Image to answer as the device runs it, stage by stage (edge_runtime.bench.time_stages), and
    for integer models the issue's bound on its ratio to the invoke alone."""
    rows = []
    for name, v in report["variants"].items():
        for t in timed_threads(report):
            st = (v.get("stages_ms") or {}).get(t)
            if not st:
                continue
            ratio = st.get("image_to_answer_over_invoke")
            if v.get("kind") != "integer":
                verdict = "— (not an integer model)"
            elif ratio is None:
                verdict = "—"
            else:
                verdict = "met" if ratio <= IMAGE_TO_ANSWER_BOUND else "**not met**"
            cells = {k: fmt((st.get(k) or {}).get("p50"), 3) for k in STAGE_NAMES}
            if "decode_resize" in st:  # a report of an older edge runtime: decode and resize timed as one
                cells.update(decode=fmt(st["decode_resize"]["p50"], 3), resize="(in decode)")
            stages = " | ".join(cells.values())
            rows.append(f"| {name} | {t} | {st.get('input_path') or '—'} | {stages} | "
                        f"{fmt(st['image_to_answer']['p50'], 3)} | {_times(ratio)} | {verdict} |")
    if not rows:
        return []
    return ["", f"### Image to answer, stage by stage (p50 ms; bound: an integer model at most "
                f"{IMAGE_TO_ANSWER_BOUND}× its invoke alone)", "",
            "The path `predict` and the field server run (EdgeModel.input_tensor): decoded and resized uint8 pixels go "
            "straight to the input tensor (input path `xor128`: p − 128 as int8; `pixels`: the pixels themselves; "
            "`table`: one lookup per pixel), no float round trip.", "",
            "| model | threads | input path | " + " | ".join(STAGE_NAMES.values()) +
            " | image to answer | ÷ invoke | ≤ bound |", "| --- |" + " --- |" * (len(STAGE_NAMES) + 5), *rows]


def browser_section(report: dict) -> list[str]:
    """In-browser latency (LiteRT.js, WebAssembly) beside the Python runtime's, from this run."""
    b = report.get("browser")
    if not b:
        return []
    lines = ["", "### In the browser (LiteRT.js in headless Chromium, WebAssembly, one thread)", ""]
    measured = b.get("variants") or {}
    if "skipped" in b:
        lines.append(f"Not measured: {b['skipped']}.")
    elif measured:
        first = next(iter(measured.values()))
        lines += [f"{first['browser']}, LiteRT.js {first['litertjs']} ({first['wasm']}): this machine's browser, not a "
                  "phone's; the same runs and warm-up as the Python figures, in this run.", "",
                  "| model | browser p50 / p90 ms | Python runtime p50 ms @1 thread | browser ÷ Python | "
                  "page, one classification: preprocess / inference ms (median) |", "| --- | --- | --- | --- | --- |"]
    else:
        lines.append("Not measured: the browser failed (see Failures).")
    for name, v in measured.items():
        lat, python, page = v["latency_ms"], v.get("python_latency_ms"), v["page"]
        lines.append(f"| {name} | {fmt(lat['p50'], 2)} / {fmt(lat['p90'], 2)} | "
                     f"{fmt(python['p50'], 2) if python else 'not timed at 1 thread'} | {_times(v.get('ratio_to_python'))} | "
                     f"{fmt(page['preprocess_ms'], 1)} / {fmt(page['inference_ms'], 1)} over {page['images']} images |")
    if b.get("refused"):
        lines += ["", "Not runnable by LiteRT.js (int8 input/output or a dynamic batch; reasons in report.json): "
                  + ", ".join(b["refused"]) + "."]
    return lines


def confusion_tables(report: dict) -> list[str]:
    labels = report["labels"]
    lines = []
    names = [n for n, v in report["variants"].items() if v.get("confusion_matrix")]
    lines += ["Rows: true class, columns: predicted, in label order " + ", ".join(labels) + ".", "",
              "| true | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for i, label in enumerate(labels):
        lines.append(f"| {label} | " + " | ".join(" ".join(f"{c:>3d}" for c in report["variants"][n]["confusion_matrix"][i])
                                                   for n in names) + " |")
    return lines


def devices_section(report: dict) -> list[str]:
    lines = []
    for target, dev in (report.get("devices") or {}).items():
        lines += ["", f"### Device {target}", "", f"- machine: {dev.get('machine', {}).get('cpu_model')} "
                  f"({dev.get('machine', {}).get('machine')}), {dev.get('machine', {}).get('os')}, "
                  f"Python {dev.get('machine', {}).get('python')}; interpreter {dev.get('interpreter')}"]
        for note in dev.get("notes", []):
            lines.append(f"- **{note}**")
        lines += ["", "| model | threads | p50 ms | p90 ms | p95 ms | agreement with this machine | max abs Δp |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, v in dev.get("variants", {}).items():
            for t, lat in (v.get("latency_ms") or {"—": {}}).items():
                agree = v.get("agreement_with_local")
                lines.append(f"| {name} | {t} | {fmt(lat.get('p50'), 2)} | {fmt(lat.get('p90'), 2)} | "
                             f"{fmt(lat.get('p95'), 2)} | "
                             f"{'—' if agree is None else f'{agree:.1%}'} | {fmt(v.get('max_abs_prob_diff'), 4)} |")
    return lines


def published_section(report: dict) -> list[str]:
    """Published MobileNetV2 latencies beside ours: only for models of their input size (224 px)."""
    prep = report.get("settings", {}).get("preprocessing") or {}
    if (prep.get("height"), prep.get("width")) != (224, 224):
        return []
    devices = [report.get("machine", {}).get("cpu_model", "")] + [
        f"{d.get('machine', {}).get('cpu_model', '')} {d.get('machine', {}).get('model', '')}" for d in (report.get("devices") or {}).values()]
    matched = {p["device"] for text in devices for p in published_matches(text)}
    lines = ["", "## Published reference numbers (MobileNetV2 1.0, 224 px, batch 1)", "",
             "Comparable to ours only for the same architecture and input size on the same device.", "",
             "| device | fp32 ms | int8 ms | source | matches a device here |", "| --- | --- | --- | --- | --- |"]
    for p in PUBLISHED:
        lines.append(f"| {p['device']} | {p['fp32_ms']} | {p['int8_ms']} | {p['source']} | "
                     f"{'yes' if p['device'] in matched else 'no'} |")
    return lines


def decision_text(report: dict) -> str:
    """How each model turned probabilities into a class: argmax, or its binary operating point."""
    points = {name: v["operating_point"] for name, v in report["variants"].items() if v.get("operating_point")}
    if not points:
        return "argmax for every model"
    return "argmax except " + ", ".join(f"{name}: {op['positive']} when p >= {op['value']:g}" for name, op in points.items())


def timing_settings_line(report: dict) -> str:
    """How the latencies were measured; or whose they are (an untimed run over the same model
    files keeps an earlier run's: `timing_from`); or that nothing was timed."""
    s = report["settings"]
    if report.get("timing_from"):
        prefix = f"- timing from the earlier run of {report['timing_from']['created']}"
    elif not s.get("threads"):
        return "- timing: none in this run (--no-timing)"
    else:
        prefix = "- timing"
    return (f"{prefix}: {s['warmup']} warm-up + {s['runs']} timed single-image runs over {s['latency_images']} images, "
            "each model in its own process; preprocessing timed apart from inference; .tflite files by "
            "`python -m edge_runtime bench` (what a device runs), the float model by `python -m oncolite.benchmarks.latency` "
            "(the same statistics)")


def markdown(report: dict) -> str:
    m, split = report.get("machine", {}), report.get("split", {})
    lines = ["# Benchmark: float Keras model vs TFLite variants", ""]
    if report.get("command"):
        lines += [f"Made by: `{report['command']}`", ""]
    lines += [f"- machine: {m.get('cpu_model')} ({', '.join(m.get('cpu_flags', [])) or 'no flags recorded'}), "
              f"{m.get('usable_cores')} usable cores, {m.get('os')}, Python {m.get('python')}",
              f"- int8 features: {m.get('int8_features', 'unknown (no /proc/cpuinfo)')}",
              f"- interpreters: {json.dumps(m.get('interpreters'))}",
              f"- git commit: {report.get('git', {}).get('commit')}{' (uncommitted changes)' if report.get('git', {}).get('dirty') else ''}",
              f"- split: {split.get('kind')}, seed {split.get('seed')}, side {split.get('side')}, "
              f"{split.get('n_' + str(split.get('side')))} images"
              + {True: ", label-conflicting groups excluded", False: ", label-conflicting groups kept"}.get(
                  split.get("conflicts_excluded"), "") + "; "
              f"manifest sha256 {split.get('manifest_sha256')}"
              + (f"; sides of CV fold {split['fold']}" if split.get("fold") is not None else ""),
              f"- decisions: {decision_text(report)}",
              timing_settings_line(report),
              "", "## Accuracy (95 % bootstrap CIs; agreement: Wilson CI; McNemar: exact, vs the float model)", "",
              *accuracy_table(report), "", "### Fidelity to the float model", "", *fidelity_table(report),
              "", "### Per-class change against the float model", "", *per_class_table(report),
              "", "## Cost", "", *cost_table(report), *float_modes_section(report), *batch_section(report),
              *stages_section(report), *browser_section(report),
              "", "## Confusion matrices", "", *confusion_tables(report)]
    flipped = flipped_table(report)
    if flipped:
        lines += ["", "## Flipped images (int8 against float)", *flipped,
                  "", "Plot: flips_vs_margin.png (each image's float decision margin; flips marked)."]
    lines += devices_section(report)
    lines += published_section(report)
    if report.get("failures"):
        lines += ["", "## Failures", ""] + [f"- {json.dumps(f)}" for f in report["failures"]]
    lines += ["", "Model sha256: " + ", ".join(f"{n} `{v['sha256'][:12]}`" for n, v in report["variants"].items() if v.get("sha256"))]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------------

def plot_accuracy_vs_size(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in report["variants"].items():
        if v.get("size_bytes") is None or v.get("accuracy") is None:
            continue
        ci = v["ci"].get("accuracy") or [v["accuracy"]] * 2
        ax.errorbar(v["size_bytes"] / 2 ** 20, v["accuracy"], yerr=[[v["accuracy"] - ci[0]], [ci[1] - v["accuracy"]]],
                    fmt="o", capsize=3)
        ax.annotate(name, (v["size_bytes"] / 2 ** 20, v["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_title("accuracy vs size")
    save_png(fig, path, dpi=110, tight=True)


def plot_latency(report: dict, path: Path) -> None:
    plt = pyplot()
    threads = [str(t) for t in report["settings"]["threads"]]
    names = [n for n, v in report["variants"].items() if v.get("latency_ms")]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.3), 4))
    width = 0.8 / max(1, len(threads))
    for k, t in enumerate(threads):
        xs, p50, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            lat = report["variants"][n]["latency_ms"].get(t)
            if lat:
                xs.append(i + k * width)
                p50.append(lat["p50"])
                lo.append(lat["p50"] - lat.get("min", lat["p50"]))
                hi.append(lat["p90"] - lat["p50"])
        ax.bar(xs, p50, width, yerr=[lo, hi], capsize=2, label=f"{t} thread{'s' if t != '1' else ''}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (p50; bars from min to p90)")
    ax.set_title("inference latency, batch 1")
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110, tight=True)


def plot_flips(report: dict, probs: dict, path: Path) -> None:
    """Where the int8 variants' flips sit against the float model's decision margin: every image
    as a tick, flipped ones as dots. Flips at small margins are ties; at large ones, real error."""
    from edge_runtime.decision import decisions, margins

    from .pooled import CONFIDENT as CONFIDENT_MARGIN

    labels, variants = report["labels"], report["variants"]
    rule = variants[FLOAT].get("operating_point")
    margin = margins(probs[FLOAT], rule, labels)
    reference = decisions(probs[FLOAT], rule, labels)
    names = [n for n in probs if n.startswith("tflite_int8")]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4))
    for row, name in enumerate(names):
        hit = decisions(probs[name], variants[name].get("operating_point"), labels) != reference
        ax.scatter(margin, np.full(len(margin), row), marker="|", color="0.75", s=60)
        ax.scatter(margin[hit], np.full(int(hit.sum()), row), color="C3", s=30, zorder=3,
                   label="flipped against float" if row == 0 else None)
    ax.axvline(CONFIDENT_MARGIN, color="0.4", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(f"float model's decision margin (dashed: {CONFIDENT_MARGIN}, right of it a flip is 'confident')")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("int8 flips against the float model's margin", fontsize=9)
    save_png(fig, path, dpi=110, tight=True)


def plot_confusions(report: dict, path: Path) -> None:
    plt = pyplot()
    names = [n for n, v in report["variants"].items() if v.get("confusion_matrix")]
    labels = report["labels"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, n in zip(axes[0], names):
        draw_confusion(ax, np.asarray(report["variants"][n]["confusion_matrix"], dtype=int),
                       [lab[:6] for lab in labels], fontsize=7)
        ax.set_title(n, fontsize=8)
    axes[0][0].set_ylabel("true")
    save_png(fig, path, dpi=110, tight=True)


def reliability(y, probs, bins: int = 10) -> dict:
    """Top-1 confidence vs accuracy in equal-width bins, and the expected calibration error."""
    conf = probs.max(1)
    right = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows = [(float(conf[which == b].mean()), float(right[which == b].mean()), int(np.sum(which == b)))
            for b in range(bins) if np.any(which == b)]
    ece = sum(n * abs(c - a) for c, a, n in rows) / len(y)
    return {"confidence": [r[0] for r in rows], "accuracy": [r[1] for r in rows], "count": [r[2] for r in rows],
            "ece": float(ece)}


def plot_reliability(curves: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    for name, c in curves.items():
        ax.plot(c["confidence"], c["accuracy"], marker="o", label=f"{name} (ECE {c['ece']:.3f})")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability: float vs int8")
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110, tight=True)


def validate_report(d: dict) -> list[str]:
    """Problems with a report's minimal shape (issue 8); empty when it is fine."""
    problems = []
    variants = d.get("variants")
    if not isinstance(variants, dict) or FLOAT not in variants:
        return [f"variants must be an object with {FLOAT!r}"]
    for name, v in variants.items():
        if name == BASELINE:
            continue
        for key in ("accuracy", "mcc", "roc_auc_macro", "f1_macro", "agreement_with_float"):
            if not isinstance(v.get(key), (int, float)) and not (key == "roc_auc_macro" and v.get(key) is None):
                problems.append(f"variants.{name}.{key} must be a number")
        if not isinstance(v.get("size_bytes"), int):
            problems.append(f"variants.{name}.size_bytes must be an integer")
        lat = v.get("latency_ms")
        if not isinstance(lat, dict):
            problems.append(f"variants.{name}.latency_ms must be an object")
        else:
            for t, s in lat.items():
                if not (t.isdigit() and isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in ("p50", "p90"))):
                    problems.append(f"variants.{name}.latency_ms.{t} must be {{'p50': ms, 'p90': ms, ...}}")
    split = d.get("split")
    if not isinstance(split, dict):
        problems.append("split must be an object")
    else:
        if split.get("kind") not in SPLIT_KINDS:
            problems.append(f"split.kind must be one of {', '.join(SPLIT_KINDS)}")
        # n_test for the usual test side; a report on another side counts that side's images.
        count = f"n_{split.get('side', 'test')}"
        if not isinstance(split.get(count), int):
            problems.append(f"split.{count} must be an integer")
        for key in ("seed", "conflicts_excluded"):
            if key not in split:
                problems.append(f"split.{key} is missing")
    return problems


def write_report(out_dir: Path, report: dict, probs: dict, y) -> str:
    """report.json, report.md and the plots; returns the Markdown. Refuses (ValueError, nothing
    written) a report that does not have the shape validate_report checks."""
    problems = validate_report(report)
    if problems:
        raise ValueError("benchmark report is malformed: " + "; ".join(problems))
    from .pooled import PREDICTIONS

    out_dir = Path(out_dir)
    # Per-image probabilities of every model: what benchmarks.pooled pools over CV folds.
    write_json(out_dir / PREDICTIONS, report.pop("predictions"))
    int8 = [n for n in probs if n.startswith("tflite_int8")]
    report["calibration"] = {n: reliability(np.asarray(y), probs[n]) for n in [FLOAT, *int8]}
    plot_accuracy_vs_size(report, out_dir / "accuracy_vs_size.png")
    if any(v.get("latency_ms") for v in report["variants"].values()):
        plot_latency(report, out_dir / "latency.png")
    plot_confusions(report, out_dir / "confusion_matrices.png")
    plot_reliability(report["calibration"], out_dir / "reliability.png")
    if int8:
        plot_flips(report, probs, out_dir / "flips_vs_margin.png")
    md = markdown(report)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", md)
    return md


# --- --compare ------------------------------------------------------------------------------------

def compare_reports(reports: list[dict]) -> dict:
    """One row per (source, variant): the local machine of each report and each of its devices."""
    rows = []
    for k, r in enumerate(reports):
        source = f"{r.get('machine', {}).get('cpu_model') or 'unknown'} [{r.get('run', k)}]"
        for name, v in r["variants"].items():
            rows.append({"source": source, "variant": name, "accuracy": v.get("accuracy"), "mcc": v.get("mcc"),
                         "roc_auc_macro": v.get("roc_auc_macro"), "agreement_with_float": v.get("agreement_with_float"),
                         "size_bytes": v.get("size_bytes"), "latency_ms": v.get("latency_ms") or {},
                         "commit": r.get("git", {}).get("commit"), "split": r.get("split")})
        for target, dev in (r.get("devices") or {}).items():
            for name, v in dev.get("variants", {}).items():
                rows.append({"source": f"{target} [{r.get('run', k)}]", "variant": name,
                             "agreement_with_local": v.get("agreement_with_local"),
                             "size_bytes": r["variants"].get(name, {}).get("size_bytes"),
                             "latency_ms": v.get("latency_ms") or {}, "notes": dev.get("notes", [])})
    threads = sorted({t for row in rows for t in row["latency_ms"]}, key=int)
    return {"format": "oncolite-benchmark-compare/1", "threads": threads, "rows": rows}


def comparison_markdown(merged: dict) -> str:
    threads = merged["threads"]
    lines = ["| source | variant | accuracy | MCC | ROC-AUC | agreement | size (KB) | "
             + " | ".join(f"p50 ms @{t}" for t in threads) + " |", "| --- |" * 1 + " --- |" * (6 + len(threads))]
    for row in merged["rows"]:
        agree = row.get("agreement_with_float", row.get("agreement_with_local"))
        size = row.get("size_bytes")
        lines.append(f"| {row['source']} | {row['variant']} | {fmt(row.get('accuracy'))} | {fmt(row.get('mcc'))} | "
                     f"{fmt(row.get('roc_auc_macro'))} | {fmt(agree)} | {'—' if size is None else f'{size / 1024:.0f}'} | "
                     + " | ".join(fmt(row["latency_ms"].get(t, {}).get("p50"), 2) for t in threads) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(out_dir: Path, merged: dict) -> str:
    md = comparison_markdown(merged)
    write_json(Path(out_dir) / "compare.json", merged)
    write_text(Path(out_dir) / "compare.md", md)
    return md
