"""Speed and memory benchmark of meta-training (and meta-test) steps.

    python -m src.bench [--settings omniglot_1shot,omniglot_5shot,...]
        [--models maml,metadrop] [--iters 10] [--warmup 2] [--eval]
        [--profile N]
        [--set key=value ...] [--out runs/bench/results.json]

For every setting x model, a fresh Python process (so that the peak memory is
that of one setting) loads ``yaml/<setting>_<model>.yaml`` (plus ``--set``
overrides), builds the model and meta-learner exactly as ``src.train`` does
(``configure_tensorflow`` then ``build``) and times ``learner.train_step``:

* ``--warmup`` untimed steps; the first one includes the tf.function tracing
  and is reported separately as the trace time;
* ``--iters`` timed steps (each synchronised by reading the loss), reported
  as median, min and max seconds per meta-iteration.

With ``--eval`` it also times ``learner.eval_step`` (meta-test adaptation of
``eval_batch`` episodes per call, with ``test_mc_samples`` noise samples per
inner step for meta-dropout, 1 for MAML) in seconds per episode.

Each entry also counts the convolution FLOPs of one meta-iteration (every
``Conv2D``, ``Conv2DBackpropInput`` and ``Conv2DBackpropFilter`` that the
compiled step runs, from their static shapes) and the rate they are done at.
With ``--ceiling`` a separate process first measures the machine's float32
matrix-product rate through TensorFlow (``matmul_ceiling``), and each rate
is also given as a fraction of it: speeds of different machines compare
only that way.

With ``--profile N`` it then runs N more meta-iterations under
``tf.profiler`` and reports where their time goes: the thread time of each
op type per meta-iteration, summed over TensorFlow's compute threads (with
two threads kept busy, the wall time is about half of the total), and the
rate of each block's convolutions of each kind (forward, input gradient,
filter gradient): their FLOPs over their thread time, in GFLOP/s per thread.

The episodes are synthetic: random pixels with the real shapes of the config
(support [B, way*shot, H, W, C], query [B, way*query, H, W, C], labels in
class order, image shape from the config's dataset). The speed does not
depend on the pixel values, so no dataset is needed.

The JSON output holds the machine (CPU model, cores, load average), the
TensorFlow version, TF_ENABLE_ONEDNN_OPTS, the thread settings and one entry
per setting x model; a table is printed at the end. Timings are only
meaningful on an otherwise idle machine: the load average is recorded and a
warning printed when it is high.
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from src.config import ConfigError, load_config, meta_test_samples, meta_train_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_NOTE = ("synthetic episodes: random pixels with the real shapes of each "
             "config (speed does not depend on pixel values)")


# The three kinds of convolution a meta-iteration runs (forward, input
# gradient, filter gradient), by their graph op types.
CONV_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")
SETTINGS = ("omniglot_1shot", "omniglot_5shot", "miniimagenet_1shot",
            "miniimagenet_5shot")


def config_path(setting, model):
    return os.path.join(ROOT, "yaml", f"{setting}_{model}.yaml")


def _csv(text):
    return [s.strip() for s in text.split(",") if s.strip()]


# ---------------------------------------------------------------------------
# Child: one setting x model in its own process.
# ---------------------------------------------------------------------------

def synthetic_batch(rng, config, episodes, image_shape):
    """Random episodes of a config's exact shapes, labels in class order."""
    import numpy as np
    way, shot, query = config.way, config.shot, config.query
    shape = tuple(image_shape)
    return {
        "support_x": rng.random((episodes, way * shot) + shape, dtype=np.float32),
        "support_y": np.tile(np.repeat(np.arange(way, dtype=np.int32), shot),
                             (episodes, 1)),
        "query_x": rng.random((episodes, way * query) + shape, dtype=np.float32),
        "query_y": np.tile(np.repeat(np.arange(way, dtype=np.int32), query),
                           (episodes, 1)),
    }


def _timed(step, batches, seeds):
    """Seconds of each step(batch, seed) call, synchronised on the result."""
    times = []
    for batch, seed in zip(batches, seeds):
        tic = time.perf_counter()
        step(batch, seed)
        times.append(time.perf_counter() - tic)
    return times


def _summary(times, per=1):
    if not times:
        return {}
    return {"median_s": statistics.median(times) / per,
            "min_s": min(times) / per, "max_s": max(times) / per,
            "times_s": [round(t, 4) for t in times]}


def _tracing_count(fn):
    try:
        return fn.experimental_get_tracing_count()
    except AttributeError:
        return None


def op_events(xspace_path):
    """(op name, op type, seconds) of every op run in a ``tf.profiler``
    XSpace file.

    Reads the op events on the host's TensorFlow compute threads
    (``tf_Compute/...`` lines); the executor's ``ExecutorState::`` spans,
    which enclose the ops, are left out.

    Args:
      xspace_path: a ``*.xplane.pb`` written by ``tf.profiler.experimental``.
    Yields:
      (str, str, float) per event; an event named ``name:type`` without a
      display name has its type after the last colon.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if meta.name.startswith("ExecutorState::"):
                    continue
                name, _, op_type = meta.name.rpartition(":")
                yield name, meta.display_name or op_type, event.duration_ps * 1e-12


def op_thread_times(events, steps):
    """Thread time per op type, summed over the compute threads.

    Args:
      events: (op name, op type, seconds) triples, as ``op_events`` yields.
      steps: meta-iterations profiled, to express the times per iteration.
    Returns:
      {op type: seconds per iteration}, largest first.
    """
    totals = {}
    for _, op_type, sec in events:
        totals[op_type] = totals.get(op_type, 0.0) + sec / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def conv_kind(op_type):
    """The ``CONV_OPS`` kind of an op type as the graph or the profile names
    it (``_FusedConv2D``, ``_MklNativeConv2DBackpropFilterWithBias``, ...);
    None if it is not a convolution."""
    for kind in reversed(CONV_OPS):  # the longest names first
        if kind in op_type:
            return kind
    return None


def conv_block(op_name):
    """The network block an op belongs to (``block2``), from its name
    (``gradient_tape/block2/Conv2DBackpropFilter``); 'other' if none."""
    match = re.search(r"(?:^|/)(block\d+)/", op_name)
    return match.group(1) if match else "other"


def by_block(items):
    """{block: {kind: total}} of (op name, op type, value) triples that are
    convolutions."""
    totals = {}
    for name, op_type, value in items:
        kind = conv_kind(op_type)
        if kind:
            row = totals.setdefault(conv_block(name), dict.fromkeys(CONV_OPS, 0.0))
            row[kind] += value
    return dict(sorted(totals.items()))


def profile_steps(step, batches, seeds):
    """Runs step(batch, seed) on each under ``tf.profiler``; returns their
    wall seconds, ``op_thread_times`` and the convolutions' thread seconds
    ``by_block``, all per step."""
    import glob

    import tensorflow as tf
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        times = _timed(step, batches, seeds)
        tf.profiler.experimental.stop()
        path, = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
        events = list(op_events(path))
    ops = op_thread_times(events, len(times))
    conv = by_block((name, op_type, sec / len(times)) for name, op_type, sec in events)
    return {"steps": len(times), "wall_s_per_step": sum(times) / len(times),
            "thread_s_per_step": sum(ops.values()),
            "conv_thread_s_per_step": sum(v for k, v in ops.items() if conv_kind(k)),
            "ops_thread_s_per_step": {k: round(v, 5) for k, v in ops.items()},
            "conv_thread_s_by_block": _rounded(conv, 5)}


def _conv_flops(op):
    """Multiply-adds x 2 of one convolution op, of a type in ``CONV_OPS``
    (forward, input or filter gradient: all three cost the forward
    convolution's 2 * outputs * kh * kw * c_in)."""
    if op.type == "Conv2D":
        kernel, out = op.inputs[1].shape, op.outputs[0].shape
    elif op.type == "Conv2DBackpropInput":
        kernel, out = op.inputs[1].shape, op.inputs[2].shape
    elif op.type == "Conv2DBackpropFilter":
        kernel, out = op.outputs[0].shape, op.inputs[2].shape
    else:
        raise ValueError(f"{op.name} is a {op.type}, not one of {CONV_OPS}")
    return 2 * out.num_elements() * kernel[0] * kernel[1] * kernel[2]


def conv_ops(concrete_fn):
    """The convolutions that one call of a traced tf.function runs.

    Only ops that its outputs or its stateful ops depend on count: the
    traced graph also holds gradients nobody uses (e.g. with respect to the
    images), which TensorFlow prunes before running it.  Shapes must be
    static, as they are for a config's episodes.

    Returns:
      [(op name, op type, GFLOP)], op type one of ``CONV_OPS``.
    """
    graph = concrete_fn.graph
    needed, stack = set(), [t.op for t in graph.outputs] + list(graph.control_outputs)
    while stack:
        op = stack.pop()
        if op.name not in needed:
            needed.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return [(op.name, op.type, _conv_flops(op) / 1e9) for op in graph.get_operations()
            if op.name in needed and op.type in CONV_OPS]


def conv_gflop(convs):
    """{op type: GFLOP} of a ``conv_ops`` list, for the three kinds of
    ``CONV_OPS``."""
    totals = dict.fromkeys(CONV_OPS, 0.0)
    for _, op_type, gflop in convs:
        totals[op_type] += gflop
    return totals


def _rounded(nested, digits):
    return {k: {kind: round(v, digits) for kind, v in row.items()}
            for k, row in nested.items()}


def matmul_ceiling(sizes=(1024, 2048, 4096), repeats=5):
    """{n: GFLOP/s} of float32 n x n matrix products through TensorFlow, the
    best of ``repeats`` calls each, with TensorFlow's default thread pools
    (every core) and this package's oneDNN setting: the ceiling against which
    a meta-iteration's convolution rate is read.  Run it in a fresh process
    (``run_one`` children set one thread per op)."""
    import tensorflow as tf
    rates = {}
    for n in sizes:
        a = tf.random.stateless_normal([n, n], seed=[0, n])
        b = tf.random.stateless_normal([n, n], seed=[1, n])
        product = tf.function(tf.matmul)
        product(a, b).numpy()  # traces
        times = _timed(lambda *_: product(a, b).numpy(), range(repeats), range(repeats))
        rates[n] = 2 * n ** 3 / min(times) / 1e9
    return rates


def run_child(path, overrides, iters, warmup, do_eval, eval_iters, profile=0):
    """Benchmarks one config in this process; returns the result dict."""
    import numpy as np
    import tensorflow as tf

    from src.train import build, configure_tensorflow, image_shape

    config = load_config(path, overrides)
    configure_tensorflow(config)
    tic = time.perf_counter()
    _, learner = build(config)
    build_s = time.perf_counter() - tic
    shape = image_shape(config)
    result = {**_setting_info(config, shape), "build_s": build_s}
    rng = np.random.default_rng(config.seed)
    result["train"], train = _time_train(learner, config, rng, shape, warmup, iters)
    if profile:
        batches = [synthetic_batch(rng, config, config.meta_batch, shape)
                   for _ in range(profile)]
        seeds = [tf.constant([config.seed, warmup + iters + it], tf.int64)
                 for it in range(1, profile + 1)]
        result["profile"] = profile_steps(train, batches, seeds)
    if do_eval:
        result["eval"] = _time_eval(learner, config, rng, shape, warmup, eval_iters)
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _setting_info(config, shape):
    """What a result records of its config, episode shapes and threads."""
    import tensorflow as tf
    return {
        "dataset": config.dataset, "way": config.way, "shot": config.shot,
        "query": config.query, "meta_batch": config.meta_batch,
        "inner_steps": config.inner_steps, "noise": config.noise,
        "learner": config.learner, "first_order": config.first_order,
        "mc_samples": meta_train_samples(config),
        "fused_bn": config.fused_bn,
        "shapes": {
            "support_x": [config.meta_batch, config.way * config.shot, *shape],
            "query_x": [config.meta_batch, config.way * config.query, *shape]},
        "threads": {
            "config_intra_op": config.intra_op_threads,
            "config_inter_op": config.inter_op_threads,
            "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "tf_version": tf.__version__,
        "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }


def _time_train(learner, config, rng, shape, warmup, iters):
    """Times ``learner.train_step`` on ``warmup`` + ``iters`` synthetic
    meta-batches and counts its convolutions' work; returns the result's
    ``train`` entry and the timed function (which the profiler reuses)."""
    import tensorflow as tf

    def train(batch, seed):
        return float(learner.train_step(batch, seed)["loss"])

    n = warmup + iters
    batches = (synthetic_batch(rng, config, config.meta_batch, shape)
               for _ in range(n))
    seeds = [tf.constant([config.seed, it], tf.int64) for it in range(1, n + 1)]
    times = _timed(train, batches, seeds)
    entry = {
        "trace_s": times[0] if warmup else None,
        "warmup_s": [round(t, 4) for t in times[:warmup]],
        "iters": iters, **_summary(times[warmup:]),
        "tracings": _tracing_count(learner.train_step)}
    convs = conv_ops(learner.train_step.get_concrete_function(
        synthetic_batch(rng, config, config.meta_batch, shape), seeds[0]))
    entry["conv_gflop"] = {k: round(v, 3) for k, v in conv_gflop(convs).items()}
    entry["conv_gflop_by_block"] = _rounded(by_block(convs), 3)
    return entry, train


def _time_eval(learner, config, rng, shape, warmup, calls):
    """Times ``learner.eval_step`` on ``warmup`` + ``calls`` synthetic calls of
    ``eval_batch`` episodes each; returns the result's ``eval`` entry."""
    import tensorflow as tf
    mc = meta_test_samples(config)
    episodes = config.eval_batch

    def evaluate(batch, seed):
        return learner.eval_step(batch, seed, mc).numpy()

    n = warmup + calls
    batches = (synthetic_batch(rng, config, episodes, shape) for _ in range(n))
    seeds = [tf.constant([config.test_seed, i], tf.int64) for i in range(n)]
    times = _timed(evaluate, batches, seeds)
    return {"mc_samples": mc, "episodes_per_call": episodes,
            "trace_s": times[0] if warmup else None,
            "warmup_s": [round(t, 4) for t in times[:warmup]],
            "calls": calls, **_summary(times[warmup:], per=episodes),
            "tracings": _tracing_count(learner.eval_step)}


# ---------------------------------------------------------------------------
# Parent: machine info, one child per setting x model, table.
# ---------------------------------------------------------------------------

def cpu_info():
    """(model name, the SIMD flags that matter to TensorFlow/oneDNN)."""
    name, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = [x for x in value.split()
                             if x in ("avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                      "avx512_vnni", "amx_tile")]
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def _package_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed
        return None


def machine_info():
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    model, flags = cpu_info()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _package_version("tensorflow"),
        "numpy": _package_version("numpy"),
        # src/__init__.py defaults TF_ENABLE_ONEDNN_OPTS to 1 if unset.
        "env": {k: os.environ.get(k) for k in
                ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS",
                 "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")},
    }


def child_process(child_args):
    """Runs ``python -m src.bench`` with ``child_args`` (``--child PATH ...``
    or ``--child-ceiling``) in a fresh process, which writes its result to
    ``--child-out``.

    Returns:
      (result, None), or (None, (message, stderr tail)) if the process failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        proc = subprocess.run([sys.executable, "-m", "src.bench", *child_args,
                               "--child-out", out], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return None, (f"benchmark process exited with code {proc.returncode}", tail)
        with open(out) as f:
            return json.load(f), None


def run_one(setting, model, args):
    """Runs one child process; returns its result dict (or an error entry)."""
    entry = {"setting": setting, "model": model,
             "config": os.path.relpath(config_path(setting, model), ROOT),
             "overrides": list(args.set)}
    path = config_path(setting, model)
    if not os.path.exists(path):
        entry["error"] = f"no config file {entry['config']}"
        return entry
    child_args = ["--child", path, "--iters", str(args.iters), "--warmup", str(args.warmup),
                  "--eval-iters", str(args.eval_iters), "--profile", str(args.profile)]
    child_args += ["--eval"] if args.eval else []
    for o in args.set:
        child_args += ["--set", o]
    tic = time.perf_counter()
    result, error = child_process(child_args)
    entry["wall_s"] = round(time.perf_counter() - tic, 2)
    if error:
        entry["error"], entry["stderr_tail"] = error
        return entry
    entry.update(result)
    return entry


def measure_ceiling():
    """``matmul_ceiling`` in a fresh process: {n: GFLOP/s}, or an error string."""
    rates, error = child_process(["--child-ceiling"])
    if error:
        return "{}: {}".format(*error)
    return {int(n): rate for n, rate in rates.items()}


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def conv_rate(train, ceiling=None):
    """'GFLOP/iter, GFLOP/s at the median step[, % of the ceiling]' of a
    result's ``train`` entry; ``ceiling``: the best matmul GFLOP/s."""
    gflop = sum(train.get("conv_gflop", {}).values())
    if not gflop or not train.get("median_s"):
        return "-"
    rate = gflop / train["median_s"]
    share = f", {100 * rate / ceiling:.0f}%" if ceiling else ""
    return f"{gflop:.1f} @ {rate:.1f}{share}"


def table(results, do_eval, ceiling=None):
    head = ["setting", "model", "support / query", "trace s",
            "s/iter median [min-max]",
            "conv GFLOP @ GFLOP/s" + (", of ceiling" if ceiling else ""), "peak MB"]
    if do_eval:
        head[5:5] = ["eval s/episode median [min-max] (S)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["setting"], r["model"], "ERROR (below)"]
                        + ["-"] * (len(head) - 3))
            continue
        t = r["train"]
        s, q = r["shapes"]["support_x"], r["shapes"]["query_x"]
        row = [r["setting"], r["model"],
               f"{'x'.join(map(str, s))} / {'x'.join(map(str, q))}",
               _fmt(t["trace_s"], 1),
               f"{_fmt(t.get('median_s'))} [{_fmt(t.get('min_s'))}-{_fmt(t.get('max_s'))}]",
               conv_rate(t, ceiling), f"{r['peak_rss_mb']:.0f}"]
        if do_eval:
            e = r["eval"]
            row[5:5] = [f"{_fmt(e.get('median_s'))} [{_fmt(e.get('min_s'))}-"
                        f"{_fmt(e.get('max_s'))}] (S={e['mc_samples']})"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
             for row in [head, ["-" * w for w in widths]] + rows]
    lines += [f"ERROR {r['setting']} {r['model']}: {r['error']}"
              for r in results if "error" in r]
    return "\n".join(lines)


def profile_table(result, top=12):
    """Text summary of one result's ``profile`` entry: the top op types, then
    each block's convolutions by kind."""
    p = result["profile"]
    total = p["thread_s_per_step"]
    lines = [f"\n{result['setting']} {result['model']}: {p['steps']} profiled "
             f"meta-iterations, {p['wall_s_per_step']:.3f} s wall each; op thread "
             f"time {total:.3f} s per iteration, of which convolutions "
             f"{p['conv_thread_s_per_step']:.3f} s "
             f"({100 * p['conv_thread_s_per_step'] / total:.0f}%)"]
    for op, sec in list(p["ops_thread_s_per_step"].items())[:top]:
        lines.append(f"  {op:<34} {1e3 * sec:8.1f} ms  {100 * sec / total:5.1f}%")
    gflop = result["train"].get("conv_gflop_by_block")
    if gflop and "conv_thread_s_by_block" in p:
        lines.append(conv_block_table(gflop, p["conv_thread_s_by_block"]))
    return "\n".join(lines)


def conv_block_table(gflop, thread_s):
    """Text table of each block's convolutions by kind: GFLOP per
    meta-iteration, and the GFLOP/s per compute thread they ran at.

    Args:
      gflop: {block: {kind: GFLOP per iteration}} (the static count).
      thread_s: {block: {kind: thread seconds per iteration}} (the profile).
    """
    def cell(block, kind):
        g, t = gflop.get(block, {}).get(kind, 0.0), thread_s.get(block, {}).get(kind, 0.0)
        return f"{g:.1f} @ {g / t:.1f}" if g and t else f"{g:.1f} @ -"

    head = ["  convolutions", "forward", "input gradient", "filter gradient"]
    rows = [[f"  {block}"] + [cell(block, kind) for kind in CONV_OPS]
            for block in sorted(set(gflop) | set(thread_s))]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(["  GFLOP per meta-iteration @ GFLOP/s per compute thread:"] + [
        "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
        for row in [head] + rows])


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m src.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=_csv, default=list(SETTINGS),
                        help="comma-separated settings: yaml/<setting>_<model>.yaml "
                             f"(default: {','.join(SETTINGS)})")
    parser.add_argument("--models", type=_csv, default=["maml", "metadrop"],
                        help="comma-separated models (default: maml,metadrop)")
    parser.add_argument("--iters", type=int, default=10, help="timed meta-iterations")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first; the first includes tracing")
    parser.add_argument("--eval", action="store_true",
                        help="also time meta-test episodes (learner.eval_step)")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="timed eval_step calls of eval_batch episodes each "
                             "(default: --iters)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N more meta-iterations and print the "
                             "thread time of each op type (default: 0, off)")
    parser.add_argument("--ceiling", action="store_true",
                        help="first measure the float32 matrix-product rate through "
                             "TensorFlow (about 20 s) and give each convolution rate "
                             "as a fraction of it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), "
                             "e.g. --set inner_steps=1")
    parser.add_argument("--out", default="runs/bench/results.json", help="JSON output")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-ceiling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.eval_iters is None:
        args.eval_iters = args.iters
    if args.iters < 1 or args.warmup < 0 or args.eval_iters < 1 or args.profile < 0:
        parser.error("--iters and --eval-iters must be >= 1, --warmup and "
                     "--profile >= 0")
    return args


def write_report(args, machine, results):
    """Writes ``args.out``: the machine, the arguments and the result entries so far."""
    report = {
        "data": DATA_NOTE,
        "machine": machine,
        "args": {k: getattr(args, k) for k in
                 ("settings", "models", "iters", "warmup", "eval", "eval_iters",
                  "profile", "ceiling", "set")},
        "complete": len(results) == len(args.settings) * len(args.models),
        "results": results,
    }
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


def _check_configs(args):
    """Stops with the config error, if any, before minutes go on children."""
    for setting in args.settings:
        for model in args.models:
            path = config_path(setting, model)
            if os.path.exists(path):
                try:
                    load_config(path, args.set)
                except ConfigError as e:
                    sys.exit(f"error: {e}")


def _warn_if_busy(machine):
    load, cpus = machine["load_average_1_5_15"][0], machine["cpus_usable"] or 1
    if load > 0.5 * cpus:
        print(f"warning: load average {load} on {cpus} CPUs: other processes are "
              "running, the timings will be too slow", file=sys.stderr, flush=True)


def _run_all(args, machine):
    """Benchmarks every setting x model in its own process; returns the
    entries, rewriting the report after each so an interrupted run keeps
    what it measured."""
    results = []
    for setting in args.settings:
        for model in args.models:
            print(f"benchmarking {setting} {model} ...", file=sys.stderr, flush=True)
            entry = run_one(setting, model, args)
            if "error" in entry:
                print(f"  error: {entry['error']}\n{entry.get('stderr_tail', '')}",
                      file=sys.stderr, flush=True)
            else:
                print(f"  {_fmt(entry['train'].get('median_s'))} s/iter, "
                      f"{entry['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            results.append(entry)
            write_report(args, machine, results)
    return results


def print_report(args, machine, results):
    """Prints the machine line, the ceiling (if measured), the table and the
    profiles of ``results``."""
    env = machine["env"]
    threads = next((r["threads"] for r in results if "threads" in r), {})
    print(f"{machine['cpu_model']}, {machine['cpus_usable']} CPUs, "
          f"TensorFlow {machine['tensorflow']}, TF_ENABLE_ONEDNN_OPTS="
          f"{env['TF_ENABLE_ONEDNN_OPTS']}, threads intra/inter "
          f"{threads.get('tf_intra_op', '?')}/{threads.get('tf_inter_op', '?')}, "
          f"load {machine['load_average_1_5_15'][0]}")
    print(f"{DATA_NOTE}; {args.warmup} warm-up + {args.iters} timed steps"
          + (f" (overrides: {' '.join(args.set)})" if args.set else ""))
    ceiling = None
    rates = machine.get("matmul_gflops")
    if isinstance(rates, dict):
        ceiling = max(rates.values())
        print("float32 matrix products through TensorFlow (the ceiling): "
              + ", ".join(f"{n}x{n} {r:.0f} GFLOP/s" for n, r in rates.items()))
    elif rates is not None:
        print(f"float32 matrix products through TensorFlow (the ceiling): "
              f"not measured ({rates})")
    print(table(results, args.eval, ceiling))
    for r in results:
        if "profile" in r:
            print(profile_table(r))
    print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(argv)
    if args.child or args.child_ceiling:
        result = (matmul_ceiling() if args.child_ceiling else
                  run_child(args.child, args.set, args.iters, args.warmup,
                            args.eval, args.eval_iters, args.profile))
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0

    _check_configs(args)
    machine = machine_info()
    _warn_if_busy(machine)
    if args.ceiling:
        print("measuring the matrix-product ceiling ...", file=sys.stderr, flush=True)
        machine["matmul_gflops"] = measure_ceiling()
    results = _run_all(args, machine)
    print_report(args, machine, results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
