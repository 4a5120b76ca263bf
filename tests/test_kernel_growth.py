"""src.kernel_growth: Adam's step rebuilt from its moments against the change
an update really made, the growth split against the exact change of the
mean square, and the CLI on a tiny trained run."""

import re

import numpy as np
import pytest
import tensorflow as tf

from src.config import load_config, save_config
from src.kernel_growth import adam_step, growth_terms
from tests.test_cli import REPO, data_dir, ok, run, train_args  # noqa: F401 (data_dir: a fixture)


def test_adam_step_is_the_change_of_the_last_update():
    """Keras Adam (the meta-learner's, epsilon 1e-8) on a float64 variable,
    three updates with random gradients: the step rebuilt from m and v is
    the change the third update made, and radial + own growth is the exact
    change of the mean square over that update."""
    rng = np.random.default_rng(0)
    lr = 1e-3
    var = tf.Variable(rng.standard_normal((3, 3, 2, 4)) * 0.02)
    other = tf.Variable(rng.standard_normal(5))
    optimizer = tf.keras.optimizers.Adam(lr, epsilon=1e-8)
    optimizer.build([other, var])
    for _ in range(3):
        before = var.numpy()
        optimizer.apply_gradients([(tf.constant(rng.standard_normal(5)), other),
                                   (tf.constant(rng.standard_normal(var.shape) + 0.3), var)])
    step, m = adam_step(optimizer, 1)
    change = var.numpy() - before
    np.testing.assert_allclose(step, change, rtol=1e-9, atol=1e-15)
    assert np.abs(change).max() > 0.5 * lr
    terms = growth_terms(var.numpy(), step, m, lr)
    exact = np.mean(var.numpy() ** 2) - np.mean(before ** 2)
    assert (terms["radial"] + terms["own"]) * lr ** 2 == pytest.approx(exact, rel=1e-9)
    assert terms["rms"] == pytest.approx(np.sqrt(np.mean(var.numpy() ** 2)))
    cos = -np.sum(before * m) / np.linalg.norm(before) / np.linalg.norm(m)
    assert terms["cos_grad"] == pytest.approx(cos)


def test_kernel_growth_cli_on_a_trained_run(tmp_path, data_dir):  # noqa: F811
    w = tmp_path / "run"
    ok(run("src.train", train_args(w, data_dir, "noise=none", "iterations=4",
                                   "ckpt_keep_every=2")))
    out = ok(run("src.kernel_growth", ["--workdir", str(w)])).stdout
    blocks = re.split(r"\n(block\d/kernel|head/kernel)\n", out)
    assert blocks[1::2] == ["block1/kernel", "block2/kernel", "block3/kernel",
                            "block4/kernel", "head/kernel"], out
    reader = tf.train.load_checkpoint(str(w / "checkpoints" / "kept" / "ckpt-4"))
    kernel = reader.get_tensor("learner/variables_list/0/.ATTRIBUTES/VARIABLE_VALUE")
    rows = re.findall(r"^ +(\d+) +([\d.]+) ", blocks[2], re.M)
    assert [int(it) for it, _ in rows] == [2, 4], blocks[2]
    assert float(rows[1][1]) == pytest.approx(np.sqrt(np.mean(kernel ** 2)), abs=1e-4)


def test_kernel_growth_cli_without_checkpoints(tmp_path):
    """A run with a config but no checkpoint: an error that says so, not a
    traceback."""
    w = tmp_path / "run"
    w.mkdir()
    save_config(load_config(REPO / "yaml" / "omniglot_1shot_maml.yaml"), w / "config.yaml")
    proc = run("src.kernel_growth", ["--workdir", str(w)])
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(f"error: {w} has no checkpoint (train it first)")
