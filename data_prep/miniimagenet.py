"""Prepare miniImageNet (Ravi & Larochelle 2017) as uint8 class-major arrays.

Two sources are accepted.

1. Ravi & Larochelle's release: an ``images/`` folder holding 60,000 JPEGs named
   WNID + index (``n0153282900000005.jpg``) and the split files ``train.csv`` /
   ``val.csv`` / ``test.csv`` (header ``filename,label``; 64 / 16 / 20 classes
   x 600 rows)::

       python -m data_prep.miniimagenet --images DIR --splits DIR --out data/miniimagenet

2. The original Meta-Dropout code's arrays ``train.npy`` [64, 600, 84*84*3] and
   ``test.npy`` [20, 600, 84*84*3] (float in [0, 1], or uint8); a ``val.npy``
   [16, 600, 84*84*3] beside them is converted too, if present::

       python -m data_prep.miniimagenet --npy DIR --out data/miniimagenet

Output, in OUT:

* ``{split}.npy``: uint8 array [n_classes, 600, 21168]; row ``[c, i]`` is image
  ``i`` of class ``c`` as an 84x84 RGB image flattened in HWC order (pixel value
  = round(255 * x) for x in [0, 1]; divide by 255 to get back [0, 1]). Classes
  are in the order of their first appearance in the csv (the csv's label
  order), images in csv row order.
* ``manifest.json``: the source, the classes of each split in order, shapes,
  dtype. With the npy source the class names are unknown (``classes: null``)
  and, without a ``val.npy``, ``missing_splits`` says there is no val split.

The arrays are written class by class through ``np.lib.format.open_memmap``
(never all in memory) to a temporary file that is renamed into place once
complete; ``manifest.json`` is written last. A second run whose inputs give
the same manifest, with complete outputs in place, returns at once.

Bad input raises :class:`data_prep.errors.DataPrepError` (the CLI prints the
message and exits 2).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.errors import DataPrepError

IMAGE_SIZE = 84
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
IMAGE_DIM = IMAGE_SIZE * IMAGE_SIZE * 3  # 21168
IMAGES_PER_CLASS = 600
CLASSES_PER_SPLIT = {"train": 64, "val": 16, "test": 20}
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Errors PIL raises on unreadable, truncated or corrupt files.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# --------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------

def read_split_csv(csv_path: Path) -> list[tuple[str, list[str]]]:
    """Read one Ravi & Larochelle split file.

    In: path of a csv with header ``filename,label`` and one row per image.
    Out: ``[(label, [filename, ...]), ...]``: the labels in order of first
    appearance, each with its filenames in row order.
    Raises DataPrepError if the file is missing or malformed, or if a filename
    is listed twice.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataPrepError(
            f"split file not found: {csv_path}. --splits must be the folder holding "
            f"Ravi & Larochelle's train.csv, val.csv and test.csv.")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise DataPrepError(
            f"{csv_path}: the first line must be the header 'filename,label'; "
            f"found {rows[0] if rows else 'an empty file'}. Use the unmodified split "
            f"files of Ravi & Larochelle.")
    by_label: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) != 2:
            raise DataPrepError(
                f"{csv_path} line {line_no}: expected 2 fields 'filename,label', "
                f"found {row}.")
        filename, label = row[0].strip(), row[1].strip()
        if filename in seen:
            raise DataPrepError(
                f"{csv_path} line {line_no}: image {filename} is listed twice. "
                f"Use the unmodified split files of Ravi & Larochelle.")
        seen.add(filename)
        by_label.setdefault(label, []).append(filename)
    return list(by_label.items())


def check_split(split: str, csv_path: Path, classes: list[tuple[str, list[str]]],
                n_classes: int, images_per_class: int) -> None:
    """Check the class count and the images-per-class count of one split.

    In: the result of :func:`read_split_csv` and the expected counts.
    Raises DataPrepError naming the offending class and its count.
    """
    if len(classes) != n_classes:
        raise DataPrepError(
            f"{csv_path}: {len(classes)} classes, expected {n_classes} for the "
            f"{split} split of miniImageNet. Use the unmodified split files of "
            f"Ravi & Larochelle.")
    for label, filenames in classes:
        if len(filenames) != images_per_class:
            raise DataPrepError(
                f"class {label} in {csv_path} has {len(filenames)} images, expected "
                f"{images_per_class} (every miniImageNet class has exactly "
                f"{images_per_class}). Use the unmodified split files of Ravi & "
                f"Larochelle.")


def find_missing_images(images_dir: Path, split: str,
                        classes: list[tuple[str, list[str]]]) -> None:
    """Check that every listed image file exists in ``images_dir``.

    Raises DataPrepError naming the first missing file and its class, and how
    many are missing in the split.
    """
    missing = [(label, name) for label, names in classes for name in names
               if not (images_dir / name).is_file()]
    if missing:
        label, name = missing[0]
        total = sum(len(names) for _, names in classes)
        raise DataPrepError(
            f"missing image {images_dir / name} (class {label}, {split} split); "
            f"{len(missing)} of the {total} images listed in {split}.csv are missing. "
            f"--images must be Ravi & Larochelle's images/ folder holding all "
            f"60,000 files named like n0153282900000005.jpg.")


def load_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode one image file.

    In: path of an image file of any size and mode.
    Out: uint8 array [size * size * 3]: the image converted to RGB, resized to
    size x size with PIL's LANCZOS filter if it is not that size already,
    flattened in HWC order.
    Raises whatever PIL raises on unreadable files (see ``_IMAGE_ERRORS``).
    """
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).reshape(-1)


def load_class(images_dir: Path, label: str, filenames: list[str], split: str) -> np.ndarray:
    """Decode all images of one class.

    In: the images folder, the class label (WNID) and its filenames in order.
    Out: uint8 array [len(filenames), 21168].
    Raises DataPrepError naming the file and the class if an image cannot be read.
    """
    out = np.empty((len(filenames), IMAGE_DIM), dtype=np.uint8)
    for i, name in enumerate(filenames):
        path = images_dir / name
        try:
            out[i] = load_image(path)
        except _IMAGE_ERRORS as e:
            raise DataPrepError(
                f"cannot read image {path} (class {label}, {split} split): {e}. "
                f"The file is corrupt or not an image: replace it with the file "
                f"from the original miniImageNet images/ folder.") from None
    return out


# --------------------------------------------------------------------------
# Writing the outputs
# --------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _outputs_complete(out_dir: Path, manifest: dict) -> bool:
    """True if OUT/manifest.json equals ``manifest`` and every split file it
    names exists with the right shape and dtype (and is not truncated)."""
    manifest_path = out_dir / MANIFEST_NAME
    try:
        with open(manifest_path) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        return False
    if existing != manifest:
        return False
    for info in manifest["splits"].values():
        try:
            arr = np.load(out_dir / info["file"], mmap_mode="r")
        except (OSError, ValueError):
            return False
        if list(arr.shape) != info["shape"] or arr.dtype != np.uint8:
            return False
        del arr
    return True


def _write_split(out_path: Path, shape: tuple[int, int, int], fill_class, verbose: bool,
                 what: str) -> None:
    """Write a uint8 .npy of ``shape`` class by class, atomically.

    ``fill_class(c)`` returns the uint8 array [shape[1], shape[2]] of class c.
    The data go to a temporary file in the same folder, renamed to
    ``out_path`` when complete; the temporary file is removed on failure.
    """
    tmp = out_path.with_name(f".{out_path.name}.partial")
    t0 = time.time()
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for c in range(shape[0]):
            mm[c] = fill_class(c)
            if verbose:
                print(f"  {what}: class {c + 1}/{shape[0]} ({time.time() - t0:.0f} s)",
                      flush=True)
        mm.flush()
        del mm
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _base_manifest() -> dict:
    return {
        "dataset": "miniImageNet (Ravi & Larochelle 2017)",
        "format_version": FORMAT_VERSION,
        "dtype": "uint8",
        "image_shape": list(IMAGE_SHAPE),
        "flatten_order": "HWC",
        "value_scale": "uint8 = round(255 * x) for x in [0, 1]; divide by 255",
    }


# --------------------------------------------------------------------------
# The two sources
# --------------------------------------------------------------------------

def _read_splits(splits_dir: Path, classes_per_split: dict[str, int],
                 images_per_class: int):
    """Reads and checks ``{split}.csv`` of every split in ``classes_per_split``.

    Returns ({split: [(label, [filename, ...]), ...]}, {"{split}.csv": sha256}).
    Raises DataPrepError on a missing or malformed csv, wrong counts, or a
    class listed in two splits.
    """
    missing_csvs = [str(splits_dir / f"{split}.csv") for split in classes_per_split
                    if not (splits_dir / f"{split}.csv").is_file()]
    if missing_csvs:
        raise DataPrepError(
            f"split file not found: {', '.join(missing_csvs)}. --splits must be the folder "
            f"holding Ravi & Larochelle's train.csv, val.csv and test.csv.")
    split_classes: dict[str, list[tuple[str, list[str]]]] = {}
    split_of_label: dict[str, str] = {}
    csv_sha256 = {}
    for split, n_classes in classes_per_split.items():
        csv_path = splits_dir / f"{split}.csv"
        classes = read_split_csv(csv_path)
        check_split(split, csv_path, classes, n_classes, images_per_class)
        for label, _ in classes:
            if label in split_of_label:
                raise DataPrepError(
                    f"class {label} is listed in both {split_of_label[label]}.csv and "
                    f"{split}.csv; the miniImageNet splits are disjoint. Use the "
                    f"unmodified split files of Ravi & Larochelle.")
            split_of_label[label] = split
        split_classes[split] = classes
        csv_sha256[f"{split}.csv"] = _sha256(csv_path)
    return split_classes, csv_sha256


def _images_manifest(images_dir: Path, splits_dir: Path, csv_sha256: dict,
                     split_classes: dict, images_per_class: int) -> dict:
    """The manifest of outputs built from ``images_dir`` by the checked csvs
    (``split_classes``: {split: [(label, filenames)]})."""
    manifest = _base_manifest()
    manifest["source"] = {
        "kind": "images",
        "images_dir": str(images_dir.resolve()),
        "splits_dir": str(splits_dir.resolve()),
        "csv_sha256": csv_sha256,
    }
    manifest["splits"] = {
        split: {
            "file": f"{split}.npy",
            "shape": [len(classes), images_per_class, IMAGE_DIM],
            "classes": [label for label, _ in classes],
        }
        for split, classes in split_classes.items()
    }
    return manifest


def prepare_from_images(images_dir, splits_dir, out_dir, *,
                        images_per_class: int = IMAGES_PER_CLASS,
                        classes_per_split: dict[str, int] | None = None,
                        force: bool = False, verbose: bool = True) -> dict:
    """Build OUT/{split}.npy from Ravi & Larochelle's images/ folder and csvs.

    In:
      images_dir: folder holding the JPEGs named in the csvs.
      splits_dir: folder holding ``{split}.csv`` for every split below.
      out_dir: output folder (created if needed).
      images_per_class: images each class must have (official: 600).
      classes_per_split: ``{split: number of classes}``; the splits to build
        (official and default: ``{"train": 64, "val": 16, "test": 20}``).
      force: rebuild even if complete outputs with a matching manifest exist.
    Out: the manifest dict, also written to OUT/manifest.json. Files written:
      OUT/{split}.npy, uint8 [n_classes, images_per_class, 21168].
    Raises DataPrepError on missing/malformed csvs, wrong class or image
    counts, a class listed in two splits, missing or unreadable images.
    """
    images_dir, splits_dir, out_dir = Path(images_dir), Path(splits_dir), Path(out_dir)
    if classes_per_split is None:
        classes_per_split = dict(CLASSES_PER_SPLIT)
    # Read and check every csv before any heavy work.
    split_classes, csv_sha256 = _read_splits(splits_dir, classes_per_split, images_per_class)

    manifest = _images_manifest(images_dir, splits_dir, csv_sha256, split_classes,
                                images_per_class)
    if not force and _outputs_complete(out_dir, manifest):
        if verbose:
            print(f"{out_dir}: complete outputs with a matching manifest exist; nothing to do.")
        return manifest

    if not images_dir.is_dir():
        raise DataPrepError(
            f"images folder not found: {images_dir}. --images must be Ravi & "
            f"Larochelle's images/ folder holding the 60,000 miniImageNet JPEGs.")
    for split, classes in split_classes.items():
        find_missing_images(images_dir, split, classes)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # outputs change from here on
    for split, classes in split_classes.items():
        shape = (len(classes), images_per_class, IMAGE_DIM)
        if verbose:
            print(f"{split}: {shape[0]} classes x {shape[1]} images -> "
                  f"{out_dir / (split + '.npy')}", flush=True)

        def fill_class(c, classes=classes, split=split):
            label, filenames = classes[c]
            return load_class(images_dir, label, filenames, split)

        _write_split(out_dir / f"{split}.npy", shape, fill_class, verbose, split)
    _write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest


def _check_npy_chunk(x: np.ndarray, path: Path, c: int) -> None:
    """Check that class c of a float source array is finite and in [0, 1]."""
    if not np.all(np.isfinite(x)):
        raise DataPrepError(
            f"{path}: class {c} holds NaN or infinite values. Expected floats in "
            f"[0, 1] or uint8; regenerate the file.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataPrepError(
            f"{path}: class {c} holds values in [{lo:g}, {hi:g}], outside [0, 1]. "
            f"Expected floats in [0, 1] or uint8 in 0..255 (for floats in 0..255, "
            f"convert the file to uint8 first).")


def _open_npy_sources(npy_dir: Path, classes_per_split: dict[str, int],
                      images_per_class: int):
    """Memory-maps and checks ``{split}.npy`` of every split; only "val" may
    be missing.

    Returns ({split: (path, memmapped array)}, {missing split: reason}).
    Raises DataPrepError on a missing or unreadable file, or a wrong shape
    or dtype.
    """
    sources, missing_splits = {}, {}
    for split, n_classes in classes_per_split.items():
        path = npy_dir / f"{split}.npy"
        if not path.is_file():
            if split == "val":
                missing_splits["val"] = (
                    "the original authors' npy release has no validation split")
                continue
            raise DataPrepError(
                f"{path} not found. --npy must be the folder holding the original "
                f"Meta-Dropout code's train.npy and test.npy.")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataPrepError(
                f"cannot read {path} as a .npy array: {e}. Regenerate or re-download "
                f"the file.") from None
        expected = (n_classes, images_per_class, IMAGE_DIM)
        if arr.shape != expected:
            raise DataPrepError(
                f"{path} has shape {list(arr.shape)}, expected {list(expected)} "
                f"([classes, images per class, 84*84*3]) for the {split} split. "
                f"Use the original train.npy / test.npy of the Meta-Dropout code.")
        if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
            raise DataPrepError(
                f"{path} has dtype {arr.dtype}; expected float in [0, 1] or uint8. "
                f"Convert the file to one of these.")
        sources[split] = (path, arr)
    return sources, missing_splits


def _npy_manifest(npy_dir: Path, sources: dict, missing_splits: dict) -> dict:
    """The manifest of outputs converted from the ``_open_npy_sources``
    result; the source files are identified by size and mtime, not hashed
    (the float release is gigabytes)."""
    files = {}
    for path, arr in sources.values():
        stat = path.stat()
        files[path.name] = {"dtype": str(arr.dtype), "bytes": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns}
    manifest = _base_manifest()
    manifest["source"] = {"kind": "npy", "npy_dir": str(npy_dir.resolve()), "files": files}
    manifest["splits"] = {
        split: {"file": f"{split}.npy", "shape": list(arr.shape), "classes": None}
        for split, (path, arr) in sources.items()
    }
    manifest["classes_note"] = "the npy source carries no class names (WNIDs)"
    if missing_splits:
        manifest["missing_splits"] = missing_splits
    return manifest


def prepare_from_npy(npy_dir, out_dir, *,
                     images_per_class: int = IMAGES_PER_CLASS,
                     classes_per_split: dict[str, int] | None = None,
                     force: bool = False, verbose: bool = True) -> dict:
    """Convert the original code's train.npy / test.npy (and val.npy) to uint8.

    In:
      npy_dir: folder holding ``train.npy`` [64, 600, 21168] and ``test.npy``
        [20, 600, 21168], float in [0, 1] or uint8; ``val.npy`` [16, 600,
        21168] is optional (the original release has none).
      out_dir: output folder (created if needed).
      images_per_class, classes_per_split: expected shapes, as in
        :func:`prepare_from_images`. Every split listed except "val" is required.
      force: rebuild even if complete outputs with a matching manifest exist.
    Out: the manifest dict, also written to OUT/manifest.json. Files written:
      OUT/{split}.npy, uint8 [n_classes, images_per_class, 21168], equal to
      round(255 * x) for float sources and to the source for uint8 ones. A
      stale OUT/val.npy is removed when there is no val source.
    Raises DataPrepError on a missing file, a wrong shape or dtype, or float
    values outside [0, 1].
    """
    npy_dir, out_dir = Path(npy_dir), Path(out_dir)
    if classes_per_split is None:
        classes_per_split = dict(CLASSES_PER_SPLIT)

    sources, missing_splits = _open_npy_sources(npy_dir, classes_per_split,
                                                images_per_class)

    manifest = _npy_manifest(npy_dir, sources, missing_splits)
    if not force and _outputs_complete(out_dir, manifest):
        if verbose:
            print(f"{out_dir}: complete outputs with a matching manifest exist; nothing to do.")
        return manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for split, (path, arr) in sources.items():
        if verbose:
            print(f"{split}: {path} ({arr.dtype}) -> {out_dir / (split + '.npy')}", flush=True)

        def fill_class(c, path=path, arr=arr):
            x = np.asarray(arr[c])
            if x.dtype == np.uint8:
                return x
            _check_npy_chunk(x, path, c)
            return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)

        _write_split(out_dir / f"{split}.npy", arr.shape, fill_class, verbose, split)
    _remove_stale(out_dir, missing_splits, verbose)
    _write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest


def _remove_stale(out_dir: Path, missing_splits: dict, verbose: bool) -> None:
    """Delete OUT/{split}.npy of the splits the npy source lacks, so that no
    earlier build's file survives beside the new manifest."""
    for split in missing_splits:
        stale = out_dir / f"{split}.npy"
        if stale.exists():
            stale.unlink()
            if verbose:
                print(f"removed stale {stale} (no {split} split in the npy source)")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _parse_classes(text: str) -> dict[str, int]:
    """'train=64,val=16,test=20' -> {'train': 64, 'val': 16, 'test': 20}."""
    out = {}
    for item in text.split(","):
        name, sep, count = item.partition("=")
        if not sep or name.strip() not in CLASSES_PER_SPLIT or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"bad --classes item {item!r}; expected e.g. train=64,val=16,test=20")
        out[name.strip()] = int(count)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.miniimagenet",
        description="Prepare miniImageNet as uint8 arrays OUT/{train,val,test}.npy "
                    "[classes, 600, 84*84*3] plus OUT/manifest.json.")
    parser.add_argument("--images", type=Path,
                        help="Ravi & Larochelle's images/ folder (use with --splits)")
    parser.add_argument("--splits", type=Path,
                        help="folder with their train.csv, val.csv, test.csv")
    parser.add_argument("--npy", type=Path,
                        help="instead: folder with the original code's train.npy / test.npy")
    parser.add_argument("--out", type=Path, default=Path("data/miniimagenet"),
                        help="output folder (default: data/miniimagenet)")
    parser.add_argument("--images-per-class", type=int, default=IMAGES_PER_CLASS,
                        help="expected images per class (default: 600; change only for tests)")
    parser.add_argument("--classes", type=_parse_classes,
                        default=dict(CLASSES_PER_SPLIT),
                        help="splits to build and their class counts "
                             "(default: train=64,val=16,test=20)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if complete outputs exist")
    args = parser.parse_args(argv)

    if args.npy is not None and (args.images is not None or args.splits is not None):
        parser.error("give either --npy or --images with --splits, not both")
    if args.npy is None and (args.images is None or args.splits is None):
        parser.error("give --images and --splits (or --npy)")

    t0 = time.time()
    try:
        if args.npy is not None:
            prepare_from_npy(args.npy, args.out, images_per_class=args.images_per_class,
                             classes_per_split=args.classes, force=args.force)
        else:
            prepare_from_images(args.images, args.splits, args.out,
                                images_per_class=args.images_per_class,
                                classes_per_split=args.classes, force=args.force)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
