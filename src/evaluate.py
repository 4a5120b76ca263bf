"""Meta-test entry point.

    python -m src.evaluate --workdir runs/omniglot_1shot_metadrop [key=value ...]

Restores the last checkpoint of the workdir, adapts to ``test_episodes``
fixed episodes of the meta-test classes (the same tasks for every model:
they depend on ``test_seed`` only), with ``test_mc_samples`` noise samples
per inner step for meta-dropout, and writes results.json beside the run.

The per-episode accuracies go to test_accuracies.json after every batch
(``src.records``): an interrupted evaluation (a 1000-episode meta-dropout
test takes about an hour on 2 CPU cores) continues where it stopped when
the same command is rerun, and two models' records allow a paired
comparison on the same episodes.

Overrides of the test protocol (test_episodes, test_mc_samples, test_seed,
eval_batch) still evaluate the run as trained and write results.json.
Overrides of any other key that can change an accuracy (inner_lr,
inner_steps, ...) evaluate a variant: its results go to
results.<key=value,...>.json, and its record sits beside the run's own.
An override that changes the model's variables (noise=, learner=) is an
error (``train.restore_trained``).

``--checkpoint N`` tests the run's checkpoint of iteration N instead of the
latest (the last three are in checkpoints/; a run trained with
``ckpt_keep_every`` keeps more in checkpoints/kept/); unless it is the
latest, its results go to results.ckpt-N.json (results.ckpt-N.<variant>.json
with overrides), which ``src.report`` accepts in place of a workdir.
"""

import dataclasses
import json
import os
import sys
import time

from src import data as data_lib
from src import records
from src.config import ConfigError, load_config, meta_test_samples
from src.report import latest_checkpoint, summarize
from src.train import (build, configure_tensorflow, evaluate_episodes, find_checkpoint,
                       make_checkpoint, restore_trained, trained_run_parser)


def results_path(workdir, checkpoint, chosen, variant):
    """Where the results of ``checkpoint`` (a path in ``workdir``) go:
    results.json, with ``.ckpt-N`` inserted if the checkpoint was ``chosen``
    by ``--checkpoint`` and is not the latest, and ``.<variant>`` for a
    variant (``records.variant_name``, '' for none)."""
    name = os.path.basename(checkpoint)
    earlier = chosen and name != latest_checkpoint(workdir)
    parts = ["results"] + ([name] if earlier else []) + ([variant] if variant else [])
    return os.path.join(workdir, ".".join(parts + ["json"]))


def _resumable_accuracies(learner, config, images, workdir, key):
    """Accuracies [test_episodes] of the fixed test episodes, continuing from
    (and extending) the per-episode record stored under ``key`` in workdir;
    also returns how many episodes came from that record."""
    recorded = records.load(workdir, key)
    # Whole batches only: a batch's noise depends on its size.
    kept = min(len(recorded), config.test_episodes) // config.eval_batch * config.eval_batch
    if kept:
        print(f"continuing from {kept} episodes in "
              f"{os.path.join(workdir, records.FILENAME)}", flush=True)

    def save(accs):  # never shortens a longer record (e.g. 1000 -> 200)
        if len(accs) > len(recorded):
            records.save(workdir, key, accs)

    accs = evaluate_episodes(learner, config, images, config.test_episodes,
                             seed=config.test_seed, progress=True,
                             done=recorded[:kept], on_batch=save)
    return accs, kept


def evaluate(config, workdir, iteration=None):
    """Evaluates the run in ``workdir`` under ``config`` (its config.yaml
    plus overrides), from its checkpoint of ``iteration`` (default: the
    latest); returns the results dict it writes to results.json, or to
    results[.ckpt-N][.<variant>].json for an earlier checkpoint or a
    variant (see the module docstring)."""
    data = data_lib.check_run_data(config.data_dir, workdir)
    checkpoint = find_checkpoint(workdir, iteration)
    configure_tensorflow(config)
    model, learner = build(config)
    ckpt, _, step, _ = make_checkpoint(learner, workdir)
    restore_trained(ckpt, checkpoint)

    images = data_lib.load_split(os.path.join(config.data_dir, "test.npy"))
    config_dict = dataclasses.asdict(config)
    run_config = dataclasses.asdict(load_config(os.path.join(workdir, "config.yaml")))
    variant = records.variant_name(run_config, config_dict)
    path = results_path(workdir, checkpoint, iteration is not None, variant)
    key = records.record_key(config_dict, checkpoint, data)
    tic = time.time()
    accs, kept = _resumable_accuracies(learner, config, images, workdir, key)
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
        "checkpoint": os.path.basename(checkpoint),
        "config": config_dict,
        "data": data,
    }
    if variant:
        results["variant"] = variant
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{workdir}{f' ({variant})' if variant else ''}: {mean:.2f} ± {ci95:.2f}% "
          f"on {len(accs)} episodes (S={results['mc_samples']}, {int(step)} "
          f"iterations); wrote {path}", flush=True)
    return results


def main(argv=None):
    parser = trained_run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the run's config.yaml "
                             "(e.g. test_episodes=100)")
    args = parser.parse_args(argv)
    try:
        config = load_config(os.path.join(args.workdir, "config.yaml"), args.overrides)
        evaluate(config, args.workdir, args.checkpoint)
    except (ConfigError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
