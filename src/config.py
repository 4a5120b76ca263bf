"""Experiment configuration: one typed dataclass, loaded from yaml.

A yaml file may name a ``base:`` yaml (relative to itself) whose keys it
overrides; command-line ``key=value`` overrides come last.  Unknown keys,
values of the wrong type and values outside a key's choices are errors that
name the key and what is valid.
"""

import dataclasses
import math
import os
import typing

import yaml


@dataclasses.dataclass
class Config:
    """Every knob of a run (defaults: Omniglot 20-way 1-shot meta-dropout,
    the authors' official run settings)."""

    # Data and episodes.
    dataset: str = "omniglot"        # omniglot | miniimagenet
    data_dir: str = "data/omniglot"  # holds train.npy, test.npy (val.npy)
    way: int = 20
    shot: int = 1
    query: int = 15                  # query examples per class
    shared_classes: bool = True      # one class set per meta-batch (original sampler)

    # Model.
    noise: str = "meta_dropout"      # none (MAML) | meta_dropout
    learner: str = "maml"            # maml | meta_sgd (learned inner step sizes)
    fused_bn: bool = True            # fused batch-norm kernel (float32)
    init: str = "original"           # kernel initialisers: original (std 0.02) | glorot_uniform | pytorch_default
    bn_epsilon: float = 1e-3         # batch norm's variance epsilon (the original code's)
    bn_scale: bool = False           # also a meta-learned batch-norm scale γ (Keras' default; a diagnostic)

    # Meta-learning.
    inner_steps: int = 5             # K
    inner_lr: float = 0.1            # α (Meta-SGD: initial value)
    meta_lr: float = 3e-4            # Adam (MAML's yamls: 1e-3)
    meta_batch: int = 4              # tasks per meta-iteration
    iterations: int = 60000
    first_order: bool = False        # first-order MAML (never the default)
    bn_second_order: bool = True     # False: the authors' TF1 meta-gradient (see README)
    adapt_offsets: bool = False      # also adapt batch norm's β in the inner loop (a diagnostic)
    mc_samples: int = 1              # S at meta-training
    clip: float = 3.0                # element-wise gradient clip; 0 disables
    parallel_tasks: int = 2          # tasks computed side by side (bounds memory); 0 = all
    seed: int = 0                    # initialisation, episodes and noise

    # Logging, checkpoints, validation.
    log_every: int = 50
    ckpt_every: int = 1000
    ckpt_keep_every: int = 0         # also keep every N-th one for good, in checkpoints/kept/; 0: off
    val_every: int = 1000            # 0 disables
    val_episodes: int = 100          # fixed validation episodes
    deterministic_ops: bool = False  # bitwise-repeatable runs (op determinism, one inter-op thread)
    intra_op_threads: int = 1        # threads per op; 0 = TensorFlow's default
    inter_op_threads: int = 0        # ops run side by side; 0 = TensorFlow's default

    # Meta-test.
    test_episodes: int = 1000
    test_mc_samples: int = 30        # S at meta-test (meta-dropout only)
    test_seed: int = 1000            # fixes the test episodes for every model
    eval_batch: int = 2              # episodes per compiled evaluation call (run side by side)


CHOICES = {
    "dataset": ("omniglot", "miniimagenet"),
    "noise": ("none", "meta_dropout"),
    "learner": ("maml", "meta_sgd"),
    "init": ("original", "glorot_uniform", "pytorch_default"),
}
NON_NEGATIVE = ("seed", "test_seed", "clip", "val_every", "ckpt_keep_every",
                "intra_op_threads", "inter_op_threads", "parallel_tasks")
POSITIVE = ("inner_lr", "meta_lr", "bn_epsilon", "way", "shot", "query", "inner_steps", "meta_batch", "iterations",
            "mc_samples", "log_every", "ckpt_every", "val_episodes",
            "test_episodes", "test_mc_samples", "eval_batch")


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of its choices."""


def _fields():
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _yaml11_float(value):
    """'1e-3' -> 0.001: YAML 1.1 reads exponents without a dot as strings."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check_value(key, value, kind):
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        value = _yaml11_float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {kind.__name__}, "
                          f"got {value!r} ({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of "
                          f"{', '.join(CHOICES[key])}; got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"config key '{key}' must be positive, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise ConfigError(f"config key '{key}' must be >= 0, got {value!r}")
    return value


def _merge(values, updates, source):
    fields = _fields()
    for key, value in updates.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{key}' in {source}; valid "
                              f"keys: {', '.join(sorted(fields))}")
        values[key] = _check_value(key, value, fields[key])
    return values


def _read_yaml(path, seen=()):
    """[(path, mapping)] of the base chain of ``path``, outermost base first."""
    if os.path.realpath(path) in seen:
        raise ConfigError(f"base: chain of {path} is a cycle")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    base = raw.pop("base", None)
    chain = []
    if base is not None:
        chain = _read_yaml(os.path.join(os.path.dirname(path), base),
                           seen + (os.path.realpath(path),))
    return chain + [(path, raw)]


def parse_override(text):
    """'key=value' -> (key, value), the value typed by yaml ('3' -> 3)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_config(path=None, overrides=()):
    """Builds a Config from a yaml file (and its bases) plus overrides.

    Args:
      path: yaml file, or None for the defaults.
      overrides: iterable of 'key=value' strings, applied last.
    Returns:
      a validated Config.
    """
    values = {}
    for source, raw in (_read_yaml(path) if path else []):
        _merge(values, raw, source)
    _merge(values, dict(parse_override(o) for o in overrides), "overrides")
    return Config(**values)


def meta_train_samples(config):
    """Noise samples per inner step at meta-training: ``mc_samples`` for a
    noisy model, 1 for MAML (no noise to average over)."""
    return config.mc_samples if config.noise != "none" else 1


def meta_test_samples(config):
    """Noise samples per inner step at meta-test: ``test_mc_samples`` for a
    noisy model, 1 for MAML (no noise to average over)."""
    return config.test_mc_samples if config.noise != "none" else 1


def save_config(config, path):
    """Writes the resolved config as yaml (every key, no base)."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
