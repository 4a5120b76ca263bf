"""The paper's Table 1: sixteen cells, trained, evaluated and collected.

    python -m src.table1 [--collect-only] [--iters N] [--episodes N]
        [--settings omniglot_1shot,...] [--models maml,...]
        [--args "key=value ..."] [--eval-args "key=value ..."]
        [--runs-root runs] [--out-md runs/table1.md] [--out-json runs/table1.json]

The cells are the settings {omniglot_1shot, omniglot_5shot,
miniimagenet_1shot, miniimagenet_5shot} x the models {maml, metasgd,
metadrop, metasgd_metadrop}; cell (setting, model) is the run
``<runs-root>/<setting>_<model>`` trained from ``yaml/<setting>_<model>.yaml``,
or ``<runs-root>/<setting>_<model>_iters<N>`` with ``--iters N``: the same
workdirs as ``make omniglot-1shot ITERS=N`` etc. use, so the make targets
and this table share their runs.

Unless ``--collect-only``, every cell of ``--settings`` x ``--models`` (all
by default) is first trained (resuming from its checkpoint) and evaluated
(unless its results.json is up to date), as the Makefile's per-setting
targets do. A cell whose dataset is absent (no train.npy / test.npy in the
config's data_dir) is skipped with a message instead of failing the table; a
cell whose training or evaluation fails is reported as such, and the command
then exits 1 after writing the table.

Then every cell is collected: our accuracy ± 95% interval, test episodes,
Monte-Carlo samples and iterations (a run shorter than the official 60,000
meta-iterations is marked as shortened), with the paper's number beside it
(``src.report.PAPER``). A cell without results says "not run" and why. The
output is a markdown table in the paper's layout (rows = models, columns =
settings) followed by the per-run detail rows of ``src.report``, and a JSON
file with the same sixteen cells.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

from src import report
from src.config import ConfigError, load_config

ROOT = report.ROOT  # where relative paths (runs root, data_dir) start
YAML_DIR = os.path.join(report.ROOT, "yaml")
SETTINGS = ("omniglot_1shot", "omniglot_5shot", "miniimagenet_1shot", "miniimagenet_5shot")
MODELS = ("maml", "metasgd", "metadrop", "metasgd_metadrop")
DATA_HINTS = {
    "omniglot": "no Omniglot data in {data_dir}: run `make data` (see README)",
    "miniimagenet": ("no miniImageNet data in {data_dir}: see README (`make "
                     "data-miniimagenet MINIIMAGENET_IMAGES=...` or "
                     "`MINIIMAGENET_NPY=...`)"),
}
OURS = report.HEAD[3]
EPISODES = report.HEAD[4]
MC = report.HEAD[5]
ITERATIONS = report.HEAD[6]
PAPER_COL = report.HEAD[7]


def workdir_name(setting, model, iters=None):
    """The Makefile's workdir name: <setting>_<model>[_iters<N>]."""
    return f"{setting}_{model}" + (f"_iters{iters}" if iters else "")


def config_path(setting, model):
    return os.path.join(YAML_DIR, f"{setting}_{model}.yaml")


def _abs(path):
    """A path relative to the repository root (where the Makefile runs)."""
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def missing_data(dataset, data_dir):
    """None if data_dir holds train.npy and test.npy, else why not."""
    if all(os.path.isfile(os.path.join(_abs(data_dir), f))
           for f in ("train.npy", "test.npy")):
        return None
    return DATA_HINTS.get(dataset, "no data in {data_dir}").format(data_dir=data_dir)


# ---------------------------------------------------------------------------
# Running the cells.
# ---------------------------------------------------------------------------

def _call(args):
    """Runs ``python -m ...`` from the repository root, output passed through."""
    print("$ python -m " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.call([sys.executable, "-m", *args], cwd=ROOT)


def run_cell(setting, model, workdir, train_overrides, eval_overrides):
    """Trains (resuming) and evaluates one cell. Returns None if it went
    well, else (kind, reason): kind 'skipped' (no data) or 'failed'."""
    try:
        config = load_config(config_path(setting, model), train_overrides)
    except (ConfigError, OSError) as e:
        return "failed", f"bad config: {e}"
    absent = missing_data(config.dataset, config.data_dir)
    if absent:
        print(f"== {setting} {model}: skipped, {absent}", flush=True)
        return "skipped", absent
    wd = _abs(workdir)
    print(f"== {setting} {model}: training in {workdir}", flush=True)
    rc = _call(["src.train", "--config", config_path(setting, model),
                "--workdir", wd, *train_overrides])
    if rc != 0:
        return "failed", f"training failed (exit code {rc}; see {workdir}/train.log)"
    if _call(["src.report", "--is-fresh", wd, *eval_overrides]) == 0:
        print(f"== {setting} {model}: {workdir}/results.json is up to date", flush=True)
        return None
    print(f"== {setting} {model}: evaluating {workdir}", flush=True)
    rc = _call(["src.evaluate", "--workdir", wd, *eval_overrides])
    if rc != 0:
        return "failed", f"evaluation failed (exit code {rc})"
    return None


# ---------------------------------------------------------------------------
# Collecting the cells.
# ---------------------------------------------------------------------------

def _checkpoint_iteration(workdir):
    name = report.latest_checkpoint(workdir)
    try:
        return int(name.rsplit("-", 1)[1]) if name else None
    except (IndexError, ValueError):
        return None


def not_run_reason(setting, model, workdir, display, config, iters):
    """Why ``workdir`` (shown as ``display``) has no results.json:
    (short reason for the Table 1 grid, full reason with what to do)."""
    reasons, short = [], []
    absent = config and missing_data(config["dataset"], config["data_dir"])
    if absent:
        reasons.append(absent)
        short.append(f"no {report.DATASET_NAMES.get(config['dataset'], config['dataset'])}"
                     " data: see README")
    if not os.path.isdir(workdir):
        reasons.append(f"no run directory {display}")
        short.append("no run directory")
        if not iters:  # point at shortened runs of the same cell, if any
            parent = os.path.dirname(workdir)
            prefix = workdir_name(setting, model) + "_iters"
            found = sorted(n[len(prefix):] for n in os.listdir(parent)
                           if n.startswith(prefix)) if os.path.isdir(parent) else []
            if found:
                reasons.append("shortened runs exist: collect them with --iters "
                               + " / ".join(found))
    else:
        it = _checkpoint_iteration(workdir)
        configured = config["iterations"] if config else "?"
        if it is None:
            reasons.append(f"training started in {display}, no checkpoint yet")
            short.append("training started, no checkpoint yet")
        else:
            reasons.append(f"trained {it} of {configured} iterations, not evaluated "
                           f"(python -m src.evaluate --workdir {display})")
            short.append(f"trained {it} of {configured} iterations, not evaluated")
    # The grid names the run's state if it has a directory, else the data.
    main = short[-1] if os.path.isdir(workdir) else short[0]
    return f"not run ({main})", "not run: " + "; ".join(reasons)


def _result_notes(r, latest, run_error=None):
    """What a reader of the cell must know about a results.json ``r``:
    shortened or incomplete training, a non-official episode count, an
    earlier checkpoint than ``latest``, and this run's error if any."""
    notes = report.training_notes(r["iterations_trained"], r["iterations_configured"])
    if r["episodes"] != report.OFFICIAL_EPISODES:
        notes.append(f"{r['episodes']} test episodes, paper "
                     f"{report.OFFICIAL_EPISODES}")
    if latest and r.get("checkpoint") and latest != r["checkpoint"]:
        notes.append(f"evaluated at {r['checkpoint']}, latest is {latest}")
    if run_error:
        notes.append(f"this run: {run_error}")
    return notes


def collect_cell(setting, model, runs_root, iters=None, run_error=None):
    """One cell: a dict of the src.report row plus structured fields."""
    name = workdir_name(setting, model, iters)
    display = os.path.join(runs_root, name)
    workdir = _abs(display)
    loaded = report.load_run(workdir)
    config, results, problem = loaded
    row = dict(zip(report.HEAD, report.row(workdir, loaded)))
    row[report.HEAD[0]] = display
    entry = report.paper_numbers(config) if config else None
    cell = {
        "setting": setting, "model": model, "workdir": display,
        "setting_name": report.setting_name(config) if config else setting,
        "model_name": report.model_name(config) if config else model,
        "status": "not run",
        "accuracy": None, "ci95": None, "episodes": None, "mc_samples": None,
        "iterations_trained": None, "iterations_configured": None, "shortened": None,
        "paper": ({"accuracy": entry[0], "ci95": entry[1], "authors_rerun": entry[2]}
                  if entry else None),
        "paper_text": row[PAPER_COL],
    }
    if results is None and os.path.exists(report.results_path(workdir)[1]):
        cell.update(status="error", reason=problem, notes=[], text=problem)
    elif results is not None:
        cell.update(_result_fields(results, workdir, run_error))
        notes = cell["notes"]
        cell["text"] = row[OURS] + (f" ({'; '.join(notes)})" if notes else "")
    else:
        short, reason = not_run_reason(setting, model, workdir, display, config, iters)
        if run_error and run_error not in reason:
            reason += f"; this run: {run_error}"
            short = short[:-1] + f"; {run_error})"
        cell.update(reason=reason, notes=[], text=short)
        row[OURS] = reason
    cell["row"] = row
    return cell


def _result_fields(r, workdir, run_error):
    """The cell fields of a run whose ``results.json`` reads as ``r``."""
    trained = r["iterations_trained"]
    return {
        "status": "ok",
        "accuracy": r["accuracy"], "ci95": r["ci95"],
        "episodes": r["episodes"], "mc_samples": r["mc_samples"],
        "iterations_trained": trained,
        "iterations_configured": r["iterations_configured"],
        "shortened": trained < report.OFFICIAL_ITERATIONS,
        "checkpoint": r.get("checkpoint"),
        "notes": _result_notes(r, report.latest_checkpoint(workdir), run_error),
    }


def collect(runs_root="runs", iters=None, run_errors=None):
    """The sixteen cells, in settings-major order."""
    run_errors = run_errors or {}
    return [collect_cell(s, m, runs_root, iters, run_errors.get((s, m)))
            for s in SETTINGS for m in MODELS]


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------

def _md(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(cells, command=None):
    """Table 1 in the paper's layout, then the per-run detail rows."""
    by_key = {(c["setting"], c["model"]): c for c in cells}
    columns = [next((by_key[(s, m)]["setting_name"] for m in MODELS
                     if (s, m) in by_key), s) for s in SETTINGS]
    lines = [
        "# Table 1: few-shot classification accuracy (%)",
        "",
        "Our meta-test accuracy ± 95% interval (1.96·std/√episodes) beside the "
        "paper's Table 1 (the authors' rerun of their own code in brackets). "
        f"Official protocol: {report.OFFICIAL_ITERATIONS} meta-iterations, "
        f"{report.OFFICIAL_EPISODES} test episodes, S = {report.OFFICIAL_TEST_MC} "
        "noise samples for meta-dropout.",
        "",
    ]
    if command:
        lines += [f"Made by `{command}` on "
                  f"{datetime.datetime.now().isoformat(timespec='seconds')}.", ""]
    lines += ["| model | " + " | ".join(columns) + " |",
              "| --- |" + " --- |" * len(columns)]
    for m in MODELS:
        row_cells = [by_key.get((s, m)) for s in SETTINGS]
        name = next((c["model_name"] for c in row_cells if c), m)
        texts = []
        for c in row_cells:
            if c is None:
                texts.append("-")
                continue
            texts.append(f"ours: {_md(c['text'])}<br>paper: {_md(c['paper_text'])}")
        lines.append(f"| {_md(name)} | " + " | ".join(texts) + " |")
    lines += ["", "## Runs", ""]
    rows = [report.HEAD, ["---"] * len(report.HEAD)]
    rows += [[_md(c["row"][h]) for h in report.HEAD] for c in cells]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_json(cells, args=None):
    return {
        "table": "Meta-Dropout (Lee et al., ICLR 2020), Table 1",
        "settings": list(SETTINGS),
        "models": list(MODELS),
        "official": {"iterations": report.OFFICIAL_ITERATIONS,
                     "episodes": report.OFFICIAL_EPISODES,
                     "test_mc_samples": report.OFFICIAL_TEST_MC},
        "args": args or {},
        "cells": [{k: v for k, v in c.items() if k != "row"} for c in cells],
    }


def _write(path, text):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def _choices(allowed):
    def parse(text):
        items = [s for s in text.replace(",", " ").split() if s]
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m src.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect-only", action="store_true",
                        help="do not train or evaluate; only collect existing results")
    parser.add_argument("--iters", type=int, default=None,
                        help="meta-iterations (shortened runs, workdirs *_iters<N>)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="meta-test episodes (default: the configs' 1000)")
    parser.add_argument("--settings", type=_choices(SETTINGS), default=list(SETTINGS),
                        help="settings to run (comma or space separated; all are "
                             "collected)")
    parser.add_argument("--models", type=_choices(MODELS), default=list(MODELS),
                        help="models to run (comma or space separated; all are "
                             "collected)")
    parser.add_argument("--args", default="",
                        help="extra key=value overrides for src.train (one string)")
    parser.add_argument("--eval-args", default="",
                        help="extra key=value overrides for src.evaluate (one string)")
    parser.add_argument("--runs-root", default="runs",
                        help="folder holding the run directories (default: runs)")
    parser.add_argument("--out-md", default=None,
                        help="markdown output (default: <runs-root>/table1[_iters<N>].md)")
    parser.add_argument("--out-json", default=None,
                        help="JSON output (default: <runs-root>/table1[_iters<N>].json)")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be >= 1")
    if args.episodes is not None and args.episodes < 1:
        parser.error("--episodes must be >= 1")
    suffix = f"_iters{args.iters}" if args.iters else ""
    args.out_md = args.out_md or os.path.join(args.runs_root, f"table1{suffix}.md")
    args.out_json = args.out_json or os.path.join(args.runs_root, f"table1{suffix}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    train_overrides = ([f"iterations={args.iters}"] if args.iters else []) + shlex.split(args.args)
    eval_overrides = (([f"test_episodes={args.episodes}"] if args.episodes else [])
                      + shlex.split(args.eval_args))
    # Check every override before spending hours on the first cell.
    for s in SETTINGS:
        for m in MODELS:
            try:
                load_config(config_path(s, m), train_overrides + eval_overrides)
            except (ConfigError, OSError) as e:
                sys.exit(f"error: {e}")

    run_errors = {}
    if not args.collect_only:
        for s in args.settings:
            for m in args.models:
                workdir = os.path.join(args.runs_root, workdir_name(s, m, args.iters))
                outcome = run_cell(s, m, workdir, train_overrides, eval_overrides)
                if outcome:
                    run_errors[(s, m)] = outcome

    cells = collect(args.runs_root, args.iters,
                    {k: reason for k, (_, reason) in run_errors.items()})
    command = "python -m src.table1 " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    table = markdown(cells, command.strip())
    print(table, end="", flush=True)
    _write(args.out_md, table)
    _write(args.out_json, json.dumps(to_json(cells, {
        "collect_only": args.collect_only, "iters": args.iters,
        "episodes": args.episodes, "runs_root": args.runs_root,
        "train_overrides": train_overrides, "eval_overrides": eval_overrides,
    }), indent=2) + "\n")
    skipped = sum(c["status"] != "ok" for c in cells)
    print(f"{16 - skipped} of 16 cells have results; {skipped} not run")
    failed = [k for k, (kind, _) in run_errors.items() if kind == "failed"]
    if failed:
        print("failed: " + ", ".join(f"{s} {m}" for s, m in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
