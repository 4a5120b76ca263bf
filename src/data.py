"""Dataset access and few-shot episode sampling (numpy only, no TensorFlow).

A split is an array ``images`` of shape [C, N, D]: C classes, N images per
class, D = H * W * Ch pixels flattened row-major (uint8 0..255, or float in
[0, 1]). An episode ("task") draws ``way`` classes without replacement and,
per class, ``shot + query`` distinct images without replacement. Labels are in
class order: label i is the i-th drawn class; the support set holds class 0's
``shot`` images, then class 1's, ...; the query set likewise with ``query``.

Batches are dicts of numpy arrays, B tasks each::

    support_x  float32 [B, way * shot,  H, W, Ch]
    support_y  int32   [B, way * shot]
    query_x    float32 [B, way * query, H, W, Ch]
    query_y    int32   [B, way * query]

uint8 pixels are divided by 255; float pixels are kept (cast to float32).
"""

import json
import os
import sys

import numpy as np

_STATE_VERSION = 1


class DataError(ValueError):
    """Missing or malformed dataset file, or impossible episode settings."""


def load_split(path):
    """Open a prepared split ``path`` (.npy, [C, N, D], uint8 or float).

    The file is memory-mapped (``mmap_mode='r'``), so only the images that
    are sampled are read from disk. Raises :class:`DataError` if the file is
    missing, unreadable, not 3-D, or not uint8/float.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(
            "Dataset file {} does not exist. Prepare the data first: run "
            "`make data` (or `python -m data_prep.omniglot --src DIR --out "
            "data/omniglot`, see the README).".format(path))
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(
            "Cannot read {} as a .npy array ({}). Delete it and run `make data` "
            "again.".format(path, e)) from None
    _check_images(images, path)
    return images


# Manifest fields that determine the prepared arrays (data_prep writes them).
_SIGNATURE_KEYS = ("dataset", "format_version", "source", "seed", "sources")


def data_signature(data_dir):
    """What identifies the prepared data in ``data_dir``: the determining
    fields of its ``manifest.json`` (format version, source, seed, source
    checksums) as a dict, or None if it has no manifest (hand-made arrays)."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    return {k: manifest.get(k) for k in _SIGNATURE_KEYS}


def check_run_data(data_dir, workdir):
    """Ties a run to the data it is trained on; returns ``data_signature(data_dir)``.

    The first call for the (existing) ``workdir`` records the signature in
    ``workdir/data.json``; later calls (resume, evaluation) raise
    :class:`DataError` if the data has changed since, e.g. re-prepared in a
    newer format: a run's checkpoints are only comparable on the images they
    were trained on.  Runs older than the record (checkpoints but no
    data.json) get a warning on stderr and the current data recorded.
    """
    record = os.path.join(workdir, "data.json")
    current = data_signature(data_dir)
    if os.path.exists(record):
        with open(record) as f:
            recorded = json.load(f)
        if recorded != current:
            changed = sorted(k for k in _SIGNATURE_KEYS
                             if (recorded or {}).get(k) != (current or {}).get(k))
            raise DataError(
                "The data in {} is not the data this run was trained on (manifest "
                "fields that differ: {}; recorded in {}). Use another --workdir to "
                "train on the new data, or point data_dir at the old data.".format(
                    data_dir, ", ".join(changed) or "manifest added or removed", record))
        return current
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        print("warning: {} has checkpoints but no record of its data; recorded the "
              "data in {} as this run's from now on".format(workdir, data_dir),
              file=sys.stderr)
    with open(record, "w") as f:
        json.dump(current, f, indent=2)
    return current


def _check_images(images, name="images"):
    if images.ndim != 3:
        raise DataError(
            "{} has shape {}; expected [classes, images per class, pixels] "
            "(3 dimensions). Re-run `make data`.".format(name, images.shape))
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise DataError("{} has dtype {}; expected uint8 or float.".format(name, images.dtype))


def _check_episode(images, image_shape, way, shot, query):
    """Validate an episode configuration against ``images`` [C, N, D]."""
    _check_images(images)
    num_classes, per_class, dim = images.shape
    if int(np.prod(image_shape)) != dim:
        raise DataError("image_shape {} has {} pixels but the images have D = {}.".format(
            tuple(image_shape), int(np.prod(image_shape)), dim))
    if way < 1 or shot < 1 or query < 1:
        raise DataError("way, shot and query must be >= 1 (got {}, {}, {}).".format(
            way, shot, query))
    if way > num_classes:
        raise DataError("way = {} but the split has only {} classes.".format(way, num_classes))
    if shot + query > per_class:
        raise DataError(
            "shot + query = {} + {} = {} but each class has only {} images.".format(
                shot, query, shot + query, per_class))


def _to_float(pixels):
    """uint8 -> float32 / 255; float -> float32."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255.0)
    return pixels.astype(np.float32)


def _draw_images(rng, per_class, way, count):
    """int [way, count]: per row, ``count`` distinct indices in [0, per_class)."""
    # argsort of uniform keys = an independent random permutation per row
    return np.argsort(rng.random((way, per_class)), axis=1)[:, :count]


def _make_task(images, image_shape, classes, image_idx, shot):
    """Gather one task.

    classes [way] class ids, image_idx [way, shot + query] image ids.
    Returns (support_x [way*shot, H, W, Ch], support_y [way*shot],
    query_x [way*query, H, W, Ch], query_y [way*query]).
    """
    way, count = image_idx.shape
    x = np.asarray(images[classes[:, None], image_idx])  # [way, count, D]; reads only these rows
    x = _to_float(x).reshape((way, count) + tuple(image_shape))
    labels = np.arange(way, dtype=np.int32)
    query = count - shot
    return (x[:, :shot].reshape((way * shot,) + tuple(image_shape)),
            np.repeat(labels, shot),
            x[:, shot:].reshape((way * query,) + tuple(image_shape)),
            np.repeat(labels, query))


def _stack_tasks(tasks):
    """List of _make_task tuples -> batch dict with a leading [B] axis."""
    keys = ("support_x", "support_y", "query_x", "query_y")
    return {k: np.stack([t[i] for t in tasks]) for i, k in enumerate(keys)}


class EpisodeSampler:
    """Random episodes for meta-training.

    Args:
      images: [C, N, D] uint8 or float array (e.g. from :func:`load_split`).
      image_shape: (H, W, Ch) with H * W * Ch = D, e.g. (28, 28, 1), (84, 84, 3).
      way, shot, query: classes per task, support and query images per class.
      seed: int seed of ``np.random.Generator(np.random.PCG64(seed))``.
      shared_classes: True (default, as the original code): one class set per
        meta-batch, shared by all its tasks (each task draws its own images);
        False: every task draws its own classes.
    """

    def __init__(self, images, image_shape, way, shot, query, seed, shared_classes=True):
        _check_episode(images, image_shape, way, shot, query)
        self.images = images
        self.image_shape = tuple(int(s) for s in image_shape)
        self.way, self.shot, self.query = int(way), int(shot), int(query)
        self.shared_classes = bool(shared_classes)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, meta_batch):
        """Draw ``meta_batch`` tasks; returns the batch dict (see module doc):
        support_x [B, way*shot, H, W, Ch], support_y [B, way*shot],
        query_x [B, way*query, H, W, Ch], query_y [B, way*query]."""
        if int(meta_batch) < 1:
            raise DataError("meta_batch must be >= 1 (got {}).".format(meta_batch))
        num_classes, per_class, _ = self.images.shape
        count = self.shot + self.query
        if self.shared_classes:
            classes = self.rng.choice(num_classes, self.way, replace=False)
        tasks = []
        for _ in range(int(meta_batch)):
            if not self.shared_classes:
                classes = self.rng.choice(num_classes, self.way, replace=False)
            idx = _draw_images(self.rng, per_class, self.way, count)
            tasks.append(_make_task(self.images, self.image_shape, classes, idx, self.shot))
        return _stack_tasks(tasks)

    def _config(self):
        return {"shape": list(self.images.shape), "way": self.way, "shot": self.shot,
                "query": self.query, "shared_classes": self.shared_classes}

    def get_state(self):
        """JSON-serialisable dict: the generator state (128-bit numbers as
        strings) and the sampler configuration."""
        bg = self.rng.bit_generator.state
        return {"version": _STATE_VERSION, "bit_generator": bg["bit_generator"],
                "state": str(bg["state"]["state"]), "inc": str(bg["state"]["inc"]),
                "has_uint32": int(bg["has_uint32"]), "uinteger": int(bg["uinteger"]),
                "config": self._config()}

    def set_state(self, state):
        """Restore a dict from :meth:`get_state`; the following ``sample``
        calls repeat the original stream exactly. Raises :class:`DataError`
        if the state comes from a sampler with another configuration."""
        if state.get("version") != _STATE_VERSION or state.get("bit_generator") != "PCG64":
            raise DataError("Unknown sampler state format: {!r}.".format(
                {k: state.get(k) for k in ("version", "bit_generator")}))
        if state.get("config") != self._config():
            raise DataError(
                "The saved sampler state was made with {} but this sampler has {}; "
                "the episode stream would not continue.".format(state.get("config"),
                                                                 self._config()))
        self.rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def fixed_episodes(images, image_shape, way, shot, query, num_episodes, seed, batch_size):
    """Yield the same ``num_episodes`` test episodes for a given ``seed``.

    Every episode draws its own classes. The episodes depend only on the
    arguments (their own ``PCG64(seed)`` generator, never shared), so every
    model is tested on the same tasks; they do not depend on ``batch_size``.
    Generated lazily: yields batch dicts (see module doc) of ``batch_size``
    episodes, the last one possibly smaller.
    """
    _check_episode(images, image_shape, way, shot, query)
    if batch_size < 1 or num_episodes < 0:
        raise DataError("batch_size must be >= 1 and num_episodes >= 0.")
    return _fixed_episode_batches(images, tuple(image_shape), int(way), int(shot),
                                  int(query), int(num_episodes), seed, int(batch_size))


def _fixed_episode_batches(images, image_shape, way, shot, query, num_episodes, seed,
                           batch_size):
    rng = np.random.Generator(np.random.PCG64(seed))
    num_classes, per_class, _ = images.shape
    tasks = []
    for _ in range(num_episodes):
        classes = rng.choice(num_classes, way, replace=False)
        idx = _draw_images(rng, per_class, way, shot + query)
        tasks.append(_make_task(images, image_shape, classes, idx, shot))
        if len(tasks) == batch_size:
            yield _stack_tasks(tasks)
            tasks = []
    if tasks:
        yield _stack_tasks(tasks)
