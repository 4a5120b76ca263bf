"""Step 1 of the gradient cross-check: the TensorFlow port's meta-gradient, saved.

With the project's venv:

  .venv/bin/python docs/crosscheck/gradient_tf.py OUT.npz

Builds MAML at the official Omniglot 1-shot settings in float64 with explicit
batch-norm ops, gives the batch-norm offsets non-zero values (so that their
paths count), draws a meta-batch of 2 tasks from data/omniglot/train.npy and
saves the variables, the batch, the meta-loss and its second-order gradient.
gradient_torch.py recomputes them independently in PyTorch.
"""
import os
import sys

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from src.config import load_config  # noqa: E402
from src.data import EpisodeSampler, load_split  # noqa: E402
from src.train import build  # noqa: E402


def main(out):
    config = load_config(os.path.join(REPO, "yaml/omniglot_1shot_maml.yaml"), ["meta_batch=2"])
    model, learner = build(config, dtype="float64", fused_bn=False)
    rng = np.random.default_rng(7)
    for v in model.group("beta").values():
        v.assign(0.1 * rng.standard_normal(v.shape))
    sampler = EpisodeSampler(load_split(os.path.join(REPO, "data/omniglot/train.npy")), (28, 28, 1),
                             config.way, config.shot, config.query, seed=3)
    batch = sampler.sample(2)
    as64 = {k: tf.constant(v.astype(np.float64) if v.dtype == np.float32 else v)
            for k, v in batch.items()}
    loss, _, grads = learner.meta_gradients(as64, tf.constant([0, 0], tf.int64))
    saved = {"loss": loss.numpy()}
    for v, g in zip(learner.variables_list, grads):
        saved["var:" + v.name] = v.numpy()
        saved["grad:" + v.name] = g.numpy()
    saved.update({"batch:" + k: v for k, v in batch.items()})
    np.savez(out, **saved)
    print(f"meta-loss {loss.numpy():.12f}; {len(grads)} gradients saved to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
