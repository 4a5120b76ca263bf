"""Why the kernels grow: each Adam step's effect on |θ|², from a run's checkpoints.

    python -m src.kernel_growth --workdir runs/omniglot_1shot_maml_zen3

Reads every checkpoint of the run (train with ``ckpt_keep_every=100`` to
keep a series) and, for each kernel, the Adam step of that checkpoint's
iteration, rebuilt from Adam's moments m and v:
Δ = -lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m / (√v + ε).  Since
|θ + Δ|² = |θ|² + 2 θ·Δ + |Δ|², the growth of the mean square of a
kernel's entries per iteration splits into a radial part 2 θ·Δ / n and
the step's own |Δ|² / n; both are printed in units of lr², beside the
growth measured between this checkpoint and the next.

Batch norm makes a block's output ignore its kernel's scale, so the
gradient of any loss of the block is orthogonal to the kernel; the
meta-loss is not, because the scale sets the inner step: scaling θ_b by c
acts like dividing its inner step size by c² (the identity
θ_b·∂L/∂θ_b = -2 α ∂L/∂α_b, ``tests/test_gradients.py``).  So
cos(θ, -m) > 0, a radial meta-gradient, means the meta-loss asks for a
smaller inner step in that block, which MAML can only take by growing the
kernel.
"""

import argparse
import os
import sys

import numpy as np
import tensorflow as tf

from src.config import ConfigError, load_config
from src.train import build, checkpoint_iterations, find_checkpoint, restore_trained

KERNELS = ("block1/kernel", "block2/kernel", "block3/kernel", "block4/kernel",
           "head/kernel")


def adam_step(optimizer, index):
    """The step Adam applied to variable ``index`` (of the list it was built
    on) at its last iteration, from its moments (Keras 2.15's Adam slots):
    (step, m), arrays of the variable's shape."""
    m = optimizer._momentums[index].numpy().astype(np.float64)
    v = optimizer._velocities[index].numpy().astype(np.float64)
    t = int(optimizer.iterations.numpy())
    lr = float(optimizer.learning_rate.numpy())
    # Keras takes the powers of β rounded to float32 (1 - β₂ᵗ is small early on).
    b1, b2 = (float(np.float32(b)) for b in (optimizer.beta_1, optimizer.beta_2))
    scale = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return -scale * m / (np.sqrt(v) + optimizer.epsilon), m


def growth_terms(theta, step, m, lr):
    """Per-iteration terms of a kernel's mean-square growth, in units of lr².

    ``theta``: the kernel after the step; ``step``: the step; ``m``: Adam's
    first moment.  Returns a dict: rms (of θ), step_rms (/ lr),
    cos_grad (cos(θ, -m), the meta-gradient's radial share), radial
    (2 θ·Δ / n / lr², θ before the step) and own (|Δ|² / n / lr²)."""
    after, d, m = (np.ravel(a).astype(np.float64) for a in (theta, step, m))
    before, n = after - d, after.size
    return {"rms": np.sqrt(np.mean(after ** 2)),
            "step_rms": np.sqrt(d @ d / n) / lr,
            "cos_grad": -(before @ m) / np.linalg.norm(before) / np.linalg.norm(m),
            "radial": 2 * (before @ d) / n / lr ** 2,
            "own": (d @ d) / n / lr ** 2}


def series(workdir):
    """{kernel: [(iteration, growth_terms)]} over the run's checkpoints, and
    Adam's learning rate.  Raises ConfigError if the run has no checkpoint."""
    config = load_config(os.path.join(workdir, "config.yaml"))
    iterations = checkpoint_iterations(workdir)
    if not iterations:
        raise ConfigError(f"{workdir} has no checkpoint (train it first)")
    _, learner = build(config)
    ckpt = tf.train.Checkpoint(learner=learner)
    names = [v.name for v in learner.variables_list]
    theta = learner.model.group("theta")
    lr = float(learner.optimizer.learning_rate.numpy())
    out = {k: [] for k in KERNELS}
    for it in iterations:
        restore_trained(ckpt, find_checkpoint(workdir, it))
        for k in KERNELS:
            step, m = adam_step(learner.optimizer, names.index(theta[k].name))
            out[k].append((it, growth_terms(theta[k].numpy(), step, m, lr)))
    return out, lr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run directory")
    args = parser.parse_args(argv)
    try:
        kernels, lr = series(args.workdir)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"{args.workdir}: meta lr {lr:g}; growth of mean(θ²) per iteration in lr²")
    for k, rows in kernels.items():
        print(f"\n{k}\n iteration  RMS(θ)  step RMS / lr  cos(θ, -m)  radial  own  "
              "sum  measured to next")
        for j, (it, r) in enumerate(rows):
            measured = ""
            if j + 1 < len(rows):
                it2, r2 = rows[j + 1]
                measured = f"{(r2['rms'] ** 2 - r['rms'] ** 2) / (it2 - it) / lr ** 2:8.3f}"
            print(f" {it:9d}  {r['rms']:.4f}  {r['step_rms']:13.3f}  {r['cos_grad']:10.3f}  "
                  f"{r['radial']:6.2f}  {r['own']:5.3f}  {r['radial'] + r['own']:5.2f}  "
                  f"{measured}")


if __name__ == "__main__":
    main()
