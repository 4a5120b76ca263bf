"""Tests of src.table1 on fake run directories (no TensorFlow, no training).

The runs root is a tmp_path; ``table1.ROOT`` (where a config's relative
data_dir is looked up) points into tmp_path too, so that no dataset is
present whatever the machine holds.
"""

import json
import os
import shutil

import pytest

from src import report, table1
from tests.test_report import fake_run

OURS = report.HEAD[3]
ITERS = report.HEAD[6]


@pytest.fixture(autouse=True)
def no_data(tmp_path, monkeypatch):
    """Relative data_dirs resolve into an empty folder: no dataset anywhere."""
    monkeypatch.setattr(table1, "ROOT", str(tmp_path / "repo"))


def shortened_run(root, setting, model, iters, **kwargs):
    """A run as `make <setting> ITERS=iters` leaves it: <root>/<name>_iters<N>."""
    name = f"{setting}_{model}"
    made = fake_run(root / "tmp", name, [f"iterations={iters}"], **kwargs)
    target = root / table1.workdir_name(setting, model, iters)
    shutil.move(made, target)
    return str(target)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    fake_run(root, "omniglot_1shot_maml", accuracy=95.1, ci95=0.2)
    # A short run in the full run's workdir (configured iterations=500).
    fake_run(root, "omniglot_1shot_metadrop", ["iterations=500"], accuracy=90.0)
    # Trained, not evaluated.
    fake_run(root, "omniglot_5shot_metasgd", results=False, trained=1200)
    fake_run(root, "miniimagenet_5shot_metadrop", accuracy=66.0, ci95=0.5, episodes=100)
    shortened_run(root, "miniimagenet_1shot", "maml", 500, accuracy=40.0)
    # A full run stopped at 30000 iterations and evaluated there.
    fake_run(root, "miniimagenet_5shot_maml", trained=30000, accuracy=63.0)
    return root


def by_key(cells):
    return {(c["setting"], c["model"]): c for c in cells}


def test_collect_sixteen_cells(runs):
    cells = table1.collect(str(runs))
    assert len(cells) == 16
    assert {(c["setting"], c["model"]) for c in cells} == {
        (s, m) for s in table1.SETTINGS for m in table1.MODELS}
    for c in cells:  # paper numbers for every cell, from src.report.PAPER
        assert c["paper"] is not None and c["paper"]["accuracy"] > 40
    cell = by_key(cells)

    full = cell[("omniglot_1shot", "maml")]
    assert full["status"] == "ok" and full["accuracy"] == 95.1
    assert full["shortened"] is False and full["iterations_trained"] == 60000
    assert full["paper"] == {"accuracy": 95.23, "ci95": 0.17, "authors_rerun": 94.49}
    assert full["text"] == "95.10 ± 0.20"

    short = cell[("omniglot_1shot", "metadrop")]
    assert short["status"] == "ok" and short["shortened"] is True
    assert "shortened run: 500 of 60000 iterations" in short["text"]
    assert "shortened run: 500 of 60000 iterations" in short["row"][ITERS]

    pending = cell[("omniglot_5shot", "metasgd")]
    assert pending["status"] == "not run"
    assert pending["text"] == "not run (trained 1200 of 60000 iterations, not evaluated)"
    assert "no Omniglot data" in pending["reason"]

    few = cell[("miniimagenet_5shot", "metadrop")]
    assert few["status"] == "ok" and few["text"] == "66.00 ± 0.50 (100 test episodes, paper 1000)"
    assert few["paper_text"] == "67.42 ± 0.52 (68.12)"

    partial = cell[("miniimagenet_5shot", "maml")]
    assert partial["status"] == "ok" and partial["shortened"] is True
    assert partial["text"] == ("63.00 ± 0.20 (shortened run: 30000 of 60000 iterations; "
                               "training incomplete: 30000 of 60000 configured)")

    absent = cell[("omniglot_5shot", "maml")]
    assert absent["status"] == "not run" and absent["accuracy"] is None
    assert absent["text"].startswith("not run (")
    assert "no Omniglot data" in absent["reason"]

    mini = cell[("miniimagenet_1shot", "maml")]  # only a shortened run exists
    assert mini["status"] == "not run"
    assert mini["text"] == "not run (no miniImageNet data: see README)"
    assert "shortened runs exist: collect them with --iters 500" in mini["reason"]


def test_collect_shortened_runs(runs):
    cell = by_key(table1.collect(str(runs), iters=500))
    mini = cell[("miniimagenet_1shot", "maml")]
    assert mini["workdir"] == os.path.join(str(runs), "miniimagenet_1shot_maml_iters500")
    assert mini["status"] == "ok" and mini["shortened"] is True
    assert mini["accuracy"] == 40.0 and mini["iterations_configured"] == 500
    assert "shortened run: 500 of 60000 iterations" in mini["text"]
    assert cell[("omniglot_1shot", "maml")]["status"] == "not run"  # no _iters500 dir


def table_rows(md, header_start):
    """The rows (lists of cells) of the markdown table whose header row starts
    with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_main_collect_only_writes_markdown_and_json(runs, tmp_path, capsys):
    md_path, json_path = tmp_path / "out" / "t1.md", tmp_path / "out" / "t1.json"
    assert table1.main(["--collect-only", "--runs-root", str(runs),
                        "--out-md", str(md_path), "--out-json", str(json_path)]) == 0
    # The miniImageNet 1-shot run is a shortened one (_iters500): not collected.
    assert "4 of 16 cells have results" in capsys.readouterr().out
    md = md_path.read_text()

    grid = table_rows(md, "| model |")
    assert grid[0] == ["model", "Omniglot 20-way 1-shot", "Omniglot 20-way 5-shot",
                       "miniImageNet 5-way 1-shot", "miniImageNet 5-way 5-shot"]
    assert grid[1] == ["---"] * 5
    assert [r[0] for r in grid[2:]] == ["MAML", "Meta-SGD", "MAML + meta-dropout",
                                        "Meta-SGD + meta-dropout"]
    assert all(len(r) == 5 for r in grid)
    maml, metasgd, metadrop, both = grid[2:]
    assert maml[1] == "ours: 95.10 ± 0.20<br>paper: 95.23 ± 0.17 (94.49)"
    assert "shortened run" in metadrop[1] and "96.63 ± 0.13 (96.24)" in metadrop[1]
    assert metasgd[3].startswith("ours: not run (no miniImageNet data")
    assert "paper: 50.87 ± 0.63" in both[3]

    detail = table_rows(md, "| run |")
    assert detail[0] == report.HEAD and len(detail) == 2 + 16
    assert all(len(r) == len(report.HEAD) for r in detail)

    data = json.loads(json_path.read_text())
    assert len(data["cells"]) == 16 and data["args"]["collect_only"] is True
    assert sum(c["status"] == "ok" for c in data["cells"]) == 4
    assert all(c["paper"] for c in data["cells"])
    assert all(c["reason"].startswith("not run") for c in data["cells"]
               if c["status"] != "ok")


def test_default_outputs_follow_iters(tmp_path):
    args = table1.parse_args(["--runs-root", str(tmp_path), "--iters", "50"])
    assert args.out_md == os.path.join(str(tmp_path), "table1_iters50.md")
    assert args.out_json == os.path.join(str(tmp_path), "table1_iters50.json")
    assert table1.parse_args([]).out_md == os.path.join("runs", "table1.md")
    with pytest.raises(SystemExit):
        table1.parse_args(["--models", "maml,bogus"])


def test_run_skips_cells_without_data(tmp_path, monkeypatch, capsys):
    def no_subprocess(args):
        raise AssertionError(f"ran {args} although the data are absent")
    monkeypatch.setattr(table1, "_call", no_subprocess)
    root = tmp_path / "runs"
    rc = table1.main(["--runs-root", str(root), "--settings", "miniimagenet_1shot",
                      "--models", "maml,metadrop", "--iters", "2", "--episodes", "2"])
    assert rc == 0
    assert "skipped, no miniImageNet data" in capsys.readouterr().out
    data = json.loads((root / "table1_iters2.json").read_text())
    cell = by_key(data["cells"])[("miniimagenet_1shot", "metadrop")]
    assert cell["text"] == "not run (no miniImageNet data: see README)"
    assert data["args"]["train_overrides"] == ["iterations=2"]
    assert data["args"]["eval_overrides"] == ["test_episodes=2"]


def test_run_reports_failures(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(table1, "missing_data", lambda dataset, data_dir: None)
    monkeypatch.setattr(table1, "_call", lambda args: calls.append(args) or 3)
    root = tmp_path / "runs"
    rc = table1.main(["--runs-root", str(root), "--settings", "omniglot_5shot",
                      "--models", "metasgd", "--args", "val_every=0"])
    assert rc == 1
    assert calls[0][:2] == ["src.train", "--config"] and calls[0][-1] == "val_every=0"
    cell = by_key(json.loads((root / "table1.json").read_text())["cells"])[
        ("omniglot_5shot", "metasgd")]
    assert cell["status"] == "not run" and "training failed (exit code 3" in cell["text"]


def test_bad_override_fails_before_running(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'bogus'"):
        table1.main(["--runs-root", str(tmp_path), "--args", "bogus=1"])


def test_unreadable_results_make_an_error_cell(runs):
    with open(runs / "omniglot_1shot_maml" / "results.json", "w") as f:
        f.write("not json")
    cell = by_key(table1.collect(str(runs)))[("omniglot_1shot", "maml")]
    assert cell["status"] == "error" and cell["accuracy"] is None
    assert cell["text"].startswith("unreadable results.json (JSONDecodeError")
    assert cell["model_name"] == "MAML"  # from the run's config.yaml
