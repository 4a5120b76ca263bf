"""src.curvature: the power iteration against numpy's eigenvalues, the
Hessian-vector product against finite differences of the gradient, and the
CLI on a tiny trained run."""

import re

import numpy as np
import pytest
import tensorflow as tf

from src.curvature import _hessian_vector_product, top_eigenvalue
from src.meta_learner import support_loss
from tests.test_cli import data_dir, ok, run, train_args  # noqa: F401 (data_dir: a fixture)
from tests.test_gradients import SEED, episode, make


def quadratic(eigenvalues, seed):
    """Loss ½ zᵀ A z over two parameter blocks (z = [a (3,), b (2, 2)]),
    A = Q diag(eigenvalues) Qᵀ with a random rotation Q; returns (loss_fn,
    params)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    a = tf.constant(q @ np.diag(eigenvalues) @ q.T)

    def loss_fn(p):
        z = tf.concat([p["a"], tf.reshape(p["b"], [-1])], 0)
        return 0.5 * tf.reduce_sum(z * tf.linalg.matvec(a, z))
    params = {"a": tf.constant(rng.standard_normal(3)),
              "b": tf.constant(rng.standard_normal((2, 2)))}
    return loss_fn, params


@pytest.mark.parametrize("eigenvalues", [[9.0, 4.0, 2.0, 1.0, 0.5, -1.0, -3.0],
                                         [5.0, 2.0, 1.0, 0.0, -1.0, -2.0, -12.0]])
def test_power_iteration_finds_the_largest_magnitude_eigenvalue(eigenvalues):
    loss_fn, params = quadratic(eigenvalues, seed=1)
    expected = max(eigenvalues, key=abs)
    assert top_eigenvalue(loss_fn, params, iterations=80) == pytest.approx(expected, rel=1e-6)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    """Smooth network, float64: H v against (∇L(θ + h v) - ∇L(θ - h v)) / 2h."""
    model, _ = make(noise="meta_dropout")
    batch = episode(tf.float64)
    x, y = batch["support_x"][0], batch["support_y"][0]
    theta = {k: tf.identity(v) for k, v in model.group("theta").items()}

    def loss_fn(p):
        return support_loss(model, {**model.params(), **p}, x, y, 1, SEED)

    rng = np.random.default_rng(3)
    v = {k: tf.constant(rng.standard_normal(p.shape)) for k, p in theta.items()}
    hv = _hessian_vector_product(loss_fn, theta, v)

    def grad_at(t):
        p = {k: theta[k] + t * v[k] for k in theta}
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = loss_fn(p)
        return tape.gradient(loss, p)
    h = 1e-6
    plus, minus = grad_at(h), grad_at(-h)
    for k in theta:
        numeric = (plus[k] - minus[k]).numpy() / (2 * h)
        assert np.linalg.norm(numeric) > 1e-6, k
        np.testing.assert_allclose(hv[k].numpy(), numeric, rtol=1e-5,
                                   atol=1e-6 * np.abs(numeric).max())


def test_curvature_cli_on_a_trained_run(tmp_path, data_dir):  # noqa: F811
    w = tmp_path / "run"
    ok(run("src.train", train_args(w, data_dir, "noise=none", "iterations=2")))
    proc = ok(run("src.curvature", ["--workdir", str(w), "--tasks", "2",
                                    "--iterations", "3"]))
    rows = re.findall(r"task (\d): λ at θ +(-?[\d.]+) \(α·λ +(-?[\d.]+)\); "
                      r"at θ_K +(-?[\d.]+) \(α·λ +(-?[\d.]+)\)", proc.stdout)
    assert [r[0] for r in rows] == ["0", "1"], proc.stdout
    for _, lam0, step0, lam_k, step_k in rows:
        assert float(step0) == pytest.approx(0.1 * float(lam0), abs=0.006)
        assert float(step_k) == pytest.approx(0.1 * float(lam_k), abs=0.006)
        assert float(lam0) != 0.0
    ok(run("src.train", train_args(tmp_path / "sgd", data_dir, "learner=meta_sgd",
                                   "iterations=1")))
    proc = run("src.curvature", ["--workdir", str(tmp_path / "sgd")])
    assert proc.returncode != 0 and "learner: maml" in proc.stderr
    assert "Traceback" not in proc.stderr
