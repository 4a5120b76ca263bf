"""Meta-training entry point.

    python -m src.train --config yaml/omniglot_1shot_metadrop.yaml \
        --workdir runs/omniglot_1shot_metadrop [key=value ...]

Rerunning the same command resumes from the last checkpoint of the workdir.
The workdir receives config.yaml (resolved), checkpoints/, train.log and
TensorBoard events (tb/).
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import numpy as np
import tensorflow as tf

from src import data as data_lib
from src.config import (ConfigError, load_config, meta_test_samples,
                        meta_train_samples, save_config)
from src.meta_learner import MetaLearner
from src.model import DATASETS, ConvNet

# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("iterations", "log_every", "ckpt_every", "ckpt_keep_every",
                     "val_every", "val_episodes", "test_episodes", "test_mc_samples",
                     "eval_batch", "data_dir", "intra_op_threads",
                     "inter_op_threads", "deterministic_ops", "parallel_tasks")


def configure_tensorflow(config):
    """Thread pools and determinism; must run before TensorFlow's first op.

    One thread per op with several ops side by side was measured fastest on
    2 CPU cores (3.9 s against 4.5 s per meta-iteration with TensorFlow's
    defaults): the inner loop's 20-image convolutions parallelise poorly
    within an op, while the tasks of a meta-batch are independent.
    """
    # Op determinism alone is not enough: ops running side by side add up
    # gradient contributions in varying order (measured: meta-gradients of
    # one batch differing by 5e-8 between calls, 5e-4 in the weights after
    # two Adam steps), so a deterministic run uses one inter-op thread.
    inter = 1 if config.deterministic_ops else config.inter_op_threads
    try:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # already initialised (several runs in one process)
        if (config.deterministic_ops
                and tf.config.threading.get_inter_op_parallelism_threads() != 1):
            raise ConfigError("deterministic_ops=true needs one inter-op thread, but "
                              "TensorFlow was initialised in this process before; "
                              "run it in a fresh process") from None
    if config.deterministic_ops:
        tf.config.experimental.enable_op_determinism()


def build(config, dtype="float32", fused_bn=None):
    """Model and meta-learner of a config (fresh variables, seeded).

    ``dtype`` ('float64' for numerical checks) and ``fused_bn`` (None: the
    config's) let a diagnostic rebuild a run in another precision.
    """
    model = ConvNet(config.dataset, config.way, noise=config.noise,
                    fused_bn=config.fused_bn if fused_bn is None else fused_bn,
                    bn_second_order=config.bn_second_order,
                    bn_epsilon=config.bn_epsilon, bn_scale=config.bn_scale,
                    seed=config.seed,
                    init=config.init, dtype=dtype)
    learner = MetaLearner(
        model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
        meta_lr=config.meta_lr, meta_sgd=config.learner == "meta_sgd",
        first_order=config.first_order,
        mc_samples=meta_train_samples(config),
        clip=config.clip, parallel_tasks=config.parallel_tasks,
        adapt_offsets=config.adapt_offsets)
    return model, learner


def converted_copy(config, learner, dtype="float64", fused_bn=False):
    """(model, learner) of ``config`` in ``dtype``, with explicit batch-norm
    ops unless ``fused_bn``, holding ``learner``'s meta-parameters (for
    numerical diagnostics of a trained run)."""
    model, copy = build(config, dtype=dtype, fused_bn=fused_bn)
    for v, ref in zip(copy.variables_list, learner.variables_list):
        v.assign(tf.cast(ref, v.dtype))
    return model, copy


def make_checkpoint(learner, workdir):
    """(checkpoint, manager, step, sampler_state) over the learner's state.

    The manager keeps the last 3 checkpoints in workdir/checkpoints/, which
    resumption reads; ``kept_manager`` keeps chosen ones for good.
    """
    step = tf.Variable(0, dtype=tf.int64, name="step")
    sampler_state = tf.Variable("", dtype=tf.string, name="sampler_state")
    ckpt = tf.train.Checkpoint(learner=learner, step=step,
                               sampler_state=sampler_state)
    manager = tf.train.CheckpointManager(
        ckpt, os.path.join(workdir, "checkpoints"), max_to_keep=3)
    return ckpt, manager, step, sampler_state


KEPT_DIR = os.path.join("checkpoints", "kept")


def kept_manager(ckpt, workdir):
    """A manager of workdir/checkpoints/kept/, which deletes nothing: the
    checkpoints of every ``ckpt_keep_every``-th iteration, for testing a
    run at several points of its schedule (``src.evaluate --checkpoint``)."""
    return tf.train.CheckpointManager(ckpt, os.path.join(workdir, KEPT_DIR),
                                      max_to_keep=None)


def _checkpoint_dirs(workdir):
    """The run's checkpoints/ (the last three) and checkpoints/kept/."""
    return os.path.join(workdir, "checkpoints"), os.path.join(workdir, KEPT_DIR)


def find_checkpoint(workdir, iteration=None):
    """Path prefix of the run's checkpoint of ``iteration`` (an int), in
    checkpoints/ or checkpoints/kept/; the latest one if ``iteration`` is
    None.  Raises ConfigError naming the iterations available."""
    if iteration is None:
        latest = tf.train.latest_checkpoint(_checkpoint_dirs(workdir)[0])
        if latest is None:
            raise ConfigError(f"no checkpoint in {workdir}: train it first "
                              "(python -m src.train --config ... --workdir ...)")
        return latest
    for d in _checkpoint_dirs(workdir):
        path = os.path.join(d, f"ckpt-{iteration}")
        if os.path.exists(path + ".index"):
            return path
    raise ConfigError(f"no checkpoint of iteration {iteration} in {workdir}; available: "
                      f"{', '.join(map(str, checkpoint_iterations(workdir))) or 'none'} "
                      "(ckpt_keep_every=N keeps every N-th for good)")


def trained_run_parser(description):
    """An argparse parser with the two arguments of every tool that reads a
    trained run (``src.evaluate``, ``src.curvature``, ``src.precision``):
    ``--workdir`` and ``--checkpoint`` (an iteration, None: the latest)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="a trained run directory")
    parser.add_argument("--checkpoint", type=int, metavar="ITERATION",
                        help="the checkpoint of this iteration (in checkpoints/ or "
                             "checkpoints/kept/) instead of the latest")
    return parser


def load_trained_run(workdir, iteration=None, overrides=()):
    """A trained run, restored for a diagnostic (``src.curvature``,
    ``src.precision``).

    Args:
      workdir: the run directory.  iteration: the checkpoint's iteration
        (None: the latest).  overrides: 'key=value' config overrides.
    Returns:
      (config, learner restored from the checkpoint, checkpoint path,
      meta-training images [classes, images, D]).
    Raises ConfigError or DataError (e.g. data changed since training).
    """
    config = load_config(os.path.join(workdir, "config.yaml"), overrides)
    checkpoint = find_checkpoint(workdir, iteration)
    data_lib.check_run_data(config.data_dir, workdir)
    images = data_lib.load_split(os.path.join(config.data_dir, "train.npy"))
    _, learner = build(config)
    restore_trained(tf.train.Checkpoint(learner=learner), checkpoint)
    return config, learner, checkpoint, images


def restore_trained(ckpt, path):
    """Restores ``ckpt`` (a tf.train.Checkpoint over a learner, optionally
    with step and sampler state) from the checkpoint file prefix ``path``,
    requiring every variable it tracks to be in the file.

    Raises ConfigError otherwise: an override that changes the model
    (``noise=meta_dropout`` on a MAML run, ``learner=meta_sgd``) must not
    test freshly initialised variables, nor misplaced ones.
    """
    try:
        status = ckpt.restore(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        names = re.findall(r"tf\.Variable '([^':]+)|name (\S+?):0", str(e))
        names = [a or b for a, b in names]
        raise ConfigError(
            f"{path} does not hold the model this config builds (unmatched: "
            f"{', '.join(names[:4]) or 'see the checkpoint'}); an override such "
            "as noise= or learner= changes the model the run trained") from None
    status.expect_partial()


def checkpoint_iterations(workdir):
    """Sorted iterations of the checkpoints in checkpoints/ and checkpoints/kept/."""
    pattern, found = re.compile(r"^ckpt-(\d+)\.index$"), set()
    for d in _checkpoint_dirs(workdir):
        for name in (os.listdir(d) if os.path.isdir(d) else []):
            m = pattern.match(name)
            if m:
                found.add(int(m.group(1)))
    return sorted(found)


def image_shape(config):
    """(H, W, C) of the config's dataset."""
    return DATASETS[config.dataset][0]


def val_split_path(config):
    """miniImageNet has a validation split; Omniglot's protocol has none, so
    its validation curve uses fixed episodes of the test classes (nothing is
    selected on it: the last checkpoint is the one evaluated)."""
    path = os.path.join(config.data_dir, "val.npy")
    return path if os.path.exists(path) else os.path.join(config.data_dir, "test.npy")


def evaluate_episodes(learner, config, images, num_episodes, seed, progress=False,
                      done=(), on_batch=None):
    """Accuracies [num_episodes] on fixed episodes of ``images`` [C, N, D].

    ``done``: accuracies of the first episodes from an interrupted call with
    the same arguments; they are kept and their batches skipped (episodes and
    noise depend only on ``seed`` and the batch index, so the result is the
    same as one uninterrupted call). ``on_batch(accs)`` is called with all
    accuracies so far after each batch. With ``progress``, prints a line with
    the running mean and ETA about every tenth of the way.
    """
    mc = meta_test_samples(config)
    batches = data_lib.fixed_episodes(
        images, image_shape(config), config.way, config.shot, config.query,
        num_episodes, seed, config.eval_batch)
    skip = len(done) // config.eval_batch
    accs = [np.asarray(done[:skip * config.eval_batch], np.float64)]
    tic, every = time.time(), max(1, num_episodes // 10)
    for i, batch in enumerate(batches):
        if i < skip:
            continue
        accs.append(learner.eval_step(batch, tf.constant([seed, i], tf.int64), mc).numpy())
        n = sum(len(a) for a in accs)
        if on_batch is not None:
            on_batch(np.concatenate(accs))
        if progress and (n // every > (n - len(accs[-1])) // every):
            eta = (time.time() - tic) / (n - len(accs[0])) * (num_episodes - n)
            print(f"  {n}/{num_episodes} episodes, accuracy so far "
                  f"{100 * np.mean(np.concatenate(accs)):.2f}%, ETA {eta / 60:.1f} min",
                  flush=True)
    return np.concatenate(accs)


@tf.function
def noise_stats(model, x):
    """Per-block mean and std of the multiplicative mask softplus(α) on x."""
    taps = {}
    model.forward(x, taps=taps)
    return {f"{layer}/{k}_{s}": f(v) for layer, t in taps.items()
            for k, v in t.items()
            for s, f in (("mean", tf.reduce_mean), ("std", tf.math.reduce_std))}


def _check_resume(config, workdir):
    path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(path):
        return
    old = dataclasses.asdict(load_config(path))
    new = dataclasses.asdict(config)
    changed = [k for k in new if old[k] != new[k] and k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"{workdir} holds a run with a different config ({', '.join(changed)}); "
            "use another --workdir or the same settings")


class Logger:
    """Text log (train.log + stdout) and TensorBoard scalars."""

    def __init__(self, workdir):
        self.file = open(os.path.join(workdir, "train.log"), "a")
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tb"))

    def line(self, text):
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def scalars(self, step, values):
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
        self.writer.flush()


def train(config, workdir):
    """Meta-trains ``config`` in ``workdir``, resuming if it has checkpoints.

    Returns the iteration reached (``config.iterations``; iterations trained
    before a resume count too).
    """
    os.makedirs(workdir, exist_ok=True)
    _check_resume(config, workdir)
    data_lib.check_run_data(config.data_dir, workdir)
    save_config(config, os.path.join(workdir, "config.yaml"))
    configure_tensorflow(config)

    sampler = data_lib.EpisodeSampler(
        data_lib.load_split(os.path.join(config.data_dir, "train.npy")),
        image_shape(config), config.way, config.shot, config.query,
        seed=config.seed, shared_classes=config.shared_classes)
    val_images = (data_lib.load_split(val_split_path(config))
                  if config.val_every else None)

    model, learner = build(config)
    ckpt, manager, step, sampler_state = make_checkpoint(learner, workdir)
    kept = kept_manager(ckpt, workdir) if config.ckpt_keep_every else None
    log = Logger(workdir)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_consumed()
        sampler.set_state(json.loads(sampler_state.numpy().decode()))
        log.line(f"resumed from {manager.latest_checkpoint} at iteration {int(step)}")

    start, t0, window = int(step), time.time(), []
    for it in range(start + 1, config.iterations + 1):
        batch = sampler.sample(config.meta_batch)
        tic = time.time()
        metrics = learner.train_step(batch, tf.constant([config.seed, it], tf.int64))
        window.append({k: float(v) for k, v in metrics.items()})
        window[-1]["sec"] = time.time() - tic
        step.assign(it)
        if it % config.log_every == 0 or it == config.iterations:
            _log_progress(log, it, config, window, t0, start, learner, batch)
            window = []
        if config.val_every and it % config.val_every == 0:
            _validate(log, it, learner, config, val_images)
        save = it % config.ckpt_every == 0 or it == config.iterations
        keep = kept is not None and it % config.ckpt_keep_every == 0
        if save or keep:
            sampler_state.assign(json.dumps(sampler.get_state()))
        if save:
            manager.save(checkpoint_number=it)
        if keep:
            kept.save(checkpoint_number=it)
    return int(step)


def _validate(log, it, learner, config, val_images):
    """Logs the mean accuracy on the fixed validation episodes (the same at
    every call: seeded by ``test_seed + 1``)."""
    accs = evaluate_episodes(learner, config, val_images, config.val_episodes,
                             seed=config.test_seed + 1)
    log.scalars(it, {"val/accuracy": float(np.mean(accs))})
    log.line(f"iter {it}: validation accuracy {100 * np.mean(accs):.2f}% "
             f"on {len(accs)} fixed episodes")


def _log_progress(log, it, config, window, t0, start, learner, batch):
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    mean["sec"] = float(np.median([w["sec"] for w in window]))  # robust to tracing
    rate = (it - start) / (time.time() - t0)
    eta = (config.iterations - it) / rate
    values = {"train/loss": mean["loss"], "train/accuracy": mean["accuracy"],
              "train/grad_norm": mean["grad_norm"],
              "train/learning_rate": float(learner.optimizer.learning_rate),
              "train/iters_per_sec": 1.0 / mean["sec"]}
    if config.noise != "none":
        stats = noise_stats(learner.model, batch["query_x"][0])
        values.update({f"noise/{k}": float(v) for k, v in stats.items()})
    log.scalars(it, values)
    log.line(f"iter {it}/{config.iterations}  loss {mean['loss']:.4f}  "
             f"acc {100 * mean['accuracy']:.2f}%  {mean['sec']:.2f} s/iter  "
             f"ETA {eta / 60:.1f} min")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="yaml file under yaml/")
    parser.add_argument("--workdir", required=True, help="run directory")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        train(config, args.workdir)
    except (ConfigError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
