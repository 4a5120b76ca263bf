"""Tests of src.data: split loading, EpisodeSampler and fixed_episodes.

The synthetic split encodes every image's identity in its pixels: all pixels
of image i of class c equal c * N + i (uint8) or (c * N + i) / 255 (float), so
a sampled image tells which class and which image it came from.
"""

import json
import types

import numpy as np
import pytest

from src.data import DataError, EpisodeSampler, fixed_episodes, load_split

C, N = 12, 20
SHAPE = (2, 3, 1)
D = 6


def make_images(dtype=np.uint8):
    """[C, N, D]: every pixel of image (c, i) = c * N + i (scaled /255 if float)."""
    ids = np.arange(C * N).reshape(C, N, 1).repeat(D, axis=2)
    return ids.astype(np.uint8) if dtype == np.uint8 else (ids / 255.0).astype(dtype)


def identities(x):
    """float [..., H, W, Ch] -> (class [...], image [...]) decoded from pixels."""
    v = np.round(x.reshape(x.shape[: x.ndim - 3] + (-1,)) * 255).astype(int)
    assert (v == v[..., :1]).all()
    return v[..., 0] // N, v[..., 0] % N


def check_task(b, t, way, shot, query):
    """All invariants of task t of batch b; returns its class list [way]."""
    sc, si = identities(b["support_x"][t])
    qc, qi = identities(b["query_x"][t])
    np.testing.assert_array_equal(b["support_y"][t], np.repeat(np.arange(way), shot))
    np.testing.assert_array_equal(b["query_y"][t], np.repeat(np.arange(way), query))
    sc, si = sc.reshape(way, shot), si.reshape(way, shot)
    qc, qi = qc.reshape(way, query), qi.reshape(way, query)
    classes = sc[:, 0]
    assert len(set(classes)) == way  # way distinct classes
    assert (sc == classes[:, None]).all() and (qc == classes[:, None]).all()  # label i <-> class
    for i in range(way):  # shot + query distinct images per class
        assert len(set(si[i]) | set(qi[i])) == shot + query
    return classes


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_shapes_dtypes_and_values(dtype):
    images = make_images(dtype)
    b = EpisodeSampler(images, SHAPE, way=5, shot=2, query=3, seed=0).sample(4)
    assert b["support_x"].shape == (4, 10, 2, 3, 1) and b["support_x"].dtype == np.float32
    assert b["query_x"].shape == (4, 15, 2, 3, 1) and b["query_x"].dtype == np.float32
    assert b["support_y"].shape == (4, 10) and b["support_y"].dtype == np.int32
    assert b["query_y"].shape == (4, 15) and b["query_y"].dtype == np.int32
    c, i = identities(b["support_x"])
    want = ((c * N + i) / 255.0).astype(np.float32)
    np.testing.assert_allclose(b["support_x"][..., 0, 0, 0], want, rtol=1e-6)
    assert b["query_x"].max() <= 1.0 and b["query_x"].min() >= 0.0


def test_uint8_is_divided_by_255_and_float_is_kept():
    images = np.zeros((3, 4, 6), np.uint8)
    images[:] = 255
    b = EpisodeSampler(images, SHAPE, 3, 1, 1, seed=0).sample(1)
    assert (b["support_x"] == 1.0).all()
    floats = np.full((3, 4, 6), 0.25, np.float64)
    b = EpisodeSampler(floats, SHAPE, 3, 1, 1, seed=0).sample(1)
    assert (b["query_x"] == np.float32(0.25)).all()


def test_pixels_keep_row_major_hwc_layout():
    images = np.arange(2 * 3 * 24, dtype=np.float32).reshape(2, 3, 24)
    b = EpisodeSampler(images, (2, 4, 3), way=2, shot=1, query=1, seed=0).sample(1)
    x = b["support_x"][0, 0]
    row = images.reshape(-1, 24)[int(x[0, 0, 0]) // 24]
    np.testing.assert_array_equal(x, row.reshape(2, 4, 3))


@pytest.mark.parametrize("way,shot,query", [(5, 1, 15), (5, 5, 15), (12, 1, 1), (3, 10, 10)])
def test_episode_invariants(way, shot, query):
    sampler = EpisodeSampler(make_images(), SHAPE, way, shot, query, seed=1,
                             shared_classes=False)
    for _ in range(20):
        b = sampler.sample(3)
        for t in range(3):
            check_task(b, t, way, shot, query)


def test_shared_classes_share_the_class_set_not_the_images():
    sampler = EpisodeSampler(make_images(), SHAPE, 5, 1, 5, seed=2)  # default: shared
    assert sampler.shared_classes
    for _ in range(10):
        b = sampler.sample(4)
        classes = [check_task(b, t, 5, 1, 5) for t in range(4)]
        assert all((c == classes[0]).all() for c in classes)
        assert not all((b["query_x"][t] == b["query_x"][0]).all() for t in range(4))


def test_per_task_classes_differ_within_a_batch():
    sampler = EpisodeSampler(make_images(), SHAPE, 5, 1, 5, seed=2, shared_classes=False)
    differ = 0
    for _ in range(10):
        b = sampler.sample(4)
        classes = [check_task(b, t, 5, 1, 5) for t in range(4)]
        differ += any(set(c) != set(classes[0]) for c in classes)
    assert differ >= 9


def test_classes_and_images_cover_the_split():
    sampler = EpisodeSampler(make_images(), SHAPE, 5, 1, 1, seed=3)
    seen_classes, seen_images = set(), set()
    for _ in range(200):
        c, i = identities(sampler.sample(2)["support_x"])
        seen_classes |= set(c.ravel())
        seen_images |= set(zip(c.ravel(), i.ravel()))
    assert seen_classes == set(range(C)) and len(seen_images) > 0.9 * C * N


def test_same_seed_same_stream_other_seed_other_stream():
    a = EpisodeSampler(make_images(), SHAPE, 5, 1, 5, seed=7)
    b = EpisodeSampler(make_images(), SHAPE, 5, 1, 5, seed=7)
    c = EpisodeSampler(make_images(), SHAPE, 5, 1, 5, seed=8)
    for _ in range(3):
        ba, bb, bc = a.sample(4), b.sample(4), c.sample(4)
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k])
        assert not np.array_equal(ba["support_x"], bc["support_x"])


@pytest.mark.parametrize("shared", [True, False])
def test_get_state_set_state_continue_the_stream(shared):
    first = EpisodeSampler(make_images(), SHAPE, 5, 2, 3, seed=11, shared_classes=shared)
    for _ in range(5):
        first.sample(4)
    state = json.loads(json.dumps(first.get_state()))  # must survive JSON
    expected = [first.sample(4) for _ in range(3)]
    resumed = EpisodeSampler(make_images(), SHAPE, 5, 2, 3, seed=999, shared_classes=shared)
    resumed.set_state(state)
    for want in expected:
        got = resumed.sample(4)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_set_state_rejects_another_configuration():
    state = EpisodeSampler(make_images(), SHAPE, 5, 2, 3, seed=0).get_state()
    other = EpisodeSampler(make_images(), SHAPE, 5, 1, 3, seed=0)
    with pytest.raises(DataError, match="configuration|made with"):
        other.set_state(state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(way=13, shot=1, query=1), "only 12 classes"),
    (dict(way=5, shot=5, query=16), "only 20 images"),
    (dict(way=5, shot=1, query=1, image_shape=(3, 3, 1)), "pixels"),
    (dict(way=5, shot=0, query=1), ">= 1"),
])
def test_invalid_settings_raise(kwargs, match):
    args = dict(image_shape=SHAPE, seed=0)
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        EpisodeSampler(make_images(), **args)
    with pytest.raises(DataError, match=match):
        fixed_episodes(make_images(), num_episodes=3, batch_size=2, **args)


# ---------------------------------------------------------------- fixed_episodes

def collect(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, batches


def test_fixed_episodes_are_lazy_and_batched():
    gen = fixed_episodes(make_images(), SHAPE, 5, 1, 3, num_episodes=10, seed=0, batch_size=4)
    assert isinstance(gen, types.GeneratorType)
    _, batches = collect(gen)
    assert [b["support_x"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["query_x"].shape == (4, 15, 2, 3, 1)


def test_fixed_episodes_are_reproducible_and_independent():
    images = make_images()
    first, _ = collect(fixed_episodes(images, SHAPE, 5, 2, 3, 30, seed=5, batch_size=4))
    # use a training sampler and the global numpy generator in between
    sampler = EpisodeSampler(images, SHAPE, 5, 2, 3, seed=5)
    for _ in range(7):
        sampler.sample(4)
    np.random.seed(123)
    np.random.rand(10)
    second, _ = collect(fixed_episodes(images, SHAPE, 5, 2, 3, 30, seed=5, batch_size=7))
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])  # also independent of batch_size
    other, _ = collect(fixed_episodes(images, SHAPE, 5, 2, 3, 30, seed=6, batch_size=4))
    assert not np.array_equal(first["support_x"], other["support_x"])


def test_fixed_episodes_draw_classes_per_episode():
    b, _ = collect(fixed_episodes(make_images(), SHAPE, 5, 1, 2, 20, seed=0, batch_size=20))
    classes = [tuple(check_task(b, t, 5, 1, 2)) for t in range(20)]
    assert len({frozenset(c) for c in classes}) > 10


# ---------------------------------------------------------------- load_split

def test_load_split_memory_maps(tmp_path):
    np.save(tmp_path / "train.npy", make_images())
    images = load_split(tmp_path / "train.npy")
    assert isinstance(images, np.memmap) and images.shape == (C, N, D)
    b = EpisodeSampler(images, SHAPE, 5, 1, 5, seed=0).sample(2)
    assert type(b["support_x"]) is np.ndarray
    check_task(b, 0, 5, 1, 5)


def test_load_split_errors(tmp_path):
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="make data"):
        load_split(tmp_path / "missing.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 784), np.uint8))
    with pytest.raises(DataError, match="3 dimensions"):
        load_split(tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="Cannot read"):
        load_split(tmp_path / "junk.npy")
