"""Our meta-test accuracies beside the paper's.

    python -m src.report runs/omniglot_1shot_maml runs/omniglot_1shot_metadrop \
        [--out runs/omniglot_1shot.md]

Reads each workdir's results.json (written by ``src.evaluate``; a results
file such as runs/x/results.ckpt-3000.json may stand for a workdir), identifies
the setting and model from the run's config (dataset, shot, learner, noise)
and prints a markdown table: our accuracy ± 95% interval, test episodes,
Monte-Carlo samples, iterations trained / configured (a run shorter than the
official 60,000 meta-iterations is marked as shortened) and the paper's
number (Table 1; the authors' rerun of their own code in brackets). A
workdir without results.json gets a "not run" row. Under the table, every
two runs whose evaluations (results.json) have per-episode records
(test_accuracies.json, ``src.records``) of the same test episodes get a
paired difference: mean of the per-episode differences ± 95% interval.

``python -m src.report --is-fresh WORKDIR [key=value ...]`` exits 0 when
WORKDIR's results.json was made from its latest checkpoint with the test
settings that ``src.evaluate WORKDIR [key=value ...]`` would use (so the
Makefile can skip a redundant evaluation), 1 otherwise.
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys

import numpy as np

from src import records
from src.config import Config, ConfigError, load_config, meta_test_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_ITERATIONS = 60000  # the authors' run files
OFFICIAL_EPISODES = 1000
OFFICIAL_TEST_MC = 30

# Paper Table 1 (mean accuracy %, its 95% interval) and the authors' rerun of
# their own code (None where there is none), keyed by
# (dataset, shot, learner, noise). Omniglot is 20-way, miniImageNet 5-way.
PAPER = {
    ("omniglot", 1, "maml", "none"): (95.23, 0.17, 94.49),
    ("omniglot", 5, "maml", "none"): (98.38, 0.07, 98.14),
    ("miniimagenet", 1, "maml", "none"): (49.58, 0.65, 48.73),
    ("miniimagenet", 5, "maml", "none"): (64.55, 0.52, 65.70),
    ("omniglot", 1, "maml", "meta_dropout"): (96.63, 0.13, 96.24),
    ("omniglot", 5, "maml", "meta_dropout"): (98.73, 0.06, 98.81),
    ("miniimagenet", 1, "maml", "meta_dropout"): (51.93, 0.67, 51.67),
    ("miniimagenet", 5, "maml", "meta_dropout"): (67.42, 0.52, 68.12),
    ("omniglot", 1, "meta_sgd", "none"): (96.16, 0.14, None),
    ("omniglot", 5, "meta_sgd", "none"): (98.54, 0.07, None),
    ("miniimagenet", 1, "meta_sgd", "none"): (48.30, 0.64, None),
    ("miniimagenet", 5, "meta_sgd", "none"): (65.55, 0.56, None),
    ("omniglot", 1, "meta_sgd", "meta_dropout"): (97.02, 0.13, None),
    ("omniglot", 5, "meta_sgd", "meta_dropout"): (99.05, 0.05, None),
    ("miniimagenet", 1, "meta_sgd", "meta_dropout"): (50.87, 0.63, None),
    ("miniimagenet", 5, "meta_sgd", "meta_dropout"): (65.55, 0.57, None),
}
PAPER_WAY = {"omniglot": 20, "miniimagenet": 5}
DATASET_NAMES = {"omniglot": "Omniglot", "miniimagenet": "miniImageNet"}
LEARNER_NAMES = {"maml": "MAML", "meta_sgd": "Meta-SGD"}
NOISE_NAMES = {"none": "", "meta_dropout": " + meta-dropout"}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def results_path(run):
    """(workdir, results file) of a report argument: a workdir (its
    results.json) or a results file of one (e.g. runs/x/results.ckpt-3000.json,
    written by ``src.evaluate --checkpoint 3000``)."""
    if run.endswith(".json"):
        return os.path.dirname(run) or ".", run
    return run, os.path.join(run, "results.json")


# Fields a results file must hold for a table row (``_result_cells``).
RESULT_FIELDS = {"accuracy": float, "ci95": float, "episodes": int,
                 "mc_samples": int, "iterations_trained": int,
                 "iterations_configured": int}


def _check_results(results):
    """Raise KeyError / TypeError unless ``results`` holds RESULT_FIELDS
    as numbers (an int where an int is due)."""
    if not isinstance(results, dict):
        raise TypeError(f"a {type(results).__name__}, not an object")
    for key, kind in RESULT_FIELDS.items():
        value = results[key]
        number = isinstance(value, (int, float) if kind is float else int)
        if not number or isinstance(value, bool):
            raise TypeError(f"{key} is {value!r}, not "
                            f"{'a number' if kind is float else 'an integer'}")


def load_run(run):
    """Read a run's results file once: (config, results, problem).

    ``run``: a workdir or a results file (see ``results_path``).
    ``config``: the run's config as a dict, or None: the results file's
    config, else the workdir's config.yaml, else yaml/<workdir name>.yaml
    (an ``_itersN`` suffix of the name, as the Makefile adds for shortened
    runs, dropped); keys missing from an older results.json take the
    Config defaults.  ``results``: the results file's dict, or None with
    ``problem`` the text a table shows instead: "not run (...)" when there
    is no file, "unreadable <file> (...)" when it does not parse or lacks a
    field of RESULT_FIELDS."""
    workdir, path = results_path(run)
    name = os.path.basename(path)
    parsed, results, problem = None, None, None
    if not os.path.exists(path):
        problem = f"not run (no {name}: train, then python -m src.evaluate)"
    else:
        try:
            parsed = _read_json(path)
            _check_results(parsed)
            results = parsed
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable {name} ({e!r})"
    config = _find_config(workdir, parsed)
    if config is not None:
        config = {**dataclasses.asdict(Config()), **config}
    return config, results, problem


def _find_config(workdir, results):
    config = results.get("config") if isinstance(results, dict) else None
    if config:
        return config
    name = re.sub(r"_iters\d+$", "", os.path.basename(os.path.normpath(workdir)))
    for path in (os.path.join(workdir, "config.yaml"),
                 os.path.join(ROOT, "yaml", name + ".yaml")):
        if os.path.exists(path):
            try:
                return dataclasses.asdict(load_config(path))
            except ConfigError:
                continue
    return None


def setting_name(config):
    dataset = config["dataset"]
    return f"{DATASET_NAMES.get(dataset, dataset)} {config['way']}-way {config['shot']}-shot"


def model_name(config):
    return (LEARNER_NAMES.get(config["learner"], config["learner"])
            + NOISE_NAMES.get(config["noise"], " + " + config["noise"]))


def paper_numbers(config):
    """(mean, 95% interval, authors' rerun or None) of the paper's Table 1
    for a run config, or None if the paper has no such number."""
    key = (config["dataset"], config["shot"], config["learner"], config["noise"])
    if PAPER_WAY.get(config["dataset"]) != config["way"]:
        return None
    return PAPER.get(key)


def paper_entry(config):
    """'95.23 ± 0.17 (94.49)' or '-' if the paper has no such number."""
    entry = paper_numbers(config)
    if entry is None:
        return "-"
    mean, ci, rerun = entry
    return f"{mean:.2f} ± {ci:.2f}" + (f" ({rerun:.2f})" if rerun is not None else "")


def training_notes(trained, configured):
    """The notes a result trained for ``trained`` of ``configured``
    iterations needs: a shortened-run marker below the official schedule,
    and an incomplete-training one below its own; [] for a full run."""
    notes = []
    if trained < OFFICIAL_ITERATIONS:
        notes.append(f"shortened run: {trained} of {OFFICIAL_ITERATIONS} iterations")
    if trained < configured:
        notes.append(f"training incomplete: {trained} of {configured} configured")
    return notes


def iterations_note(trained, configured):
    """'60000 / 60000', followed by ``training_notes`` if any."""
    notes = training_notes(trained, configured)
    return f"{trained} / {configured}" + ("; " + "; ".join(notes) if notes else "")


def _result_cells(r, config):
    """(ours, episodes, MC samples, iterations) cells of a results dict."""
    ours = f"{r['accuracy']:.2f} ± {r['ci95']:.2f}"
    episodes = str(r["episodes"])
    if r["episodes"] != OFFICIAL_EPISODES:
        episodes += f" (paper: {OFFICIAL_EPISODES})"
    mc = str(r["mc_samples"])
    if config and config["noise"] != "none" and r["mc_samples"] != OFFICIAL_TEST_MC:
        mc += f" (paper: {OFFICIAL_TEST_MC})"
    return [ours, episodes, mc,
            iterations_note(r["iterations_trained"], r["iterations_configured"])]


def row(run, loaded=None):
    """One table row (list of cells) for a workdir or results file;
    ``loaded``: its ``load_run`` if the caller has read it already."""
    config, results, problem = loaded or load_run(run)
    setting = setting_name(config) if config else "?"
    model = model_name(config) if config else "?"
    paper = paper_entry(config) if config else "-"
    cells = ([problem, "-", "-", "-"] if results is None
             else _result_cells(results, config))
    return [run, setting, model] + cells + [paper]


HEAD = ["run", "setting", "model", "ours (accuracy % ± 95% CI)", "test episodes",
        "MC samples", "iterations trained / configured",
        "paper Table 1 (authors' rerun)"]


def summarize(accs):
    """Mean accuracy and 95% interval in percent: (mean, 1.96·std/√n)."""
    accs = np.asarray(accs, dtype=np.float64)
    return 100 * accs.mean(), 100 * 1.96 * accs.std() / np.sqrt(len(accs))


# Record-key fields that decide which test episodes a record holds.
_EPISODE_KEYS = ("dataset", "way", "shot", "query", "test_seed")


def _episode_record(run):
    """(episode identity, accuracies [n]) of the evaluation in a run's
    results file, from test_accuracies.json; None if either is missing."""
    workdir, path = results_path(run)
    try:
        results = _read_json(path)
        key = records.record_key(results["config"], results["checkpoint"],
                                 results.get("data"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    accs = records.load(workdir, key)
    if not len(accs):
        return None
    identity = ({k: key["config"].get(k) for k in _EPISODE_KEYS}, key["data"])
    return identity, accs


def paired_lines(workdirs):
    """One line per two runs (workdirs or results files) tested on the same
    episodes (same dataset, way, shot, query, test seed and data): the
    second's accuracy minus the first's on their common episodes, mean ±
    1.96·std/√n in points."""
    records = [(w, _episode_record(w)) for w in workdirs]
    lines = []
    for (wa, ra), (wb, rb) in itertools.combinations(records, 2):
        if ra is None or rb is None or ra[0] != rb[0]:
            continue
        n = min(len(ra[1]), len(rb[1]))
        if n < 2:
            continue
        mean, ci = summarize(rb[1][:n] - ra[1][:n])
        lines.append(f"{wb} minus {wa} on the same {n} test episodes: "
                     f"{mean:+.2f} ± {ci:.2f} points (paired)")
    return lines


def report(workdirs):
    """The markdown table of ``workdirs``, then its paired differences."""
    rows = [HEAD, ["---"] * len(HEAD)] + [row(w) for w in workdirs]
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    pairs = paired_lines(workdirs)
    return table + ("\n" + "\n".join(pairs) + "\n" if pairs else "")


def latest_checkpoint(workdir):
    """Basename of the latest checkpoint (from checkpoints/checkpoint), or None."""
    path = os.path.join(workdir, "checkpoints", "checkpoint")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
    return os.path.basename(m.group(1)) if m else None


def is_fresh(workdir, overrides=()):
    """True when results.json was evaluated on the latest checkpoint with the
    test settings ``src.evaluate --workdir workdir overrides`` would use."""
    path = os.path.join(workdir, "results.json")
    config_yaml = os.path.join(workdir, "config.yaml")
    if not (os.path.exists(path) and os.path.exists(config_yaml)):
        return False
    r = _read_json(path)
    config = load_config(config_yaml, overrides)
    mc = meta_test_samples(config)
    return (r.get("checkpoint") == latest_checkpoint(workdir)
            and r.get("episodes") == config.test_episodes
            and r.get("mc_samples") == mc
            and r.get("test_seed") == config.test_seed)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m src.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                        help="run directories, or results files of runs such as "
                             "runs/x/results.ckpt-3000.json (with --is-fresh: one "
                             "directory, then key=value overrides as given to "
                             "src.evaluate)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--is-fresh", action="store_true",
                        help="exit 0 if WORKDIR's results.json is up to date, else 1")
    args = parser.parse_args(argv)

    if args.is_fresh:
        workdir, overrides = args.workdirs[0], args.workdirs[1:]
        try:
            return 0 if is_fresh(workdir, overrides) else 1
        except (ConfigError, OSError, ValueError, KeyError) as e:
            print(f"{workdir}: cannot tell whether results.json is up to date ({e})",
                  file=sys.stderr)
            return 1

    table = report(args.workdirs)
    print(table, end="", flush=True)
    if args.out:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
