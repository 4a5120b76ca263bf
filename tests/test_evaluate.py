"""Unit tests of the pieces of src.evaluate that need no TensorFlow run:
the 95% interval (src.report.summarize, shared with the paired
differences) and the per-episode record that lets a meta-test resume."""

import dataclasses

import numpy as np
import pytest

from src.config import load_config
from src.evaluate import EpisodeRecord
from src.report import summarize

CONFIG = "yaml/omniglot_1shot_metadrop.yaml"
SIGNATURE = {"dataset": "omniglot", "format_version": 2}


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
    test_mc_samples, eval_batch, inner_steps) hides it; run-length, logging
    and thread keys do not."""
    config = load_config(CONFIG)
    rec = EpisodeRecord(str(tmp_path), config, "/x/ckpt-2000", SIGNATURE)
    assert rec.load().shape == (0,)
    rec.save(np.array([0.5, 0.75, 1.0]))
    np.testing.assert_array_equal(
        EpisodeRecord(str(tmp_path), config, "/y/ckpt-2000", SIGNATURE).load(),
        [0.5, 0.75, 1.0])
    assert not (tmp_path / "test_accuracies.json.tmp").exists()

    same = {"test_episodes": 10, "iterations": 5, "intra_op_threads": 2,
            "data_dir": "/elsewhere", "val_every": 7}
    assert len(EpisodeRecord(str(tmp_path), dataclasses.replace(config, **same),
                             "ckpt-2000", SIGNATURE).load()) == 3
    for change in ({"test_seed": 1}, {"test_mc_samples": 29}, {"eval_batch": 4},
                   {"inner_steps": 10}):
        other = dataclasses.replace(config, **change)
        assert EpisodeRecord(str(tmp_path), other, "ckpt-2000", SIGNATURE).load().shape == (0,), change
    assert EpisodeRecord(str(tmp_path), config, "ckpt-1900", SIGNATURE).load().shape == (0,)
    assert EpisodeRecord(str(tmp_path), config, "ckpt-2000",
                         dict(SIGNATURE, format_version=1)).load().shape == (0,)


def test_record_ignores_a_corrupt_file(tmp_path):
    (tmp_path / "test_accuracies.json").write_text('{"key": ')
    config = load_config(CONFIG)
    assert EpisodeRecord(str(tmp_path), config, "ckpt-1", SIGNATURE).load().shape == (0,)
