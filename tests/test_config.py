"""Tests of src.config: defaults, yaml base chains, key=value overrides,
validation errors, save/load round trip, and the shipped yaml/ experiment
files against the official run settings of DESIGN.md."""

import dataclasses
import glob
from pathlib import Path

import pytest
import yaml

from src.config import (CHOICES, POSITIVE, Config, ConfigError, load_config,
                        meta_test_samples, meta_train_samples, save_config)

REPO = Path(__file__).resolve().parents[1]
YAML_DIR = REPO / "yaml"
FIELDS = [f.name for f in dataclasses.fields(Config)]


def write(path, mapping_or_text):
    """Writes a yaml file (a dict is dumped, a str written verbatim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (mapping_or_text if isinstance(mapping_or_text, str)
            else yaml.safe_dump(mapping_or_text))
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------- defaults


def test_defaults_are_the_official_omniglot_1shot_metadrop_settings():
    """load_config() with no file equals Config() and holds the documented
    defaults (20-way 1-shot, K=5, 15 query, meta-batch 4, 60000 iterations,
    clip 3, meta lr 3e-4, meta-dropout, second order, S=30 at test, 1000 test episodes)."""
    c = load_config()
    assert c == Config()
    expected = dict(dataset="omniglot", way=20, shot=1, query=15, inner_steps=5,
                    inner_lr=0.1, meta_lr=3e-4, meta_batch=4, iterations=60000, clip=3.0,
                    noise="meta_dropout", learner="maml", first_order=False,
                    mc_samples=1, test_mc_samples=30, test_episodes=1000,
                    shared_classes=True, deterministic_ops=False,
                    bn_second_order=True, bn_epsilon=1e-3)
    for key, value in expected.items():
        assert getattr(c, key) == value, key
        assert type(getattr(c, key)) is type(value), key


def test_empty_yaml_gives_defaults(tmp_path):
    """An empty yaml file is a valid config equal to the defaults."""
    path = write(tmp_path / "empty.yaml", "")
    assert load_config(path) == Config()


def test_non_mapping_yaml_is_an_error(tmp_path):
    """A yaml file that is a list (not a mapping) raises ConfigError naming
    the file."""
    path = write(tmp_path / "list.yaml", "- way\n- 5\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


# ------------------------------------------------------------ base chains


def test_base_chain_overrides_in_order(tmp_path):
    """A three-level base chain (base path relative to each file, across
    directories): later files override earlier ones key by key; keys set
    only in the root survive; untouched keys keep their defaults."""
    write(tmp_path / "common" / "root.yaml",
          {"way": 7, "shot": 3, "inner_lr": 0.5, "noise": "none"})
    write(tmp_path / "mid.yaml",
          {"base": "common/root.yaml", "shot": 2, "meta_lr": 0.002})
    leaf = write(tmp_path / "exp" / "leaf.yaml",
                 {"base": "../mid.yaml", "meta_lr": 0.005, "noise": "meta_dropout"})
    c = load_config(leaf)
    assert c.way == 7                  # root only
    assert c.shot == 2                 # mid overrides root
    assert c.inner_lr == 0.5           # root only
    assert c.meta_lr == 0.005          # leaf overrides mid
    assert c.noise == "meta_dropout"   # leaf overrides root
    assert c.query == Config().query   # default
    assert c.iterations == Config().iterations


def test_error_in_base_names_the_base_file(tmp_path):
    """An unknown key inside a base file is reported with that file's path."""
    write(tmp_path / "root.yaml", {"wya": 5})
    leaf = write(tmp_path / "leaf.yaml", {"base": "root.yaml", "way": 5})
    with pytest.raises(ConfigError) as e:
        load_config(leaf)
    assert "wya" in str(e.value) and "root.yaml" in str(e.value)


def test_missing_base_file_is_an_error(tmp_path):
    """A base that does not exist raises (an OSError today, naming the file)."""
    leaf = write(tmp_path / "leaf.yaml", {"base": "nope.yaml"})
    with pytest.raises((ConfigError, OSError), match="nope.yaml"):
        load_config(leaf)


# ---------------------------------------------------------- overrides


def test_overrides_are_typed_by_yaml_and_applied_last(tmp_path):
    """key=value overrides are parsed by yaml (int, float, bool, str) and
    win over the yaml file and its bases."""
    path = write(tmp_path / "a.yaml", {"way": 7, "first_order": False,
                                       "data_dir": "x"})
    c = load_config(path, ["way=5", "inner_lr=0.25", "meta_lr=1.0e-4",
                           "first_order=true", "data_dir=/tmp/some dir",
                           "noise=none", "clip=0"])
    assert c.way == 5 and type(c.way) is int
    assert c.inner_lr == 0.25 and type(c.inner_lr) is float
    assert c.meta_lr == pytest.approx(1e-4) and type(c.meta_lr) is float
    assert c.first_order is True
    assert c.data_dir == "/tmp/some dir"
    assert c.noise == "none"
    assert c.clip == 0.0 and type(c.clip) is float  # int accepted for float
    # Overrides without a file apply to the defaults.
    assert load_config(None, ["shot=5"]).shot == 5


def test_later_override_wins():
    """Of two overrides of the same key, the last one counts."""
    assert load_config(None, ["way=5", "way=10"]).way == 10


def test_override_value_may_contain_equals_sign():
    """Only the first '=' splits key and value."""
    assert load_config(None, ["data_dir=a=b"]).data_dir == "a=b"


def test_override_without_equals_is_an_error():
    """An override that is not key=value raises ConfigError quoting it."""
    with pytest.raises(ConfigError, match="way5"):
        load_config(None, ["way5"])


def test_override_float_in_exponent_notation():
    """meta_lr=1e-3 (the usual way to write it) is accepted as the float 0.001."""
    assert load_config(None, ["meta_lr=1e-3"]).meta_lr == pytest.approx(1e-3)


# ------------------------------------------------------------- errors


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_names_key_and_lists_valid_keys(tmp_path, where):
    """An unknown key (in a yaml file or an override) raises ConfigError whose
    message names the key and lists every valid key."""
    if where == "yaml":
        path, overrides = write(tmp_path / "a.yaml", {"inner_lrr": 0.1}), []
    else:
        path, overrides = None, ["inner_lrr=0.1"]
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "'inner_lrr'" in msg
    for name in FIELDS:
        assert name in msg, name


@pytest.mark.parametrize("key, value, kind", [
    ("way", "'five'", "int"),        # str for int
    ("way", "5.0", "int"),           # float for int
    ("iterations", "true", "int"),   # bool for int
    ("first_order", "1", "bool"),    # int for bool
    ("first_order", "'yes'", "bool"),  # str for bool
    ("inner_lr", "'fast'", "float"),  # str for float
    ("inner_lr", "false", "float"),  # bool for float
    ("noise", "3", "str"),           # int for str
    ("data_dir", "null", "str"),     # None for str
])
@pytest.mark.parametrize("where", ["yaml", "override"])
def test_ill_typed_value_names_key_and_type(tmp_path, key, value, kind, where):
    """A value of the wrong type raises ConfigError naming the key and the
    expected type, whether it comes from a yaml file or an override."""
    if where == "yaml":
        path = write(tmp_path / "a.yaml", f"{key}: {value}\n")
        overrides = []
    else:
        path, overrides = None, [f"{key}={value}"]
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert f"'{key}'" in msg and kind in msg, msg


def test_int_accepted_for_float_key(tmp_path):
    """An int for a float key is accepted and stored as a float."""
    path = write(tmp_path / "a.yaml", {"inner_lr": 1, "meta_lr": 2, "clip": 5})
    c = load_config(path)
    for key, value in (("inner_lr", 1.0), ("meta_lr", 2.0), ("clip", 5.0)):
        assert getattr(c, key) == value and type(getattr(c, key)) is float


@pytest.mark.parametrize("key, bad", [("noise", "dropout"),
                                      ("dataset", "mnist"),
                                      ("learner", "reptile"),
                                      ("init", "he_normal")])
def test_value_outside_choices_lists_choices(key, bad):
    """A value outside a key's choices raises ConfigError naming the key, the
    bad value and every valid choice."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={bad}"])
    msg = str(e.value)
    assert f"'{key}'" in msg and bad in msg
    for choice in CHOICES[key]:
        assert choice in msg


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_value_for_positive_key(key, value):
    """Every key in POSITIVE rejects 0 and negative values, naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert f"'{key}'" in str(e.value) and "positive" in str(e.value)


def test_zero_allowed_where_it_means_disabled():
    """clip=0 (no clipping), val_every=0 (no validation) and
    ckpt_keep_every=0 (no kept checkpoints) are valid."""
    c = load_config(None, ["clip=0", "val_every=0", "ckpt_keep_every=0"])
    assert c.clip == 0.0 and c.val_every == 0 and c.ckpt_keep_every == 0


@pytest.mark.parametrize("key", ["val_every", "ckpt_keep_every", "parallel_tasks"])
def test_negative_value_for_non_negative_key(key):
    """Keys where 0 means off reject negative values, naming the key."""
    with pytest.raises(ConfigError, match=f"'{key}' must be >= 0"):
        load_config(None, [f"{key}=-1"])


# ------------------------------------------------------------ round trip


def test_save_config_round_trip(tmp_path):
    """save_config writes every key (no base) and the file loads back to an
    equal Config, for a config with non-default values of every type."""
    c = load_config(None, ["way=5", "shot=5", "meta_lr=1.0e-8", "inner_lr=0.4",
                           "noise=none", "learner=meta_sgd", "first_order=true",
                           "clip=0", "seed=123"])
    c = dataclasses.replace(c, data_dir="yes")  # a str that yaml reads as bool
    path = tmp_path / "saved.yaml"
    save_config(c, str(path))
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(FIELDS)
    assert "base" not in raw
    back = load_config(str(path))
    assert back == c
    assert back.data_dir == "yes"
    assert back.meta_lr == 1e-8


def test_save_config_round_trip_of_every_shipped_yaml(tmp_path):
    """Every yaml under yaml/ survives save_config -> load_config unchanged."""
    for i, path in enumerate(sorted(glob.glob(str(YAML_DIR / "*.yaml")))):
        c = load_config(path)
        out = tmp_path / f"{i}.yaml"
        save_config(c, str(out))
        assert load_config(str(out)) == c, path


# ------------------------------------------------------- shipped yaml files


def test_every_shipped_yaml_loads():
    """Each yaml under yaml/ loads into a valid Config."""
    paths = sorted(glob.glob(str(YAML_DIR / "*.yaml")))
    assert len(paths) >= 5
    for path in paths:
        assert isinstance(load_config(path), Config), path


OFFICIAL = dict(inner_steps=5, query=15, meta_batch=4, iterations=60000,
                clip=3.0, mc_samples=1, test_mc_samples=30, test_episodes=1000,
                first_order=False, learner="maml", shared_classes=True,
                dataset="omniglot", way=20)


@pytest.mark.parametrize("name, settings", [
    ("omniglot_1shot_metadrop", dict(shot=1, inner_lr=0.1, meta_lr=3e-4,
                                     noise="meta_dropout")),
    ("omniglot_1shot_maml", dict(shot=1, inner_lr=0.1, meta_lr=1e-3,
                                 noise="none")),
    ("omniglot_5shot_metadrop", dict(shot=5, inner_lr=0.4, meta_lr=1e-3,
                                     noise="meta_dropout")),
    ("omniglot_5shot_maml", dict(shot=5, inner_lr=0.4, meta_lr=1e-3,
                                 noise="none")),
])
def test_official_settings(name, settings):
    """The four Omniglot experiment files hold DESIGN.md's official run
    settings (table of way/shot/inner lr/meta lr, plus K=5, 15 query,
    meta-batch 4, 60000 iterations, clip 3, S=30 at test, 1000 episodes)."""
    c = load_config(str(YAML_DIR / f"{name}.yaml"))
    for key, value in {**OFFICIAL, **settings}.items():
        got = getattr(c, key)
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-12), (key, got)
        else:
            assert got == value, (key, got)


@pytest.mark.parametrize("key", ["seed", "test_seed"])
def test_negative_seed_rejected(key):
    """A negative seed / test_seed (unusable by numpy's PCG64) is a ConfigError
    naming the key."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}=-1"])


@pytest.mark.parametrize("override", ["meta_lr=nan", "inner_lr=.inf",
                                      "meta_lr=-0.001", "clip=-1"])
def test_non_finite_or_negative_float_rejected(override):
    """Non-finite learning rates / clip and negative ones are ConfigErrors
    naming the key."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


@pytest.mark.parametrize("text, match", [("base: missing.yaml\n", "missing.yaml"),
                                         ("base: a.yaml\n", "cycle")])
def test_bad_base_chain_is_a_config_error(tmp_path, text, match):
    """A missing base file or a cyclic chain is a ConfigError, not a traceback."""
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("noise, train_s, test_s", [("meta_dropout", 3, 7), ("none", 1, 1)])
def test_noise_samples_only_for_noisy_models(noise, train_s, test_s):
    # MAML has no noise to average over: one pass, whatever mc_samples says.
    config = load_config(None, [f"noise={noise}", "mc_samples=3", "test_mc_samples=7"])
    assert (meta_train_samples(config), meta_test_samples(config)) == (train_s, test_s)
