"""Curvature of the inner loop at a trained checkpoint.

    python -m src.curvature --workdir runs/omniglot_1shot_maml [--checkpoint N] [--tasks 3]

For a few meta-training tasks, prints the eigenvalue λ of largest magnitude
of the support loss's Hessian w.r.t. θ, at the meta-learned θ and at θ_K
after the K inner steps, with α·λ.  An inner SGD step of size α contracts
the loss along an eigen-direction only if |1 - α·λ| < 1, i.e. 0 < α·λ < 2;
α·λ well past 2 at θ means the first inner step overshoots along that
direction.  Computed in float64 with explicit batch-norm ops, from the
float32 checkpoint; the noise, for meta-dropout, is sampled with a fixed
seed.
"""

import sys

import numpy as np
import tensorflow as tf

from src import data as data_lib
from src.config import ConfigError, meta_train_samples
from src.meta_learner import adapt, support_loss
from src.train import converted_copy, image_shape, load_trained_run, trained_run_parser


def top_eigenvalue(loss_fn, params, iterations=30, seed=0):
    """Largest-magnitude Hessian eigenvalue of ``loss_fn`` at ``params``.

    Power iteration on Hessian-vector products (a tape in a tape), from a
    seeded random direction.
    Args:
      loss_fn: {name: tensor} -> scalar loss, twice differentiable.
      params: {name: tensor} the point.
      iterations: power-iteration steps.
    Returns:
      float, the Rayleigh quotient vᵀHv of the last (unit) iterate.
    """
    rng = np.random.default_rng(seed)
    v = {k: tf.constant(rng.standard_normal(p.shape), p.dtype) for k, p in params.items()}
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(u * u) for u in v.values()]))
        v = {k: u / norm for k, u in v.items()}
        hv = _hessian_vector_product(loss_fn, params, v)
        eigenvalue = float(tf.add_n([tf.reduce_sum(hv[k] * v[k]) for k in v]))
        v = hv
    return eigenvalue


def _hessian_vector_product(loss_fn, params, v):
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(params)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(params)
            loss = loss_fn(params)
        grads = inner.gradient(loss, params)
        directional = tf.add_n([tf.reduce_sum(grads[k] * v[k]) for k in params])
    return outer.gradient(directional, params)


def task_curvature(model, config, support_x, support_y, seed, iterations=30):
    """Top eigenvalues of one task's support-loss Hessian w.r.t. θ.

    Args:
      model: a float64 ConvNet (θ, φ, β as trained).  config: its run's Config.
      support_x: [N, H, W, C] float64; support_y: int [N].
      seed: int [2] noise seed (meta-dropout's noise, fixed for every pass).
      iterations: power-iteration steps.
    Returns:
      (λ at θ, λ at θ_K after the run's K inner steps of size α), floats.
    """
    samples = meta_train_samples(config)

    def loss_fn(theta):
        return support_loss(model, {**model.params(), **theta}, support_x, support_y,
                            samples, seed)

    theta = {k: tf.identity(v) for k, v in model.group("theta").items()}
    step = {k: tf.constant(config.inner_lr, tf.float64) for k in theta}
    adapted = adapt(model, model.params(), step, support_x, support_y,
                    config.inner_steps, samples, seed)
    return (top_eigenvalue(loss_fn, theta, iterations),
            top_eigenvalue(loss_fn, adapted, iterations))


def main(argv=None):
    parser = trained_run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3, help="meta-training tasks")
    parser.add_argument("--iterations", type=int, default=30, help="power-iteration steps")
    parser.add_argument("--seed", type=int, default=7, help="seed of the tasks")
    args = parser.parse_args(argv)
    try:
        config, learner, checkpoint, images = load_trained_run(args.workdir, args.checkpoint)
        if config.learner != "maml" or config.adapt_offsets:
            raise ConfigError("src.curvature handles MAML's inner loop on θ "
                              "(learner: maml, adapt_offsets: false)")
    except (ConfigError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")
    model64, _ = converted_copy(config, learner)
    sampler = data_lib.EpisodeSampler(images, image_shape(config), config.way,
                                      config.shot, config.query, seed=args.seed)
    print(f"{checkpoint}: inner lr α = {config.inner_lr}, K = {config.inner_steps}")
    for t in range(args.tasks):
        batch = sampler.sample(1)
        at_start, at_end = task_curvature(
            model64, config, tf.constant(batch["support_x"][0], tf.float64),
            tf.constant(batch["support_y"][0]), tf.constant([args.seed, t], tf.int64),
            args.iterations)
        print(f"task {t}: λ at θ {at_start:9.2f} (α·λ {config.inner_lr * at_start:6.2f}); "
              f"at θ_K {at_end:9.2f} (α·λ {config.inner_lr * at_end:6.2f})", flush=True)


if __name__ == "__main__":
    main()
