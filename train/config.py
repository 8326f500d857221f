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
from pathlib import Path

from edge_runtime.errors import OncoliteError
from edge_runtime.preprocess import Preprocessing

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS_PATH = CONFIG_DIR / "defaults.json"
# A run directory's config.json carries this provenance section beside the settings; it is
# not a setting, so `--config RUN_DIR/config.json` reproduces a run.
PROVENANCE_KEY = "run"


class ConfigError(OncoliteError):
    """A config file or override that names an unknown key or has an unusable value."""


def available(kind: str) -> list[str]:
    """Names of the shipped dataset or profile files ("datasets" or "profiles")."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.json"))


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the path") from None
    except json.JSONDecodeError as e:
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


def validate(config: dict, reference: dict, source: str, prefix: str = "") -> None:
    """Every key of `config` must exist in `reference` (the defaults), sections must stay sections."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(f"{source}: unknown config key {name!r}; valid keys here: {', '.join(sorted(reference))}")
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
    check_values(config)
    return config


def stored_config(path: str | Path) -> dict:
    """A run's config.json: its stored settings over today's defaults.

    The stored settings win and are not validated against today's defaults: the run was
    started with them. Keys defaults.json gained since only fill what an older run lacks, so
    code reading a key finds one; compare with `same_settings`, which ignores such keys."""
    return deep_merge(read_config_file(DEFAULTS_PATH), read_config_file(path))


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


def check_values(config: dict) -> None:
    """The few values whose mistakes would otherwise surface deep inside TensorFlow."""
    choices = {"monitor": ("val_mcc", "val_loss"), "head": ("compact", "reference"),
               "lr_schedule": ("constant", "cosine", "plateau"),
               "mixed_precision": ("auto", True, False), "distribute": ("auto", "none", "mirrored", "multiworker")}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"config: {key}={config[key]!r} is not one of {', '.join(map(repr, allowed))}")
    if config["head_epochs"] + config["finetune_epochs"] < 1:
        raise ConfigError("config: head_epochs + finetune_epochs must be at least 1")
    for key in ("input_size", "batch_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"config: {key} must be a positive integer, got {config[key]!r}")


def parse_overrides(pairs: list[str] | None) -> dict:
    """["a.b=1", "head=compact"] -> {"a": {"b": 1}, "head": "compact"}; values are JSON when they parse."""
    result: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
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


def preprocessing(config: dict) -> Preprocessing:
    """The model's input contract from a resolved config (the one preprocessing's parameters)."""
    return Preprocessing(height=config["input_size"], width=config["input_size"], resample=config["resample"])
