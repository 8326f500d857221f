"""`oncolite train`: MobileNetV2 transfer learning on a manifest, two phases, resumable.

Phase "head": the backbone frozen, only the head trains (head_lr, head_epochs). Phase
"finetune": the top `finetune_depth` backbone layers train too, BatchNorm stays frozen
(finetune_lr, finetune_epochs). Each phase stops early after `patience` epochs without a better
`monitor` value (val MCC or val loss, computed on the whole validation side after every epoch)
and hands the best weights on; the best model over both phases is models/float.keras.

Resume: after every epoch the model and optimizer go to train/state/ (a TF checkpoint) and
train/state/state.json (written atomically after the checkpoint, so it always names a complete
one) records phase, epoch, best value and history. `oncolite train RUN_DIR --resume` after a
crash or SIGKILL continues from the last completed epoch with the run's own config. A finished
training (train/summary.json, written last) is left as it is, with a line saying so; `--force`
trains it again from scratch.

Hardware: on CPU, one device. With GPUs, `mixed_precision: "auto"` trains in mixed_float16
(float32 variables and softmax) and `distribute: "auto"` uses tf.distribute.MirroredStrategy
over all visible GPUs (batch_size is the global batch, split across replicas). Several
machines: set TF_CONFIG on each (the standard JSON `{"cluster": {"worker": ["host1:port",
"host2:port"]}, "task": {"type": "worker", "index": i}}`) and run the same command with the
same RUN_DIR on a shared file system; "auto" then picks MultiWorkerMirroredStrategy and only
worker 0 (the chief) writes the run directory, the others checkpoint (and save their copy of the
model: saving runs collectives every worker must join) into RUN_DIR/workers/<i>/.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# TensorFlow, tf-keras, scikit-learn and the modules built on them (train.model, train.data) are
# imported inside the functions that use them: `oncolite train --help` and a mistyped setting
# answer at once, without loading TensorFlow.
from edge_runtime.atomic import atomic_path, write_json, write_text
from edge_runtime.console import Log, add_output_flags, old_spelling, print_json, progress, result, say
from edge_runtime.errors import EXIT_OK, ManifestError, OncoliteError
from edge_runtime.resources import WORKSPACE
from .checkpoints import save_resume_point
from .config import (PROVENANCE_KEY, add_profile_argument, add_set_argument, available, default_profile, load_config,
                     parse_overrides, preprocessing, read_config_file, same_settings)
from .manifest import load_manifest, verify_manifest, write_manifest
from .plots import pyplot, save_png
from .provenance import versions
from .rundir import RESUME_POINT, RunDir

if TYPE_CHECKING:
    import tensorflow as tf
    import tf_keras as keras

PHASES = ("head", "finetune")
HISTORY_FIELDS = ("phase", "epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy", "val_mcc", "seconds")


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="run directory to create, or to continue with --resume (default: runs/<manifest folder>-<time>)")
    parser.add_argument("--manifest", help="manifest.json from `oncolite split` (not needed with --resume)")
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)  # the old spelling of RUN_DIR
    parser.add_argument("--config", help="a config file (JSON; a run's config.json works) over the defaults")
    add_profile_argument(parser)
    parser.add_argument("--dataset", choices=available("datasets"), help="configs/datasets/<name>.json")
    add_set_argument(parser)
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, help="train on fold i of the manifest's cross-validation")
    folds.add_argument("--folds", type=int, metavar="K", help="train every fold 0..K-1 into RUN/folds/<i>/ and report mean and spread")
    again = parser.add_mutually_exclusive_group()
    # A flag: `--resume RUN_DIR`, the old spelling, is the same words in another order.
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run RUN_DIR from its last completed epoch, with its own settings")
    again.add_argument("--force", action="store_true",
                       help="train RUN_DIR again from scratch (a finished training is otherwise left as it is)")
    parser.add_argument("--tune", type=int, metavar="N", help="first search N KerasTuner trials on the validation side")
    add_output_flags(parser)


def given_run_dir(args) -> str | None:
    """RUN_DIR, from its place (the first argument) or from an old spelling (with a note)."""
    if args.old_run:
        if args.run_dir:
            raise OncoliteError(f"--run {args.old_run} and {args.run_dir}: give the run directory once, first")
        old_spelling(args, f"--run {args.old_run}", f"oncolite train {args.old_run} ...")
        return args.old_run
    return args.run_dir


def main(args) -> int:
    quiet = args.quiet or args.json
    given = given_run_dir(args)
    if args.resume:
        if not given:
            raise OncoliteError("--resume: which run? give its directory: oncolite train RUN_DIR --resume")
        run_dir = Path(given)
        config, provenance = read_run_config(run_dir)
        folds, fold = provenance.get("folds"), provenance.get("fold")
    else:
        # Settings first: a mistyped --set is refused at once (before a missing --manifest, too),
        # before TensorFlow loads to look for a GPU (the default profile's question) and before
        # minutes of hashing the manifest's files.
        # A profile holds only budget values that pass every check: checking without one is enough.
        overrides = parse_overrides(args.set)
        load_config(dataset=args.dataset, profile=args.profile, path=args.config, overrides=overrides)
        if not args.manifest and given and RunDir(given).manifest_copy.exists():
            # A run directory holds its own manifest (`oncolite run --until split`, or a trained run).
            args.manifest = str(RunDir(given).manifest_copy)
            own_settings = not (args.set or args.profile or args.config or args.dataset)
        else:
            own_settings = False
        if not args.manifest:
            where = f"{given} holds no manifest.json; " if given else ""
            raise OncoliteError(f"--manifest is required: {where}give the manifest.json of `oncolite split` "
                                "(or RUN_DIR --resume to continue an interrupted run)")
        if own_settings and RunDir(given).config_file.exists():
            # No settings given for a run directory that has its own: they are kept.
            config = RunDir(given).config()
            profile = RunDir(given).provenance().get("profile")
        else:
            profile = args.profile or default_profile()
            config = load_config(dataset=args.dataset, profile=profile, path=args.config, overrides=overrides)
        run_dir = Path(given or WORKSPACE / "runs" / f"{Path(args.manifest).resolve().parent.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        # --folds 1 is one train/val/test split, as in `split` and `run` (the manifest's own split).
        folds, fold = (None if args.folds == 1 else args.folds), args.fold
    # KerasTuner trials before training: --tune N, else the config's tune.trials.
    trials = args.tune if args.tune is not None else int(config["tune"]["trials"])
    if args.force:
        forget_training(run_dir, folds)
    elif finished_mark(run_dir, folds).exists():
        # Tuned settings are the search's choice, unknown before it runs: nothing to compare them with.
        if not trials:
            refuse_other_run(run_dir, config, finished=True)
        model = RunDir(run_dir).fold("<i>").float_model if folds else RunDir(run_dir).float_model
        if args.json:
            print_json({**json.loads(finished_mark(run_dir, folds).read_text(encoding="utf-8")), "finished_before": True})
        result(args, f"{run_dir}: training finished before; left as it is (model: {model}); to train again from "
                     "scratch add --force, or give a new RUN_DIR")
        return EXIT_OK
    if args.resume:
        # The original manifest, or the run's own copy if the original has moved.
        source = provenance["manifest"] if Path(provenance["manifest"]).exists() else RunDir(run_dir).manifest_copy
        manifest = load_manifest(source)
        check_manifest(manifest, provenance, run_dir)
    else:
        # Read, checked against --folds, then verified: a wrong --folds is refused before the hashing.
        manifest = load_manifest(args.manifest, verify=False)
        check_folds(manifest, args.folds)
        verify_manifest(manifest, check_hashes=manifest.path.suffix.lower() != ".csv")
        for f in range(folds) if folds else [fold]:  # before --tune's trials, too
            check_training_labels(manifest, f)
        if trials:
            from .tune import tune

            config = tune(run_dir, manifest, config, trials=trials, fold=fold, quiet=quiet)
        provenance = {"manifest": str(Path(args.manifest).resolve()), "manifest_sha256": manifest.sha256,
                      "dataset": args.dataset, "profile": profile, "config_file": args.config,
                      "overrides": args.set, "fold": fold, "folds": folds}
    if folds:
        summary = train_folds(run_dir, manifest, config, provenance, folds, quiet=quiet)
    else:
        summary = train_run(run_dir, manifest, config, provenance, fold=fold, quiet=quiet)
    if args.json:
        print_json(summary)
    else:
        say(args, *summary_lines(summary))
        result(args, result_line(run_dir, summary))
    return EXIT_OK


def check_folds(manifest, asked: int | None) -> None:
    """`--folds K` trains folds 0..K-1 of the manifest's cross-validation: K must be its fold count."""
    if asked is None or asked == manifest.folds:
        return
    fix = f"or make a {asked}-fold manifest with `oncolite split DATA --folds {asked}`"
    if manifest.folds == 1:
        raise ManifestError(f"{manifest.path}: one train/val/test split, no cross-validation folds, and --folds {asked} "
                            f"asks for {asked}; drop --folds to train its split, {fix}")
    raise ManifestError(f"{manifest.path}: {manifest.folds} cross-validation folds, and --folds {asked} asks for {asked}; "
                        f"give --folds {manifest.folds} (or --fold I for one fold), {fix}")


def result_line(run_dir: Path, summary: dict) -> str:
    """The one result line: the model (or cv.json) written and the headline figure."""
    if isinstance(summary.get("folds"), list):
        mcc = summary.get("val", {}).get("mcc")
        figure = f"val MCC {mcc['mean']:.3f} ± {mcc['std']:.3f}" if mcc else "no validation side"
        return (f"{RunDir(run_dir).cv_summary}: {figure} over {len(summary['folds'])} folds "
                f"(models: {RunDir(run_dir).fold('<i>').float_model})")
    best = summary["best"]
    val = f", val {summary['val']['n']} images" if summary.get("val") else ""
    return (f"{RunDir(run_dir).float_model}: best {summary['monitor']} {best['value']:.3f} "
            f"({best['phase']} epoch {best['epoch']}{val})")


def summary_lines(summary: dict) -> list[str]:
    if "folds" in summary and isinstance(summary["folds"], list):
        return [f"{side} {k}: {v['mean']:.3f} ± {v['std']:.3f} over {len(summary['folds'])} folds"
                for side in ("val", "test") for k, v in summary.get(side, {}).items()]
    lines = [f"best {summary['monitor']} {summary['best']['value']:.4f} "
             f"({summary['best']['phase']} epoch {summary['best']['epoch']})"]
    for side in ("val", "test"):
        if summary.get(side):
            m = summary[side]
            lines.append(f"{side}: accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  MCC {m['mcc']:.3f}  (n={m['n']})")
    return lines


# ---------------------------------------------------------------- run directory

def read_run_config(run_dir: Path) -> tuple[dict, dict]:
    """The run's own config (as stored, today's defaults only filling keys it lacks) and provenance:
    RunDir.config() and RunDir.provenance()."""
    run = RunDir(run_dir)
    return run.config(), run.provenance()


def check_manifest(manifest, provenance: dict, run_dir: Path) -> None:
    if manifest.sha256 not in (provenance.get("manifest_sha256"), provenance.get("manifest_copy_sha256")):
        raise OncoliteError(f"{provenance['manifest']}: changed since {run_dir} started (sha256 differs); "
                            "restore it or start a new run")


def check_training_labels(manifest, fold: int | None) -> None:
    """Refuse a split whose training side lacks a label: the model could never predict it, and
    training would run to a validation score that means nothing."""
    counts = Counter(item["label"] for item in manifest.sides(fold)["train"])
    missing = [label for label in manifest.labels if not counts[label]]
    if missing:
        split = "the manifest's split" if fold is None else f"fold {fold}"
        raise ManifestError(f"{manifest.path}: {split} has no training images of {', '.join(missing)}; rebuild it with "
                            "`oncolite split` (fewer --folds, another --seed) or add images of those labels")


def start_run_dir(run_dir: Path, manifest, config: dict, provenance: dict) -> None:
    """config.json (settings + provenance), manifest.json, versions.json."""
    run = RunDir(run_dir)
    copy_sha256 = copy_manifest(manifest, run.manifest_copy)
    write_json(run.config_file, {**config, PROVENANCE_KEY: {**provenance, "manifest_copy_sha256": copy_sha256}})
    write_json(run.versions_file, versions())


AFTER_TRAINING = ("export", "benchmark")  # config sections that only later stages read


def refuse_other_run(run_dir: Path, config: dict, finished: bool = False) -> None:
    """A run directory with training state (or, `finished`, a finished training) continues, or
    stays as it is, only with its own config."""
    config_path = RunDir(run_dir).config_file
    if config_path.exists() and (finished or RunDir(run_dir).train_state_file.exists()):
        # Only the keys both hold: a run started before defaults.json gained a key lacks it. The
        # export and benchmark sections change no trained model (a newer default variant list
        # is not another training).
        before = {k: v for k, v in read_config_file(config_path).items() if k not in AFTER_TRAINING}
        if not same_settings(before, {k: v for k, v in config.items() if k not in AFTER_TRAINING}):
            raise OncoliteError(f"{run_dir}: already holds a run with another config; continue it with "
                                f"`oncolite train {run_dir} --resume`, train it again with this config with --force, "
                                "or choose another RUN_DIR")


def finished_mark(run_dir: Path, folds: int | None = None) -> Path:
    """The file a finished training writes last: train/summary.json, or cv.json once every fold of
    `--folds K` has finished. While it exists the training is not done again (see forget_training)."""
    return RunDir(run_dir).cv_summary if folds else RunDir(run_dir).summary


def forget_training(run_dir: Path, folds: int | None = None) -> None:
    """Training starts over in `run_dir`: its finished marks go first, so a kill midway never leaves
    an old mark over new state, then the resume points (the chief's and other workers')."""
    finished_mark(run_dir, folds).unlink(missing_ok=True)
    for fold_dir in [RunDir(run_dir).fold(i) for i in range(folds)] if folds else [RunDir(run_dir)]:
        finished_mark(fold_dir.path).unlink(missing_ok=True)
        shutil.rmtree(fold_dir.train_state, ignore_errors=True)
        shutil.rmtree(fold_dir.workers_dir, ignore_errors=True)


def copy_manifest(manifest, destination: Path) -> str:
    """The manifest as used, with `root` rewritten so the copy still finds the images; its sha256."""
    if manifest.path.resolve() == destination.resolve():
        return manifest.sha256
    data = json.loads(manifest.path.read_text(encoding="utf-8"))
    return write_manifest({**data, "root": str(manifest.root)}, destination)


# ---------------------------------------------------------------- hardware

def use_mixed_precision(config: dict) -> bool:
    import tensorflow as tf

    setting = config["mixed_precision"]
    return bool(tf.config.list_physical_devices("GPU")) if setting == "auto" else bool(setting)


def select_strategy(config: dict) -> tf.distribute.Strategy:
    """The distribution strategy for `distribute` (see the module docstring)."""
    import tensorflow as tf

    setting = config["distribute"]
    if setting == "auto":
        if os.environ.get("TF_CONFIG"):
            setting = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            setting = "mirrored"
        else:
            setting = "none"
    if setting == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if setting == "mirrored":
        # All GPUs; without GPUs, all logical CPUs (how the tests exercise this path).
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is None or resolver.task_type in (None, "chief") or \
        (resolver.task_type == "worker" and resolver.task_id == 0)


def setup_determinism(config: dict) -> None:
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(config["seed"])
    if config["deterministic"]:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------- metrics on a side

def side_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """The numbers training decides on; the full report is `oncolite evaluate`'s."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, matthews_corrcoef

    pred = probs.argmax(axis=1)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return {"n": int(len(y)), "loss": float(-np.mean(np.log(p_true))), "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "mcc": float(matthews_corrcoef(y, pred))}


def improved(monitor: str, row: dict, best: dict | None) -> bool:
    """Better on `monitor`; an MCC tie goes to the lower val loss (MCC is coarse on small sides)."""
    if best is None:
        return True
    if monitor == "val_loss":
        return row["val_loss"] < best["value"]
    return row["val_mcc"] > best["value"] or (row["val_mcc"] == best["value"] and row["val_loss"] < best["val_loss"])


def learning_rate(config: dict, phase: str, epoch: int, plateau_factor: float) -> float:
    base = config[f"{phase}_lr"]
    if config["lr_schedule"] == "cosine":
        total = max(1, config[f"{phase}_epochs"])
        return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / total)))
    if config["lr_schedule"] == "plateau":
        return base * plateau_factor
    return base


# ---------------------------------------------------------------- training

class Trainer:
    """One run directory, one split: builds, trains both phases, checkpoints, resumes."""

    def __init__(self, run_dir: Path, sides: dict, labels: list[str], config: dict, log: Log, quiet: bool):
        from .data import label_indices

        self.run_dir, self.sides, self.labels, self.config, self.log, self.quiet = run_dir, sides, labels, config, log, quiet
        self.prep = preprocessing(config)
        self.mixed = use_mixed_precision(config)
        self.strategy = select_strategy(config)
        self.chief = is_chief(self.strategy)
        self.task = getattr(getattr(self.strategy, "cluster_resolver", None), "task_id", 0) or 0
        self.state_dir = RunDir(run_dir).train_state if self.chief else RunDir(run_dir).worker_state(self.task)
        self.state_path = self.state_dir / RESUME_POINT
        if not sides["val"] or not sides["train"]:
            raise ManifestError("the manifest has no train or no val images on this split; early stopping and the "
                                "best checkpoint need both: rebuild it with `oncolite split` (val_fraction > 0)")
        self.state = self.load_state()
        self.y_val = label_indices(sides["val"], labels)
        self.ema = None  # the phase's WeightAverage, made by compile() when the `ema` setting is on

    # -- state

    def load_state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        return {"phase": PHASES[0], "epoch": 0, "checkpoint": None, "best": None, "wait": 0,
                "plateau_factor": 1.0, "history": []}

    def save_state(self) -> None:
        save_resume_point(self.state_path, self.state,
                          keep={self.state["checkpoint"], (self.state["best"] or {}).get("checkpoint")})

    # -- model

    def build(self) -> keras.Model:
        import tf_keras as keras

        from . import model as model_lib

        keras.mixed_precision.set_global_policy("mixed_float16" if self.mixed else "float32")
        c = self.config
        with self.strategy.scope():
            model = model_lib.build_classifier(len(self.labels), c["input_size"], c["input_size"], c["alpha"],
                                               c["head"], c["dropout"], c["dense_units"], c["weights"])
        if c["int8_grid_layers"] and c["weights"] is not None:
            model_lib.snap_to_int8_grid(model, c["int8_grid_layers"])
        return model

    def compile(self, model: keras.Model, phase: str) -> None:
        import tf_keras as keras

        from . import model as model_lib

        model_lib.set_trainable_depth(model, 0 if phase == "head" else self.config["finetune_depth"],
                                      train_batchnorm=self.config["weights"] is None)
        c = self.config
        with self.strategy.scope():
            lr = c[f"{phase}_lr"]
            if c["weight_decay"]:
                # Decoupled weight decay (AdamW); biases and BatchNorm parameters are not decayed.
                optimizer = keras.optimizers.AdamW(lr, weight_decay=c["weight_decay"])
                optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
            else:
                optimizer = keras.optimizers.Adam(lr)
            model.compile(optimizer=optimizer, loss=training_loss(len(self.labels), c["label_smoothing"],
                                                                   bool(c["mixup"] or c["cutmix"])),
                          metrics=["accuracy"])
            # Slot variables exist before a restore, so the optimizer state comes back exactly.
            model.optimizer.build(model.trainable_variables)
            # A phase's average starts from the weights it starts from (the previous phase's best).
            self.ema = WeightAverage(model.trainable_variables, c["ema"]) if c["ema"] else None

    def write_checkpoint(self, model: keras.Model, name: str, with_optimizer: bool) -> str:
        """A TF checkpoint in train/state/; returns its name (relative, so a run dir can move)."""
        import tensorflow as tf

        tf.train.Checkpoint(**checkpointed(model, with_optimizer, self.ema)).write(str(self.state_dir / name))
        return name

    def restore(self, model: keras.Model, name: str, with_optimizer: bool) -> None:
        import tensorflow as tf

        objects = checkpointed(model, with_optimizer, self.ema)
        with self.strategy.scope():
            tf.train.Checkpoint(**objects).read(str(self.state_dir / name)).expect_partial()

    # -- loop

    def datasets(self):
        from .data import class_weights, label_indices, make_dataset

        c = self.config
        oversample = bool(c["oversample"])
        train_ds = make_dataset(self.sides["train"], self.labels, self.prep, c["batch_size"], augment=c["augment"],
                                shuffle=True, seed=c["seed"], cache=c["cache"], oversample=oversample, mixup=c["mixup"],
                                cutmix=c["cutmix"])
        val_ds = make_dataset(self.sides["val"], self.labels, self.prep, c["batch_size"], cache=c["cache"])
        weights = None
        if c["class_weights"] and not oversample:  # oversampling already balances the classes
            weights = class_weights(label_indices(self.sides["train"], self.labels), len(self.labels))
        return train_ds, val_ds, weights

    def run(self, model: keras.Model) -> keras.Model:
        """Train `model` (from `build`) through the phases left, resuming from the state."""
        train_ds, val_ds, weights = self.datasets()
        self.log(f"train {len(self.sides['train'])} / val {len(self.sides['val'])} images, labels {self.labels}, "
                 f"class weights {weights}, strategy {type(self.strategy).__name__} x{self.strategy.num_replicas_in_sync}, "
                 f"mixed precision {self.mixed}")
        for phase in PHASES[PHASES.index(self.state["phase"]):] if self.state["phase"] in PHASES else ():
            self.compile(model, phase)
            if self.state["epoch"] > 0 and self.state["checkpoint"]:
                self.restore(model, self.state["checkpoint"], with_optimizer=True)
                self.log(f"resumed {phase} after epoch {self.state['epoch']}")
            elif self.state["best"]:
                self.restore(model, self.state["best"]["checkpoint"], with_optimizer=False)
            self.run_phase(model, phase, train_ds, val_ds, weights)
            if self.state["best"]:
                self.restore(model, self.state["best"]["checkpoint"], with_optimizer=False)
            following = PHASES[PHASES.index(phase) + 1] if phase != PHASES[-1] else "done"
            self.state.update(phase=following, epoch=0, checkpoint=None, wait=0, phase_best=None, plateau_factor=1.0)
            self.save_state()
        if self.state["phase"] == "done" and self.state["best"]:
            self.restore(model, self.state["best"]["checkpoint"], with_optimizer=False)
        return model

    def run_phase(self, model, phase, train_ds, val_ds, weights) -> None:
        c, monitor = self.config, self.config["monitor"]
        for epoch in range(self.state["epoch"], c[f"{phase}_epochs"]):
            if self.state["wait"] >= c["patience"]:
                break
            lr = learning_rate(c, phase, epoch, self.state["plateau_factor"])
            model.optimizer.learning_rate.assign(lr)
            t0 = time.monotonic()
            title = f"{phase} epoch {epoch + 1}/{c[f'{phase}_epochs']}"
            with batch_progress(title, batches(train_ds), self.quiet) as callbacks:
                if self.ema:
                    callbacks.append(self.ema.callback())
                fit = model.fit(train_ds, epochs=1, class_weight=weights, verbose=0, callbacks=callbacks).history
            # With a weight average, the average is what is validated and kept as the best.
            with self.ema.swapped() if self.ema else contextlib.nullcontext():
                with batch_progress(f"{title} validation", batches(val_ds), self.quiet) as callbacks:
                    val = side_metrics(self.y_val, model.predict(val_ds, verbose=0, callbacks=callbacks))
                row = {"phase": phase, "epoch": epoch + 1, "lr": lr, "loss": fit["loss"][-1],
                       "accuracy": fit["accuracy"][-1], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                       "val_mcc": val["mcc"], "seconds": round(time.monotonic() - t0, 2)}
                if improved(monitor, row, self.state["best"]):
                    name = f"best-{phase}-{epoch + 1}"
                    self.state["best"] = {"value": row[monitor], "val_loss": row["val_loss"], "phase": phase,
                                          "epoch": epoch + 1,
                                          "checkpoint": self.write_checkpoint(model, name, with_optimizer=False)}
            # Patience counts from this phase's own best: fine-tuning starts below the head's best
            # (newly unfrozen layers disturb the features) and must get `patience` epochs to recover.
            if improved(monitor, row, self.state.get("phase_best")):
                self.state["phase_best"] = {"value": row[monitor], "val_loss": row["val_loss"]}
                self.state["wait"] = 0
            else:
                self.state["wait"] += 1
                if c["lr_schedule"] == "plateau" and self.state["wait"] % max(1, c["patience"] // 2) == 0:
                    self.state["plateau_factor"] *= 0.5
            self.state["checkpoint"] = self.write_checkpoint(model, f"epoch-{phase}-{epoch + 1}", with_optimizer=True)
            self.state["epoch"] = epoch + 1
            self.state["history"].append(row)
            self.save_state()
            if self.chief:
                write_history(self.run_dir / "train", self.state["history"])
            self.log(f"{title}: loss {row['loss']:.4f} acc {row['accuracy']:.3f} "
                     f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.3f} val_mcc {row['val_mcc']:.3f} "
                     f"lr {lr:.2e} ({row['seconds']:.1f} s)")
        if self.state["wait"] >= c["patience"]:
            self.log(f"{phase}: early stop, no better {monitor} for {c['patience']} epochs")


def batches(ds) -> int | None:
    """Batches in one pass over a tf.data dataset, None when tf.data cannot tell (oversampling)."""
    n = int(ds.cardinality())
    return n if n >= 0 else None


@contextlib.contextmanager
def batch_progress(desc: str, total: int | None, quiet: bool):
    """Keras callbacks (none when quiet) that advance a progress bar on stderr with every batch
    of the fit or predict they are given, showing the running training loss."""
    if quiet:
        yield []
        return
    import tf_keras as keras

    with progress(total=total, desc=desc, unit="batch") as bar:
        def step(batch, logs=None):
            bar.update(1)
            if logs and "loss" in logs:
                bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

        yield [keras.callbacks.LambdaCallback(on_train_batch_end=step, on_predict_batch_end=step)]


def checkpointed(model: keras.Model, with_optimizer: bool, ema: "WeightAverage | None" = None) -> dict:
    """What a checkpoint holds. Weights alone go in as a plain list: a Keras model also tracks
    its optimizer, whose slots differ between phases, so a phase's best weights must not carry it.
    A resume point also holds the weight average, like the optimizer's state."""
    if with_optimizer:
        return {"model": model, "optimizer": model.optimizer, **({"ema": ema.module} if ema else {})}
    return {"weights": list(model.weights)}


class WeightAverage:
    """An exponential moving average of the trainable weights (setting `ema`), updated after every
    training step. Our own rather than the optimizers' `use_ema`: tf-keras overwrites the model's
    weights with that average at the end of every fit(), and training fits one epoch at a time.
    The decay warms up as min(decay, (1 + step) / (10 + step)) so early steps do not average in
    the untrained start."""

    def __init__(self, variables, decay: float):
        import tensorflow as tf

        self.variables, self.decay = list(variables), float(decay)
        self.module = tf.Module()
        self.module.average = [tf.Variable(v, trainable=False, name="average") for v in self.variables]
        self.module.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="average_steps")
        self._update = tf.function(self._step)

    def _step(self) -> None:
        import tensorflow as tf

        steps = tf.cast(self.module.steps.assign_add(1), tf.float32)
        decay = tf.minimum(self.decay, (1.0 + steps) / (10.0 + steps))
        for average, v in zip(self.module.average, self.variables):
            average.assign(decay * average + (1.0 - decay) * tf.cast(v, average.dtype))

    def callback(self):
        import tf_keras as keras

        return keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs=None: self._update())

    @contextlib.contextmanager
    def swapped(self):
        """The average in the model's weights inside the block, the trained weights back after it."""
        trained = [v.numpy() for v in self.variables]
        for v, average in zip(self.variables, self.module.average):
            v.assign(average)
        try:
            yield
        finally:
            for v, value in zip(self.variables, trained):
                v.assign(value)


def write_history(train_dir: Path, history: list[dict]) -> None:
    """history.csv and curves.png in `train_dir`, the run's RunDir.train_dir."""
    run = RunDir(train_dir.parent)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    write_text(run.history, buffer.getvalue())
    plot_curves(run.curves, history)


def plot_curves(path: Path, history: list[dict]) -> None:
    x = np.arange(1, len(history) + 1)
    fig, (ax_loss, ax_score) = pyplot().subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("val_loss", ax_loss), ("accuracy", ax_score),
                    ("val_accuracy", ax_score), ("val_mcc", ax_score)):
        ax.plot(x, [row[key] for row in history], label=key, marker=".")
    switch = sum(1 for row in history if row["phase"] == "head")
    for ax in (ax_loss, ax_score):
        if 0 < switch < len(history):
            ax.axvline(switch + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch (head | fine-tune)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_loss.set_title("loss")
    ax_score.set_title("accuracy and MCC")
    fig.tight_layout()
    save_png(fig, path)


def training_subset(items: list[dict], fraction: float, seed: int) -> list[dict]:
    """About `fraction` of each class of the training side, in whole duplicate groups (so the
    subset stays leak-free), the same for a given seed: the points of a learning curve."""
    if fraction >= 1:
        return items
    rng = np.random.default_rng(seed)
    chosen = set()
    for label in sorted({item["label"] for item in items}):
        sizes = Counter(item["group"] for item in items if item["label"] == label)
        groups = sorted(sizes)
        rng.shuffle(groups)
        target, count = fraction * sum(sizes.values()), 0
        for group in groups:
            if count >= target:
                break
            chosen.add((label, group))
            count += sizes[group]
    return [item for item in items if (item["label"], item["group"]) in chosen]


def training_loss(n_classes: int, label_smoothing: float, mixed: bool = False):
    """Cross-entropy on integer labels, with the one-hot targets smoothed towards uniform by
    `label_smoothing` (tf-keras' sparse loss has no smoothing of its own); when `mixed` (mixup or
    cutmix) the dataset gives mixed one-hot targets, and the loss takes them as they are."""
    import tensorflow as tf
    import tf_keras as keras

    if mixed:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if not label_smoothing:
        return "sparse_categorical_crossentropy"

    def smoothed_sparse_crossentropy(y_true, y_pred):
        targets = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), n_classes)
        return keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=label_smoothing)

    return smoothed_sparse_crossentropy


def save_float_model(model: keras.Model, path: Path, config: dict, n_classes: int, mixed: bool) -> None:
    """models/float.keras: the network alone, uncompiled, in float32. It is rebuilt and given the
    trained weights: a mixed-precision model becomes plain float layers for QAT and TFLite export,
    and the file carries no training loss or optimizer (a custom loss such as label smoothing's
    would make `keras.models.load_model` fail outside oncolite)."""
    import tf_keras as keras

    from . import model as model_lib

    if mixed:
        keras.mixed_precision.set_global_policy("float32")
    plain = model_lib.build_classifier(n_classes, config["input_size"], config["input_size"], config["alpha"],
                                       config["head"], config["dropout"], config["dense_units"], weights=None)
    plain.set_weights(model.get_weights())
    with atomic_path(path) as tmp:
        plain.save(tmp)


def train_run(run_dir: str | Path, manifest, config: dict, provenance: dict, fold: int | None = None,
              quiet: bool = False, evaluate_test: bool = True) -> dict:
    """Train one split of `manifest` into `run_dir` (resuming if it holds an interrupted run; a
    finished one is left as it is and its summary returned: forget_training starts over).

    evaluate_test=False never touches the test side (hyperparameter search)."""
    import tf_keras as keras

    from . import model as model_lib
    from .data import image_errors, label_indices, make_dataset

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if finished_mark(run_dir).exists():
        return json.loads(finished_mark(run_dir).read_text(encoding="utf-8"))
    check_training_labels(manifest, fold)
    sides = manifest.sides(fold=fold)
    sides["train"] = training_subset(sides["train"], config["train_fraction"], config["seed"])
    labels = list(manifest.labels)
    trainer_log = Log(run.log("train"), quiet)
    refuse_other_run(run_dir, config)
    setup_determinism(config)
    trainer = Trainer(run_dir, sides, labels, config, trainer_log, quiet)
    # Built before anything is written: weights that do not fit stop the run with no folder left behind.
    model = trainer.build()
    if trainer.chief and not trainer.state["history"]:
        start_run_dir(run_dir, manifest, config, {**provenance, "fold": fold})
    with image_errors():
        model = trainer.run(model)
    summary = {"monitor": config["monitor"], "best": {k: v for k, v in trainer.state["best"].items() if k != "checkpoint"},
               "epochs": {p: sum(1 for r in trainer.state["history"] if r["phase"] == p) for p in PHASES},
               "head_summary": model_lib.head_summary(model), "fold": fold,
               "replicas": trainer.strategy.num_replicas_in_sync, "mixed_precision": trainer.mixed}
    for side in ("val", "test") if evaluate_test else ("val",):
        if sides.get(side):
            ds = make_dataset(sides[side], labels, trainer.prep, config["batch_size"], cache=False)
            with image_errors():
                probs = model.predict(ds, verbose=0)
            summary[side] = side_metrics(label_indices(sides[side], labels), probs)
    # Saving a distributed model runs collectives, so every worker saves: the others beside their state.
    saved = run.float_model if trainer.chief else run.worker_float_model(trainer.task)
    save_float_model(model, saved, config, len(labels), trainer.mixed)
    if trainer.chief:
        stored = json.loads(run.config_file.read_text(encoding="utf-8"))
        stored[PROVENANCE_KEY]["head_summary"] = summary["head_summary"]
        write_json(run.config_file, stored)
        write_json(finished_mark(run_dir), summary)  # last: the mark of a finished training
        trainer_log(f"done: best {config['monitor']} {summary['best']['value']:.4f}; "
                    f"val {summary.get('val', {}).get('mcc', float('nan')):.3f} MCC; model {run.float_model}")
    keras.backend.clear_session()
    return summary


def train_folds(run_dir: str | Path, manifest, config: dict, provenance: dict, k: int, quiet: bool = False) -> dict:
    """Every fold 0..k-1 into run_dir/folds/<i>/, then run_dir/cv.json with mean and spread."""
    run_dir = Path(run_dir)
    for fold in range(k):  # every fold before the first starts, not hours into the run
        check_training_labels(manifest, fold)
    start_run_dir(run_dir, manifest, config, {**provenance, "folds": k, "fold": None})
    summaries = [train_run(RunDir(run_dir).fold(i).path, manifest, config, {**provenance, "folds": None}, fold=i, quiet=quiet)
                 for i in range(k)]
    cv = {"folds": summaries}
    for side in ("val", "test"):
        rows = [s[side] for s in summaries if side in s]
        if rows:
            cv[side] = {key: {"mean": float(np.mean([r[key] for r in rows])), "std": float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
                              "values": [r[key] for r in rows]}
                        for key in ("accuracy", "balanced_accuracy", "mcc", "loss")}
    write_json(RunDir(run_dir).cv_summary, cv)
    return cv
