"""Tests of src.report on fake run directories (no training)."""

import dataclasses
import json
import os

from src import report
from src import records
from src.config import load_config, save_config

YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yaml")


def fake_run(root, name, overrides=(), trained=None, accuracy=95.5, ci95=0.2,
             episodes=1000, results=True, checkpoint=None):
    """A workdir like src.train + src.evaluate leave: config.yaml,
    checkpoints/checkpoint and (if ``results``) results.json."""
    config = load_config(os.path.join(YAML, name + ".yaml"), overrides)
    workdir = root / name
    (workdir / "checkpoints").mkdir(parents=True)
    save_config(config, workdir / "config.yaml")
    trained = config.iterations if trained is None else trained
    ckpt = checkpoint or f"ckpt-{trained}"
    (workdir / "checkpoints" / "checkpoint").write_text(
        f'model_checkpoint_path: "{ckpt}"\nall_model_checkpoint_paths: "{ckpt}"\n')
    if results:
        (workdir / "results.json").write_text(json.dumps({
            "accuracy": accuracy, "ci95": ci95, "episodes": episodes,
            "mc_samples": config.test_mc_samples if config.noise != "none" else 1,
            "iterations_trained": trained,
            "iterations_configured": config.iterations,
            "test_seed": config.test_seed, "seconds": 1.0,
            "checkpoint": f"ckpt-{trained}",
            "config": dataclasses.asdict(config)}))
    return str(workdir)


def cells(table, workdir):
    """The cells of ``workdir``'s row of a markdown table."""
    for line in table.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if parts[0] == workdir:
            return dict(zip(report.HEAD, parts))
    raise AssertionError(f"no row for {workdir} in\n{table}")


def test_shortened_run_is_marked_and_paper_numbers_appear(tmp_path):
    maml = fake_run(tmp_path, "omniglot_1shot_maml", ["iterations=500"])
    drop = fake_run(tmp_path, "omniglot_1shot_metadrop", accuracy=96.1, ci95=0.15)
    table = report.report([maml, drop])

    row = cells(table, maml)
    assert row["setting"] == "Omniglot 20-way 1-shot"
    assert row["model"] == "MAML"
    assert row["ours (accuracy % ± 95% CI)"] == "95.50 ± 0.20"
    assert "shortened run: 500 of 60000 iterations" in row["iterations trained / configured"]
    assert row["paper Table 1 (authors' rerun)"] == "95.23 ± 0.17 (94.49)"

    row = cells(table, drop)
    assert row["model"] == "MAML + meta-dropout"
    assert row["MC samples"] == "30"
    assert row["iterations trained / configured"] == "60000 / 60000"
    assert "shortened" not in row["iterations trained / configured"]
    assert row["paper Table 1 (authors' rerun)"] == "96.63 ± 0.13 (96.24)"


def test_five_shot_and_interrupted_training(tmp_path):
    run = fake_run(tmp_path, "omniglot_5shot_metadrop", trained=1200, episodes=100)
    row = cells(report.report([run]), run)
    assert row["paper Table 1 (authors' rerun)"] == "98.73 ± 0.06 (98.81)"
    assert "shortened run: 1200 of 60000 iterations" in row["iterations trained / configured"]
    assert "training incomplete: 1200 of 60000 configured" in row["iterations trained / configured"]
    assert row["test episodes"] == "100 (paper: 1000)"


def test_missing_results_says_not_run(tmp_path):
    trained = fake_run(tmp_path, "omniglot_1shot_metadrop", results=False)
    absent = str(tmp_path / "omniglot_5shot_maml_iters50")  # no directory at all
    table = report.report([trained, absent])
    row = cells(table, trained)
    assert row["ours (accuracy % ± 95% CI)"].startswith("not run")
    assert row["paper Table 1 (authors' rerun)"] == "96.63 ± 0.13 (96.24)"
    row = cells(table, absent)
    assert row["ours (accuracy % ± 95% CI)"].startswith("not run")
    assert row["model"] == "MAML"  # from yaml/omniglot_5shot_maml.yaml
    assert row["paper Table 1 (authors' rerun)"] == "98.38 ± 0.07 (98.14)"


def test_unreadable_results_fall_back_to_config_yaml(tmp_path):
    """A results.json that does not parse, or lacks a field, shows as
    unreadable; the row still names the run from its config.yaml."""
    broken = fake_run(tmp_path, "omniglot_1shot_metadrop")
    with open(os.path.join(broken, "results.json"), "w") as f:
        f.write('{"accuracy": 9')  # cut short mid-write
    partial = fake_run(tmp_path, "omniglot_1shot_maml")
    path = os.path.join(partial, "results.json")
    with open(path) as f:
        r = json.load(f)
    del r["episodes"]
    with open(path, "w") as f:
        json.dump(r, f)
    table = report.report([broken, partial])

    row = cells(table, broken)
    assert row["ours (accuracy % ± 95% CI)"].startswith("unreadable results.json (JSONDecodeError")
    assert row["model"] == "MAML + meta-dropout"
    assert row["test episodes"] == "-"
    row = cells(table, partial)
    assert row["ours (accuracy % ± 95% CI)"] == "unreadable results.json (KeyError('episodes'))"
    assert row["model"] == "MAML"


def test_ill_typed_results_are_unreadable_not_a_crash(tmp_path):
    """A field of the wrong type, or a file that holds no object, gives an
    "unreadable" row (the run still named from config.yaml), not a
    traceback from the number formatting."""
    cases = [("omniglot_1shot_maml", {"accuracy": "95.5"}),
             ("omniglot_5shot_maml", {"episodes": 1000.0}),
             ("omniglot_1shot_metadrop", None)]
    texts = []
    for name, change in cases:
        run = fake_run(tmp_path, name)
        path = os.path.join(run, "results.json")
        with open(path) as f:
            r = json.load(f)
        with open(path, "w") as f:
            json.dump({**r, **change} if change else [1, 2], f)
        config, results, problem = report.load_run(run)
        assert results is None and config["noise"] in ("none", "meta_dropout")
        row = dict(zip(report.HEAD, report.row(run)))
        assert row["model"] in ("MAML", "MAML + meta-dropout")
        texts.append(row["ours (accuracy % ± 95% CI)"])
    assert texts == [
        "unreadable results.json (TypeError(\"accuracy is '95.5', not a number\"))",
        "unreadable results.json (TypeError('episodes is 1000.0, not an integer'))",
        "unreadable results.json (TypeError('a list, not an object'))"]


def test_a_row_reads_its_results_file_once(tmp_path, monkeypatch):
    run = fake_run(tmp_path, "omniglot_1shot_maml")
    reads = []
    read = report._read_json
    monkeypatch.setattr(report, "_read_json", lambda p: reads.append(p) or read(p))
    assert report.row(run)[3] == "95.50 ± 0.20"
    assert reads == [os.path.join(run, "results.json")]


def test_paper_table_is_complete():
    for dataset in ("omniglot", "miniimagenet"):
        for shot in (1, 5):
            for learner in ("maml", "meta_sgd"):
                for noise in ("none", "meta_dropout"):
                    assert (dataset, shot, learner, noise) in report.PAPER
    assert report.PAPER[("miniimagenet", 5, "maml", "meta_dropout")] == (67.42, 0.52, 68.12)


def test_main_writes_markdown(tmp_path, capsys):
    run = fake_run(tmp_path, "omniglot_1shot_maml")
    out = tmp_path / "sub" / "table.md"
    assert report.main([run, "--out", str(out)]) == 0
    assert "95.23 ± 0.17 (94.49)" in capsys.readouterr().out
    assert out.read_text().startswith("| run |")


def test_is_fresh(tmp_path):
    run = fake_run(tmp_path, "omniglot_1shot_metadrop")
    assert report.main(["--is-fresh", run]) == 0
    assert report.main(["--is-fresh", run, "test_episodes=100"]) == 1
    stale = fake_run(tmp_path / "b", "omniglot_1shot_metadrop", checkpoint="ckpt-70000")
    assert report.main(["--is-fresh", stale]) == 1
    assert report.main(["--is-fresh", str(tmp_path / "nothing")]) == 1


def write_record(workdir, accs, **changes):
    """results.json and test_accuracies.json as src.evaluate leaves them
    after a test with the config ``changes`` (e.g. test_seed=7)."""
    path = os.path.join(workdir, "results.json")
    results = json.loads(open(path).read())
    results["config"].update(changes)
    results["data"] = {"format_version": 2}
    with open(path, "w") as f:
        json.dump(results, f)
    key = records.record_key(results["config"], results["checkpoint"], results["data"])
    records.save(workdir, key, accs)


def test_paired_difference_on_the_same_episodes(tmp_path):
    """Two runs with records of the same episodes get one paired line: the
    mean and 1.96·std/√n of the per-episode differences, over the common
    prefix; a run tested on other episodes (another test_seed) gets none."""
    maml = fake_run(tmp_path, "omniglot_1shot_maml")
    drop = fake_run(tmp_path, "omniglot_1shot_metadrop")
    other = fake_run(tmp_path, "omniglot_1shot_metasgd")
    write_record(maml, [0.90, 0.80, 1.00, 0.70, 0.5])
    write_record(drop, [0.95, 0.90, 1.00, 0.75])  # interrupted: 4 episodes
    write_record(other, [1.0, 1.0, 1.0, 1.0], test_seed=7)
    # A variant's record beside MAML's own (as `src.evaluate inner_steps=10`
    # leaves it) is not the one paired.
    results = json.loads(open(os.path.join(maml, "results.json")).read())
    records.save(maml, records.record_key({**results["config"], "inner_steps": 10},
                                          results["checkpoint"], results["data"]),
                 [0.0] * 5)
    # By hand: differences in points 5, 10, 0, 5; mean 5; population
    # variance (0 + 25 + 25 + 0) / 4 = 12.5.
    ci = 1.96 * 12.5 ** 0.5 / 2
    table = report.report([maml, drop, other])
    lines = [l for l in table.splitlines() if "(paired)" in l]
    assert lines == [f"{drop} minus {maml} on the same 4 test episodes: "
                     f"+5.00 ± {ci:.2f} points (paired)"]


def test_results_file_of_an_earlier_checkpoint_stands_for_its_run(tmp_path):
    """A results file (results.ckpt-N.json, as ``src.evaluate --checkpoint
    N`` writes) may replace a workdir: its row shows that file's accuracy and
    iterations, and it is paired with the run's latest checkpoint through
    its own record, not the latest one's."""
    run = fake_run(tmp_path, "omniglot_1shot_maml", ["iterations=4000"], trained=4000,
                   accuracy=92.2)
    write_record(run, [1.0, 0.9, 0.8, 0.7])
    latest = json.loads(open(os.path.join(run, "results.json")).read())
    earlier = {**latest, "accuracy": 90.6, "ci95": 0.21, "iterations_trained": 3000,
               "checkpoint": "ckpt-3000"}
    path = os.path.join(run, "results.ckpt-3000.json")
    with open(path, "w") as f:
        json.dump(earlier, f)
    records.save(run, records.record_key(earlier["config"], "ckpt-3000", earlier["data"]),
                 [0.9, 0.9, 0.9, 0.9])

    table = report.report([path, run])
    assert cells(table, path)["ours (accuracy % ± 95% CI)"] == "90.60 ± 0.21"
    assert cells(table, path)["iterations trained / configured"].startswith("3000 / 4000")
    assert cells(table, path)["model"] == "MAML"
    assert cells(table, run)["ours (accuracy % ± 95% CI)"] == "92.20 ± 0.20"
    # Differences in points +10, 0, -10, -20: mean -5, population variance 125.
    ci = 1.96 * 125 ** 0.5 / 2
    assert [l for l in table.splitlines() if "(paired)" in l] == [
        f"{run} minus {path} on the same 4 test episodes: -5.00 ± {ci:.2f} points (paired)"]
    missing = os.path.join(run, "results.ckpt-1000.json")
    assert cells(report.report([missing]), missing)["ours (accuracy % ± 95% CI)"] == \
        "not run (no results.ckpt-1000.json: train, then python -m src.evaluate)"
