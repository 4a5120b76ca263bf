"""Restoring a trained run for evaluation and the diagnostics
(``train.restore_trained``): every variable comes from the checkpoint, and a
config override that changes the model is an error, not a test of freshly
initialised (or misplaced) weights; and the thread set-up such a run starts
with (``train.configure_tensorflow``)."""

import numpy as np
import pytest

from src.config import ConfigError, load_config
from src.train import build, make_checkpoint, restore_trained

SMALL = ["way=5", "parallel_tasks=1"]


def saved_run(tmp_path, overrides):
    """A learner of ``SMALL + overrides`` whose variables (meta-parameters and
    Adam's slots) were moved off their seeded initial values, saved as a
    checkpoint in ``tmp_path``; returns (checkpoint path, {name: saved value})."""
    _, learner = build(load_config(None, SMALL + overrides))
    rng = np.random.default_rng(0)
    for v in learner.variables_list + learner.optimizer.variables:
        v.assign(v.numpy() + rng.normal(size=v.shape).astype(v.dtype.as_numpy_dtype))
    ckpt, manager, _, _ = make_checkpoint(learner, str(tmp_path))
    path = manager.save(checkpoint_number=7)
    return path, {v.name: v.numpy() for v in learner.variables_list}


@pytest.mark.parametrize("model", [["noise=none"], ["noise=meta_dropout"],
                                   ["noise=none", "learner=meta_sgd"]])
def test_same_model_restores_every_variable(tmp_path, model):
    """A fresh learner of the same config holds the saved values afterwards,
    though it was built with different (seeded initial) ones."""
    path, saved = saved_run(tmp_path, model)
    _, learner = build(load_config(None, SMALL + model))
    assert any(not np.array_equal(v.numpy(), saved[v.name]) for v in learner.variables_list)
    restore_trained(make_checkpoint(learner, str(tmp_path))[0], path)
    for v in learner.variables_list:
        np.testing.assert_array_equal(v.numpy(), saved[v.name], err_msg=v.name)


@pytest.mark.parametrize("trained, override", [
    (["noise=none"], "noise=meta_dropout"),   # adds φ
    (["noise=meta_dropout"], "noise=none"),   # drops φ: the list would shift
    (["noise=none"], "learner=meta_sgd"),     # adds the step sizes
])
def test_an_override_that_changes_the_model_is_an_error(tmp_path, trained, override):
    path, _ = saved_run(tmp_path, trained)
    _, learner = build(load_config(None, SMALL + trained + [override]))
    with pytest.raises(ConfigError, match="does not hold the model this config builds"):
        restore_trained(make_checkpoint(learner, str(tmp_path))[0], path)


def test_deterministic_ops_refused_once_threads_are_fixed(monkeypatch):
    """In a process whose TensorFlow already runs with several inter-op
    threads (set_... raises), deterministic_ops=true is an error: op
    determinism alone would not make the run repeatable."""
    import tensorflow as tf

    from src.train import configure_tensorflow

    def initialised(_):
        raise RuntimeError("cannot be modified after initialization")
    enabled = []
    monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads", initialised)
    monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", initialised)
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 0)
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism",
                        lambda: enabled.append(True))
    with pytest.raises(ConfigError, match="deterministic_ops"):
        configure_tensorflow(load_config(None, ["deterministic_ops=true"]))
    configure_tensorflow(load_config(None))  # without determinism, nothing to refuse
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 1)
    configure_tensorflow(load_config(None, ["deterministic_ops=true"]))
    assert enabled == [True]
