"""Meta-test entry point.

    python -m src.evaluate --workdir runs/omniglot_1shot_metadrop [key=value ...]

Restores the last checkpoint of the workdir, adapts to ``test_episodes``
fixed episodes of the meta-test classes (the same tasks for every model:
they depend on ``test_seed`` only), with ``test_mc_samples`` noise samples
per inner step for meta-dropout, and writes results.json beside the run.

The per-episode accuracies go to test_accuracies.json after every batch:
an interrupted evaluation (a 1000-episode meta-dropout test takes 1.5 h on
2 CPU cores) continues where it stopped when the same command is rerun, and
two models' records allow a paired comparison on the same episodes.
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
from src.report import summarize
from src.train import build, configure_tensorflow, evaluate_episodes, make_checkpoint


# Keys that cannot change a test accuracy (run length, logging, threads).
_NOT_IN_RECORD_KEY = ("iterations", "log_every", "ckpt_every", "val_every",
                      "val_episodes", "test_episodes", "data_dir",
                      "intra_op_threads", "inter_op_threads", "parallel_tasks")


class EpisodeRecord:
    """Per-episode test accuracies of one checkpoint, kept in
    ``workdir/test_accuracies.json`` as {"key": ..., "accuracies": [...]}.

    The key holds the checkpoint, the data signature and every config key
    that can change an accuracy; a record with another key is ignored
    (and overwritten by the next save).
    """

    def __init__(self, workdir, config, checkpoint, data):
        self.path = os.path.join(workdir, "test_accuracies.json")
        cfg = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in _NOT_IN_RECORD_KEY}
        self.key = {"checkpoint": os.path.basename(checkpoint), "data": data,
                    "config": cfg}

    def load(self):
        """Accuracies [n] recorded under this key (empty if none)."""
        try:
            with open(self.path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return np.zeros(0)
        if record.get("key") != json.loads(json.dumps(self.key)):
            return np.zeros(0)
        return np.asarray(record["accuracies"], np.float64)

    def save(self, accs):
        """Writes ``accs`` [n] atomically (a kill never leaves half a file)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": self.key, "accuracies": [float(a) for a in accs]}, f)
        os.replace(tmp, self.path)


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
    record = EpisodeRecord(workdir, config, manager.latest_checkpoint, data)
    recorded = record.load()
    # Whole batches only: a batch's noise depends on its size.
    kept = min(len(recorded), config.test_episodes) // config.eval_batch * config.eval_batch
    if kept:
        print(f"continuing from {kept} episodes in {record.path}", flush=True)

    def save(accs):  # never shortens a longer record (e.g. 1000 -> 200)
        if len(accs) > len(recorded):
            record.save(accs)

    tic = time.time()
    accs = evaluate_episodes(learner, config, images, config.test_episodes,
                             seed=config.test_seed, progress=True,
                             done=recorded[:kept], on_batch=save)
    mean, ci95 = summarize(accs)
    results = {
        "accuracy": round(mean, 4), "ci95": round(ci95, 4),
        "episodes": len(accs),
        "episodes_resumed": kept,
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
