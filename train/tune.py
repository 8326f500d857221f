"""`oncolite train --tune N`: KerasTuner search over learning rate, dropout, dense units and
unfrozen depth (the reference study tuned its head with KerasTuner).

Each trial is an ordinary training run (train.train.train_run, epochs capped at tune.epochs per
phase) scored by its best validation value of `monitor`; the test side is never evaluated, so
the search cannot leak test information into the chosen config. The search space comes from
the config's `tune` section. Results: RUN_DIR/train/tune/ (results.json, best_config.json, and
KerasTuner's own oracle state, which lets an interrupted search continue).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_runtime.atomic import write_json
from .config import deep_merge
from .rundir import RunDir


def search_space(hp, space: dict) -> dict:
    """Config overrides for one trial, drawn from KerasTuner hyperparameters."""
    low, high = space["lr"]
    return {"finetune_lr": hp.Float("lr", low, high, sampling="log"),
            "dropout": hp.Float("dropout", space["dropout"][0], space["dropout"][1], step=0.1),
            "dense_units": hp.Choice("dense_units", space["dense_units"]),
            "finetune_depth": hp.Choice("finetune_depth", space["finetune_depth"])}


def trial_config(config: dict, overrides: dict) -> dict:
    """The trial's config: head LR keeps its ratio to the fine-tuning LR; epochs capped."""
    ratio = config["head_lr"] / config["finetune_lr"]
    cap = config["tune"]["epochs"]
    return deep_merge(config, {**overrides, "head_lr": overrides["finetune_lr"] * ratio,
                               "head_epochs": min(config["head_epochs"], cap),
                               "finetune_epochs": min(config["finetune_epochs"], cap)})


def tune(run_dir: str | Path, manifest, config: dict, trials: int, fold: int | None = None, quiet: bool = False) -> dict:
    """Search `trials` configs on the validation side; returns `config` with the best values."""
    import keras_tuner as kt

    from .train import train_run

    tune_dir = RunDir(run_dir).tune_dir
    monitor = config["monitor"]
    direction = "max" if monitor == "val_mcc" else "min"

    class TrainRunTuner(kt.BayesianOptimization):
        def run_trial(self, trial, *args, **kwargs):
            candidate = trial_config(config, search_space(trial.hyperparameters, config["tune"]))
            trial_dir = tune_dir / f"trial_{trial.trial_id}"
            summary = train_run(trial_dir, manifest, candidate, {"manifest": str(manifest.path), "tune_trial": trial.trial_id},
                                fold=fold, quiet=quiet, evaluate_test=False)
            # Trials are for their score: their models and checkpoints would only fill the disk.
            for heavy in (RunDir(trial_dir).models, RunDir(trial_dir).train_state):
                shutil.rmtree(heavy, ignore_errors=True)
            return {monitor: summary["best"]["value"]}

    tuner = TrainRunTuner(objective=kt.Objective(monitor, direction), max_trials=trials, seed=config["seed"],
                          directory=str(tune_dir), project_name="oracle", overwrite=False)
    tuner.search()
    done = [t for t in tuner.oracle.trials.values() if t.score is not None]
    best_hp = tuner.get_best_hyperparameters(1)[0]
    best = trial_config(config, search_space(best_hp, config["tune"]))
    # The final run trains for the configured epochs, not the capped ones.
    best.update(head_epochs=config["head_epochs"], finetune_epochs=config["finetune_epochs"])
    write_json(tune_dir / "results.json", {
        "monitor": monitor, "direction": direction, "space": config["tune"],
        "trials": sorted(({"trial": t.trial_id, "score": t.score, "values": t.hyperparameters.values} for t in done),
                         key=lambda r: r["score"], reverse=direction == "max"),
        "best": best_hp.values})
    write_json(tune_dir / "best_config.json", best)
    return best
