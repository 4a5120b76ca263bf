"""Tests of data_prep/miniimagenet.py.

The real miniImageNet images are not available. The shared data folder
(``../shared/data/miniimagenet`` from the repo root) holds the official split
files and one real, full-size ImageNet photograph per class; tests that need
them skip when it is absent. Every class is topped up with GENERATED images:
84x84 (some 97x120, to go through the resize) flat-colour JPEGs whose colour
encodes (class index, image index), so that the slot every image lands in can
be checked. Flat colours survive JPEG + LANCZOS within +-1, and the codes are
multiples of 4.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import miniimagenet as mi
from data_prep.errors import DataPrepError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "miniimagenet"
D = 84 * 84 * 3


def shared_or_skip() -> Path:
    if not (SHARED / "splits").is_dir() or not (SHARED / "one_image_per_class").is_dir():
        pytest.skip(f"shared miniImageNet split files / photographs not found at {SHARED} "
                    f"(they exist only on the development machine)")
    return SHARED


# --------------------------------------------------------------------------
# Helpers: generated images, csvs, independent readers
# --------------------------------------------------------------------------

def code_colour(c: int, i: int) -> tuple[int, int, int]:
    """RGB colour coding class c (< 64) and image i (< 600)."""
    return (4 * c, 4 * (i // 50), 4 * (i % 50))


def decode_colours(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 21168] flat-colour images -> int [n, 2] (class, image) codes."""
    mean = images.reshape(len(images), -1, 3).mean(axis=1)
    q = np.rint(mean / 4).astype(int)
    return np.stack([q[:, 0], 50 * q[:, 1] + q[:, 2]], axis=1)


def generated_jpeg(c: int, i: int) -> bytes:
    size = (97, 120) if i % 7 == 3 else (84, 84)
    buf = io.BytesIO()
    Image.new("RGB", size, code_colour(c, i)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def real_photo(split: str, wnid: str) -> Path:
    (path,) = sorted((SHARED / "one_image_per_class" / split / wnid).iterdir())
    return path


def independent_resize(path: Path) -> np.ndarray:
    """The reference decode: PIL, RGB, 84x84 LANCZOS, HWC flatten."""
    im = Image.open(path).convert("RGB").resize((84, 84), resample=Image.LANCZOS)
    return np.array(im).reshape(-1)


def csv_label_order(csv_path: Path) -> list[str]:
    """Labels in order of first appearance, read independently of the module."""
    labels = [line.split(",")[1].strip() for line in csv_path.read_text().splitlines()[1:]
              if line.strip()]
    return list(dict.fromkeys(labels))


def csv_rows_by_class(csv_path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in csv_path.read_text().splitlines()[1:]:
        if line.strip():
            name, label = line.strip().split(",")
            rows.setdefault(label, []).append(name)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("filename,label\n" + "".join(f"{f},{l}\n" for f, l in rows))


def photo_slot(c: int, n: int) -> int:
    """Row (within its class) that receives the real photograph of class c."""
    return (37 * c + 5) % n


def fill_images(images_dir: Path, split: str, by_class: dict[str, list[str]],
                use_real_photos: bool) -> dict[str, int]:
    """Write the images of one split: the real photograph of class c (if asked)
    at row photo_slot(c), generated JPEGs elsewhere. Returns {wnid: slot}."""
    images_dir.mkdir(parents=True, exist_ok=True)
    slots = {}
    for c, (wnid, names) in enumerate(by_class.items()):
        for i, name in enumerate(names):
            (images_dir / name).write_bytes(generated_jpeg(c, i))
        if use_real_photos:
            slots[wnid] = photo_slot(c, len(names))
            shutil.copyfile(real_photo(split, wnid), images_dir / names[slots[wnid]])
    return slots


def small_dataset(root: Path, counts=None, per_class=4):
    """Synthetic splits: counts = {split: n_classes}; interleaved csv rows.

    Returns (images_dir, splits_dir, {split: {label: [filenames]}}).
    """
    counts = counts or {"train": 3, "val": 2, "test": 2}
    images, splits = root / "images", root / "splits"
    splits.mkdir(parents=True)
    layout = {}
    k = 0
    for split, n in counts.items():
        labels = [f"n{9000000 + k + c:08d}" for c in range(n)]
        k += n
        by_class = {l: [f"{l}{i:08d}.jpg" for i in range(per_class)] for l in labels}
        # rows interleaved (class 1 first, then 0, ...), so first-appearance order
        # differs from sorted order and rows of a class are not contiguous
        order = labels[1:2] + labels[:1] + labels[2:]
        rows = [(by_class[l][i], l) for i in range(per_class) for l in order]
        write_csv(splits / f"{split}.csv", rows)
        layout[split] = {l: by_class[l] for l in order}
        fill_images(images, split, layout[split], use_real_photos=False)
    return images, splits, layout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.miniimagenet", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900)  # hang guard only


# --------------------------------------------------------------------------
# Real split files, real photographs, 600 per class
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_test_split(tmp_path_factory):
    """test.csv (the real one, 20 classes x 600 rows) prepared from the 20 real
    photographs (full size, so resized) plus 11,980 generated JPEGs."""
    shared = shared_or_skip()
    root = tmp_path_factory.mktemp("mini600")
    csv_path = shared / "splits" / "test.csv"
    by_class = csv_rows_by_class(csv_path)
    t0 = time.time()
    slots = fill_images(root / "images", "test", by_class, use_real_photos=True)
    t_gen = time.time() - t0
    t0 = time.time()
    manifest = mi.prepare_from_images(root / "images", shared / "splits", root / "out",
                                      classes_per_split={"test": 20}, verbose=False)
    t_prep = time.time() - t0
    print(f"\nreal test split: generated 12000 files in {t_gen:.1f} s, prepared in {t_prep:.1f} s")
    yield {"root": root, "out": root / "out", "manifest": manifest, "slots": slots,
           "by_class": by_class, "csv": csv_path}
    shutil.rmtree(root)  # 300 MB: do not leave it to pytest's tmp retention


def test_real_test_split_shapes_dtype_manifest(real_test_split):
    """Real test.csv, 600 per class (1 real photograph + 599 generated each)."""
    out = real_test_split["out"]
    arr = np.load(out / "test.npy", mmap_mode="r")
    assert arr.shape == (20, 600, 21168) and arr.dtype == np.uint8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == real_test_split["manifest"]
    assert manifest["splits"]["test"]["shape"] == [20, 600, 21168]
    assert manifest["dtype"] == "uint8"
    assert manifest["source"]["kind"] == "images"
    assert manifest["splits"]["test"]["classes"] == csv_label_order(real_test_split["csv"])
    assert manifest["splits"]["test"]["classes"][:2] == ["n01930112", "n01981276"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npy"]


def test_real_photographs_land_in_their_class_slots(real_test_split):
    """Each real photograph is at [class index in csv order, its row], equal to
    an independent PIL RGB + LANCZOS 84x84 resize of the full-size file."""
    arr = np.load(real_test_split["out"] / "test.npy", mmap_mode="r")
    labels = csv_label_order(real_test_split["csv"])
    for c, wnid in enumerate(labels):
        path = real_photo("test", wnid)
        assert Image.open(path).size != (84, 84)  # the resize is exercised
        np.testing.assert_array_equal(arr[c, real_test_split["slots"][wnid]],
                                      independent_resize(path), err_msg=wnid)


def test_generated_fill_in_csv_row_order(real_test_split):
    """Every generated image is at [its class, its csv row within the class]."""
    arr = np.load(real_test_split["out"] / "test.npy", mmap_mode="r")
    for c, wnid in enumerate(csv_label_order(real_test_split["csv"])):
        codes = decode_colours(np.asarray(arr[c]))
        expected = np.stack([np.full(600, c), np.arange(600)], axis=1)
        keep = np.arange(600) != real_test_split["slots"][wnid]
        np.testing.assert_array_equal(codes[keep], expected[keep], err_msg=wnid)


def test_real_test_split_idempotent(real_test_split, monkeypatch):
    """A second run with complete outputs decodes nothing and rewrites nothing."""
    out = real_test_split["out"]
    before = (out / "test.npy").stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("images decoded again")

    monkeypatch.setattr(mi, "load_class", no_decoding)
    t0 = time.time()
    manifest = mi.prepare_from_images(real_test_split["root"] / "images", SHARED / "splits",
                                      out, classes_per_split={"test": 20}, verbose=False)
    assert time.time() - t0 < 5
    assert manifest == real_test_split["manifest"]
    assert (out / "test.npy").stat().st_mtime_ns == before


def test_cli_second_run_is_quick(real_test_split):
    out = real_test_split["out"]
    before = (out / "test.npy").stat().st_mtime_ns
    r = run_cli("--images", str(real_test_split["root"] / "images"),
                "--splits", str(SHARED / "splits"), "--out", str(out), "--classes", "test=20")
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout
    assert (out / "test.npy").stat().st_mtime_ns == before


def test_real_class_with_599_images(tmp_path):
    """The real test.csv with one row of its 3rd class removed."""
    shared = shared_or_skip()
    lines = (shared / "splits" / "test.csv").read_text().splitlines()
    third = csv_label_order(shared / "splits" / "test.csv")[2]
    drop = next(k for k, line in enumerate(lines) if line.endswith("," + third))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.csv").write_text("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
    with pytest.raises(DataPrepError, match=f"class {third} .* has 599 images, expected 600"):
        mi.prepare_from_images(tmp_path / "images", tmp_path / "splits", tmp_path / "out",
                               classes_per_split={"test": 20}, verbose=False)


def test_real_val_split_trimmed_with_grayscale_photo(tmp_path):
    """Real val.csv trimmed to its first 5 rows per class (real WNIDs, label
    order kept), the 16 real val photographs (one of them grayscale: converted
    to RGB) plus generated fill."""
    shared = shared_or_skip()
    full = csv_rows_by_class(shared / "splits" / "val.csv")
    by_class = {wnid: names[:5] for wnid, names in full.items()}
    (tmp_path / "splits").mkdir()
    write_csv(tmp_path / "splits" / "val.csv",
              [(n, w) for w, names in by_class.items() for n in names])
    slots = fill_images(tmp_path / "images", "val", by_class, use_real_photos=True)
    manifest = mi.prepare_from_images(tmp_path / "images", tmp_path / "splits", tmp_path / "out",
                                      images_per_class=5, classes_per_split={"val": 16},
                                      verbose=False)
    arr = np.load(tmp_path / "out" / "val.npy")
    assert arr.shape == (16, 5, D)
    assert manifest["splits"]["val"]["classes"] == csv_label_order(shared / "splits" / "val.csv")
    grey = 0
    for c, wnid in enumerate(by_class):
        path = real_photo("val", wnid)
        np.testing.assert_array_equal(arr[c, slots[wnid]], independent_resize(path))
        if Image.open(path).mode == "L":
            grey += 1
            rgb = arr[c, slots[wnid]].reshape(84, 84, 3)
            assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert grey == 1


@pytest.mark.slow
def test_all_three_real_splits_600_per_class(tmp_path):
    """All real split files (64/16/20 x 600) with the 100 real photographs and
    59,900 generated JPEGs, through the CLI with its official defaults."""
    shared = shared_or_skip()
    slots = {}
    for split in ("train", "val", "test"):
        by_class = csv_rows_by_class(shared / "splits" / f"{split}.csv")
        slots[split] = fill_images(tmp_path / "images", split, by_class, use_real_photos=True)
    r = run_cli("--images", str(tmp_path / "images"), "--splits", str(shared / "splits"),
                "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        arr = np.load(tmp_path / "out" / f"{split}.npy", mmap_mode="r")
        assert arr.shape == (n, 600, D) and arr.dtype == np.uint8
        labels = csv_label_order(shared / "splits" / f"{split}.csv")
        assert manifest["splits"][split]["classes"] == labels
        for c, wnid in enumerate(labels):
            slot = slots[split][wnid]
            np.testing.assert_array_equal(arr[c, slot], independent_resize(real_photo(split, wnid)))
            codes = decode_colours(np.asarray(arr[c]))
            keep = np.arange(600) != slot
            assert (codes[keep, 0] == c).all() and (codes[keep, 1] == np.arange(600)[keep]).all()
    shutil.rmtree(tmp_path / "out")  # 1.3 GB


# --------------------------------------------------------------------------
# Synthetic small splits (no shared data needed)
# --------------------------------------------------------------------------

SMALL = {"train": 3, "val": 2, "test": 2}


def test_small_three_splits_label_and_row_order(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL, per_class=4)
    manifest = mi.prepare_from_images(images, splits, tmp_path / "out", images_per_class=4,
                                      classes_per_split=SMALL, verbose=False)
    for split, n in SMALL.items():
        arr = np.load(tmp_path / "out" / f"{split}.npy")
        assert arr.shape == (n, 4, D) and arr.dtype == np.uint8
        labels = list(layout[split])
        assert manifest["splits"][split]["classes"] == labels
        assert labels != sorted(labels)  # first appearance, not sorted
        codes = decode_colours(arr.reshape(-1, D)).reshape(n, 4, 2)
        assert (codes[..., 0] == np.arange(n)[:, None]).all()
        assert (codes[..., 1] == np.arange(4)[None, :]).all()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_small_rebuilds_when_inputs_change_or_forced(tmp_path, monkeypatch):
    images, splits, layout = small_dataset(tmp_path, SMALL, per_class=4)
    kw = dict(images_per_class=4, classes_per_split=SMALL, verbose=False)
    mi.prepare_from_images(images, splits, tmp_path / "out", **kw)
    calls = []
    real_load_class = mi.load_class
    monkeypatch.setattr(mi, "load_class", lambda *a: calls.append(a[1]) or real_load_class(*a))
    mi.prepare_from_images(images, splits, tmp_path / "out", **kw)
    assert calls == []
    mi.prepare_from_images(images, splits, tmp_path / "out", force=True, **kw)
    assert len(calls) == 7
    # a changed csv (rows of a class reordered) gives a new manifest: rebuild
    rows = [(n, l) for l, names in layout["test"].items() for n in reversed(names)]
    write_csv(splits / "test.csv", rows)
    calls.clear()
    mi.prepare_from_images(images, splits, tmp_path / "out", **kw)
    assert len(calls) == 7
    # a deleted output: rebuild
    (tmp_path / "out" / "val.npy").unlink()
    calls.clear()
    mi.prepare_from_images(images, splits, tmp_path / "out", **kw)
    assert len(calls) == 7


def test_failure_leaves_no_partial_output(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL, per_class=4)
    last_class = list(layout["test"])[-1]
    (images / layout["test"][last_class][2]).write_bytes(b"not a jpeg")
    with pytest.raises(DataPrepError):
        mi.prepare_from_images(images, splits, tmp_path / "out", images_per_class=4,
                               classes_per_split=SMALL, verbose=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "test.npy").exists()
    assert not list((tmp_path / "out").glob(".*"))


# --------------------------------------------------------------------------
# Bad inputs (images source)
# --------------------------------------------------------------------------

def _prepare_small(images, splits, out, per_class=4, counts=SMALL):
    return mi.prepare_from_images(images, splits, out, images_per_class=per_class,
                                  classes_per_split=counts, verbose=False)


def test_missing_csv(tmp_path):
    images, splits, _ = small_dataset(tmp_path, SMALL)
    (splits / "val.csv").unlink()
    with pytest.raises(DataPrepError, match=r"split file not found: .*val\.csv\. --splits"):
        _prepare_small(images, splits, tmp_path / "out")
    (splits / "test.csv").unlink()
    with pytest.raises(DataPrepError) as e:
        _prepare_small(images, splits, tmp_path / "out")
    assert f"{splits / 'val.csv'}, {splits / 'test.csv'}" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_csv_header(tmp_path):
    images, splits, _ = small_dataset(tmp_path, SMALL)
    text = (splits / "train.csv").read_text().splitlines()
    (splits / "train.csv").write_text("\n".join(text[1:]) + "\n")
    with pytest.raises(DataPrepError, match=r"train\.csv.*header 'filename,label'"):
        _prepare_small(images, splits, tmp_path / "out")


def test_missing_image_names_file_and_class(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL)
    label = list(layout["val"])[1]
    name = layout["val"][label][3]
    (images / name).unlink()
    with pytest.raises(DataPrepError) as e:
        _prepare_small(images, splits, tmp_path / "out")
    msg = str(e.value)
    assert f"missing image {images / name}" in msg and f"class {label}" in msg
    assert "1 of the 8 images listed in val.csv are missing" in msg and "--images" in msg
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_images_folder(tmp_path):
    _, splits, _ = small_dataset(tmp_path, SMALL)
    with pytest.raises(DataPrepError, match="images folder not found"):
        _prepare_small(tmp_path / "nowhere", splits, tmp_path / "out")


def test_class_with_too_few_images(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL)
    label = list(layout["train"])[2]
    lines = (splits / "train.csv").read_text().splitlines()
    lines.remove(f"{layout['train'][label][0]},{label}")
    (splits / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataPrepError, match=f"class {label} in .*train.csv has 3 images, expected 4"):
        _prepare_small(images, splits, tmp_path / "out")


def test_wrong_number_of_classes(tmp_path):
    images, splits, _ = small_dataset(tmp_path, SMALL)
    with pytest.raises(DataPrepError, match=r"test\.csv: 2 classes, expected 20"):
        _prepare_small(images, splits, tmp_path / "out", counts={"test": 20})


def test_class_in_two_splits(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL)
    label = list(layout["train"])[0]
    val_label = list(layout["val"])[0]
    text = (splits / "val.csv").read_text().replace(f",{val_label}\n", f",{label}\n")
    (splits / "val.csv").write_text(text)
    with pytest.raises(DataPrepError, match=f"class {label} is listed in both train.csv and val.csv"):
        _prepare_small(images, splits, tmp_path / "out")


def test_duplicate_row(tmp_path):
    images, splits, layout = small_dataset(tmp_path, SMALL)
    label = list(layout["test"])[0]
    with open(splits / "test.csv", "a") as f:
        f.write(f"{layout['test'][label][0]},{label}\n")
    with pytest.raises(DataPrepError, match="listed twice"):
        _prepare_small(images, splits, tmp_path / "out")


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated"])
def test_corrupt_image_names_file_and_class(tmp_path, content):
    images, splits, layout = small_dataset(tmp_path, SMALL)
    label = list(layout["test"])[1]
    path = images / layout["test"][label][2]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)
                    ).save(buf, "JPEG")
    data = {"garbage": b"this is not a jpeg" * 10, "empty": b"",
            "truncated": buf.getvalue()[: len(buf.getvalue()) // 2]}[content]
    path.write_bytes(data)
    with pytest.raises(DataPrepError) as e:
        _prepare_small(images, splits, tmp_path / "out")
    msg = str(e.value)
    assert f"cannot read image {path}" in msg and f"class {label}" in msg
    assert "replace it" in msg


def test_cli_error_exit_2_without_traceback(tmp_path):
    images, splits, _ = small_dataset(tmp_path, SMALL)
    (splits / "test.csv").unlink()
    r = run_cli("--images", str(images), "--splits", str(splits), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: split file not found: {splits / 'test.csv'}. --splits")
    assert "Traceback" not in r.stderr
    # a count error, with the official defaults
    write_csv(splits / "test.csv", [])
    r = run_cli("--images", str(images), "--splits", str(splits), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "train.csv: 3 classes, expected 64" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_arguments(tmp_path):
    r = run_cli("--npy", str(tmp_path), "--images", str(tmp_path), "--splits", str(tmp_path))
    assert r.returncode == 2 and "either --npy or --images" in r.stderr
    r = run_cli("--images", str(tmp_path))
    assert r.returncode == 2 and "give --images and --splits" in r.stderr
    r = run_cli("--npy", str(tmp_path), "--classes", "train=x")
    assert r.returncode == 2 and "bad --classes item" in r.stderr


# --------------------------------------------------------------------------
# The original code's npy files
# --------------------------------------------------------------------------

NPY_COUNTS = {"train": 3, "val": 2, "test": 2}


def write_npys(folder: Path, val: bool = False, per_class: int = 5):
    """train.npy float32 in [0, 1] (exact multiples of 1/255 plus noise below
    half a step), test.npy uint8, val.npy float64 if asked. Returns the
    expected uint8 arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    expected = {}
    u8 = rng.integers(0, 256, (3, per_class, D), dtype=np.uint8)
    u8[0, 0, :2] = [0, 255]
    x = u8.astype(np.float32) / 255 + rng.uniform(-0.4, 0.4, u8.shape).astype(np.float32) / 255
    x = np.clip(x, 0, 1).astype(np.float32)
    np.save(folder / "train.npy", x)
    expected["train"] = u8
    expected["test"] = rng.integers(0, 256, (2, per_class, D), dtype=np.uint8)
    np.save(folder / "test.npy", expected["test"])
    if val:
        expected["val"] = rng.integers(0, 256, (2, per_class, D), dtype=np.uint8)
        np.save(folder / "val.npy", expected["val"].astype(np.float64) / 255)
    return expected


def _prepare_npy(src, out, **kw):
    return mi.prepare_from_npy(src, out, images_per_class=5, classes_per_split=NPY_COUNTS,
                               verbose=False, **kw)


def test_npy_train_test_converted_no_val(tmp_path, monkeypatch):
    expected = write_npys(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "val.npy", np.zeros((1, 1, D), np.uint8))  # stale, from an earlier run
    manifest = _prepare_npy(tmp_path / "src", out)
    for split in ("train", "test"):
        arr = np.load(out / f"{split}.npy")
        assert arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, expected[split])
    assert not (out / "val.npy").exists()
    assert "val" not in manifest["splits"]
    assert "no validation split" in manifest["missing_splits"]["val"]
    assert manifest["splits"]["train"] == {"file": "train.npy", "shape": [3, 5, D], "classes": None}
    assert manifest["source"]["kind"] == "npy"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # idempotent
    monkeypatch.setattr(mi, "_write_split", lambda *a: pytest.fail("rewritten"))
    assert _prepare_npy(tmp_path / "src", out) == manifest


def test_npy_with_val(tmp_path):
    expected = write_npys(tmp_path / "src", val=True)
    manifest = _prepare_npy(tmp_path / "src", tmp_path / "out")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "val.npy"), expected["val"])
    assert "missing_splits" not in manifest and manifest["splits"]["val"]["shape"] == [2, 5, D]


def test_npy_rebuilt_when_source_replaced(tmp_path):
    write_npys(tmp_path / "src")
    _prepare_npy(tmp_path / "src", tmp_path / "out")
    new = np.full((2, 5, D), 7, np.uint8)
    np.save(tmp_path / "src" / "test.npy", new)
    os.utime(tmp_path / "src" / "test.npy", ns=(1, 1))  # mtime surely differs
    _prepare_npy(tmp_path / "src", tmp_path / "out")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "test.npy"), new)


def test_npy_wrong_shape_names_file_found_expected(tmp_path):
    write_npys(tmp_path / "src")
    np.save(tmp_path / "src" / "test.npy", np.zeros((2, 5, 84, 84, 3), np.uint8))
    with pytest.raises(DataPrepError) as e:
        _prepare_npy(tmp_path / "src", tmp_path / "out")
    msg = str(e.value)
    assert str(tmp_path / "src" / "test.npy") in msg
    assert f"shape [2, 5, 84, 84, 3], expected [2, 5, {D}]" in msg


def test_npy_official_shape_expected_by_default(tmp_path):
    write_npys(tmp_path / "src")
    with pytest.raises(DataPrepError, match=r"train\.npy has shape \[3, 5, 21168\], expected \[64, 600, 21168\]"):
        mi.prepare_from_npy(tmp_path / "src", tmp_path / "out", verbose=False)


@pytest.mark.parametrize("bad, pattern", [
    (1.5, r"values in \[0, 1\.5\], outside \[0, 1\]"),
    (-0.25, r"values in \[-0\.25, 1\], outside \[0, 1\]"),
    (np.nan, "NaN or infinite"),
])
def test_npy_values_out_of_range(tmp_path, bad, pattern):
    write_npys(tmp_path / "src")
    x = np.load(tmp_path / "src" / "train.npy")
    x[2, 1, 7] = bad
    x[2, 0, 0] = 1.0
    x[2, 0, 1] = 0.0
    np.save(tmp_path / "src" / "train.npy", x)
    with pytest.raises(DataPrepError, match=r"train\.npy: class 2 holds " + pattern):
        _prepare_npy(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(".*"))


def test_npy_wrong_dtype_and_missing_file(tmp_path):
    write_npys(tmp_path / "src")
    np.save(tmp_path / "src" / "test.npy", np.zeros((2, 5, D), np.int64))
    with pytest.raises(DataPrepError, match=r"test\.npy has dtype int64; expected float in \[0, 1\] or uint8"):
        _prepare_npy(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "test.npy").unlink()
    with pytest.raises(DataPrepError, match=r"test\.npy not found. --npy"):
        _prepare_npy(tmp_path / "src", tmp_path / "out")


def test_npy_not_an_array(tmp_path):
    write_npys(tmp_path / "src")
    (tmp_path / "src" / "train.npy").write_bytes(b"not numpy")
    with pytest.raises(DataPrepError, match=r"cannot read .*train\.npy as a \.npy array"):
        _prepare_npy(tmp_path / "src", tmp_path / "out")


def test_npy_cli_wrong_shape_exit_2(tmp_path):
    write_npys(tmp_path / "src")
    r = run_cli("--npy", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "train.npy has shape [3, 5, 21168], expected [64, 600, 21168]" in r.stderr
    assert "Traceback" not in r.stderr


def test_npy_cli_success(tmp_path):
    expected = write_npys(tmp_path / "src")
    r = run_cli("--npy", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                "--images-per-class", "5", "--classes", "train=3,val=2,test=2")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "train.npy"), expected["train"])
