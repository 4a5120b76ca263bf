"""Unit tests of the pieces of src.evaluate that need no TensorFlow run:
the 95% interval (src.report.summarize, shared with the paired
differences) and the per-episode records (src.records) that let a meta-test
resume and keep a diagnostic evaluation from overwriting the run's own."""

import dataclasses
import json

import numpy as np
import pytest

from src import records
from src.config import load_config
from src.report import summarize

CONFIG = "yaml/omniglot_1shot_metadrop.yaml"
SIGNATURE = {"dataset": "omniglot", "format_version": 2}


def config_dict(**changes):
    return dataclasses.asdict(dataclasses.replace(load_config(CONFIG), **changes))


def key(checkpoint="ckpt-2000", data=SIGNATURE, **changes):
    return records.record_key(config_dict(**changes), checkpoint, data)


def test_summarize_is_mean_and_normal_interval_in_percent():
    accs = [0.9, 1.0, 0.8, 0.95]
    mean, ci = summarize(accs)
    # population std of the four values, by hand: mean 0.9125
    dev = [v - 0.9125 for v in accs]
    std = (sum(d * d for d in dev) / 4) ** 0.5
    assert mean == pytest.approx(91.25)
    assert ci == pytest.approx(100 * 1.96 * std / 2)


def test_record_round_trip_and_key(tmp_path):
    """A saved record loads back under the same key; another checkpoint,
    data, or any config key that can change an accuracy (test_seed,
    test_mc_samples, eval_batch, inner_steps) does not find it; run-length,
    logging and thread keys do not matter."""
    w = str(tmp_path)
    assert records.load(w, key()).shape == (0,)
    records.save(w, key(checkpoint="/x/ckpt-2000"), np.array([0.5, 0.75, 1.0]))
    np.testing.assert_array_equal(records.load(w, key(checkpoint="/y/ckpt-2000")),
                                  [0.5, 0.75, 1.0])
    assert not (tmp_path / "test_accuracies.json.tmp").exists()

    same = {"test_episodes": 10, "iterations": 5, "intra_op_threads": 2,
            "data_dir": "/elsewhere", "val_every": 7}
    assert len(records.load(w, key(**same))) == 3
    for change in ({"test_seed": 1}, {"test_mc_samples": 29}, {"eval_batch": 4},
                   {"inner_steps": 10}, {"adapt_offsets": True}, {"bn_epsilon": 1e-5},
                   {"bn_scale": True}):
        assert records.load(w, key(**change)).shape == (0,), change
    assert records.load(w, key(checkpoint="ckpt-1900")).shape == (0,)
    assert records.load(w, key(data=dict(SIGNATURE, format_version=1))).shape == (0,)


@pytest.mark.parametrize("later,other", [("adapt_offsets", True), ("bn_epsilon", 1e-5),
                                         ("bn_scale", True)])
def test_record_written_before_a_later_key_existed_stays_valid(tmp_path, later, other):
    """A key added later is left out of the record key at its default, so
    a record saved without it is still found."""
    w = str(tmp_path)
    old_config = config_dict()
    del old_config[later]
    records.save(w, records.record_key(old_config, "ckpt-2000", SIGNATURE), np.array([1.0]))
    assert len(records.load(w, key())) == 1
    assert records.load(w, key(**{later: other})).shape == (0,)


def test_records_of_other_settings_are_kept(tmp_path):
    """Saving under one key keeps every other key's record (a diagnostic
    inner_steps=10 test never erases the run's own 1000 episodes), and
    saving again under a key replaces only that record."""
    w = str(tmp_path)
    records.save(w, key(), [1.0, 0.5])
    records.save(w, key(inner_steps=10), [0.25])
    records.save(w, key(test_seed=7), [0.0, 0.0, 0.0])
    records.save(w, key(), [1.0, 0.5, 0.75])
    np.testing.assert_array_equal(records.load(w, key()), [1.0, 0.5, 0.75])
    np.testing.assert_array_equal(records.load(w, key(inner_steps=10)), [0.25])
    np.testing.assert_array_equal(records.load(w, key(test_seed=7)), [0.0, 0.0, 0.0])
    assert len(json.loads((tmp_path / "test_accuracies.json").read_text())["records"]) == 3


def test_record_of_the_earlier_single_record_format_is_read(tmp_path):
    """The first format ({"key", "accuracies"}) is still read, and a save
    under another key keeps it."""
    (tmp_path / "test_accuracies.json").write_text(
        json.dumps({"key": key(), "accuracies": [0.5, 1.0]}))
    w = str(tmp_path)
    np.testing.assert_array_equal(records.load(w, key()), [0.5, 1.0])
    records.save(w, key(inner_lr=0.3), [0.0])
    np.testing.assert_array_equal(records.load(w, key()), [0.5, 1.0])


def test_record_ignores_a_corrupt_file(tmp_path):
    (tmp_path / "test_accuracies.json").write_text('{"key": ')
    assert records.load(str(tmp_path), key()).shape == (0,)


def test_variant_name():
    """Protocol keys (test_episodes, test_mc_samples, test_seed, eval_batch)
    and keys that cannot change an accuracy test the run as trained; any
    other change names a variant, keys sorted."""
    run = config_dict()
    assert records.variant_name(run, config_dict(
        test_episodes=10, test_mc_samples=5, test_seed=3, eval_batch=4,
        data_dir="/x", intra_op_threads=2, iterations=7)) == ""
    assert records.variant_name(run, config_dict(inner_steps=10)) == "inner_steps=10"
    assert (records.variant_name(run, config_dict(inner_steps=10, inner_lr=0.3, test_seed=3))
            == "inner_lr=0.3,inner_steps=10")
