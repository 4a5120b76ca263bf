"""Meta-test entry point.

    python -m src.evaluate --workdir runs/omniglot_1shot_metadrop [key=value ...]

Restores the last checkpoint of the workdir, adapts to ``test_episodes``
fixed episodes of the meta-test classes (the same tasks for every model:
they depend on ``test_seed`` only), with ``test_mc_samples`` noise samples
per inner step for meta-dropout, and writes results.json beside the run.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from src import data as data_lib
from src.config import ConfigError, load_config, meta_test_samples
from src.train import build, configure_tensorflow, evaluate_episodes, make_checkpoint


def summarize(accs):
    """Mean accuracy and 95% interval in percent: (mean, 1.96·std/√n)."""
    accs = np.asarray(accs, dtype=np.float64)
    return 100 * accs.mean(), 100 * 1.96 * accs.std() / np.sqrt(len(accs))


def evaluate(config, workdir):
    """Evaluates the run in ``workdir``; returns the results dict it writes."""
    data = data_lib.check_run_data(config.data_dir, workdir)
    configure_tensorflow(config)
    model, learner = build(config)
    ckpt, manager, step, _ = make_checkpoint(learner, workdir)
    if not manager.latest_checkpoint:
        raise ConfigError(f"no checkpoint in {workdir}: train it first "
                          "(python -m src.train --config ... --workdir ...)")
    ckpt.restore(manager.latest_checkpoint).expect_partial()

    images = data_lib.load_split(os.path.join(config.data_dir, "test.npy"))
    tic = time.time()
    accs = evaluate_episodes(learner, config, images, config.test_episodes,
                             seed=config.test_seed, progress=True)
    mean, ci95 = summarize(accs)
    results = {
        "accuracy": round(mean, 4), "ci95": round(ci95, 4),
        "episodes": len(accs),
        "mc_samples": meta_test_samples(config),
        "iterations_trained": int(step),
        "iterations_configured": config.iterations,
        "test_seed": config.test_seed,
        "seconds": round(time.time() - tic, 1),
        "checkpoint": os.path.basename(manager.latest_checkpoint),
        "config": dataclasses.asdict(config),
        "data": data,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{workdir}: {mean:.2f} ± {ci95:.2f}% on {len(accs)} episodes "
          f"(S={results['mc_samples']}, {int(step)} iterations)", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run directory")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the run's config.yaml "
                             "(e.g. test_episodes=100)")
    args = parser.parse_args(argv)
    try:
        config = load_config(os.path.join(args.workdir, "config.yaml"), args.overrides)
        evaluate(config, args.workdir)
    except (ConfigError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
