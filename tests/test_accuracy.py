"""Slow accuracy checks (``make test-slow``; not in the default suite).

Each test prepares the real Omniglot from ../shared/data/omniglot (skipped
where absent), trains one model through the real CLI at the official
settings and episode shapes for 200 meta-iterations, and tests it on the
first 100 of the 1000 fixed test episodes (S = 30 for meta-dropout).  They
catch what breaks learning without breaking a gradient identity: a wrong
data protocol, a sampler or label bug, a lost meta-gradient term.

The floors are set against measured runs (docs/experiments.md), not against
this code's own output at the time of writing:
  * MAML's official seed-0 run had 84.3% training query accuracy at 200
    iterations; the same run with batch norm through ``tf.nn.moments`` (its
    variance against a stopped mean: a wrong second derivative) had 72.0%.
    Floor: 78%.
  * Meta-dropout (meta lr 3e-4, a third of MAML's) had 83.2% at 250
    iterations.  Floor: 75%.

Cost on 2 CPU cores (AMD EPYC): MAML about 10 minutes, meta-dropout about
30 (its meta-test adapts on 30 noise samples per inner step).
"""

import json

import pytest

from tests.test_cli import ok, run

ITERATIONS = 200
EPISODES = 100
# A guard against a hung subprocess, not a speed check.
TIMEOUT = 3 * 3600


@pytest.mark.slow
@pytest.mark.parametrize("config, mc_samples, floor", [
    ("yaml/omniglot_1shot_maml.yaml", 1, 78.0),
    ("yaml/omniglot_1shot_metadrop.yaml", 30, 75.0),
])
def test_omniglot_1shot_learns(real_out, tmp_path, config, mc_samples, floor):
    _, omniglot_dir = real_out
    workdir = tmp_path / "run"
    ok(run("src.train", ["--config", config, "--workdir", str(workdir),
                         f"data_dir={omniglot_dir}", f"iterations={ITERATIONS}",
                         f"ckpt_every={ITERATIONS}", "log_every=50", "val_every=0"],
           timeout=TIMEOUT))
    ok(run("src.evaluate", ["--workdir", str(workdir), f"test_episodes={EPISODES}"],
           timeout=TIMEOUT))
    results = json.loads((workdir / "results.json").read_text())
    assert results["iterations_trained"] == ITERATIONS
    assert results["episodes"] == EPISODES
    assert results["mc_samples"] == mc_samples
    print(f"{config}: {results['accuracy']:.2f} ± {results['ci95']:.2f}% after "
          f"{ITERATIONS} iterations, {EPISODES} test episodes")
    assert results["accuracy"] >= floor, results
