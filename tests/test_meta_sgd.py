"""Meta-SGD: a learned inner step size per θ element, meta-learned with θ."""

import numpy as np
import tensorflow as tf

from tests.test_gradients import SEED, episode, gradient, make


def test_meta_sgd_with_frozen_step_sizes_is_maml():
    """Step sizes left at the inner learning rate give MAML's meta-loss and
    MAML's meta-gradient for every θ, φ and β."""
    _, maml = make(smooth=False, inner_lr=0.3)
    _, msgd = make(smooth=False, inner_lr=0.3, meta_sgd=True)
    batch = episode(tf.float64, tasks=2)
    loss_a, _ = maml.meta_loss(batch, SEED)
    loss_b, _ = msgd.meta_loss(batch, SEED)
    assert float(loss_a) == float(loss_b)
    ga, gb = gradient(maml, batch), gradient(msgd, batch)
    for v in maml.variables_list:
        np.testing.assert_allclose(gb[v.name].numpy(), ga[v.name].numpy(), rtol=1e-12, atol=1e-14)
    assert len(msgd.variables_list) == 2 * len(maml.model.group("theta")) + \
        len(maml.model.group("phi")) + len(maml.model.group("beta"))


def test_meta_sgd_step_sizes_receive_gradients_and_change():
    """Every learned step-size tensor has θ's shape, starts at the inner
    learning rate, gets a non-zero meta-gradient and moves after a step."""
    model, learner = make(smooth=False, inner_lr=0.3, meta_sgd=True)
    batch = episode(tf.float64, tasks=2)
    grads = gradient(learner, batch)
    for key, lr in learner.inner_lr.items():
        assert lr.shape == model.group("theta")[key].shape
        np.testing.assert_array_equal(lr.numpy(), 0.3)
        assert np.max(np.abs(grads[lr.name].numpy())) > 0
    learner.train_step(batch, SEED)
    moved = [np.max(np.abs(lr.numpy() - 0.3)) for lr in learner.inner_lr.values()]
    assert min(moved) > 0


def test_meta_sgd_learns_step_sizes_for_adapted_offsets():
    """With ``adapt_offsets``, β gets learned step sizes of its shape too."""
    model, learner = make(smooth=False, inner_lr=0.3, meta_sgd=True, adapt_offsets=True)
    adapted = {**model.group("theta"), **model.group("beta")}
    assert set(learner.inner_lr) == set(adapted)
    for key, lr in learner.inner_lr.items():
        assert lr.shape == adapted[key].shape
    grads = gradient(learner, episode(tf.float64, tasks=2))
    for key in model.group("beta"):
        assert np.max(np.abs(grads[learner.inner_lr[key].name].numpy())) > 0
