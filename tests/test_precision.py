"""src.precision: the converted copies hold the run's weights (their
meta-gradients agree with the float32 learner's own, which a copy that kept
its fresh initialisation would not), the float32-sized move of the weights,
and the CLI on a tiny trained run."""

import re

import numpy as np
import pytest
import tensorflow as tf

from src.config import load_config
from src.precision import meta_gradient, move_by_rounding, relative_errors
from src.train import build, converted_copy
from tests.test_cli import REPO, data_dir, ok, run, train_args  # noqa: F401 (data_dir: a fixture)

SMALL = ["noise=none", "way=5", "query=2", "inner_steps=2", "meta_batch=2"]


def small_batch(config, seed=0):
    """Continuous random images (no near-tied max-pool windows, so float32
    and float64 route the gradient alike) in the config's episode shape."""
    rng = np.random.default_rng(seed)
    b, way = config.meta_batch, config.way
    return {"support_x": rng.random((b, way * config.shot, 28, 28, 1), np.float32),
            "support_y": np.tile(np.arange(way, dtype=np.int32), (b, config.shot)),
            "query_x": rng.random((b, way * config.query, 28, 28, 1), np.float32),
            "query_y": np.tile(np.repeat(np.arange(way, dtype=np.int32), config.query),
                               (b, 1))}


def test_relative_errors_leave_out_the_conv_biases():
    ref = {"block1/kernel": np.array([3.0, 4.0]), "block1/bias": np.array([1e-12]),
           "head/bias": np.array([2.0])}
    got = {"block1/kernel": np.array([3.0, 4.5]), "block1/bias": np.array([5e-12]),
           "head/bias": np.array([2.0])}
    assert relative_errors(got, ref) == {"block1/kernel": pytest.approx(0.1),
                                         "head/bias": 0.0}


def test_move_by_rounding_stays_within_one_float32_rounding():
    config = load_config(REPO / "yaml/omniglot_1shot_maml.yaml", SMALL)
    _, learner = build(config)
    _, copy = converted_copy(config, learner)
    move_by_rounding(copy)
    for v, ref in zip(copy.variables_list, learner.variables_list):
        ref = ref.numpy()
        moved = v.numpy() - ref.astype(np.float64)
        assert np.all(np.abs(moved) <= 2.0 ** -24 * np.abs(ref)), v.name
        if np.any(ref != 0):
            assert np.count_nonzero(moved) > 0.9 * np.count_nonzero(ref), v.name
            # Rounded back to float32, most weights are the checkpoint's again.
            assert np.mean(v.numpy().astype(np.float32) == ref) > 0.5, v.name


@pytest.mark.parametrize("dtype,fused", [("float64", False), ("float32", False),
                                         ("float32", True)])
def test_converted_copy_has_the_learners_meta_gradient(dtype, fused):
    config = load_config(REPO / "yaml/omniglot_1shot_maml.yaml", SMALL)
    _, learner = build(config)
    # Moved away from the seeded initialisation that build() repeats.
    for i, v in enumerate(learner.variables_list):
        v.assign_add(tf.random.stateless_normal(v.shape, [5, i], stddev=0.02))
    batch, seed = small_batch(config), tf.constant([1, 2])
    loss, grads = meta_gradient(learner, batch, seed)
    copy_loss, copy_grads = meta_gradient(
        converted_copy(config, learner, dtype, fused)[1], batch, seed)
    assert copy_loss == pytest.approx(loss, rel=1e-5)
    errors = relative_errors(copy_grads, grads)
    assert len(errors) == 4 + 2 + 4   # kernels, head kernel and bias, offsets
    assert max(errors.values()) < 1e-3, errors
    if dtype == "float64":
        assert copy_grads["block1/kernel"].dtype == np.float64


def test_precision_cli_on_a_trained_run(tmp_path, data_dir):  # noqa: F811
    w = tmp_path / "run"
    ok(run("src.train", train_args(w, data_dir, "noise=none", "iterations=2")))
    proc = ok(run("src.precision", ["--workdir", str(w), "--batches", "2"]))
    rows = re.findall(r"batch (\d), (float\d\d, [a-z0-9 ]+): loss ([\d.e+-]+); gradient "
                      r"([\d.e+-]+) / ([\d.e+-]+) / ([\d.e+-]+) \((\S+)\)", proc.stdout)
    variants = ["float32, fused batch norm", "float32, explicit ops",
                "float64, weights moved by float32 rounding"]
    assert [(r[0], r[1]) for r in rows] == [(b, v) for b in "01" for v in variants], proc.stdout
    for _, _, loss, low, median, high, worst in rows:
        assert float(loss) < 1e-3
        assert float(low) <= float(median) <= float(high)
        assert not re.fullmatch(r"block\d/bias", worst)
    proc = ok(run("src.precision", ["--workdir", str(w), "--batches", "1", "inner_steps=3"]))
    assert "K = 3," in proc.stdout and proc.stdout.count("batch 0, ") == 3, proc.stdout
    ok(run("src.train", train_args(tmp_path / "md", data_dir, "iterations=1")))
    proc = run("src.precision", ["--workdir", str(tmp_path / "md")])
    assert proc.returncode != 0 and "noise: none" in proc.stderr
    assert "Traceback" not in proc.stderr
