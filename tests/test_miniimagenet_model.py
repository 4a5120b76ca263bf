"""The miniImageNet network (84x84x3, 32 channels, 800 features) and a short
training + evaluation through the real CLI on generated miniImageNet-shaped
data (real miniImageNet is not needed: uint8 [classes, 20, 84*84*3] arrays of
smooth random colour fields, one template per class).

The CLI test pays TensorFlow's start-up and the tracing of the second-order
step twice (~20-40 s each on 2 loaded cores).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import src  # noqa: F401  (TensorFlow environment defaults)
import tensorflow as tf

from src import report, table1
from src.model import ConvNet

REPO = Path(__file__).resolve().parents[1]
CONFIG = "yaml/miniimagenet_1shot_metadrop.yaml"
# A guard against a hung subprocess, not a speed check: these runs take
# 20-60 s alone, but several times longer on a CPU shared with training.
TIMEOUT = 900


@pytest.mark.parametrize("noise", ["meta_dropout", "none"])
def test_network_shapes(noise):
    model = ConvNet("miniimagenet", 5, noise=noise)
    assert model.input_shape_hwc == (84, 84, 3)
    theta = model.group("theta")
    assert theta["block1/kernel"].shape == (3, 3, 3, 32)
    for i in (2, 3, 4):
        assert theta[f"block{i}/kernel"].shape == (3, 3, 32, 32)
        assert theta[f"block{i}/bias"].shape == (32,)
    # 84 -> 42 -> 21 -> 10 -> 5: a flattened feature of 5 * 5 * 32 = 800.
    assert theta["head/kernel"].shape == (800, 5)
    assert theta["head/bias"].shape == (5,)
    assert model.group("beta")["block4/offset"].shape == (32,)
    phi = model.group("phi")
    if noise == "none":
        assert phi == {}
    else:
        assert phi["block1/noise_kernel"].shape == (3, 3, 3, 32)
        assert phi["block4/noise_kernel"].shape == (3, 3, 32, 32)
        assert phi["head/noise_kernel"].shape == (800, 1)
        assert phi["head/noise_bias"].shape == (1,)

    x = tf.random.stateless_uniform([3, 84, 84, 3], seed=[1, 2])
    logits = model.forward(x)
    assert logits.shape == (3, 5)
    assert np.all(np.isfinite(logits.numpy()))
    sampled = model.forward(x, sample=True, seed=tf.constant([3, 4]))
    assert sampled.shape == (3, 5)
    if noise == "none":
        np.testing.assert_allclose(sampled.numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
    else:
        assert not np.allclose(sampled.numpy(), logits.numpy())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.npy [8, 20, 21168], val.npy and test.npy [6, 20, 21168], uint8:
    per class a smooth random colour template (8x8 upsampled to 84x84), per
    image the template plus noise."""
    d = tmp_path_factory.mktemp("miniimagenet")
    rng = np.random.default_rng(0)
    for name, classes in (("train", 8), ("val", 6), ("test", 6)):
        out = np.empty((classes, 20, 84 * 84 * 3), np.uint8)
        for c in range(classes):
            template = np.kron(rng.uniform(0, 255, (8, 8, 3)), np.ones((11, 11, 1)))[:84, :84]
            for i in range(20):
                img = template + rng.normal(scale=30, size=template.shape)
                out[c, i] = np.clip(img, 0, 255).astype(np.uint8).ravel()
        np.save(d / f"{name}.npy", out)
    return d


def run(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_train_and_evaluate_cli(tmp_path, data_dir):
    workdir = tmp_path / "runs" / "miniimagenet_1shot_metadrop_iters2"
    run("src.train", "--config", CONFIG, "--workdir", workdir, f"data_dir={data_dir}",
        "iterations=2", "query=2", "inner_steps=1", "meta_batch=1", "val_every=0",
        "log_every=1", "ckpt_every=2")
    log = (workdir / "train.log").read_text()
    assert "iter 2/2" in log
    assert (workdir / "checkpoints" / "checkpoint").exists()

    proc = run("src.evaluate", "--workdir", workdir, "test_episodes=2",
               "test_mc_samples=2", "eval_batch=1")
    assert "on 2 episodes" in proc.stdout
    r = json.loads((workdir / "results.json").read_text())
    assert r["episodes"] == 2 and r["mc_samples"] == 2
    assert r["iterations_trained"] == 2 and r["iterations_configured"] == 2
    assert 0.0 <= r["accuracy"] <= 100.0 and r["ci95"] >= 0.0
    assert r["checkpoint"] == "ckpt-2"
    config = r["config"]
    assert (config["dataset"], config["way"], config["shot"]) == ("miniimagenet", 5, 1)
    assert (config["noise"], config["learner"]) == ("meta_dropout", "maml")
    assert (config["inner_lr"], config["meta_lr"]) == (0.01, 1e-4)

    # The run is picked up by the reports as a shortened miniImageNet cell.
    row = dict(zip(report.HEAD, report.row(str(workdir))))
    assert row["setting"] == "miniImageNet 5-way 1-shot"
    assert row["model"] == "MAML + meta-dropout"
    assert "shortened run: 2 of 60000 iterations" in row[report.HEAD[6]]
    cell = table1.collect_cell("miniimagenet_1shot", "metadrop", str(tmp_path / "runs"),
                               iters=2)
    assert cell["status"] == "ok" and cell["shortened"] is True
    assert cell["paper_text"] == "51.93 ± 0.67 (51.67)"
