"""How far a run's float32 meta-gradient is from float64, at a checkpoint.

    python -m src.precision --workdir runs/omniglot_1shot_maml [--checkpoint N] [--batches 3] [key=value ...]

On a few meta-training meta-batches, the run's meta-gradient (as it was
trained: second order or not, meta-batch, inner steps; ``key=value``
overrides change that, e.g. ``inner_steps=1``) is computed at the
checkpoint's weights: in float64 with explicit batch-norm ops, the
reference; in float32 with the fused batch-norm kernel (training's
default); in float32 with explicit ops; and in float64 again at weights
moved by the size of one float32 rounding (``move_by_rounding``).  For
each variant it prints the meta-loss's relative difference from the
reference and the relative error |g - g64| / |g64| (Euclidean norms per
variable) over the variables: smallest, median, largest and which.  The conv biases are left out: batch
norm subtracts them again, so their meta-gradient is zero up to rounding.

The last variant tells two sources of float32's error apart: a
meta-gradient sensitive to its weights (the moved weights change it about
as much as float32 does) or rounding inside the computation (they change
it far less).  MAML only: meta-dropout's noise is drawn in the model's
dtype, so its float32 and float64 draws differ.
"""

import sys

import numpy as np
import tensorflow as tf

from src import data as data_lib
from src.config import ConfigError
from src.train import converted_copy, image_shape, load_trained_run, trained_run_parser

# name: (dtype, fused batch norm, weights moved by a float32 rounding)
VARIANTS = {"float32, fused batch norm": ("float32", True, False),
            "float32, explicit ops": ("float32", False, False),
            "float64, weights moved by float32 rounding": ("float64", False, True)}


def meta_gradient(learner, batch, seed):
    """(meta-loss, {variable name: meta-gradient}) of ``learner`` on
    ``batch`` (numpy arrays, cast to the learner's dtype), unclipped."""
    dtype = learner.variables_list[0].dtype
    batch = {k: tf.constant(v, dtype if k.endswith("_x") else None) for k, v in batch.items()}
    loss, _, grads = learner.meta_gradients(batch, seed)
    names = [v.name.split(":")[0] for v in learner.variables_list]
    return float(loss), {n: np.asarray(g, np.float64) for n, g in zip(names, grads)}


def move_by_rounding(learner, seed=0):
    """Multiplies every meta-parameter of a float64 ``learner`` by
    (1 + 2^-24 u), u ~ U(-1, 1) seeded: the size of a float32 rounding.  If
    that alone moves the float64 meta-gradient as much as float32 does, the
    error comes from the meta-loss's sensitivity, not from an op."""
    for i, v in enumerate(learner.variables_list):
        u = tf.random.stateless_uniform(v.shape, [seed, i], -1.0, 1.0, v.dtype)
        v.assign(v * (1.0 + 2.0 ** -24 * u))


def relative_errors(grads, reference):
    """{name: |g - ref| / |ref|} over the names of ``reference`` whose
    gradient is not a conv bias's (zero up to rounding)."""
    return {n: float(np.linalg.norm(grads[n] - ref) / np.linalg.norm(ref))
            for n, ref in reference.items()
            if not (n.startswith("block") and n.endswith("/bias"))}


def summary(errors):
    """'min / median / max (name of the max)' of an {name: error} dict."""
    worst = max(errors, key=errors.get)
    values = np.array(list(errors.values()))
    return (f"{values.min():.2e} / {np.median(values):.2e} / {values.max():.2e} "
            f"({worst})")


def main(argv=None):
    parser = trained_run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="meta-training meta-batches")
    parser.add_argument("--seed", type=int, default=7, help="seed of the meta-batches")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides of the computation, e.g. inner_steps=1")
    args = parser.parse_args(argv)
    try:
        config, learner, checkpoint, images = load_trained_run(
            args.workdir, args.checkpoint, args.overrides)
        if config.noise != "none":
            raise ConfigError("src.precision compares float32 with float64 on the same "
                              "weights and data, which needs a noise-free model (noise: none); "
                              "meta-dropout's noise is drawn in the model's dtype")
    except (ConfigError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")
    reference = converted_copy(config, learner, "float64", False)[1]
    variants = {}
    for name, (dtype, fused, moved) in VARIANTS.items():
        variants[name] = converted_copy(config, learner, dtype, fused)[1]
        if moved:
            move_by_rounding(variants[name])
    sampler = data_lib.EpisodeSampler(images, image_shape(config), config.way,
                                      config.shot, config.query, seed=args.seed,
                                      shared_classes=config.shared_classes)
    print(f"{checkpoint}: meta-batch {config.meta_batch}, K = {config.inner_steps}, "
          f"α = {config.inner_lr}; relative error min / median / max (worst variable)")
    seed = tf.constant([args.seed, 0], tf.int32)
    for b in range(args.batches):
        batch = sampler.sample(config.meta_batch)
        loss64, grads64 = meta_gradient(reference, batch, seed)
        for name, variant in variants.items():
            loss, grads = meta_gradient(variant, batch, seed)
            print(f"batch {b}, {name}: loss {abs(loss - loss64) / abs(loss64):.1e}; "
                  f"gradient {summary(relative_errors(grads, grads64))}", flush=True)


if __name__ == "__main__":
    main()
