"""Run configuration: defaults live in configs/*.json, not in code.

Layers, later ones winning (deep merge): configs/defaults.json <- configs/profiles/<profile>.json
<- configs/datasets/<dataset>.json <- a user's file (--config) <- overrides (--set key=value).
A profile sets the generic budget (size, epochs, folds); a dataset file wins over it because
it knows its images (IDC's 50 px patches train at 96 px whatever the profile).
Every key must exist in defaults.json: a typo is an error naming the valid keys, never a
silently ignored setting. Keys starting with "_" are comments.

A run's own config.json is read with `stored_config`, not `load_config`: it is the truth for
that run, even after defaults.json has gained or lost keys.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from edge_runtime.console import did_you_mean
from edge_runtime.errors import OncoliteError
# _RESAMPLE: the one preprocessing's resampling filters (edge_runtime has no public name for them yet).
from edge_runtime.preprocess import _RESAMPLE, Preprocessing
from edge_runtime.resources import CONFIG_DIR, DATA_ROOT, PRETRAINED_DIR
from edge_runtime.variants import SELECTABLE

DEFAULTS_PATH = CONFIG_DIR / "defaults.json"
# A run directory's config.json carries this provenance section beside the settings; it is
# not a setting, so `--config RUN_DIR/config.json` reproduces a run.
PROVENANCE_KEY = "run"
# Keys added to defaults.json with a default that differs from what older runs used: a stored
# config without the key gets the value that run was trained with, not today's default.
# (mean/std: runs before the int8-exact input contract normalized with MobileNetV2's 127.5.)
LEGACY_DEFAULTS = {"mean": 127.5, "std": 127.5}

# MobileNetV2 ImageNet weights shipped in the repo, by width (alpha). weights="imagenet" means
# one of these files, never Keras' download: a run must not depend on the network at run time.
SHIPPED_WEIGHTS = {1.0: PRETRAINED_DIR / "mobilenet_v2_1.0_224_imagenet_no_top.h5"}
HEADS = ("compact", "reference")
# quantize/export.py's IO_CHOICES (a test keeps them equal: this layer cannot import quantize/).
INT8_IO = ("int8", "uint8", "float")
# MobileNetV2's smallest input side (tf-keras refuses anything smaller).
MIN_INPUT_SIZE = 32
# `--folds K` of `split` and `run` (and the `folds` setting): K-fold cross-validation; 1 is one
# train/val/test split, whose test side is fold 0 of this many.
ONE_SPLIT_PARTS = 5
FOLDS_HELP = (f"K-fold cross-validation: K folds, each testing on 1/K of the data; 1: one train/val/test split "
              f"(test: 1/{ONE_SPLIT_PARTS} of the data)")


class ConfigError(OncoliteError):
    """A config file or override that names an unknown key or has an unusable value."""


def available(kind: str) -> list[str]:
    """Names of the shipped dataset or profile files ("datasets" or "profiles")."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.json"))


def add_profile_argument(parser) -> None:
    """`--profile`, the same for `oncolite train` and `oncolite run` (default: `default_profile`)."""
    parser.add_argument("--profile", choices=available("profiles"),
                        help="settings budget (configs/profiles/<name>.json): quick, 160 px and short training, minutes "
                             "on 2 CPU cores; full, 224 px and full epochs, 5-fold CV under `oncolite run`; "
                             "default: full with a GPU, quick without")


def default_profile() -> str:
    """The profile when none is given: full with a GPU, quick without (full takes hours on a CPU).
    Asks TensorFlow, so a command calls it only once it will train."""
    import tensorflow as tf

    return "full" if tf.config.list_physical_devices("GPU") else "quick"


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give a JSON config file (a run's is RUN_DIR/config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a JSON object; fix the file")
    data.pop(PROVENANCE_KEY, None)
    return strip_comments(data)


def strip_comments(d: dict) -> dict:
    return {k: strip_comments(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith("_")}


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` over `base`, merging nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dotted_names(reference: dict, prefix: str = "") -> list[str]:
    """Every section and setting of `reference` by its dotted name ("augment", "augment.zoom")."""
    return [name for key, value in reference.items()
            for name in [f"{prefix}{key}", *(dotted_names(value, f"{prefix}{key}.") if isinstance(value, dict) else [])]]


def validate(config: dict, reference: dict, source: str, prefix: str = "") -> None:
    """Every key of `config` must exist in `reference` (the defaults), sections must stay sections."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            # Suggested from every name below this level: `rotation` finds `augment.rotation`.
            # Listed by their dotted names, a section as `name.*`: what --set takes here.
            valid = sorted(f"{prefix}{k}" + (".*" if isinstance(v, dict) else "") for k, v in reference.items())
            raise ConfigError(f"{source}: unknown config key {name!r}{did_you_mean(name, dotted_names(reference, prefix))}; "
                              f"valid keys here: {', '.join(valid)}")
        if isinstance(reference[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name!r} must be a section (a JSON object) with keys {', '.join(sorted(reference[key]))}")
            validate(value, reference[key], source, f"{name}.")


def _named_file(kind: str, name: str) -> Path:
    path = CONFIG_DIR / kind / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"{path}: no {kind[:-1]} config named {name!r}; choose one of {', '.join(available(kind))}")
    return path


def load_config(dataset: str | None = None, profile: str | None = None, path: str | Path | None = None,
                overrides: dict | None = None) -> dict:
    """The resolved config: defaults <- profile <- dataset <- file <- overrides, validated."""
    defaults = read_config_file(DEFAULTS_PATH)
    layers = []
    if profile:
        layers.append((str(_named_file("profiles", profile)), read_config_file(_named_file("profiles", profile))))
    if dataset:
        layers.append((str(_named_file("datasets", dataset)), read_config_file(_named_file("datasets", dataset))))
    if path:
        layers.append((str(path), read_config_file(path)))
    if overrides:
        layers.append(("--set", strip_comments(overrides)))
    config = defaults
    for source, layer in layers:
        validate(layer, defaults, source)
        config = deep_merge(config, layer)
    check_values(config, layers)
    return config


def stored_config(path: str | Path) -> dict:
    """A run's config.json: its stored settings over today's defaults.

    The stored settings win and are not validated against today's defaults: the run was
    started with them. Keys defaults.json gained since only fill what an older run lacks, so
    code reading a key finds one; compare with `same_settings`, which ignores such keys.
    A key in LEGACY_DEFAULTS fills with the value older runs used instead."""
    return deep_merge(deep_merge(read_config_file(DEFAULTS_PATH), LEGACY_DEFAULTS), read_config_file(path))


def same_settings(a: dict, b: dict) -> bool:
    """Equal on every key both hold (sections compared key by key): a key one config lacks
    was added to (or removed from) defaults.json between the two runs, not chosen differently."""
    for key in a.keys() & b.keys():
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            if not same_settings(a[key], b[key]):
                return False
        elif a[key] != b[key]:
            return False
    return True


def resolve_weights(alpha: float, weights: str | None) -> str | None:
    """The backbone weights file for `weights` ("imagenet", a path, or None: random
    initialization) at width `alpha`; a ConfigError naming what to use when there is none."""
    if weights is None:
        return None
    if weights == "imagenet":
        shipped = SHIPPED_WEIGHTS.get(alpha)
        if shipped is None or not shipped.is_file():
            have = ", ".join(f"alpha {a} ({p.relative_to(DATA_ROOT)})" for a, p in SHIPPED_WEIGHTS.items()
                             if p.is_file()) or "no width"
            raise ConfigError(f"config: weights=\"imagenet\" with alpha={alpha}: ImageNet weights are shipped for {have} "
                              f"and nothing is downloaded; use --set alpha=1.0, a local MobileNetV2 alpha {alpha} weights "
                              "file (--set weights=PATH.h5), or no pretrained weights (--set weights=null)")
        return str(shipped)
    if isinstance(weights, str) and weights and Path(weights).expanduser().is_file():
        return str(Path(weights).expanduser())
    raise ConfigError(f"config: weights={json.dumps(weights)} must be \"imagenet\" (the shipped ImageNet weights), "
                      "null (random initialization: --set weights=null) or the path of an existing Keras weights file (.h5)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(low: int):
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = True, unit: str = ""):
    def ok(v):
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))
    interval = f"> {low:g}" if high is None and low_open else f">= {low:g}" if high is None else \
        f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return ok, f"a number {interval}{unit}"


def _one_of(*choices):
    return (lambda v: any(v == c and type(v) is type(c) for c in choices)), \
        f"one of {', '.join(json.dumps(c) for c in choices)}"


def _list_of(rule, allow_empty: bool = False):
    test, accepted = rule
    return ((lambda v: isinstance(v, list) and (allow_empty or bool(v)) and all(test(x) for x in v)),
            f"a{'' if allow_empty else ' non-empty'} JSON list, each {accepted} (e.g. --set 'key=[...]')")


def _range_of(rule):
    test, accepted = rule
    return (lambda v: isinstance(v, list) and len(v) == 2 and all(map(test, v)) and v[0] <= v[1]), \
        f"[low, high] with low <= high, each {accepted}"


def _channels(rule):
    test, accepted = rule
    return (lambda v: test(v) or (isinstance(v, list) and len(v) == 3 and all(map(test, v)))), \
        f"{accepted}, or a list of 3 such numbers (R, G, B)"


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_LR = _number(0, low_open=True)
_EPOCHS = _integer(0)
# Every setting of configs/defaults.json but `weights` (checked with `alpha` by resolve_weights):
# dotted name -> (test, what it accepts).
RULES = {
    "input_size": ((lambda v: _is_int(v) and v >= MIN_INPUT_SIZE), f"an integer >= {MIN_INPUT_SIZE} (pixels)"),
    "resample": _one_of(*_RESAMPLE),
    "mean": _channels(_number(0, 255, high_open=False)),
    "std": _channels(_number(0, low_open=True)),
    "alpha": _number(0, low_open=True),
    "head": _one_of(*HEADS),
    "dropout": _number(0, 1),
    "dense_units": _integer(0),
    "int8_grid_layers": _list_of(((lambda v: isinstance(v, str) and bool(v)), "a layer name"), allow_empty=True),
    "batch_size": _integer(1),
    "head_epochs": _EPOCHS,
    "finetune_epochs": _EPOCHS,
    "head_lr": _LR,
    "finetune_lr": _LR,
    "finetune_depth": _integer(0),
    "monitor": _one_of("val_mcc", "val_loss"),
    "patience": _integer(1),
    "lr_schedule": _one_of("constant", "cosine", "plateau"),
    "weight_decay": _number(0, 1),
    "label_smoothing": _number(0, 1),
    "mixup": _number(0, 10, high_open=False),
    "cutmix": _number(0, 10, high_open=False),
    "ema": _number(0, 1),
    "train_fraction": _number(0, 1, low_open=True, high_open=False),
    "class_weights": _BOOL,
    "oversample": _BOOL,
    "augment.rotation": _number(0, 180, high_open=False, unit=" (degrees)"),
    "augment.shift": _number(0, 1, unit=" (fraction of the side)"),
    "augment.shear": _number(0, 1.5, high_open=False, unit=" (radians)"),
    "augment.zoom": _number(0, 1, unit=" (fraction of the side)"),
    "augment.elastic": _number(0, 0.25, high_open=False, unit=" (fraction of the side)"),
    "augment.hflip": _BOOL,
    "augment.vflip": _BOOL,
    "augment.rot90": _BOOL,
    "augment.color_jitter": _number(0, 1, high_open=False),
    "augment.gamma": _number(0, 1, high_open=False),
    "augment.speckle": _number(0, 1, high_open=False),
    "cache": _one_of("auto", True, False),
    "seed": _integer(0),
    "deterministic": _BOOL,
    "mixed_precision": _one_of("auto", True, False),
    "distribute": _one_of("auto", "none", "mirrored", "multiworker"),
    "folds": _integer(1),
    "tune.trials": _integer(0),
    "tune.epochs": _integer(1),
    "tune.lr": _range_of(_LR),
    "tune.dropout": _range_of(_number(0, 1)),
    "tune.dense_units": _list_of(_integer(0)),
    "tune.finetune_depth": _list_of(_integer(0)),
    "qat.epochs": _EPOCHS,
    "qat.lr": _LR,
    "qat.settle_steps": _integer(0),
    "qat.freeze_bn": _BOOL,
    "qat.distill": _BOOL,
    "qat.distill_weight": _number(0, 1, high_open=False),
    "qat.temperature": _number(0, low_open=True),
    "qat.patience": _integer(1),
    "export.calibration_images": _integer(1),
    "export.variants": _list_of(_one_of(*SELECTABLE)),  # the variants table's names, as --variants
    "export.int8_io": _one_of(*INT8_IO),
    "export.gate": _number(0, 1, high_open=False),
    "benchmark.threads": _list_of(_integer(1), allow_empty=True),
    "benchmark.warmup": _integer(0),
    "benchmark.runs": _integer(1),
}

# What each setting does, next to what it accepts (RULES) and its value in configs/defaults.json:
# `oncolite config` prints the three together; a test keeps this table, RULES and the defaults
# on the same keys.
DOCS = {
    "input_size": "square side, in pixels, the image is resized to for the network (the device uses the same)",
    "resample": "resize filter of the one preprocessing, shared by training and the device",
    "mean": "pixel mean subtracted before the network (per channel or one number); 128 puts uint8 pixels exactly on the int8 input grid",
    "std": "pixel scale divided by after the mean; 128 maps [0, 255] to about [-1, 1]",
    "alpha": "MobileNetV2 width multiplier (ImageNet weights are shipped for 1.0)",
    "head": "classifier head: compact (pooling, dropout, dense) or reference (flatten, dense 1024)",
    "dropout": "dropout rate before the classifier layer",
    "dense_units": "hidden dense layer in the compact head (0: none)",
    "weights": "backbone initialization: \"imagenet\" (the shipped file, never a download), null, or a .h5 path",
    "int8_grid_layers": "conv layers whose BatchNorm-folded kernels are snapped to their int8 grid before training",
    "batch_size": "images per training step (split across devices under tf.distribute)",
    "head_epochs": "epochs of phase 1: the head alone on the frozen backbone",
    "finetune_epochs": "epochs of phase 2: the top `finetune_depth` backbone layers train too",
    "head_lr": "phase-1 learning rate",
    "finetune_lr": "phase-2 learning rate",
    "finetune_depth": "backbone layers (from the top) that phase 2 trains; BatchNorm stays frozen",
    "monitor": "validation figure that picks the best epoch and stops early",
    "patience": "epochs without a better `monitor` before a phase stops",
    "lr_schedule": "learning rate over a phase: constant, cosine decay, or halved on a plateau",
    "weight_decay": "decoupled weight decay (AdamW) per step, relative to the learning rate; 0: plain Adam",
    "label_smoothing": "share of each one-hot target spread evenly over the classes (0: none)",
    "mixup": "mixup's Beta(a, a) parameter: each training image blended with another of its batch, targets alike (0: none)",
    "cutmix": "cutmix's Beta(a, a) parameter: a box of another image of the batch pasted over each training image, "
              "the target weighted by area (0: none; with mixup too, each batch takes one of the two)",
    "train_fraction": "share of the training side that trains (whole duplicate groups, per class, fixed by `seed`): "
                      "below 1 for a learning curve",
    "ema": "decay of an exponential moving average of the weights, updated every step; validation, the best "
           "checkpoint and the saved model use the average (0: off; 0.99 averages over ~100 steps)",
    "class_weights": "weight the loss by inverse class frequency",
    "oversample": "oversample rare classes instead (use one of the two)",
    "augment.rotation": "random rotation, up to this many degrees either way",
    "augment.shift": "random translation, up to this fraction of the side",
    "augment.shear": "random shear, up to this many radians",
    "augment.zoom": "random zoom, up to this fraction",
    "augment.elastic": "random elastic deformation: a smooth field moving points by up to this fraction of the "
                       "side (0: none; 0.03 is ~7 px at 224 px)",
    "augment.hflip": "random horizontal flips",
    "augment.vflip": "random vertical flips (off for ultrasound: the probe is at the top)",
    "augment.rot90": "random 90-degree rotations and transposes (histology tiles have no up)",
    "augment.color_jitter": "random brightness/contrast/saturation/hue strength (0: none)",
    "augment.gamma": "random gamma (pixels ** g, g between 1 - this and 1 + this; ultrasound gain curves; 0: none)",
    "augment.speckle": "multiplicative speckle noise, per-pixel sd up to this (ultrasound; 0: none)",
    "cache": "keep decoded training images in memory: true, false, or auto (when they fit)",
    "seed": "seed of splits, shuffling, augmentation and initialization",
    "deterministic": "bit-reproducible training (slower: deterministic TF ops, one thread for data)",
    "mixed_precision": "float16 compute on a GPU: auto (when one is there), true or false",
    "distribute": "tf.distribute strategy: auto (mirrored over GPUs), none, mirrored, multiworker (TF_CONFIG)",
    "folds": "K-fold cross-validation of `oncolite run` (its --folds K): the split's folds, each trained and "
             "benchmarked; 1: one train/val/test split",
    "tune.trials": "KerasTuner trials on the validation side before training (0: no search; train's --tune N overrides)",
    "tune.epochs": "epochs per tuner trial",
    "tune.lr": "tuner search range of the fine-tuning learning rate",
    "tune.dropout": "tuner search range of the dropout rate",
    "tune.dense_units": "tuner choices of the head's hidden units",
    "tune.finetune_depth": "tuner choices of the fine-tuned depth",
    "qat.epochs": "quantization-aware fine-tuning epochs",
    "qat.lr": "QAT learning rate",
    "qat.settle_steps": "forward passes that settle the activation ranges before QAT trains",
    "qat.freeze_bn": "fold BatchNorm first, so QAT fake-quantizes the kernels the converter rounds",
    "qat.distill": "train towards the float model's outputs (distillation) rather than the labels alone",
    "qat.distill_weight": "share of the distillation term in the QAT loss (the rest: label cross-entropy)",
    "qat.temperature": "distillation temperature",
    "qat.patience": "QAT epochs without better validation agreement before stopping",
    "export.calibration_images": "training images that calibrate the integer models' activation ranges and round "
                                 "int8_gptq's and int8_gptq_act's kernels (int8_gptq_act holds their activations "
                                 "in memory: ~4 GB for 200 at 224 px)",
    "export.variants": "what `oncolite export` makes (the variants table, edge_runtime/variants.py)",
    "export.int8_io": "integer models' input/output type: int8, uint8 or float",
    "export.gate": "largest validation accuracy loss against float an integer model may have before the export warns (and runs the quantization debugger)",
    "benchmark.threads": "interpreter thread counts the benchmark times ([] : no timing)",
    "benchmark.warmup": "untimed invokes before timing",
    "benchmark.runs": "timed invokes per model and thread count",
}


def _lookup(config: dict, name: str):
    for part in name.split("."):
        config = config[part]
    return config


def _set_by(layers: list[tuple[str, dict]], name: str) -> int:
    """Index of the last layer that sets dotted `name` (-1: only the defaults)."""
    for index in range(len(layers) - 1, -1, -1):
        node = layers[index][1]
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return index
    return -1


def check_values(config: dict, layers: list[tuple[str, dict]] = ()) -> None:
    """Every setting's type and range, before any work starts: a mistake is one line naming the
    setting, where it came from and what it accepts, not a traceback from inside TensorFlow (or
    a download) later. `layers`: (source, settings) over the defaults, in load_config's order."""
    layers = list(layers)

    def where(*names: str) -> str:
        index = max(_set_by(layers, name) for name in names)
        return layers[index][0] if index >= 0 else str(DEFAULTS_PATH)

    for name, (test, accepted) in RULES.items():
        value = _lookup(config, name)
        if not test(value):
            raise ConfigError(f"{where(name)}: {name}={json.dumps(value)} must be {accepted}")
    if config["head_epochs"] + config["finetune_epochs"] < 1:
        raise ConfigError(f"{where('head_epochs', 'finetune_epochs')}: head_epochs + finetune_epochs must be at least 1")
    try:
        resolve_weights(config["alpha"], config["weights"])
    except ConfigError as e:
        # Named after whichever of the two was set last: the one the user just changed.
        raise ConfigError(f"{where('weights', 'alpha')}: {str(e).removeprefix('config: ')}") from None


def parse_overrides(pairs: list[str] | None) -> dict:
    """["a.b=1", "head=compact"] -> {"a": {"b": 1}, "head": "compact"}; values are JSON when they parse."""
    result: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set finetune_lr=1e-5 or --set augment.vflip=true")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = result
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return result


def add_set_argument(parser, section: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable), on every command that reads config. `section`: a command
    that works on a trained run reads only its own section (its flags are sugar for those keys);
    the run's other settings were fixed when it trained (see `with_overrides`)."""
    if section is None:
        help_ = ("override one setting (repeatable), e.g. --set finetune_lr=1e-5 --set augment.vflip=true; "
                 "`oncolite config` lists and documents every key")
    else:
        keys = ", ".join(f"{section}.{key}" for key in read_config_file(DEFAULTS_PATH)[section])
        help_ = f"override one of this stage's settings for this call (repeatable): {keys}"
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_)


# The stage command that reads each stage section of a trained run (train and run read the rest).
SECTION_COMMANDS = {"qat": "oncolite quantize", "export": "oncolite export", "benchmark": "oncolite benchmark"}


def with_overrides(config: dict, pairs: list[str], section: str) -> dict:
    """A run's stored config with a stage command's --set pairs over its `section`, checked by the
    rules every setting obeys. A key outside the section is refused: changing a training setting
    after training would describe a model that does not exist."""
    overrides = parse_overrides(pairs)
    defaults = read_config_file(DEFAULTS_PATH)
    for key, value in overrides.items():
        # A key that is no setting at all is validate's: refused with the closest names.
        if key != section and (key in defaults or key in defaults[section]):
            given = (", ".join(f"{key}.{leaf}" for leaf in value) if isinstance(value, dict) and value
                     else key)  # the dotted key(s) as typed: benchmark.runs
            if key in defaults[section]:
                fix = f"write it --set {section}.{key}=VALUE"
            elif key in SECTION_COMMANDS:
                fix = f"{key}.* settings are read by `{SECTION_COMMANDS[key]}`: give --set {given}=... there"
            else:
                fix = f"{given} is fixed when the run trains: `oncolite train` and `oncolite run` read it"
            raise ConfigError(f"--set {given}: `{SECTION_COMMANDS.get(section, 'this command')}` reads only the "
                              f"{section}.* settings ({', '.join(f'{section}.{k}' for k in sorted(defaults[section]))}); "
                              f"{fix}")
    validate(overrides, defaults, "--set")
    merged = deep_merge(config, overrides)
    for name, (test, accepted) in RULES.items():
        if _set_by([("--set", overrides)], name) >= 0 and not test(_lookup(merged, name)):
            raise ConfigError(f"--set: {name}={json.dumps(_lookup(merged, name))} must be {accepted}")
    return merged


def preprocessing(config: dict) -> Preprocessing:
    """The model's input contract from a resolved config (the one preprocessing's parameters)."""
    return Preprocessing(height=config["input_size"], width=config["input_size"], mean=config["mean"],
                         std=config["std"], resample=config["resample"])


def describe(keys: list[str] | None = None, dataset: str | None = None, profile: str | None = None,
             path: str | None = None, overrides: dict | None = None) -> list[dict]:
    """Each setting (or those under `keys`) with its default, its value under a dataset,
    profile, config file and overrides (load_config's layers, checked as training checks them),
    what it accepts and what it does, in DOCS' order (configs/defaults.json's)."""
    defaults = read_config_file(DEFAULTS_PATH)
    values = load_config(dataset=dataset, profile=profile, path=path, overrides=overrides)
    return [{"key": key, "default": _lookup(defaults, key), "value": _lookup(values, key), "doc": doc,
             "accepts": RULES[key][1] if key in RULES else '"imagenet", null or the path of a .h5 file'}
            for key, doc in DOCS.items() if not keys or any(key == k or key.startswith(f"{k}.") for k in keys)]


def add_arguments(parser) -> None:
    from edge_runtime.console import add_output_flags

    parser.add_argument("keys", nargs="*", metavar="KEY", help="settings or sections to show (default: all), e.g. qat export.gate")
    parser.add_argument("--profile", choices=available("profiles"), help="show the values under this profile (e.g. quick)")
    parser.add_argument("--dataset", choices=available("datasets"), help="show the values under this dataset's defaults")
    parser.add_argument("--config", help="show the values under this config file (JSON; a run's config.json works)")
    add_set_argument(parser)
    add_output_flags(parser)


def main(args) -> int:
    """`oncolite config`: every setting with its default, what it accepts and what it does."""
    from edge_runtime.console import print_json

    names = dotted_names(read_config_file(DEFAULTS_PATH))
    for key in args.keys:
        if key not in names:
            raise ConfigError(f"no setting named {key}{did_you_mean(key, names)}; `oncolite config` lists them all")
    settings = describe(args.keys, args.dataset, args.profile, args.config, parse_overrides(args.set))
    layers = " + ".join(filter(None, ["defaults", args.profile and f"profile {args.profile}",
                                      args.dataset and f"dataset {args.dataset}", args.config and f"file {args.config}",
                                      " ".join(f"--set {pair}" for pair in args.set)]))  # load_config's order
    if args.json:
        print_json({"defaults": str(DEFAULTS_PATH), "values_of": layers, "settings": settings})
        return 0
    if args.quiet:  # the values alone, one `KEY = VALUE` line per setting: `oncolite config qat.lr -q` is one line
        print("\n".join(f"{s['key']} = {json.dumps(s['value'])}" for s in settings))
        return 0

    def shown(s):
        changed = f" (default {json.dumps(s['default'])})" if s["value"] != s["default"] else ""
        return f"{s['key']} = {json.dumps(s['value'])}{changed}\n    {s['doc']}; accepts {s['accepts']}"

    print("\n".join(shown(s) for s in settings))
    print(f"\n(values: {layers}; defaults: {DEFAULTS_PATH}; change one with --set KEY=VALUE or a --config file)")
    return 0
