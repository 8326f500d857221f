"""The README's BUSI results and targets tables are the committed run's figures
(reports/busi/run.json, written by the command the README shows), formatted as the README
formats them: a re-run that changes a figure, or a hand-rounded number, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
POOLED = json.loads((REPO_ROOT / "reports" / "busi" / "run.json").read_text(encoding="utf-8"))["pooled"]["models"]


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table whose header row starts with `heading`."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {heading} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))  # a cell's own bars are escaped: \|
        rows.append([cell.strip().replace("**", "").replace("\\|", "|") for cell in cells])
    return rows


def variant_of(name: str) -> str:
    name = re.sub(r"\s*\(.*\)$", "", name)
    return {"Keras float": "keras_float", "TFLite fp32": "tflite_fp32"}.get(name, f"tflite_{name}")


def metric(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def test_the_pooled_results_table_is_the_runs():
    rows = table_rows("model | accuracy | MCC")
    assert len(rows) >= 6
    for name, accuracy, mcc, auc, agreement, flips, _size in rows:
        m = POOLED[variant_of(name)]
        assert [accuracy, mcc, auc] == [metric(m["accuracy"]), metric(m["mcc"]), metric(m["macro_roc_auc"])], name
        if name.startswith("Keras"):
            continue
        lo, hi = m["agreement_ci"]
        expected = "100 %" if m["agreement"] == 1 else f"{m['agreement']:.1%} [{lo:.1%}, {hi:.1%}]".replace("%", "")
        assert agreement.replace(" %", "") == expected.replace(" %", ""), name
        assert flips == f"{m['flips']} ({m['confident_flips']})", name


def test_the_int8_targets_table_is_the_shipped_models():
    m = POOLED["tflite_int8"]
    targets = {row[0]: row[1] for row in table_rows("target | result")}
    assert targets["int8 pooled agreement >= 98 % (aim 99 %)"] == f"{m['agreement']:.1%}".replace("%", " %")
    assert targets["0 confident flips"] == str(m["confident_flips"])
    assert targets["int8 |Δaccuracy| <= 0.5 pt"] == f"{m['delta_accuracy'] * 100:.2f} pt"
    assert targets["int8 |ΔMCC| <= 0.01"] == f"{m['delta_mcc']:.3f}"
    assert targets["int8 |Δ macro ROC-AUC| <= 0.005"] == f"{m['delta_roc_auc']:.4f}"
    flagged = m["uncertain"]
    assert targets["agreement outside the uncertain band >= 99.5 %"] == \
        f"{flagged['agreement_outside']:.0%} ({flagged['share']:.1%} flagged)".replace("%", " %")
