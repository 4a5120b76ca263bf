"""The benchmark's profile: op thread times read from a tf.profiler XSpace
(checked on a hand-built XSpace whose totals are known), overall and for
each block's convolutions; its convolution FLOP count, overall and by block
(checked against counts by hand on small graphs); and profiled and
meta-test runs through the real CLI (subprocesses; ~15-60 s each on 2
cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tensorflow as tf

from src.bench import (by_block, conv_block_table, conv_gflop, conv_ops, conv_rate,
                       matmul_ceiling, op_events, op_thread_times, parse_args, print_report,
                       write_report)

REPO = Path(__file__).resolve().parents[1]


def _xspace(path):
    """Two compute threads and a python thread; durations in ps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = {1: ("ExecutorState::Process", ""),
             2: ("block2/add_3:_MklNativeFusedConv2D", "_MklNativeFusedConv2D"),
             3: ("block1/mul_7:Mul", "Mul"),
             4: ("block1/Softplus_2:Softplus", ""),   # no display name
             5: ("train_step", ""),
             6: ("gradient_tape/block1/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter", ""),
             7: ("gradient_tape/gradient_tape/block2/Conv2D:Conv2D", "Conv2D")}
    for i, (name, display) in names.items():
        plane.event_metadata[i].id = i
        plane.event_metadata[i].name = name
        plane.event_metadata[i].display_name = display
    events = {"tf_Compute/11": [(1, 0, 9_000_000), (2, 1_000, 6_000_000),
                                (3, 7_000_000, 1_000_000)],
              "tf_Compute/12": [(1, 0, 5_000_000), (2, 0, 2_000_000),
                                (4, 2_000_000, 3_000_000), (6, 5_000_000, 4_000_000),
                                (7, 9_000_000, 500_000)],
              "python": [(5, 0, 50_000_000)]}
    for line_name, evs in events.items():
        line = plane.lines.add(name=line_name)
        for meta, offset, duration in evs:
            line.events.add(metadata_id=meta, offset_ps=offset, duration_ps=duration)
    other = space.planes.add(name="/host:metadata")
    other.lines.add(name="tf_Compute/99").events.add(metadata_id=1, duration_ps=10**12)
    with open(path, "wb") as f:
        f.write(space.SerializeToString())


def test_op_thread_times_sums_ops_per_step(tmp_path):
    path = tmp_path / "x.xplane.pb"
    _xspace(path)
    times = op_thread_times(op_events(str(path)), steps=2)
    # Executor spans, the python thread and other planes are not op time.
    assert list(times) == ["_MklNativeFusedConv2D", "_MklNativeConv2DBackpropFilter",
                           "Softplus", "Mul", "Conv2D"]
    assert times["_MklNativeFusedConv2D"] == pytest.approx((6e-6 + 2e-6) / 2)
    assert times["_MklNativeConv2DBackpropFilter"] == pytest.approx(4e-6 / 2)
    assert times["Softplus"] == pytest.approx(3e-6 / 2)
    assert times["Mul"] == pytest.approx(1e-6 / 2)
    assert times["Conv2D"] == pytest.approx(0.5e-6 / 2)


def test_convolution_thread_times_by_block(tmp_path):
    """The profile's convolutions grouped by the block in their op name and
    by kind, whatever oneDNN or the graph optimiser renamed their type to."""
    path = tmp_path / "x.xplane.pb"
    _xspace(path)
    got = by_block(op_events(str(path)))
    zero = {"Conv2D": 0.0, "Conv2DBackpropInput": 0.0, "Conv2DBackpropFilter": 0.0}
    assert got == {"block1": {**zero, "Conv2DBackpropFilter": pytest.approx(4e-6)},
                   "block2": {**zero, "Conv2D": pytest.approx(8e-6 + 0.5e-6)}}


# x [2, 5, 5, 3] * w [3, 3, 3, 4], SAME: 2 * (2*5*5*4 outputs) * (3*3*3 taps).
CONV_FLOP = 2 * (2 * 5 * 5 * 4) * (3 * 3 * 3) / 1e9


def _conv_graph_inputs():
    return (tf.TensorSpec([2, 5, 5, 3], tf.float32),
            tf.TensorSpec([3, 3, 3, 4], tf.float32))


def test_conv_gflop_counts_only_what_runs():
    """A kernel gradient needs the forward convolution and one filter
    gradient; the input gradient taken beside it but not returned is pruned
    by TensorFlow, so it must not count."""
    @tf.function(input_signature=_conv_graph_inputs())
    def kernel_grad(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME") ** 2)
        gx, gw = tape.gradient(loss, [x, w])
        del gx
        return gw

    got = conv_gflop(conv_ops(kernel_grad.get_concrete_function()))
    assert got == pytest.approx({"Conv2D": CONV_FLOP, "Conv2DBackpropInput": 0.0,
                                 "Conv2DBackpropFilter": CONV_FLOP})


def test_conv_gflop_second_order_and_stateful_outputs():
    """A gradient of a gradient (as in MAML), consumed only by a variable
    assignment: the forward convolution, the inner input gradient, and the
    outer derivative of that input gradient with respect to the kernel (a
    filter gradient) and to its incoming gradient (a convolution)."""
    v = tf.Variable(tf.zeros([3, 3, 3, 4]))

    @tf.function(input_signature=_conv_graph_inputs())
    def second_order(x, w):
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME") ** 2)
            gx = inner.gradient(loss, x)
            meta = tf.reduce_sum(gx ** 2)
        v.assign(outer.gradient(meta, w))

    got = conv_gflop(conv_ops(second_order.get_concrete_function()))
    # Forward conv; its input gradient (inner); the outer pass differentiates
    # the input gradient (a filter gradient and a convolution) and, through
    # dy = 2y, the forward conv again (one more filter gradient).
    assert got == pytest.approx({"Conv2D": 2 * CONV_FLOP,
                                 "Conv2DBackpropInput": CONV_FLOP,
                                 "Conv2DBackpropFilter": 2 * CONV_FLOP})


def test_conv_gflop_by_block():
    """Two blocks of different sizes, named as the model names its layers,
    sharing one kernel.  The gradient of a sum needs neither the sum nor
    block2's output, so block2's forward convolution is pruned; block2 runs
    an input gradient (towards block1) and a filter gradient, block1 its
    forward convolution (block2's input) and a filter gradient."""
    @tf.function(input_signature=_conv_graph_inputs())
    def two_blocks(x, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            with tf.name_scope("block1"):
                h = tf.nn.conv2d(x, w[:, :, :, :3], 1, "SAME")
            with tf.name_scope("block2"):
                loss = tf.reduce_sum(tf.nn.conv2d(h, w, 1, "SAME"))
        return tape.gradient(loss, w)

    got = by_block(conv_ops(two_blocks.get_concrete_function()))
    # block1 has 3 output channels, block2 4; both have 3 input channels.
    assert got == {
        "block1": pytest.approx({"Conv2D": CONV_FLOP * 3 / 4, "Conv2DBackpropInput": 0.0,
                                 "Conv2DBackpropFilter": CONV_FLOP * 3 / 4}),
        "block2": pytest.approx({"Conv2D": 0.0, "Conv2DBackpropInput": CONV_FLOP,
                                 "Conv2DBackpropFilter": CONV_FLOP})}


def test_conv_block_table():
    gflop = {"block1": {"Conv2D": 6.0, "Conv2DBackpropInput": 0.0, "Conv2DBackpropFilter": 3.0}}
    thread_s = {"block1": {"Conv2D": 0.1, "Conv2DBackpropInput": 0.0,
                           "Conv2DBackpropFilter": 0.2},
                "other": {"Conv2D": 0.5, "Conv2DBackpropInput": 0.0,
                          "Conv2DBackpropFilter": 0.0}}
    lines = conv_block_table(gflop, thread_s).splitlines()
    assert lines[2].split() == ["block1", "6.0", "@", "60.0", "0.0", "@", "-", "3.0", "@", "15.0"]
    assert lines[3].split() == ["other", "0.0", "@", "-", "0.0", "@", "-", "0.0", "@", "-"]


def test_conv_rate_and_ceiling():
    train = {"conv_gflop": {"Conv2D": 60.0, "Conv2DBackpropFilter": 40.0}, "median_s": 2.0}
    assert conv_rate(train) == "100.0 @ 50.0"
    assert conv_rate(train, ceiling=200.0) == "100.0 @ 50.0, 25%"
    assert conv_rate({"median_s": 1.0}) == "-"
    rates = matmul_ceiling(sizes=(64, 128), repeats=2)
    assert sorted(rates) == [64, 128] and all(r > 0 for r in rates.values())


def _printed_report(capsys, rates):
    machine = {"cpu_model": "cpu", "cpus_usable": 2, "tensorflow": "2.15.1",
               "env": {"TF_ENABLE_ONEDNN_OPTS": None}, "load_average_1_5_15": [0.0, 0, 0]}
    if rates is not None:
        machine["matmul_gflops"] = rates
    result = {"setting": "omniglot_1shot", "model": "maml", "peak_rss_mb": 1000.0,
              "shapes": {"support_x": [4, 20, 28, 28, 1], "query_x": [4, 300, 28, 28, 1]},
              "train": {"trace_s": 9.0, "median_s": 2.0, "min_s": 1.9, "max_s": 2.1,
                        "conv_gflop": {"Conv2D": 100.0, "Conv2DBackpropFilter": 60.0}}}
    print_report(parse_args(["--iters", "3"]), machine, [result])
    return capsys.readouterr().out


def test_print_report_ceiling(capsys):
    # 160 GFLOP in 2 s is 80 GFLOP/s: 50% of the best product, 160 GFLOP/s.
    out = _printed_report(capsys, {1024: 120.0, 2048: 160.0})
    assert "1024x1024 120 GFLOP/s, 2048x2048 160 GFLOP/s" in out
    assert "160.0 @ 80.0, 50%" in out and "of ceiling" in out
    out = _printed_report(capsys, "child failed: boom")
    assert "(the ceiling): not measured (child failed: boom)" in out
    assert "160.0 @ 80.0" in out and "50%" not in out
    out = _printed_report(capsys, None)
    assert "the ceiling" not in out and "160.0 @ 80.0" in out


def test_profiled_bench_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "src.bench", "--settings", "omniglot_1shot",
         "--models", "metadrop", "--iters", "1", "--warmup", "1", "--profile", "2",
         "--set", "way=5", "--set", "query=2", "--set", "inner_steps=1",
         "--set", "meta_batch=2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    entry, = report["results"]
    prof = entry["profile"]
    assert prof["steps"] == 2
    ops = prof["ops_thread_s_per_step"]
    assert any("Conv2D" in op for op in ops) and "Softplus" in ops
    assert 0 < prof["conv_thread_s_per_step"] < prof["thread_s_per_step"]
    # Op time cannot exceed the wall time times the compute threads.
    threads = max(entry["threads"]["tf_inter_op"], 1) * max(entry["threads"]["tf_intra_op"], 1)
    assert prof["thread_s_per_step"] <= 1.05 * prof["wall_s_per_step"] * max(threads, os.cpu_count())
    assert "of which convolutions" in proc.stdout
    # The profile ran the convolutions that the FLOP count counts.
    assert set(entry["train"]["conv_gflop"]) == {
        "Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"}
    assert all(g > 0 for g in entry["train"]["conv_gflop"].values())
    # The same convolutions by block: the four blocks, summing to the totals,
    # and the profile found each block's convolutions under its name.
    by_block_gflop = entry["train"]["conv_gflop_by_block"]
    assert sorted(by_block_gflop) == ["block1", "block2", "block3", "block4"]
    for kind, total in entry["train"]["conv_gflop"].items():
        assert sum(row[kind] for row in by_block_gflop.values()) == pytest.approx(total, abs=2e-3)
    by_block_s = prof["conv_thread_s_by_block"]
    assert sorted(by_block_s) == ["block1", "block2", "block3", "block4"]
    assert sum(sum(row.values()) for row in by_block_s.values()) == pytest.approx(
        prof["conv_thread_s_per_step"], rel=1e-3)
    assert "GFLOP per meta-iteration @ GFLOP/s per compute thread" in proc.stdout


def test_report_written_per_entry(tmp_path):
    """An interrupted benchmark leaves a report of the entries measured so far,
    marked incomplete."""
    out = tmp_path / "sub" / "bench.json"
    args = parse_args(["--settings", "omniglot_1shot,omniglot_5shot",
                       "--models", "maml", "--out", str(out)])
    write_report(args, {"cpu_model": "x"}, [{"setting": "omniglot_1shot", "model": "maml"}])
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [r["setting"] for r in report["results"]] == ["omniglot_1shot"]
    assert report["args"]["settings"] == ["omniglot_1shot", "omniglot_5shot"]
    write_report(args, {"cpu_model": "x"}, report["results"] + [{"setting": "omniglot_5shot"}])
    assert json.loads(out.read_text())["complete"] is True


def test_bench_eval_entry(tmp_path):
    """--eval times the meta-test step per episode, with the config's S and
    episodes per call."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "src.bench", "--settings", "omniglot_1shot",
         "--models", "metadrop", "--iters", "1", "--warmup", "1", "--eval",
         "--eval-iters", "2", "--set", "way=5", "--set", "query=2",
         "--set", "inner_steps=1", "--set", "meta_batch=2", "--set", "test_mc_samples=3",
         "--set", "eval_batch=2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry, = json.loads(out.read_text())["results"]
    ev = entry["eval"]
    assert (ev["mc_samples"], ev["episodes_per_call"], ev["calls"]) == (3, 2, 2)
    assert len(ev["times_s"]) == 2 and len(ev["warmup_s"]) == 1
    # Seconds per episode: each call's time over its two episodes.
    assert ev["median_s"] == pytest.approx(sum(ev["times_s"]) / 2 / 2, rel=0.01, abs=1e-4)
    assert ev["tracings"] == 1
    assert "(S=3)" in proc.stdout
