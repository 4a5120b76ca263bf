"""End-to-end tests of the command-line entry points (src.train,
src.evaluate) in subprocesses, on a tiny generated Omniglot-shaped dataset
(no ../shared data needed): a smoke run with all its outputs, CLI errors,
and an exact resume after SIGKILL.

Each subprocess pays TensorFlow's start-up and the tracing of the
second-order step (~10-25 s on 2 cores); the whole file takes ~2-3 minutes.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = "yaml/omniglot_1shot_metadrop.yaml"
TINY = ["way=5", "query=2", "inner_steps=1", "meta_batch=2", "ckpt_every=2",
        "log_every=1", "val_every=2", "val_episodes=2", "test_episodes=4",
        "test_mc_samples=2", "eval_batch=2"]
# A guard against a hung subprocess, not a speed check: these runs take
# 20-60 s alone, but several times longer on a CPU shared with training.
TIMEOUT = 900


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.npy uint8 [40, 20, 784] and test.npy uint8 [30, 20, 784]: per
    class a template of 3 random Gaussian blobs, per image a jittered,
    thresholded copy (ink 255 on 0)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    for name, classes in (("train", 40), ("test", 30)):
        out = np.zeros((classes, 20, 784), np.uint8)
        for c in range(classes):
            centres = rng.uniform(5, 23, size=(3, 2))
            for i in range(20):
                jit = centres + rng.normal(scale=1.0, size=centres.shape)
                img = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
                          for cy, cx in jit)
                img = img + rng.normal(scale=0.1, size=img.shape)
                out[c, i] = (img > 0.5).ravel().astype(np.uint8) * 255
        np.save(d / f"{name}.npy", out)
    (d / "manifest.json").write_text(json.dumps(MANIFEST))
    return str(d)


# What data_prep writes beside the arrays (the fields that identify them).
MANIFEST = {"dataset": "omniglot", "format_version": 2, "source": "archives", "seed": 1,
            "sources": [{"name": "images_background.zip", "size": 1, "md5": "0" * 32}],
            "shapes": {"train": [40, 20, 784], "test": [30, 20, 784]}}
SIGNATURE = {k: MANIFEST[k] for k in ("dataset", "format_version", "source", "seed",
                                      "sources")}


def run(module, args, wait=True, timeout=TIMEOUT):
    """Runs ``python -m module args`` from the repo root; returns the
    CompletedProcess (or the Popen if ``wait`` is False)."""
    cmd = [sys.executable, "-m", module, *args]
    kwargs = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(cmd, **kwargs)
    return subprocess.run(cmd, timeout=timeout, **kwargs)


def train_args(workdir, data_dir, *extra):
    return ["--config", CONFIG, "--workdir", str(workdir), *TINY,
            f"data_dir={data_dir}", *extra]


def ok(proc):
    """Asserts a finished subprocess exited 0, showing its output if not."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:],
                                  proc.stderr[-3000:])
    return proc


def read_events(tb_dir):
    """{tag: {step: value}} of every scalar in the TensorBoard event files."""
    import src  # noqa: F401
    import tensorflow as tf
    out = {}
    files = sorted(Path(tb_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {tb_dir}"
    for f in files:
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                value = (float(tf.make_ndarray(v.tensor)) if v.HasField("tensor")
                         else v.simple_value)
                out.setdefault(v.tag, {})[event.step] = value
    return out


def checkpoint_state(workdir):
    """Text of checkpoints/checkpoint ('' if absent)."""
    path = Path(workdir) / "checkpoints" / "checkpoint"
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def read_checkpoint(path):
    """{variable key: numpy value} of a checkpoint (object graph excluded)."""
    import src  # noqa: F401
    import tensorflow as tf
    reader = tf.train.load_checkpoint(path)
    return {k: np.asarray(reader.get_tensor(k))
            for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def ckpt_files(workdir):
    """{file name: mtime_ns} under checkpoints/."""
    d = Path(workdir) / "checkpoints"
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


# ------------------------------------------------------------------ smoke


def test_train_then_evaluate_smoke(tmp_path, data_dir):
    """4 meta-iterations then meta-test through the CLI: the workdir gets the
    resolved config.yaml, train.log with one progress line per iteration and
    validation lines, checkpoints 2 and 4, TensorBoard scalars (train/*,
    val/accuracy, noise/*) at the right steps, and evaluate writes a
    well-formed results.json (accuracy a multiple of 1/40 in [0, 100],
    ci95 >= 0, 4 episodes, S = 2, 4 iterations trained, the config)."""
    w = tmp_path / "run"
    proc = ok(run("src.train", train_args(w, data_dir, "iterations=4")))
    for i in range(1, 5):
        assert f"iter {i}/4" in proc.stdout

    # config.yaml: every key, resolved (yaml chain + overrides).
    saved = yaml.safe_load((w / "config.yaml").read_text())
    assert saved["way"] == 5 and saved["query"] == 2 and saved["iterations"] == 4
    assert saved["noise"] == "meta_dropout" and saved["meta_lr"] == pytest.approx(3e-4)
    assert saved["data_dir"] == data_dir and "base" not in saved

    log = (w / "train.log").read_text()
    progress = re.findall(r"^iter (\d+)/4  loss ([\d.]+)  acc ([\d.]+)%", log, re.M)
    assert [int(p[0]) for p in progress] == [1, 2, 3, 4]
    for _, loss, acc in progress:
        assert 0 < float(loss) < 20 and 0 <= float(acc) <= 100
    assert len(re.findall(r"^iter [24]: validation accuracy [\d.]+% on 2 fixed episodes",
                          log, re.M)) == 2

    state = checkpoint_state(w)
    assert 'model_checkpoint_path: "ckpt-4"' in state
    for n in (2, 4):
        assert (w / "checkpoints" / f"ckpt-{n}.index").exists()

    events = read_events(w / "tb")
    for tag in ("train/loss", "train/accuracy", "train/grad_norm",
                "train/learning_rate", "train/iters_per_sec"):
        assert sorted(events.get(tag, {})) == [1, 2, 3, 4], (tag, sorted(events))
    assert sorted(events["val/accuracy"]) == [2, 4]
    assert all(v == pytest.approx(3e-4) for v in events["train/learning_rate"].values())
    assert all(0 <= v <= 1 for v in events["train/accuracy"].values())
    assert all(0 <= v <= 1 for v in events["val/accuracy"].values())
    assert all(v > 0 and np.isfinite(v) for t in ("train/loss", "train/grad_norm",
                                                  "train/iters_per_sec")
               for v in events[t].values())
    for b in range(1, 5):
        for stat in ("mean", "std"):
            tag = f"noise/block{b}/mask_{stat}"
            assert sorted(events.get(tag, {})) == [1, 2, 3, 4], tag
        # softplus(alpha) > 0; near softplus(0) = 0.69 after a few tiny steps.
        assert all(0.3 < v < 1.5 for v in events[f"noise/block{b}/mask_mean"].values())

    # Meta-test.
    proc = ok(run("src.evaluate", ["--workdir", str(w), "test_episodes=4"]))
    results = json.loads((w / "results.json").read_text())
    assert 0 <= results["accuracy"] <= 100
    # 4 episodes x 10 query images: the mean is a multiple of 100/40.
    assert abs(results["accuracy"] * 40 / 100 - round(results["accuracy"] * 40 / 100)) < 1e-3
    assert results["ci95"] >= 0
    assert results["episodes"] == 4
    assert results["mc_samples"] == 2
    assert results["iterations_trained"] == 4
    assert results["checkpoint"] == "ckpt-4"
    assert isinstance(results["config"], dict)
    assert {k: v for k, v in results["config"].items()} == saved
    assert f"{results['accuracy']:.2f}" in proc.stdout
    # The run is tied to the data it was trained on.
    assert results["data"] == SIGNATURE
    assert json.loads((w / "data.json").read_text()) == SIGNATURE

    # The per-episode record: 4 accuracies, multiples of 1/10, whose mean
    # is the reported accuracy.
    def recorded():  # {inner_steps: accuracies} of the records in the file
        content = json.loads((w / "test_accuracies.json").read_text())
        return {r["key"]["config"]["inner_steps"]: r["accuracies"]
                for r in content["records"]}

    assert list(recorded()) == [1]
    accs = np.array(recorded()[1])
    assert accs.shape == (4,)
    np.testing.assert_allclose(accs * 10, np.round(accs * 10), atol=1e-6)
    assert 100 * accs.mean() == pytest.approx(results["accuracy"], abs=1e-4)
    assert results["episodes_resumed"] == 0

    # An evaluation killed after its first batch (eval_batch=2) continues:
    # the recorded episodes are kept (sentinels here, to prove they are not
    # recomputed) and the second batch comes out as in the uninterrupted run.
    content = json.loads((w / "test_accuracies.json").read_text())
    content["records"][0]["accuracies"] = [0.0, 1.0]
    (w / "test_accuracies.json").write_text(json.dumps(content))
    proc = ok(run("src.evaluate", ["--workdir", str(w), "test_episodes=4"]))
    assert "continuing from 2 episodes" in proc.stdout
    resumed = json.loads((w / "results.json").read_text())
    assert resumed["episodes"] == 4 and resumed["episodes_resumed"] == 2
    expected = np.concatenate([[0.0, 1.0], accs[2:]])
    assert resumed["accuracy"] == pytest.approx(100 * expected.mean(), abs=1e-4)
    np.testing.assert_allclose(recorded()[1], expected)

    # A shorter test is served from the record, which keeps its 4 episodes.
    ok(run("src.evaluate", ["--workdir", str(w), "test_episodes=2"]))
    short = json.loads((w / "results.json").read_text())
    assert short["episodes"] == 2 and short["accuracy"] == pytest.approx(50.0)
    assert len(recorded()[1]) == 4

    # A variant (a model key overridden at test) writes its own results
    # file and record, and leaves the run's own untouched.
    proc = ok(run("src.evaluate", ["--workdir", str(w), "test_episodes=2", "inner_steps=2"]))
    assert "results.inner_steps=2.json" in proc.stdout
    variant = json.loads((w / "results.inner_steps=2.json").read_text())
    assert variant["variant"] == "inner_steps=2" and variant["episodes"] == 2
    assert variant["config"]["inner_steps"] == 2 and variant["episodes_resumed"] == 0
    assert json.loads((w / "results.json").read_text()) == short
    assert sorted(recorded()) == [1, 2] and len(recorded()[2]) == 2
    np.testing.assert_allclose(recorded()[1], expected)


def test_kept_checkpoints_and_testing_an_earlier_one(tmp_path, data_dir):
    """ckpt_every=1, ckpt_keep_every=2, 5 iterations: checkpoints/ holds the
    last three (3, 4, 5) and checkpoints/kept/ every second one (2, 4), each
    the state of its iteration (step and Adam's count; the kept 4 equal to
    checkpoints/ckpt-4 in every variable).  ``src.evaluate --checkpoint 2``
    tests the kept one into results.ckpt-2.json with its own record;
    naming the latest writes results.json; a missing one is an error that
    lists the iterations available."""
    w = tmp_path / "run"
    ok(run("src.train", train_args(w, data_dir, "iterations=5", "ckpt_every=1",
                                   "ckpt_keep_every=2")))
    index = lambda d: sorted(p.name for p in d.glob("ckpt-*.index"))
    assert index(w / "checkpoints") == ["ckpt-3.index", "ckpt-4.index", "ckpt-5.index"]
    assert index(w / "checkpoints" / "kept") == ["ckpt-2.index", "ckpt-4.index"]
    kept2 = read_checkpoint(str(w / "checkpoints" / "kept" / "ckpt-2"))
    kept4 = read_checkpoint(str(w / "checkpoints" / "kept" / "ckpt-4"))
    main4 = read_checkpoint(str(w / "checkpoints" / "ckpt-4"))
    for state, n in ((kept2, 2), (kept4, 4)):
        assert int(state["step/.ATTRIBUTES/VARIABLE_VALUE"]) == n
        assert int(state["learner/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == n
    # save_counter counts saves, not iterations: the kept copy is one more.
    same = [k for k in main4 if not k.startswith("save_counter")]
    assert all(np.array_equal(kept4[k], main4[k]) for k in same)
    weights = [k for k in kept2 if k.startswith("learner/variables_list/")]
    assert any(not np.array_equal(kept2[k], kept4[k]) for k in weights)

    proc = ok(run("src.evaluate", ["--workdir", str(w), "--checkpoint", "2",
                                   "test_episodes=2"]))
    assert "results.ckpt-2.json" in proc.stdout and not (w / "results.json").exists()
    earlier = json.loads((w / "results.ckpt-2.json").read_text())
    assert earlier["iterations_trained"] == 2 and earlier["checkpoint"] == "ckpt-2"
    assert earlier["episodes"] == 2 and "variant" not in earlier
    ok(run("src.evaluate", ["--workdir", str(w), "--checkpoint", "5", "test_episodes=2"]))
    latest = json.loads((w / "results.json").read_text())
    assert latest["iterations_trained"] == 5 and latest["checkpoint"] == "ckpt-5"
    content = json.loads((w / "test_accuracies.json").read_text())
    assert sorted(r["key"]["checkpoint"] for r in content["records"]) == ["ckpt-2", "ckpt-5"]

    proc = run("src.evaluate", ["--workdir", str(w), "--checkpoint", "1"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no checkpoint of iteration 1" in proc.stderr
    assert "available: 2, 3, 4, 5" in proc.stderr


def test_unknown_key_on_cli_fails_and_names_it(tmp_path, data_dir):
    """An unknown key=value on the train CLI exits non-zero with a message
    naming the key (and listing valid ones), before creating the workdir."""
    w = tmp_path / "never"
    proc = run("src.train", train_args(w, data_dir, "inner_lrr=0.1"))
    assert proc.returncode != 0
    assert "inner_lrr" in proc.stderr and "unknown config key" in proc.stderr
    assert "inner_lr," in proc.stderr  # the list of valid keys
    assert "Traceback" not in proc.stderr
    assert not w.exists()


def test_train_and_evaluate_refuse_data_changed_since_training(tmp_path, data_dir):
    """A run recorded on format-1 data (e.g. before a data_prep change) is
    neither resumed nor evaluated on the re-prepared data: both exit
    non-zero naming the manifest field that differs, before any TF work, and
    leave the run's files as they were."""
    from src.config import load_config, save_config
    w = tmp_path / "old_run"
    w.mkdir()
    old = {**SIGNATURE, "format_version": 1}
    (w / "data.json").write_text(json.dumps(old))
    save_config(load_config(CONFIG, TINY + [f"data_dir={data_dir}"]), str(w / "config.yaml"))
    before = {p.name: p.read_text() for p in w.iterdir()}
    for module, args in (("src.train", train_args(w, data_dir)),
                         ("src.evaluate", ["--workdir", str(w)])):
        proc = run(module, args)
        assert proc.returncode != 0, module
        assert "not the data this run was trained on" in proc.stderr, proc.stderr
        assert "format_version" in proc.stderr and "Traceback" not in proc.stderr
        assert {p.name: p.read_text() for p in w.iterdir()} == before


# ----------------------------------------------------------------- resume


def test_resume_after_sigkill_is_exact(tmp_path, data_dir):
    """deterministic_ops=true (which also runs one op at a time, see the next
    test), 6 iterations, checkpoints every 2: run A uninterrupted; run B SIGKILLed once a checkpoint (2 or 4) exists,
    then rerun to completion.  Every variable of the final checkpoints of A
    and B (weights, Adam slots and iteration count, step, sampler state) is
    bitwise identical.  Rerunning the finished B trains nothing and writes no
    checkpoint; resuming B with a changed inner_lr is refused, naming the
    key, and leaves the run untouched."""
    args = lambda w: train_args(w, data_dir, "iterations=6", "deterministic_ops=true")
    wa, wb = tmp_path / "A", tmp_path / "B"

    # B first (killed), then A, so that the two never compete for the CPU.
    proc = run("src.train", args(wb), wait=False)
    deadline = time.time() + TIMEOUT
    state = ""
    try:
        while time.time() < deadline and proc.poll() is None:
            state = checkpoint_state(wb)
            if "ckpt-" in state:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out[-2000:], err[-2000:])
    killed_at = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', state).group(1))
    assert killed_at in (2, 4), state
    assert "iter 6/6" not in out

    resumed = ok(run("src.train", args(wb)))
    latest = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"',
                           checkpoint_state(wb)).group(1))
    assert latest == 6
    m = re.search(r"resumed from \S+ckpt-(\d+) at iteration (\d+)", resumed.stdout)
    assert m and int(m.group(2)) == int(m.group(1)) >= killed_at, resumed.stdout
    start = int(m.group(2))
    assert [int(i) for i in re.findall(r"^iter (\d+)/6 ", resumed.stdout, re.M)] == \
        list(range(start + 1, 7))

    ok(run("src.train", args(wa)))

    a = read_checkpoint(str(wa / "checkpoints" / "ckpt-6"))
    b = read_checkpoint(str(wb / "checkpoints" / "ckpt-6"))
    assert set(a) == set(b)
    slots = [k for k in a if k.startswith("learner/optimizer/_variables/")]
    assert len(slots) == 2 * len([k for k in a if k.startswith("learner/variables_list/")])
    assert int(a["learner/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    assert int(a["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    diffs = {}
    for k in sorted(a):
        if a[k].dtype.kind in "fc":
            d = float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0
            if d > 0:
                diffs[k] = d
        elif not np.array_equal(a[k], b[k]):
            diffs[k] = "differs"
    assert not diffs, f"A and B differ in {len(diffs)} of {len(a)} variables: {diffs}"
    # Training really moved the weights (the comparison is not vacuous).
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k in slots)

    # A finished run: rerunning trains nothing and writes no checkpoint.
    before_files, before_log = ckpt_files(wb), (wb / "train.log").read_text()
    again = ok(run("src.train", args(wb)))
    assert re.search(r"resumed from \S+ckpt-6 at iteration 6", again.stdout)
    assert not re.search(r"^iter \d+/6 ", again.stdout, re.M)
    assert ckpt_files(wb) == before_files
    assert (wb / "train.log").read_text().startswith(before_log)

    # A changed non-resumable key is refused.
    config_before = (wb / "config.yaml").read_text()
    refused = run("src.train", args(wb) + ["inner_lr=0.2"])
    assert refused.returncode != 0
    assert "inner_lr" in refused.stderr and "different config" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert ckpt_files(wb) == before_files
    assert (wb / "config.yaml").read_text() == config_before


REPEAT_GRADIENTS = """
import sys
import numpy as np
import src
import tensorflow as tf
from src import data as data_lib
from src.config import load_config
from src.train import build, configure_tensorflow
cfg = load_config("yaml/omniglot_1shot_metadrop.yaml", sys.argv[2:])
configure_tensorflow(cfg)
images = data_lib.load_split(sys.argv[1] + "/train.npy")
batch = data_lib.EpisodeSampler(images, (28, 28, 1), cfg.way, cfg.shot,
                                cfg.query, seed=0).sample(cfg.meta_batch)
model, learner = build(cfg)
step = tf.function(learner.meta_gradients)
runs = [[g.numpy() for g in step(batch, tf.constant([0, 1], tf.int64))[2]]
        for _ in range(4)]
print("MAXDIFF", max(float(np.abs(a - b).max())
                     for r in runs[1:] for a, b in zip(r, runs[0])))
"""


def test_meta_gradient_repeatable_with_deterministic_ops(data_dir):
    """With deterministic_ops=true (one inter-op thread), four evaluations
    of the compiled meta-gradient on the same 20-way batch are bitwise equal.
    (Measured: with TensorFlow's default inter-op pool they differ by up to
    ~1e-7 from call to call at 20-way sizes even with deterministic_ops=true
    -- the forward loss is identical, the gradients are not -- and Adam
    amplifies that to ~5e-4 weight differences after 2 iterations.)"""
    proc = ok(subprocess.run(
        [sys.executable, "-c", REPEAT_GRADIENTS, data_dir, "way=20", "query=2",
         "inner_steps=1", "meta_batch=2", "deterministic_ops=true"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT))
    assert float(re.search(r"MAXDIFF (\S+)", proc.stdout).group(1)) == 0.0
