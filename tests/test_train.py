"""Training: config layering, the tf.data pipeline, learning a planted task, resume after SIGKILL,
the distributed + mixed-precision path on two logical CPUs, k-fold CV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.errors import OncoliteError
from oncolite.train.config import available, load_config, parse_overrides
from edge_runtime.hashing import file_sha256
from oncolite.train.manifest import load_manifest, write_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
# Tiny and from scratch: for the plumbing (resume, distribution, folds), not for accuracy.
TINY = {"input_size": 32, "alpha": 0.35, "weights": None, "batch_size": 8, "finetune_depth": 20,
        "patience": 100, "augment": {"rotation": 10, "shear": 0.1}}
# Learning needs features: a frozen backbone from scratch has none worth a head (its BatchNorm
# statistics are untrained), so the learning checks use the shipped ImageNet weights at 64 px.
PRETRAINED = {"input_size": 64, "alpha": 1.0, "weights": "imagenet", "batch_size": 16, "head_epochs": 3,
              "finetune_epochs": 0, "head_lr": 0.01, "patience": 100,
              "augment": {"rotation": 0, "shift": 0, "shear": 0, "zoom": 0, "hflip": False}}


def planted_image(path: Path, quadrant: str | None, rng, size: int = 64) -> None:
    """Dim noise with, optionally, a bright square in one quadrant ("tl", "tr", "bl", "br")."""
    pixels = (rng.random((size, size, 3)) * 70).astype(np.uint8)
    if quadrant:
        half, side = size // 2, size // 3
        top = 0 if quadrant[0] == "t" else half
        left = 0 if quadrant[1] == "l" else half
        y, x = top + (half - side) // 2, left + (half - side) // 2
        pixels[y:y + side, x:x + side] = 255
    Image.fromarray(pixels).save(path)


def planted_manifest(folder: Path, classes: dict, counts=(48, 16, 16), folds: int = 0, seed: int = 0) -> Path:
    """Images of `classes` ({label: function(rng) -> quadrant or None}) and a manifest over them.

    counts: images per class on train, val and test. folds > 0 adds a `cv` column rotating
    val through the items; the manifest's `split` is then fold 0, as `oncolite split` writes it.
    """
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = []
    for label, quadrant in classes.items():
        for side, count in zip(("train", "val", "test"), counts):
            for i in range(count):
                path = images / f"{label}_{side}_{i}.png"
                planted_image(path, quadrant(rng), rng)
                items.append({"path": f"images/{path.name}", "sha256": file_sha256(path), "label": label,
                              "group": path.name, "split": side, "meta": {}})
    if folds:
        for n, item in enumerate(items):
            item["cv"] = ["val" if n % folds == k else "train" for k in range(folds)]
            item["split"] = item["cv"][0]
    manifest = {"format": "oncolite-manifest/1", "root": str(folder), "labels": list(classes), "seed": seed,
                "split": {"kind": "random", "folds": max(folds, 1)}, "items": items}
    path = folder / "manifest.json"
    write_manifest(manifest, path)
    return path


TL_VS_BR = {"br": lambda rng: "br", "tl": lambda rng: "tl"}


def oncolite(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "oncolite", *map(str, argv)], env=ENV, capture_output=True,
                          text=True, cwd=REPO_ROOT, **kwargs)


def settings(config_path: Path) -> dict:
    return {k: v for k, v in json.loads(config_path.read_text()).items() if k != "run"}


# ---------------------------------------------------------------- config

def test_resume_point_keeps_only_the_checkpoints_its_state_names(tmp_path):
    from oncolite.train.checkpoints import save_resume_point

    for name in ("epoch-head-1", "epoch-head-2", "epoch-head-10", "best-head-1", "best-head-2"):
        for suffix in (".index", ".data-00000-of-00001"):
            (tmp_path / (name + suffix)).write_bytes(b"checkpoint")
    state = {"checkpoint": "epoch-head-2", "best": {"checkpoint": "best-head-1"}}
    save_resume_point(tmp_path / "state.json", state, keep={"epoch-head-2", "best-head-1", None})
    assert json.loads((tmp_path / "state.json").read_text()) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best-head-1.data-00000-of-00001", "best-head-1.index",
        "epoch-head-2.data-00000-of-00001", "epoch-head-2.index", "state.json"]


def test_config_layers_merge_deeply_in_order(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"batch_size": 8, "augment": {"zoom": 0.3}}))
    config = load_config(dataset="breakhis", profile="quick", path=user,
                         overrides=parse_overrides(["augment.zoom=0.5", "head=reference", "finetune_lr=1e-5"]))
    assert config["augment"]["vflip"] is True and config["augment"]["rot90"] is True  # dataset
    assert config["input_size"] == load_config(profile="quick")["input_size"]  # profile over defaults
    assert config["batch_size"] == 8  # file
    assert config["augment"]["zoom"] == 0.5 and config["head"] == "reference" and config["finetune_lr"] == 1e-5
    assert config["augment"]["rotation"] == 20  # untouched keys of a merged section survive
    assert load_config()["augment"]["vflip"] is False  # defaults are not mutated by merging


def test_config_refuses_unknown_keys_and_names_the_valid_ones(tmp_path):
    with pytest.raises(OncoliteError, match=r"'batchsize'.*batch_size"):
        load_config(overrides={"batchsize": 3})
    with pytest.raises(OncoliteError, match=r"'augment.vertical'.*vflip"):
        load_config(overrides=parse_overrides(["augment.vertical=true"]))
    with pytest.raises(OncoliteError, match="monitor"):
        load_config(overrides={"monitor": "val_auc"})
    with pytest.raises(OncoliteError, match="no profile config named 'fast'"):
        load_config(profile="fast")
    with pytest.raises(OncoliteError, match="key=value"):
        parse_overrides(["batch_size"])


def test_shipped_configs_load_and_fit_their_modality():
    assert {"busi", "breakhis", "idc"} <= set(available("datasets"))
    assert {"quick", "full"} <= set(available("profiles"))
    busi, idc = load_config(dataset="busi"), load_config(dataset="idc")
    assert not busi["augment"]["vflip"] and not busi["augment"]["rot90"] and not busi["augment"]["color_jitter"]
    assert idc["augment"]["vflip"] and idc["augment"]["rot90"] and idc["augment"]["color_jitter"] > 0
    assert idc["input_size"] > 50  # IDC's 50 px patches are upscaled
    assert load_config(profile="full")["folds"] == 5 and load_config(profile="full")["input_size"] == 224


def test_a_dataset_keeps_its_own_settings_under_a_profile():
    # The profile sets the generic budget; the dataset file knows its images and wins over it.
    assert load_config(dataset="idc", profile="quick")["input_size"] == 96
    assert load_config(dataset="busi", profile="quick")["input_size"] == 160  # BUSI sets no size: the profile's
    idc_full = load_config(dataset="idc", profile="full")
    assert (idc_full["head_epochs"], idc_full["finetune_epochs"], idc_full["cache"]) == (3, 8, False)
    assert idc_full["folds"] == 5  # what the dataset leaves unset still comes from the profile


def test_a_run_config_json_is_a_valid_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**load_config(profile="quick"), "run": {"manifest_sha256": "abc"}}))
    assert load_config(path=path) == load_config(profile="quick")


# ---------------------------------------------------------------- data

def test_pipeline_batches_normalized_images_and_balances_when_oversampling(tmp_path):
    from edge_runtime.preprocess import Preprocessing, preprocess
    from oncolite.train.data import class_weights, load_arrays, make_dataset

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(3, 1, 1)))
    train_items = manifest.sides()["train"]
    items = [i for i in train_items if i["label"] == "br"] + [i for i in train_items if i["label"] == "tl"][:1]
    prep = Preprocessing(32, 32)
    x, y = load_arrays(items, manifest.labels, prep, quiet=True)
    assert x.shape == (4, 32, 32, 3) and list(y) == [0, 0, 0, 1]
    np.testing.assert_array_equal(x[0], preprocess(items[0]["path"], prep))  # the one preprocessing

    plain = [(xb.numpy(), yb.numpy()) for xb, yb in make_dataset(items, manifest.labels, prep, batch_size=3)]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in plain]), x)
    assert plain[0][0].dtype == np.float32

    balanced = np.concatenate([yb.numpy() for _, yb in make_dataset(
        items * 25, manifest.labels, prep, batch_size=16, oversample=True, shuffle=True)])
    assert len(balanced) == 2 * 75 and 0.35 < balanced.mean() < 0.65  # 1 in 4 without oversampling

    weights = class_weights(y, 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 1.0


def test_augmentation_changes_pixels_not_labels_or_range(tmp_path):
    from oncolite.train.config import preprocessing
    from oncolite.train.data import load_arrays, make_dataset

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(4, 1, 1)))
    items = manifest.sides()["train"]
    config = load_config(dataset="breakhis", overrides={"input_size": 32, "augment": {"shear": 0.2}})
    prep = preprocessing(config)
    x, y = load_arrays(items, manifest.labels, prep, quiet=True)
    xa, ya = next(iter(make_dataset(items, manifest.labels, prep, batch_size=len(items), augment=config["augment"])))
    assert list(ya.numpy()) == list(y)
    assert not np.allclose(xa.numpy(), x)
    assert xa.numpy().min() >= -1.0 - 1e-5 and xa.numpy().max() <= 1.0 + 1e-5  # reflect fill, clipped jitter



def test_ultrasound_gamma_and_speckle_keep_grayscale_black_and_range():
    import tensorflow as tf
    from oncolite.train.config import preprocessing
    from oncolite.train.data import gamma_and_speckle

    prep = preprocessing(load_config(overrides={"input_size": 32}))
    pixels = np.zeros((4, 16, 16, 3), np.float32)
    pixels[:, :, 8:] = 200.0  # half black, half bright, the same in every channel (a grayscale scan)
    images = tf.constant((pixels - np.array(prep.mean)) / np.array(prep.std), tf.float32)
    out = gamma_and_speckle(images, 0.3, 0.2, prep, tf.random.Generator.from_seed(0)).numpy()
    back = out * np.array(prep.std) + np.array(prep.mean)
    assert np.allclose(back[..., 0], back[..., 1], atol=1e-3) and np.allclose(back[..., 0], back[..., 2], atol=1e-3)
    assert np.allclose(back[:, :, :8], 0.0, atol=1e-3)  # multiplicative: black stays black
    bright = back[:, :, 8:, 0]
    assert bright.std() > 1.0 and bright.min() >= 0.0 and bright.max() <= 255.0 + 1e-3
    assert not np.allclose(bright.mean(axis=(1, 2)), bright.mean())  # the gain curve differs per image


def test_elastic_deformation_bends_smoothly_by_at_most_its_strength():
    import tensorflow as tf
    from oncolite.train.data import elastic_deformation

    size, strength = 40, 0.05
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    # Channel 0 holds each pixel's row, channel 1 its column: the output says where each pixel was read.
    images = tf.constant(np.repeat(np.stack([rows, cols, rows + cols], axis=-1)[None], 3, axis=0))
    out = elastic_deformation(images, strength, tf.random.Generator.from_seed(0)).numpy()
    moved = np.stack([out[..., 0] - rows, out[..., 1] - cols], axis=-1)
    assert np.abs(moved).max() <= strength * size + 1e-3  # never further than the strength
    assert np.abs(moved).max() > 0.2 * strength * size  # but it does move them
    assert not np.allclose(moved[0], moved[1], atol=1e-2)  # a field of its own per image
    inner = moved[:, 3:-3, 3:-3]  # away from the border, where a point past it reads its mirror image
    # Smooth: neighbours move alike (per-pixel noise of this strength would differ by up to 4 px).
    assert np.abs(np.diff(inner, axis=1)).max() < 1.0 and np.abs(np.diff(inner, axis=2)).max() < 1.0
    np.testing.assert_allclose(out[..., 2], out[..., 0] + out[..., 1], atol=1e-3)  # read bilinearly, the channels alike
    flat = tf.fill((2, size, size, 3), 0.25)
    np.testing.assert_allclose(elastic_deformation(flat, 0.1, tf.random.Generator.from_seed(1)).numpy(), 0.25, atol=1e-6)


# ---------------------------------------------------------------- training

def test_learns_a_planted_task_well_above_chance(tmp_path):
    from oncolite.train.train import train_run

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR))
    summary = train_run(tmp_path / "run", manifest, load_config(overrides=PRETRAINED), {"manifest": str(manifest.path)},
                        quiet=True)
    assert summary["test"]["accuracy"] >= 0.9 and summary["test"]["mcc"] >= 0.8
    run = tmp_path / "run"
    for name in ("config.json", "manifest.json", "versions.json", "logs/train.log", "train/history.csv",
                 "train/curves.png", "models/float.keras", "train/summary.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["run"]["head_summary"]["head_params"] == 1280 * 2 + 2
    load_manifest(run / "manifest.json")  # the copy still finds the images
    import tf_keras as keras

    model = keras.models.load_model(run / "models" / "float.keras", safe_mode=True)
    assert model.output_shape == (None, 2)


def test_resume_after_sigkill_finishes_with_the_same_config(tmp_path):
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(16, 4, 4))
    run = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "head_epochs": 3, "finetune_epochs": 4}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "oncolite", "train", "--manifest", manifest, "--run", run, "--quiet", *sets],
                            env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "train" / "state" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["history"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(state.read_text())
    assert before["phase"] != "done"
    config_before = settings(run / "config.json")

    done = oncolite("train", "--resume", run, "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["epochs"] == {"head": 3, "finetune": 4}
    history = (run / "train" / "history.csv").read_text().splitlines()[1:]
    assert [line.split(",")[:2] for line in history] == \
        [["head", str(e)] for e in range(1, 4)] + [["finetune", str(e)] for e in range(1, 5)]
    assert settings(run / "config.json") == config_before
    log = (run / "logs" / "train.log").read_text()
    if before["epoch"] > 0:
        assert f"resumed {before['phase']} after epoch {before['epoch']}" in log
    else:  # killed between two phases: the next one starts at its first epoch, once
        assert log.count(f"{before['phase']} epoch 1/") == 1
    assert (run / "models" / "float.keras").exists()

    # A fresh run with another config into the same folder is refused, not mixed in.
    clash = oncolite("train", "--manifest", manifest, "--run", run, "--set", "batch_size=4", *sets[:1], timeout=300)
    assert clash.returncode == 2 and "--resume" in clash.stderr


def old_run_config(run: Path) -> dict:
    """Rewrite `run`/config.json as if written before defaults.json had `oversample` and
    `augment.color_jitter`; returns what it now holds."""
    path = run / "config.json"
    stored = json.loads(path.read_text())
    del stored["oversample"], stored["augment"]["color_jitter"]
    path.write_text(json.dumps(stored))
    return stored


def test_an_old_runs_config_is_its_own_not_refused_for_keys_added_since(tmp_path):
    from oncolite.train.config import stored_config
    from oncolite.train.train import read_run_config, refuse_other_run

    run = tmp_path / "run"
    (run / "train" / "state").mkdir(parents=True)
    (run / "train" / "state" / "state.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({**load_config(overrides={"batch_size": 4}), "run": {"fold": None}}))
    stored = old_run_config(run)
    config, provenance = read_run_config(run)
    assert provenance == {"fold": None}
    assert config["batch_size"] == 4  # the run's own value, not today's default
    assert config["oversample"] == load_config()["oversample"]  # a key it lacks: today's default, for reading
    assert config["augment"]["color_jitter"] == load_config()["augment"]["color_jitter"]
    refuse_other_run(run, config)  # resuming with its own config
    refuse_other_run(run, load_config(overrides={"batch_size": 4}))  # a fresh run with the same settings
    with pytest.raises(OncoliteError, match="another config"):
        refuse_other_run(run, load_config(overrides={"batch_size": 8}))
    with pytest.raises(OncoliteError, match="another config"):
        refuse_other_run(run, load_config(overrides={"batch_size": 4, "augment": {"zoom": 0.3}}))
    # Export's and benchmark's settings (a newer default variant list) train no other model.
    refuse_other_run(run, load_config(overrides={"batch_size": 4, "export": {"variants": ["fp32"]},
                                                 "benchmark": {"runs": 3}}))
    # A key today's defaults.json no longer has stays the run's own, not an "unknown key" error.
    (run / "config.json").write_text(json.dumps({**stored, "retired_setting": 1}))
    assert stored_config(run / "config.json")["retired_setting"] == 1


def test_resume_of_a_run_older_than_todays_defaults_is_not_refused(tmp_path):
    import argparse

    from oncolite.train.train import add_arguments, main, train_run

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(8, 4, 4)))
    run = tmp_path / "run"
    train_run(run, manifest, load_config(overrides={**TINY, "head_epochs": 1, "finetune_epochs": 0}),
              {"manifest": str(manifest.path), "manifest_sha256": manifest.sha256}, quiet=True)
    stored = old_run_config(run)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--resume", str(run), "--quiet"])) == 0
    assert settings(run / "config.json") == {k: v for k, v in stored.items() if k != "run"}  # still as stored


DISTRIBUTED = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from oncolite.train.config import load_config
from oncolite.train.manifest import load_manifest
from oncolite.train.train import train_run
import tf_keras as keras
config = load_config(overrides={**json.loads(sys.argv[2]), "distribute": "mirrored", "mixed_precision": True})
summary = train_run(sys.argv[3], load_manifest(sys.argv[1]), config, {"manifest": sys.argv[1]}, quiet=True)
model = keras.models.load_model(sys.argv[3] + "/models/float.keras", safe_mode=True)
summary["saved_policies"] = sorted({l.dtype_policy.name for l in model.layers})
print(json.dumps(summary))
"""


def test_distributed_mixed_precision_path_on_two_logical_cpus(tmp_path):
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(8, 4, 4))
    config = {**TINY, "head_epochs": 1, "finetune_epochs": 1}
    result = subprocess.run([sys.executable, "-c", DISTRIBUTED, manifest, json.dumps(config), tmp_path / "run"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["replicas"] == 2 and summary["mixed_precision"] is True
    assert summary["epochs"] == {"head": 1, "finetune": 1}
    assert summary["saved_policies"] == ["float32"]  # the saved model is plain float32 for QAT/export


def test_folds_train_each_fold_and_report_mean_and_spread(tmp_path):
    from oncolite.train.train import train_folds

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(6, 0, 2), folds=2))
    config = load_config(overrides={**TINY, "head_epochs": 1, "finetune_epochs": 1})
    cv = train_folds(tmp_path / "cv", manifest, config, {"manifest": str(manifest.path)}, 2, quiet=True)
    for i in range(2):
        assert (tmp_path / "cv" / "folds" / str(i) / "models" / "float.keras").exists()
        assert json.loads((tmp_path / "cv" / "folds" / str(i) / "config.json").read_text())["run"]["fold"] == i
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert len(saved["val"]["mcc"]["values"]) == 2 and saved["val"]["accuracy"]["mean"] == pytest.approx(
        np.mean(saved["val"]["accuracy"]["values"]))
    assert cv["folds"][0]["fold"] == 0 and cv["folds"][1]["fold"] == 1


def test_tune_searches_on_validation_and_returns_a_config_from_the_space(tmp_path):
    from oncolite.train.tune import tune

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(6, 3, 3)))
    config = load_config(overrides={**TINY, "head_epochs": 1, "finetune_epochs": 3,
                                    "tune": {"epochs": 1, "dense_units": [0, 8], "finetune_depth": [5, 10]}})
    best = tune(tmp_path / "run", manifest, config, trials=2, quiet=True)
    results = json.loads((tmp_path / "run" / "train" / "tune" / "results.json").read_text())
    assert len(results["trials"]) == 2 and results["monitor"] == "val_mcc"
    assert best["dense_units"] in (0, 8) and best["finetune_depth"] in (5, 10)
    assert 1e-5 <= best["finetune_lr"] <= 1e-3 and best["finetune_epochs"] == 3  # the real run is not capped
    assert best == load_config(path=tmp_path / "run" / "train" / "tune" / "best_config.json")
    for trial in (tmp_path / "run" / "train" / "tune").glob("trial_*"):
        assert "test" not in json.loads((trial / "train" / "summary.json").read_text())  # never looked at


def test_the_configs_tune_trials_runs_the_search_as_tune_does(tmp_path):
    # `--set tune.trials=N` (what `oncolite run` passes on) searches like `train --tune N`.
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(6, 3, 3))
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "head_epochs": 1, "finetune_epochs": 1}.items()]
    done = oncolite("train", tmp_path / "run", "--manifest", manifest, "--quiet", *sets,
                    "--set", "tune.trials=1", "--set", "tune.epochs=1", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "train" / "tune" / "results.json").read_text())
    assert len(results["trials"]) == 1


DETERMINISTIC = r"""
import json, sys
from oncolite.train.config import load_config
from oncolite.train.manifest import load_manifest
from oncolite.train.train import train_run
config = load_config(overrides={**json.loads(sys.argv[2]), "deterministic": True})
losses = [train_run(f"{sys.argv[3]}/{r}", load_manifest(sys.argv[1]), config, {"manifest": sys.argv[1]}, quiet=True)["val"]["loss"]
          for r in range(2)]
print(json.dumps(losses))
"""


def test_deterministic_mode_repeats_a_run_exactly(tmp_path):
    # In a subprocess: op determinism is process-wide and would slow every later test.
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(12, 4, 0))
    config = {**PRETRAINED, "head_epochs": 2, "augment": {"rotation": 10, "shear": 0.1, "color_jitter": 0.1}}
    result = subprocess.run([sys.executable, "-c", DETERMINISTIC, manifest, json.dumps(config), tmp_path / "runs"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = json.loads(result.stdout.splitlines()[-1])
    assert first == second and 0 < first < 0.69  # learned something, and exactly the same twice


def test_label_smoothing_loss_is_the_smoothed_cross_entropy():
    import tensorflow as tf

    from oncolite.train.train import training_loss

    assert training_loss(3, 0.0) == "sparse_categorical_crossentropy"
    probs = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    loss = training_loss(3, 0.3)(tf.constant([0, 2]), probs).numpy()
    targets = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])  # 1 - 0.3 + 0.3/3 on the label, 0.3/3 elsewhere
    assert np.allclose(loss, -(targets * np.log(probs.numpy())).sum(axis=1), atol=1e-5)


def test_mixup_blends_each_image_and_its_target_by_the_same_weight():
    import tensorflow as tf

    from oncolite.train.data import mixer

    images = tf.constant(np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1) * np.ones((8, 4, 4, 3), np.float32))
    labels = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = mixer(3, seed=0, mixup=0.4)(images, labels)
    mixed, targets = mixed.numpy(), targets.numpy()
    assert targets.shape == (8, 3) and np.allclose(targets.sum(axis=1), 1.0)
    assert np.allclose(mixed, mixed[:, :1, :1, :1])  # a blend of two flat images is flat
    blended = targets.max(axis=1) < 1 - 1e-3
    assert blended.any()  # Beta(0.4, 0.4) weights are rarely exactly 0 or 1
    # Each blended value lies between the smallest and largest image values, as a convex mix does.
    assert mixed.min() >= 0.0 and mixed.max() <= 7.0 and not np.allclose(mixed[:, 0, 0, 0], np.arange(8))


def test_cutmix_pastes_a_box_of_another_image_and_weights_the_target_by_the_area_kept():
    import tensorflow as tf

    from oncolite.train.data import mixer

    # Image i is flat at value i and has label i: every pixel says which image it came from.
    images = tf.constant(np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1) * np.ones((8, 16, 16, 3), np.float32))
    labels = tf.constant(np.arange(8))
    mixed, targets = mixer(8, seed=0, cutmix=1.0)(images, labels)
    mixed, targets = mixed.numpy()[..., 0], targets.numpy()
    assert np.allclose(targets.sum(axis=1), 1.0)
    pasted = 0
    for i in range(8):
        own = mixed[i] == i
        assert np.isclose(targets[i, i], own.mean(), atol=1e-6), i  # the target's share is the area kept
        other = np.unique(mixed[i][~own])
        assert len(other) <= 1  # one partner per image
        if len(other):
            pasted += 1
            rows, cols = np.nonzero(~own)  # the pasted pixels form one rectangle
            assert (~own)[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
            assert np.isclose(targets[i, int(other[0])], 1 - own.mean(), atol=1e-6)
    assert pasted >= 4
    # Both, as training runs it (inside tf.data's graph): each batch is mixed one way or the other.
    flat = []
    for seed in range(6):
        ds = tf.data.Dataset.from_tensors((images, labels)).map(mixer(8, seed=seed, mixup=0.4, cutmix=1.0))
        batch, targets = next(iter(ds))
        assert np.allclose(targets.numpy().sum(axis=1), 1.0)
        flat.append(np.allclose(batch.numpy(), batch.numpy()[:, :1, :1, :]))  # mixup keeps flat images flat
    assert any(flat) and not all(flat)


def test_weight_decay_label_smoothing_and_mixup_train_and_the_model_loads_anywhere(tmp_path):
    """AdamW shrinks the trained weights against plain Adam on the same run (mixup's and cutmix's
    soft targets and the class weights train together); the saved float model carries no custom
    loss, so plain Keras loads it compiled or not."""
    import tf_keras as keras

    from oncolite.train.train import train_run

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(24, 8, 8)))
    short = {**PRETRAINED, "head_epochs": 2, "finetune_epochs": 0, "head_lr": 0.01, "seed": 3, "deterministic": True}
    norms = {}
    for name, extra in (("adam", {}), ("adamw", {"weight_decay": 0.5, "label_smoothing": 0.2, "mixup": 0.4,
                                                  "cutmix": 1.0})):
        train_run(tmp_path / name, manifest, load_config(overrides={**short, **extra}), {"manifest": str(manifest.path)},
                  quiet=True)
        model = keras.models.load_model(tmp_path / name / "models" / "float.keras", safe_mode=True)
        norms[name] = float(np.linalg.norm(model.get_layer("predictions").get_weights()[0]))
    assert norms["adamw"] < 0.95 * norms["adam"], norms


def test_weight_average_follows_the_warmed_up_decay_and_swaps_back_exactly():
    import tensorflow as tf

    from oncolite.train.train import WeightAverage

    v = tf.Variable([1.0, -2.0])
    ema = WeightAverage([v], decay=0.9)
    expected = np.array([1.0, -2.0])
    for step, value in enumerate(([3.0, 0.0], [5.0, 4.0], [-1.0, 2.0]), start=1):
        v.assign(value)
        ema._update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * np.array(value)
    np.testing.assert_allclose(ema.module.average[0].numpy(), expected, rtol=1e-6)
    with ema.swapped():
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
    assert v.numpy().tolist() == [-1.0, 2.0]  # the trained weights are back


def test_with_ema_the_saved_model_is_the_average_not_the_last_step(tmp_path):
    """With `ema` on, validation and the best checkpoint use the averaged weights: the saved
    model's head is the average, which differs from where training left the weights; the
    average is part of the resume point (checkpointed beside the optimizer)."""
    import tensorflow as tf
    import tf_keras as keras

    from oncolite.train import train as train_mod

    manifest = load_manifest(planted_manifest(tmp_path, TL_VS_BR, counts=(24, 8, 8)))
    config = load_config(overrides={**PRETRAINED, "head_epochs": 2, "ema": 0.5, "monitor": "val_loss", "seed": 1})
    seen = {"trained": [], "average": []}  # per validation (one per epoch): the head kernel
    original_swapped = train_mod.WeightAverage.swapped

    def swapped(self):
        kernel = next(i for i, v in enumerate(self.variables) if "predictions" in v.name and "kernel" in v.name)
        seen["trained"].append(self.variables[kernel].numpy().copy())
        seen["average"].append(self.module.average[kernel].numpy().copy())
        resume_point = tmp_path / "run" / "train" / "state" / "epoch-head-1"
        if len(seen["average"]) == 2:  # epoch 1's resume point exists while epoch 2 validates
            seen["resume_names"] = list(tf.train.load_checkpoint(str(resume_point)).get_variable_to_shape_map())
        return original_swapped(self)

    train_mod.WeightAverage.swapped = swapped
    try:
        train_mod.train_run(tmp_path / "run", manifest, config, {"manifest": str(manifest.path)}, quiet=True)
    finally:
        train_mod.WeightAverage.swapped = original_swapped
    state = json.loads((tmp_path / "run" / "train" / "state" / "state.json").read_text())
    model = keras.models.load_model(tmp_path / "run" / "models" / "float.keras", safe_mode=True)
    kernel = model.get_layer("predictions").get_weights()[0]
    best = state["best"]["epoch"] - 1
    np.testing.assert_allclose(kernel, seen["average"][best], rtol=1e-5, atol=1e-7)
    assert not np.allclose(seen["average"][best], seen["trained"][best], rtol=1e-3, atol=1e-5)
    assert any(name.startswith("ema/average") for name in seen["resume_names"])


def test_training_subset_takes_whole_groups_of_every_class_about_the_fraction():
    from oncolite.train.train import training_subset

    items = [{"label": label, "group": f"{label}-{g}", "path": f"{label}-{g}-{k}"}
             for label, n_groups in (("a", 40), ("b", 10)) for g in range(n_groups) for k in range(1 + g % 3)]
    half = training_subset(items, 0.5, seed=0)
    for label in ("a", "b"):
        total = sum(1 for it in items if it["label"] == label)
        kept = sum(1 for it in half if it["label"] == label)
        assert 0.5 * total <= kept < 0.5 * total + 3  # the last group taken may overshoot by its size
    kept_groups = {it["group"] for it in half}
    assert all(it in half for it in items if it["group"] in kept_groups)  # no group is split
    assert training_subset(items, 0.5, seed=0) == half and training_subset(items, 0.5, seed=1) != half
    assert training_subset(items, 1.0, seed=0) is items
