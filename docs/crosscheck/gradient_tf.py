"""Step 1 of the gradient cross-check: the TensorFlow port's meta-gradient, saved.

With the project's venv:

  .venv/bin/python docs/crosscheck/gradient_tf.py OUT.npz [maml|metadrop]

Builds MAML (or MAML + meta-dropout) at the official Omniglot 1-shot settings
in float64 with explicit batch-norm ops, gives the batch-norm offsets (and
meta-dropout's noise biases) non-zero values so that their paths count, draws
a meta-batch of 2 tasks from data/omniglot/train.npy and saves the variables,
the batch, the meta-loss and its second-order gradient. For meta-dropout it
takes S = 2 noise samples per inner step (so that each sample's own batch
statistics count) and records every noise draw, in the order drawn, so that
gradient_torch.py can feed the same ε to its independent PyTorch version.
"""
import os
import sys

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from src import noise  # noqa: E402
from src.config import load_config  # noqa: E402
from src.data import EpisodeSampler, load_split  # noqa: E402
from src.train import build  # noqa: E402


def recording(draw, draws):
    """``noise.normal`` that also appends each draw (numpy) to ``draws``."""
    def normal(shape, seed, dtype):
        eps = draw(shape, seed, dtype)
        draws.append(eps.numpy())
        return eps
    return normal


def main(out, model_name="maml"):
    overrides = ["meta_batch=2"] + (["mc_samples=2"] if model_name == "metadrop" else [])
    config = load_config(os.path.join(REPO, f"yaml/omniglot_1shot_{model_name}.yaml"), overrides)
    model, learner = build(config, dtype="float64", fused_bn=False)
    rng = np.random.default_rng(7)
    offsets = list(model.group("beta").values())
    offsets += [v for k, v in model.group("phi").items() if k.endswith("noise_bias")]
    for v in offsets:
        v.assign(0.1 * rng.standard_normal(v.shape))
    draws = []
    noise.normal = recording(noise.normal, draws)  # eager here, so every draw passes
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
    saved.update({f"noise:{i}": eps for i, eps in enumerate(draws)})
    saved["mc_samples"] = config.mc_samples
    np.savez(out, **saved)
    print(f"meta-loss {loss.numpy():.12f}; {len(grads)} gradients and {len(draws)} noise draws "
          f"saved to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
