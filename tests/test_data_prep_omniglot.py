"""Tests of data_prep.omniglot.

Most tests build tiny archives in tmp_path with the official layout
(``images_background/ALPHABET/characterNN/XXXX_YY.png``, 105x105 1-bit PNGs,
ink black on white) and pass the tiny counts to the prep functions. The last
tests run the full preparation on the real archives in ../shared/data/omniglot
and skip when that folder is absent.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_prep import omniglot
from data_prep.omniglot import DataPrepError

REPO = Path(__file__).resolve().parents[1]

# Tiny layout: 5 + 3 characters, 4 drawers each; split 6 / 2.
LAYOUT = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 3},
}
IMAGES = 4
N_TRAIN, N_TEST = 6, 2
TINY = dict(n_train=N_TRAIN, n_test=N_TEST, images_per_char=IMAGES,
            expected_chars={"images_background.zip": 5, "images_evaluation.zip": 3})


def drawing(char_number, drawer):
    """A 105x105 1-bit image, ink black (0) on white (1).

    Every image has an ink rectangle at rows 0:45, cols 0:30 (top left), plus
    a mark whose column depends on the character and one that depends on the
    drawer (both at column >= 40, rows >= 60).
    """
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 29, 44], fill=0)  # [x0, y0, x1, y1], inclusive
    x = 40 + 6 * (char_number % 8)
    draw.rectangle([x, 60, x + 5, 74], fill=0)
    x = 40 + 10 * drawer
    draw.rectangle([x, 90, x + 7, 99], fill=0)
    return img


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_archives(src, layout=LAYOUT, images=IMAGES, compression=zipfile.ZIP_DEFLATED,
                   drop=None):
    """Write images_background.zip / images_evaluation.zip into ``src``.

    Returns {character path: [105x105 PIL images in drawer order]}.
    ``drop`` = a character path whose last image is left out.
    """
    src.mkdir(parents=True, exist_ok=True)
    drawn, number = {}, 0
    for root, alphabets in layout.items():
        with zipfile.ZipFile(src / (root + ".zip"), "w", compression) as z:
            z.writestr(root + "/", b"")
            for alphabet, n_chars in alphabets.items():
                for c in range(1, n_chars + 1):
                    char = "{}/{}/character{:02d}".format(root, alphabet, c)
                    drawn[char] = []
                    count = images - 1 if char == drop else images
                    for d in range(count):
                        img = drawing(number, d)
                        drawn[char].append(img)
                        z.writestr("{}/{:04d}_{:02d}.png".format(char, number + 1, d + 1),
                                   png_bytes(img))
                    number += 1
    return drawn


def maml_resize(img):
    """MAML's resize_images.py, literally: ``im.resize((28, 28),
    resample=Image.LANCZOS)`` on the 1-bit image (PIL samples 1-bit images
    with NEAREST whatever the filter), then 8-bit grey."""
    return np.asarray(img.resize((28, 28), resample=Image.Resampling.LANCZOS).convert("L"))


def expected_class(img_list, k):
    """Independent reference: MAML's resize, 255 - x, rot90 k -> [N, 784]."""
    out = []
    for img in img_list:
        a = 255 - maml_resize(img)
        out.append(np.rot90(a, k).reshape(-1))
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny archives prepared once with seed 1: (src, out, drawn characters)."""
    base = tmp_path_factory.mktemp("tiny")
    drawn = build_archives(base / "src")
    assert omniglot.prepare(str(base / "src"), str(base / "out"), seed=1, **TINY) == "prepared"
    return base / "src", base / "out", drawn


def load_out(out):
    train = np.load(out / "train.npy")
    test = np.load(out / "test.npy")
    manifest = json.loads((out / "manifest.json").read_text())
    return train, test, manifest


# ---------------------------------------------------------------- archives

def test_shapes_dtype_and_manifest(tiny):
    src, out, _ = tiny
    train, test, man = load_out(out)
    assert train.shape == (4 * N_TRAIN, IMAGES, 784) and train.dtype == np.uint8
    assert test.shape == (4 * N_TEST, IMAGES, 784) and test.dtype == np.uint8
    assert man["format_version"] == omniglot.FORMAT_VERSION
    assert man["seed"] == 1 and man["source"] == "archives" and man["dtype"] == "uint8"
    assert man["shapes"] == {"train": list(train.shape), "test": list(test.shape)}
    assert [s["name"] for s in man["sources"]] == ["images_background.zip",
                                                   "images_evaluation.zip"]
    for s in man["sources"]:
        assert s["size"] == os.path.getsize(src / s["name"])
        assert s["md5"] == omniglot.file_md5(src / s["name"])
    assert len(man["classes"]["train"]) == 4 * N_TRAIN
    assert man["classes"]["train"][:4] == [man["classes"]["train"][0][:-len("@rot0")] + r
                                          for r in ("@rot0", "@rot90", "@rot180", "@rot270")]


def test_ink_is_255_background_is_0(tiny):
    _, out, _ = tiny
    train, test, man = load_out(out)
    rot0 = np.concatenate([train[0::4], test[0::4]]).reshape(-1, 28, 28)
    # the ink rectangle (source rows 0:45, cols 0:30 -> about 12 x 8 pixels)
    assert (rot0[:, 0:9, 0:5] == 255).all()
    # a region far from every mark is pure background
    assert (rot0[:, 16:26, 0:6] == 0).all()
    assert (rot0 == 0).mean() > 0.5


def test_rotations_are_separate_classes(tiny):
    _, out, _ = tiny
    for arr in load_out(out)[:2]:
        for c in range(arr.shape[0] // 4):
            base = arr[4 * c].reshape(-1, 28, 28)
            for k in range(4):
                want = np.rot90(base, k, axes=(1, 2)).reshape(len(base), -1)
                np.testing.assert_array_equal(arr[4 * c + k], want)


def test_every_class_holds_its_character_in_drawer_order(tiny):
    _, out, drawn = tiny
    train, test, man = load_out(out)
    for arr, names in ((train, man["classes"]["train"]), (test, man["classes"]["test"])):
        for index, name in enumerate(names):
            char, rot = name.split("@rot")
            np.testing.assert_array_equal(arr[index], expected_class(drawn[char], int(rot) // 90))


def test_split_follows_seeded_permutation(tiny, tmp_path):
    src, out, drawn = tiny
    chars = sorted(drawn)
    _, _, man = load_out(out)
    perm = np.random.RandomState(1).permutation(len(chars))
    assert man["classes"]["train"][::4] == [chars[i] + "@rot0" for i in perm[:N_TRAIN]]
    assert man["classes"]["test"][::4] == [chars[i] + "@rot0" for i in perm[N_TRAIN:]]
    # same seed again -> byte-identical arrays
    omniglot.prepare(str(src), str(tmp_path / "again"), seed=1, **TINY)
    for split in ("train", "test"):
        assert (tmp_path / "again" / (split + ".npy")).read_bytes() == \
            (out / (split + ".npy")).read_bytes()
    # another seed -> another split, still a partition of all characters
    omniglot.prepare(str(src), str(tmp_path / "seed2"), seed=2, **TINY)
    _, _, man2 = load_out(tmp_path / "seed2")
    assert man2["seed"] == 2 and man2["classes"] != man["classes"]
    train_chars = {c.split("@")[0] for c in man2["classes"]["train"]}
    test_chars = {c.split("@")[0] for c in man2["classes"]["test"]}
    assert not train_chars & test_chars and train_chars | test_chars == set(chars)


def test_second_run_is_up_to_date_and_rewrites_nothing(tiny, tmp_path):
    src, _, _ = tiny
    out = tmp_path / "out"
    assert omniglot.prepare(str(src), str(out), seed=1, **TINY) == "prepared"
    names = ("train.npy", "test.npy", "manifest.json")
    before = {n: os.stat(out / n).st_mtime_ns for n in names}
    time.sleep(0.01)
    assert omniglot.prepare(str(src), str(out), seed=1, **TINY) == "up-to-date"
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == before
    assert sorted(os.listdir(out)) == sorted(names)  # no temporary files left
    # another seed, or a damaged output, makes it prepare again
    assert omniglot.prepare(str(src), str(out), seed=3, **TINY) == "prepared"
    (out / "test.npy").write_bytes(b"garbage")
    assert omniglot.prepare(str(src), str(out), seed=3, **TINY) == "prepared"
    assert np.load(out / "test.npy").shape == (4 * N_TEST, IMAGES, 784)


def test_download_option_fetches_missing_archives(tiny, tmp_path, monkeypatch):
    src, _, _ = tiny
    md5 = {n: omniglot.file_md5(src / n) for n in omniglot.ARCHIVES}
    monkeypatch.setattr(omniglot, "OFFICIAL_URL", src.as_uri() + "/{name}")
    monkeypatch.setattr(omniglot, "OFFICIAL_MD5", md5)
    dest = tmp_path / "downloads"
    result = omniglot.prepare(str(dest), str(tmp_path / "out"), seed=1, download=True, **TINY)
    assert result == "prepared"
    for n in omniglot.ARCHIVES:
        assert (dest / n).read_bytes() == (src / n).read_bytes()


# ---------------------------------------------------------------- download

def test_download_file_checks_md5(tmp_path):
    payload = os.urandom(300_000)
    source = tmp_path / "archive.zip"
    source.write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()

    dest = tmp_path / "dl" / "archive.zip"
    dest.parent.mkdir()
    omniglot.download_file(source.as_uri(), str(dest), good)
    assert dest.read_bytes() == payload
    assert not Path(str(dest) + ".part").exists()

    bad_dest = tmp_path / "dl" / "bad.zip"
    with pytest.raises(DataPrepError, match="md5"):
        omniglot.download_file(source.as_uri(), str(bad_dest), "0" * 32)
    assert not bad_dest.exists() and not Path(str(bad_dest) + ".part").exists()

    with pytest.raises(DataPrepError, match="incomplete"):
        omniglot.download_file(source.as_uri(), str(bad_dest), good, size=len(payload) + 1)
    assert not bad_dest.exists() and not Path(str(bad_dest) + ".part").exists()

    with pytest.raises(DataPrepError, match="Could not download"):
        omniglot.download_file((tmp_path / "nope.zip").as_uri(), str(bad_dest), good)
    assert not Path(str(bad_dest) + ".part").exists()


# ---------------------------------------------------------------- authors' npy

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_authors_npy_is_converted(tmp_path, dtype):
    rng = np.random.default_rng(0)
    src = tmp_path / "authors"
    src.mkdir()
    raw = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = (rng.random((4 * n, IMAGES, 784)) < 0.1).astype(np.float64) * rng.random()
        raw[split] = np.round(x * 255).astype(np.uint8) if dtype == np.uint8 else x.astype(dtype)
        np.save(src / (split + ".npy"), raw[split])
    out = tmp_path / "out"
    assert omniglot.prepare(str(src), str(out), **TINY) == "prepared"
    train, test, man = load_out(out)
    assert man["source"] == "authors-npy" and man["classes"] == {"train": None, "test": None}
    for split, arr in (("train", train), ("test", test)):
        assert arr.dtype == np.uint8
        want = raw[split] if dtype == np.uint8 else np.round(raw[split].astype(np.float64) * 255)
        np.testing.assert_array_equal(arr, want.astype(np.uint8))
    assert omniglot.prepare(str(src), str(out), **TINY) == "up-to-date"


def test_authors_npy_wrong_shape_names_file_and_shapes(tmp_path):
    src = tmp_path / "authors"
    src.mkdir()
    np.save(src / "train.npy", np.zeros((4 * N_TRAIN, IMAGES, 784), np.float32))
    np.save(src / "test.npy", np.zeros((4 * N_TEST, IMAGES, 28, 28), np.float32))
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(src), str(tmp_path / "out"), **TINY)
    msg = str(err.value)
    assert "test.npy" in msg and "(8, 4, 28, 28)" in msg and "(8, 4, 784)" in msg
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_authors_npy_out_of_range(tmp_path):
    src = tmp_path / "authors"
    src.mkdir()
    np.save(src / "train.npy", np.full((4 * N_TRAIN, IMAGES, 784), 255.0, np.float32))
    np.save(src / "test.npy", np.zeros((4 * N_TEST, IMAGES, 784), np.float32))
    with pytest.raises(DataPrepError, match=r"outside \[0, 1\]"):
        omniglot.prepare(str(src), str(tmp_path / "out"), **TINY)


# ---------------------------------------------------------------- bad inputs

def test_missing_archive(tmp_path):
    build_archives(tmp_path / "src")
    (tmp_path / "src" / "images_evaluation.zip").unlink()
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(tmp_path / "src"), str(tmp_path / "out"), **TINY)
    assert "images_evaluation.zip" in str(err.value) and "--download" in str(err.value)


def test_truncated_zip(tmp_path):
    build_archives(tmp_path / "src")
    path = tmp_path / "src" / "images_background.zip"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(tmp_path / "src"), str(tmp_path / "out"), **TINY)
    msg = str(err.value)
    assert "images_background.zip" in msg and "truncated" in msg and "Re-download" in msg


def test_corrupt_zip_member(tmp_path):
    build_archives(tmp_path / "src", compression=zipfile.ZIP_STORED)
    path = tmp_path / "src" / "images_evaluation.zip"
    with zipfile.ZipFile(path) as z:
        info = [i for i in z.infolist() if i.filename.endswith(".png")][1]
    data = bytearray(path.read_bytes())
    h = info.header_offset  # local header: 30 bytes + name + extra, then the data
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + \
        int.from_bytes(data[h + 28:h + 30], "little")
    data[start + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(tmp_path / "src"), str(tmp_path / "out"), **TINY)
    msg = str(err.value)
    assert "corrupt" in msg and info.filename in msg and "Re-download" in msg


def test_wrong_character_count(tmp_path):
    build_archives(tmp_path / "src")
    counts = dict(TINY, expected_chars={"images_background.zip": 6, "images_evaluation.zip": 3})
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(tmp_path / "src"), str(tmp_path / "out"), **counts)
    msg = str(err.value)
    assert "found 5 character folders (expected 6)" in msg and "images_background.zip" in msg


def test_wrong_image_count(tmp_path):
    build_archives(tmp_path / "src", drop="images_evaluation/Gamma/character02")
    with pytest.raises(DataPrepError) as err:
        omniglot.prepare(str(tmp_path / "src"), str(tmp_path / "out"), **TINY)
    assert "images_evaluation/Gamma/character02: 3" in str(err.value)


def test_cli_turns_errors_into_exit_code_2(tmp_path, capsys):
    build_archives(tmp_path / "src")  # tiny: the CLI expects the official 964/659
    assert omniglot.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected 964" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.omniglot", "--src", str(empty), "--out",
         str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--download" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- real data

# real_out: the fixture in conftest.py.


def test_real_archives_full_prep(real_out):
    src, out = real_out
    train = np.load(out / "train.npy", mmap_mode="r")
    test = np.load(out / "test.npy", mmap_mode="r")
    assert train.shape == (4800, 20, 784) and test.shape == (1692, 20, 784)
    assert train.dtype == np.uint8 and test.dtype == np.uint8
    sample = np.asarray(train[::50])
    assert sample.max() == 255 and sample.min() == 0
    assert (sample == 0).mean() > 0.6 and sample.mean() < 0.2 * 255  # mostly background
    man = json.loads((out / "manifest.json").read_text())
    train_chars = {c.split("@")[0] for c in man["classes"]["train"]}
    test_chars = {c.split("@")[0] for c in man["classes"]["test"]}
    assert len(train_chars) == 1200 and len(test_chars) == 423
    assert not train_chars & test_chars
    assert {c.split("/")[0] for c in train_chars | test_chars} == {"images_background",
                                                                   "images_evaluation"}
    base = np.asarray(test[8]).reshape(20, 28, 28)
    np.testing.assert_array_equal(test[11], np.rot90(base, 3, axes=(1, 2)).reshape(20, -1))
    # Binary, as MAML's resized images: no grey pixel anywhere.
    assert set(np.unique(sample)) == {0, 255}


def test_real_archives_match_maml_resize(real_out):
    """The first character of the test split, unrotated, equals MAML's
    resize_images.py applied to its 20 PNGs read straight from the archive."""
    src, out = real_out
    man = json.loads((out / "manifest.json").read_text())
    name, rotation = man["classes"]["test"][0].split("@")
    assert rotation == "rot0"
    root = name.split("/")[0]
    with zipfile.ZipFile(src / (root + ".zip")) as z:
        pngs = sorted(m for m in z.namelist()
                      if m.startswith(name + "/") and m.endswith(".png"))
        images = [Image.open(io.BytesIO(z.read(m))) for m in pngs]
        assert len(images) == 20 and images[0].mode == "1"
        expected = expected_class(images, 0)
    np.testing.assert_array_equal(np.load(out / "test.npy", mmap_mode="r")[0], expected)


def test_real_archives_second_run_is_quick(real_out):
    src, out = real_out
    start = time.time()
    assert omniglot.prepare(str(src), str(out)) == "up-to-date"
    assert time.time() - start < 10
