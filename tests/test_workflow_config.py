"""Issue 20, item 2: every setting is checked before any work starts, with one line naming the
setting, where it was set and what it accepts; nothing is downloaded at run time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.errors import EXIT_USAGE
from oncolite.train.config import DEFAULTS_PATH, ConfigError, load_config, parse_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "pretrained" / "mobilenet_v2_1.0_224_imagenet_no_top.h5"


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    return {k for key, value in d.items() if not key.startswith("_")
            for k in (leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}


def test_every_setting_of_the_defaults_has_a_check():
    from oncolite.train.config import RULES

    # weights is checked together with alpha (which file it names depends on the width).
    assert set(RULES) | {"weights"} == leaf_keys(json.loads(DEFAULTS_PATH.read_text()))


def test_every_setting_is_documented_and_read_by_something():
    """Issue 16: every key documented where it is defined (train/config.py's DOCS, shown by
    `oncolite config`), and read by code outside the config module: no key is accepted and ignored."""
    from oncolite.train.config import DOCS

    keys = leaf_keys(json.loads(DEFAULTS_PATH.read_text()))
    assert set(DOCS) == keys and all(DOCS[k].strip() for k in keys)
    sources = "\n".join(p.read_text() for folder in ("train", "quantize", "benchmarks", "oncolite", "edge_runtime")
                        for p in (REPO_ROOT / folder).rglob("*.py") if p.name != "config.py")
    unread = [k for k in keys if f'"{k.split(".")[-1]}"' not in sources]
    assert not unread, f"settings nothing reads: {unread}"
    shown = subprocess.run([sys.executable, "-m", "oncolite", "config"], capture_output=True, text=True, cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert shown.returncode == 0 and all(f"\n{k} = " in "\n" + shown.stdout for k in keys), shown.stderr


def test_the_shipped_configs_pass_their_own_checks():
    for dataset in (None, "busi", "breakhis", "idc"):
        for profile in (None, "quick", "full"):
            load_config(dataset=dataset, profile=profile)


@pytest.mark.parametrize("pair, accepted", [
    ("dropout=1.5", "a number in [0, 1)"),
    ("augment.rotation=-3", "a number in [0, 180] (degrees)"),
    ("augment.hflip=\"yes\"", "true or false"),
    ("augment.color_jitter=2", "a number in [0, 1]"),
    ("head_epochs=\"ten\"", "an integer >= 0"),
    ("finetune_epochs=2.5", "an integer >= 0"),
    ("batch_size=8.0", "an integer >= 1"),
    ("head_lr=0", "a number > 0"),
    ("finetune_lr=-1e-5", "a number > 0"),
    ("patience=0", "an integer >= 1"),
    ("input_size=16", "an integer >= 32"),
    ("resample=\"lanczos\"", "one of \"bilinear\""),
    ("std=0", "a number > 0"),
    ("mean=[1, 2]", "a list of 3"),
    ("alpha=0", "a number > 0"),
    ("cache=\"sometimes\"", "one of \"auto\", true, false"),
    ("seed=-1", "an integer >= 0"),
    ("class_weights=1", "true or false"),
    ("tune.lr=[0.001, 1e-05]", "low <= high"),
    ("tune.dense_units=[]", "a non-empty JSON list"),
    ("qat.temperature=0", "a number > 0"),
    ("qat.distill_weight=1.5", "a number in [0, 1]"),
    ("export.calibration_images=0", "an integer >= 1"),
    ("export.variants=[\"int4\"]", "\"int8_qat\""),
    ("export.int8_io=\"int16\"", "one of \"int8\", \"uint8\", \"float\""),
    ("benchmark.runs=0", "an integer >= 1"),
    ("benchmark.threads=[0]", "an integer >= 1"),
])
def test_a_bad_value_is_one_line_naming_the_setting_its_source_and_what_it_accepts(pair, accepted):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=parse_overrides([pair]))
    message = str(caught.value)
    name = pair.partition("=")[0]
    assert "\n" not in message
    assert message.startswith(f"--set: {name}=") and accepted in message, message


def test_the_file_that_set_a_bad_value_is_named(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"augment": {"zoom": 1.5}}))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{mine}: augment.zoom=1.5 must be a number in [0, 1)")):
        load_config(dataset="breakhis", path=mine)


def test_weights_accept_imagenet_a_file_or_null_and_nothing_else(tmp_path):
    assert load_config(overrides={"weights": "imagenet", "alpha": 1.0})["weights"] == "imagenet"
    assert load_config(overrides={"weights": None, "alpha": 0.35})["weights"] is None
    assert load_config(overrides={"weights": str(SHIPPED)})["weights"] == str(SHIPPED)
    with pytest.raises(ConfigError, match=r'^--set: weights="none" must be "imagenet" .*--set weights=null'):
        load_config(overrides=parse_overrides(["weights=none"]))
    with pytest.raises(ConfigError, match="existing Keras weights file"):
        load_config(overrides={"weights": str(tmp_path / "missing.h5")})


def test_imagenet_at_a_width_without_a_shipped_file_is_refused_not_downloaded():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=parse_overrides(["alpha=0.35"]))
    message = str(caught.value)
    assert message.startswith('--set: weights="imagenet" with alpha=0.35')
    assert "pretrained/mobilenet_v2_1.0_224_imagenet_no_top.h5" in message and "nothing is downloaded" in message
    assert "--set weights=PATH.h5" in message and "--set weights=null" in message


def test_the_export_choices_are_quantizes_own():
    from oncolite.quantize.export import IO_CHOICES, VARIANTS
    from oncolite.train.config import INT8_IO, load_config

    # Every variant the default config lists is one export can make.
    assert INT8_IO == IO_CHOICES and set(load_config()["export"]["variants"]) <= set(VARIANTS)


# ---------------------------------------------------------------- through the command

def oncolite_train(tmp_path, *sets):
    """`oncolite train` on a manifest that is never reached; returns (result, run directory)."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "oncolite", "train", str(run), "--manifest", str(manifest),
                             *[a for s in sets for a in ("--set", s)]],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return result, run


@pytest.mark.parametrize("sets, fragment", [
    (["alpha=0.35"], "nothing is downloaded"),
    (["weights=none"], "--set weights=null"),
    (["dropout=2"], "dropout=2 must be a number in [0, 1)"),
])
def test_train_refuses_a_bad_setting_in_one_line_before_reading_the_manifest_or_making_the_run(tmp_path, sets, fragment):
    result, run = oncolite_train(tmp_path, *sets)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not run.exists()


def test_a_weights_file_of_another_width_is_one_line_and_leaves_no_run_directory(tmp_path):
    # Settings that pass the checks but a file that only loading can judge: the model is built
    # (and the file loaded) before the run directory is made.
    from oncolite.train.manifest import write_manifest
    from tests.datatrees import noise, save
    from edge_runtime.hashing import file_sha256

    items = []
    for label in ("a", "b"):
        for side in ("train", "val"):
            path = save(tmp_path / "images" / f"{label}_{side}.png", noise(len(items)))
            items.append({"path": f"images/{path.name}", "sha256": file_sha256(path), "label": label,
                          "group": path.name, "split": side, "meta": {}})
    write_manifest({"format": "oncolite-manifest/1", "root": str(tmp_path), "labels": ["a", "b"], "seed": 0,
                    "split": {"kind": "given", "folds": 1}, "items": items}, tmp_path / "manifest.json")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "oncolite", "train", str(run), "--manifest", "manifest.json",
                             "--set", f"weights={SHIPPED}", "--set", "alpha=0.35", "--set", "input_size=32"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "not MobileNetV2 alpha 0.35 backbone weights" in result.stderr
    assert "--set weights=null" in result.stderr and not run.exists()


def test_config_shows_a_profiles_values_beside_the_defaults(capsys):
    """`oncolite config --profile quick` prints what the quick profile trains with, from its file."""
    from oncolite.cli import main as oncolite

    quick = load_config(profile="quick")
    assert oncolite(["config", "input_size", "head_epochs", "--profile", "quick", "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"input_size = {quick['input_size']}",
                                                    f"head_epochs = {quick['head_epochs']}"]
    assert oncolite(["config", "input_size", "--profile", "quick"]) == 0
    out = capsys.readouterr().out
    assert f"(default {load_config()['input_size']})" in out and "profile quick" in out
    assert oncolite(["config", "input_size", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["settings"][0]
    assert entry["value"] == entry["default"] == load_config()["input_size"]


def test_config_shows_the_values_a_set_and_a_config_file_give_and_checks_them(tmp_path, capsys):
    """`oncolite config --config F --set K=V` resolves the layers train and run resolve, over the
    same rules: the value shown is the one training would use, a bad one exits 2 naming it."""
    from oncolite.cli import main as oncolite

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"mixup": 0.3, "augment": {"gamma": 0.1}}))
    assert oncolite(["config", "mixup", "augment.gamma", "--config", str(path), "--set", "augment.gamma=0.2", "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == ["mixup = 0.3", "augment.gamma = 0.2"]
    assert oncolite(["config", "mixup", "--set", "mixup=0.4"]) == 0
    assert "--set mixup=0.4" in capsys.readouterr().out
    assert oncolite(["config", "mixup", "--set", "mixup=-1"]) == EXIT_USAGE
    assert "mixup" in capsys.readouterr().err
    assert oncolite(["config", "--set", "mixupp=0.1"]) == EXIT_USAGE
    assert "did you mean 'mixup'" in capsys.readouterr().err
    # A run directory given for its config file, or a file that is not text: one line, exit 2.
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for wrong, says in ((tmp_path, "is a folder"), (tmp_path / "binary.json", "not valid JSON")):
        assert oncolite(["config", "--config", str(wrong)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
