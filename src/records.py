"""Per-episode meta-test accuracies, kept beside a run.

``workdir/test_accuracies.json`` holds one record per evaluation setting:
{"records": [{"key": ..., "accuracies": [...]}, ...]}.  A record's key is
the checkpoint, the data signature and every config key that can change an
accuracy, so that an interrupted evaluation continues only from episodes
computed under the same setting, two models can be compared episode by
episode, and a diagnostic evaluation (say ``inner_steps=10``) never
overwrites the record of the run's own setting.  Light (no TensorFlow):
``src.report`` reads the records too.
"""

import json
import os

import numpy as np

from src.config import Config

FILENAME = "test_accuracies.json"

# Config keys that cannot change a test accuracy (run length, logging,
# threads, where the data lives; bn_second_order shapes only the
# meta-gradient and init only the weights before training, which the
# checkpoint replaces; leaving them out keeps the records written before
# they existed valid).
NOT_IN_KEY = ("iterations", "log_every", "ckpt_every", "ckpt_keep_every",
              "val_every", "val_episodes", "test_episodes", "data_dir",
              "intra_op_threads", "inter_op_threads", "parallel_tasks",
              "bn_second_order", "init")

# Keys of the test protocol: they choose which episodes are drawn and how
# they are scored, not what model is tested.  Overriding any other key at
# evaluation (inner_lr, inner_steps, ...) evaluates a variant of the model.
PROTOCOL = ("test_episodes", "test_mc_samples", "test_seed", "eval_batch")

# Keys added after records were first written, with their defaults: a key
# at its default is left out, so that the older records stay valid; any
# other value is part of the key.
LATER_KEYS = {k: getattr(Config, k) for k in ("adapt_offsets", "bn_epsilon",
                                                 "bn_scale")}


def record_key(config, checkpoint, data):
    """The key of a record: {"checkpoint": basename, "data": signature,
    "config": the config dict without NOT_IN_KEY, nor LATER_KEYS at their
    defaults}, in its JSON form."""
    cfg = {k: v for k, v in config.items()
           if k not in NOT_IN_KEY
           and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    key = {"checkpoint": os.path.basename(checkpoint), "data": data, "config": cfg}
    return json.loads(json.dumps(key))


def variant_name(run_config, config):
    """'' if ``config`` (a dict) tests the run as trained (``run_config``),
    up to the test protocol and keys that cannot change an accuracy; else
    the differing keys as 'k1=v1,k2=v2' (sorted), e.g. 'inner_steps=10'."""
    changed = sorted(k for k in config
                     if k not in NOT_IN_KEY + PROTOCOL
                     and config[k] != run_config.get(k))
    return ",".join(f"{k}={config[k]}" for k in changed)


def _read_all(path):
    """All records of the file ([] if missing or unreadable); the single
    record of the earlier format ({"key", "accuracies"}) counts as one."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(content, dict):
        return []
    records = [content] if "key" in content else content.get("records")
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict)]


def load(workdir, key):
    """Accuracies [n] recorded in ``workdir`` under ``key`` (empty if none)."""
    for record in _read_all(os.path.join(workdir, FILENAME)):
        if record.get("key") == key:
            return np.asarray(record.get("accuracies", []), np.float64)
    return np.zeros(0)


def save(workdir, key, accs):
    """Writes ``accs`` [n] under ``key``, keeping the other keys' records;
    atomically (a kill never leaves half a file)."""
    path = os.path.join(workdir, FILENAME)
    others = [r for r in _read_all(path) if r.get("key") != key]
    records = others + [{"key": key, "accuracies": [float(a) for a in accs]}]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"records": records}, f)
    os.replace(tmp, path)
