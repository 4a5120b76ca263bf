"""Turn the official Omniglot archives into the arrays that training reads.

Usage (from the repository root)::

    python -m data_prep.omniglot --src DIR --out data/omniglot [--download] [--seed 1]

Input (in ``--src``), either
  * the two official archives ``images_background.zip`` (964 characters) and
    ``images_evaluation.zip`` (659 characters), laid out as
    ``images_background/ALPHABET/characterNN/XXXX_YY.png`` with 20 drawings
    per character, 105x105, 1-bit, ink black (0) on white; or
  * the original authors' ``train.npy`` [4800, 20, 784] and ``test.npy``
    [1692, 20, 784] (float in [0, 1] or uint8).

Output (in ``--out``)
  * ``train.npy`` uint8 [4800, 20, 784] and ``test.npy`` uint8 [1692, 20, 784]:
    28x28 images flattened row-major, value = round(ink * 255), ink = 1 and
    background = 0;
  * ``manifest.json``: format version, seed, source files (name, size, md5),
    the ordered class list of each split, shapes and dtype.

Protocol (Vinyals et al. 2016, as in MAML): the 1623 character folders of both
archives are pooled and sorted by path, shuffled with
``np.random.RandomState(seed).permutation``; the first 1200 characters are
meta-train, the other 423 meta-test. Each image is resized to 28x28 with
nearest-neighbour sampling, so that it stays binary, and inverted
(ink = 255 - pixel).  This is what MAML's ``resize_images.py`` produced (it
asks PIL for LANCZOS, but PIL resizes 1-bit images with NEAREST whatever
filter is asked), the likely lineage of the original authors' arrays.  (An
earlier version of this script resized with a real LANCZOS filter, which
leaves about 9% of the pixels grey; its arrays carry format version 1 and
are rebuilt.)
Every rotation by k * 90 degrees (``np.rot90``, k = 0..3) is a class of its
own: class index = 4 * character index + k. The 20 images of a class are in
drawer order (sorted file names).

Every bad input raises :class:`DataPrepError` with a message that says what is
wrong and what to do; the command line turns it into exit code 2.
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
import zipfile

import numpy as np
from PIL import Image

from data_prep.errors import DataPrepError  # shared with data_prep.miniimagenet

FORMAT_VERSION = 2  # 2: binary images (nearest-neighbour resize, as MAML)
IMAGE_SIZE = 28
ROTATIONS = (0, 90, 180, 270)
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}"
OFFICIAL_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
ARCHIVES = ("images_background.zip", "images_evaluation.zip")
OFFICIAL_CHARS = {"images_background.zip": 964, "images_evaluation.zip": 659}
OFFICIAL_IMAGES_PER_CHAR = 20
OFFICIAL_N_TRAIN = 1200
OFFICIAL_N_TEST = 423
SPLITS = ("train", "test")

# images_background/ALPHABET/characterNN/XXXX_YY.png
_PNG_RE = re.compile(r"^([^/]+)/([^/]+)/([^/]+)/([^/]+\.png)$")


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def file_md5(path, chunk=1 << 20):
    """Hex md5 of the file at ``path``."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _source_entry(path):
    """{"name", "size", "md5"} of one source file."""
    return {"name": os.path.basename(path), "size": os.path.getsize(path),
            "md5": file_md5(path)}


def _atomic_write_bytes(path, write_fn):
    """Write a file through ``write_fn(fileobj)`` into a temporary file in the
    same directory, then rename it over ``path`` (a killed run never leaves a
    half-written ``path``)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_npy(path, array):
    _atomic_write_bytes(path, lambda f: np.save(f, array, allow_pickle=False))


def _save_json(path, obj):
    text = json.dumps(obj, indent=1) + "\n"
    _atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------

def _progress(done, total, start):
    if total:
        frac = done / total
        bar = "#" * int(30 * frac)
        text = "\r  [{:<30}] {:5.1f}% {:.1f}/{:.1f} MB".format(
            bar, 100 * frac, done / 1e6, total / 1e6)
    else:
        text = "\r  {:.1f} MB".format(done / 1e6)
    rate = done / max(time.time() - start, 1e-6) / 1e6
    sys.stderr.write(text + " ({:.1f} MB/s)".format(rate))
    sys.stderr.flush()


def download_file(url, dest, md5, size=None, chunk=1 << 16):
    """Download ``url`` to the file ``dest`` and check it.

    The data goes to ``dest + ".part"`` with a progress bar on stderr; the
    size (``size`` if given, else the server's Content-Length) and the ``md5``
    are checked before the file is renamed to ``dest``. On any failure the
    partial file is deleted and :class:`DataPrepError` is raised.
    Works for any URL urllib opens, including ``file://``.
    """
    part = dest + ".part"
    _log("downloading {} -> {}".format(url, dest))
    try:
        h = hashlib.md5()
        done = 0
        start = time.time()
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            length = resp.headers.get("Content-Length")
            expected = size if size is not None else (int(length) if length else None)
            for block in iter(lambda: resp.read(chunk), b""):
                out.write(block)
                h.update(block)
                done += len(block)
                _progress(done, expected, start)
        sys.stderr.write("\n")
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        _remove(part)
        raise DataPrepError(
            "Could not download {} ({}). Check the network connection and try "
            "again, or download the file by hand into {}.".format(
                url, e, os.path.dirname(os.path.abspath(dest)))) from None
    if expected is not None and done != expected:
        _remove(part)
        raise DataPrepError(
            "The download of {} is incomplete: got {} bytes, expected {}. The "
            "partial file was deleted; run the command again.".format(url, done, expected))
    if h.hexdigest() != md5:
        _remove(part)
        raise DataPrepError(
            "The download of {} has md5 {} but {} was expected: the file is "
            "corrupt or not the official one. The partial file was deleted; "
            "run the command again, or download it by hand from {}.".format(
                url, h.hexdigest(), md5, url))
    os.replace(part, dest)
    return dest


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


# --------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------

def _redownload_hint(name):
    return ("Re-download it from {} (or pass --download after deleting the "
            "file).".format(OFFICIAL_URL.format(name=name)))


def _checked_members(zip_path):
    """The member names of the zip at ``zip_path``, after reading every member
    against its CRC; raises :class:`DataPrepError` if it is truncated,
    not a zip, or corrupt."""
    name = os.path.basename(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as z:
            bad = z.testzip()
            members = z.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        # zlib.error is not an OSError; it only comes from testzip's reads
        raise DataPrepError(
            "{} is truncated or is not a valid zip file ({}). {}".format(
                zip_path, e, _redownload_hint(name))) from None
    except Exception as e:  # zlib.error and friends from a damaged member
        raise DataPrepError(
            "{} is corrupt ({}: {}). {}".format(
                zip_path, type(e).__name__, e, _redownload_hint(name))) from None
    if bad is not None:
        raise DataPrepError(
            "{} is corrupt: member {} fails its CRC check. {}".format(
                zip_path, bad, _redownload_hint(name)))
    return members


def list_characters(zip_path, expected_chars, images_per_char):
    """Check one archive and list its characters.

    Returns a dict ``{"ARCHIVE_ROOT/ALPHABET/characterNN": [png member names,
    sorted]}``. Raises :class:`DataPrepError` if the zip cannot be opened, is
    truncated or corrupt (``testzip``), or does not hold ``expected_chars``
    characters of ``images_per_char`` PNGs each.
    """
    name = os.path.basename(zip_path)
    members = _checked_members(zip_path)
    root = name[:-len(".zip")]
    chars = {}
    for m in members:
        if m.startswith("__MACOSX/") or "/._" in m:
            continue
        match = _PNG_RE.match(m)
        if match and match.group(1) == root:
            chars.setdefault(m.rsplit("/", 1)[0], []).append(m)
    wrong = {c: len(v) for c, v in chars.items() if len(v) != images_per_char}
    if len(chars) != expected_chars or wrong:
        detail = "found {} character folders (expected {})".format(len(chars), expected_chars)
        if wrong:
            first = sorted(wrong)[:3]
            detail += "; {} of them do not have {} images (e.g. {})".format(
                len(wrong), images_per_char,
                ", ".join("{}: {}".format(c, wrong[c]) for c in first))
        raise DataPrepError(
            "{} does not have the layout of the official Omniglot archive "
            "({}/ALPHABET/characterNN/*.png): {}. {}".format(
                zip_path, root, detail, _redownload_hint(name)))
    return {c: sorted(v) for c, v in chars.items()}


def load_character(z, members):
    """Decode one character's PNGs from the open zip ``z``.

    Returns uint8 [len(members), 28, 28] with ink = 255, background = 0
    (converted to 'L', resized with NEAREST, then 255 - pixel; for the
    official 1-bit PNGs every value is 0 or 255).
    """
    out = np.empty((len(members), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, m in enumerate(members):
        try:
            img = Image.open(io.BytesIO(z.read(m))).convert("L")
        except Exception as e:  # unreadable PNG or a CRC error on read
            raise DataPrepError(
                "Cannot decode {} in {} ({}). {}".format(
                    m, z.filename, e, _redownload_hint(os.path.basename(z.filename)))) from None
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
        out[i] = 255 - np.asarray(img, dtype=np.uint8)
    return out


def rotated_classes(images):
    """uint8 [N, 28, 28] -> uint8 [4, N, 784]: rotation k is np.rot90(., k)."""
    return np.stack([np.rot90(images, k, axes=(1, 2)).reshape(len(images), -1)
                     for k in range(len(ROTATIONS))])


def split_characters(char_names, seed, n_train, n_test):
    """Sorted character paths -> (train list, test list) of paths.

    ``np.random.RandomState(seed).permutation`` of the sorted list; the first
    ``n_train`` are meta-train, the remaining ``n_test`` meta-test.
    """
    names = sorted(char_names)
    if len(names) != n_train + n_test:
        raise DataPrepError(
            "Found {} characters in all but the split needs {} + {} = {}. "
            "Re-download the official archives.".format(
                len(names), n_train, n_test, n_train + n_test))
    perm = np.random.RandomState(seed).permutation(len(names))
    return [names[i] for i in perm[:n_train]], [names[i] for i in perm[n_train:]]


def class_names(char_paths):
    """Character paths -> class names, 4 per character: 'PATH@rot0', '@rot90', ..."""
    return ["{}@rot{}".format(c, r) for c in char_paths for r in ROTATIONS]


# --------------------------------------------------------------------------
# the two preparation paths
# --------------------------------------------------------------------------

def _manifest_matches(out, source, seed, sources, shapes):
    """True if ``out`` holds complete outputs of ``shapes`` ({split: shape})
    made from the same inputs (source kind, seed, source sizes and md5s)."""
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    if (man.get("format_version") != FORMAT_VERSION or man.get("source") != source
            or man.get("seed") != seed or man.get("sources") != sources):
        return False
    for split in SPLITS:
        try:
            arr = np.load(os.path.join(out, split + ".npy"), mmap_mode="r")
        except (OSError, ValueError):
            return False
        if arr.shape != tuple(shapes[split]) or arr.dtype != np.uint8:
            return False
    return True


def _split_shapes(n_train, n_test, images_per_char):
    """{split: (classes, images per class, 784)}; 4 rotation classes per character."""
    dim = IMAGE_SIZE * IMAGE_SIZE
    return {"train": (len(ROTATIONS) * n_train, images_per_char, dim),
            "test": (len(ROTATIONS) * n_test, images_per_char, dim)}


def _write_outputs(out, arrays, manifest):
    """Write train/test .npy then the manifest, each atomically.

    The old manifest is removed first so that a run killed half-way is never
    mistaken for an up-to-date one.
    """
    os.makedirs(out, exist_ok=True)
    _remove(os.path.join(out, "manifest.json"))
    for split in SPLITS:
        _save_npy(os.path.join(out, split + ".npy"), arrays[split])
    _save_json(os.path.join(out, "manifest.json"), manifest)


def prepare_from_archives(src, out, seed=1, n_train=OFFICIAL_N_TRAIN,
                          n_test=OFFICIAL_N_TEST, expected_chars=None,
                          images_per_char=OFFICIAL_IMAGES_PER_CHAR):
    """Official archives in ``src`` -> ``out/{train,test}.npy`` + manifest.

    ``expected_chars`` maps archive name to its number of characters
    (default: the official 964 / 659). Returns "up-to-date" or "prepared".
    Output shapes: train [4 * n_train, images_per_char, 784], test
    [4 * n_test, images_per_char, 784], uint8.
    """
    expected_chars = expected_chars or OFFICIAL_CHARS
    paths = [os.path.join(src, a) for a in ARCHIVES]
    sources = [_source_entry(p) for p in paths]
    if _manifest_matches(out, "archives", seed, sources,
                         _split_shapes(n_train, n_test, images_per_char)):
        _log("{}: Omniglot data is up to date (seed {}).".format(out, seed))
        return "up-to-date"

    start = time.time()
    chars = {}  # character path -> sorted PNG members; and where it lives
    where = {}
    for p in paths:
        listed = list_characters(p, expected_chars[os.path.basename(p)], images_per_char)
        chars.update(listed)
        where.update({c: p for c in listed})
    train_chars, test_chars = split_characters(chars, seed, n_train, n_test)

    # slot[c] = (split, position of character c in that split)
    split_chars = {"train": train_chars, "test": test_chars}
    slot = {c: (s, i) for s in SPLITS for i, c in enumerate(split_chars[s])}
    arrays = {s: np.empty((len(ROTATIONS) * len(split_chars[s]), images_per_char,
                           IMAGE_SIZE * IMAGE_SIZE), np.uint8) for s in SPLITS}
    for p in paths:
        _log("reading {} ...".format(p))
        with zipfile.ZipFile(p) as z:
            for c in sorted(c for c in chars if where[c] == p):
                s, i = slot[c]
                k = len(ROTATIONS)
                arrays[s][k * i:k * (i + 1)] = rotated_classes(load_character(z, chars[c]))
    classes = {s: class_names(split_chars[s]) for s in SPLITS}
    manifest = _manifest("archives", seed, sources, arrays, classes)
    manifest["characters"] = {"train": len(train_chars), "test": len(test_chars)}
    _write_outputs(out, arrays, manifest)
    _log("wrote {} (train {}, test {}) in {:.1f} s".format(
        out, arrays["train"].shape, arrays["test"].shape, time.time() - start))
    return "prepared"


def _manifest(source, seed, sources, arrays, classes):
    return {
        "format_version": FORMAT_VERSION,
        "dataset": "omniglot",
        "source": source,
        "seed": seed,
        "sources": sources,
        "image_shape": [IMAGE_SIZE, IMAGE_SIZE, 1],
        "value": "uint8, round(ink * 255); ink = 255, background = 0",
        "dtype": "uint8",
        "shapes": {s: list(arrays[s].shape) for s in SPLITS},
        "classes": classes,
    }


def _load_authors_split(path, expected_shape, chunk=256):
    """Validate one of the authors' .npy files and return it as uint8.

    Float files must hold values in [0, 1] (converted with round(x * 255));
    uint8 files are copied. Raises DataPrepError naming the file on a wrong
    shape, dtype or value range.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataPrepError(
            "Cannot read {} as a .npy array ({}). Replace it with the "
            "original file, or prepare from the official archives instead "
            "(pass --download).".format(path, e)) from None
    if tuple(arr.shape) != tuple(expected_shape):
        raise DataPrepError(
            "{} has shape {} but shape {} was expected (classes, images per "
            "class, 28*28 pixels). Use the original authors' file, or prepare "
            "from the official archives instead (pass --download).".format(
                path, tuple(arr.shape), tuple(expected_shape)))
    if arr.dtype == np.uint8:
        return np.array(arr)
    if arr.dtype.kind != "f":
        raise DataPrepError(
            "{} has dtype {}; expected float values in [0, 1] or uint8.".format(path, arr.dtype))
    result = np.empty(arr.shape, np.uint8)
    for i in range(0, arr.shape[0], chunk):  # chunks: float64 file can be 600 MB
        block = np.asarray(arr[i:i + chunk], dtype=np.float64)
        if not np.all(np.isfinite(block)) or block.min() < 0.0 or block.max() > 1.0:
            raise DataPrepError(
                "{} holds values outside [0, 1] (min {}, max {}); expected "
                "ink = 1.0 and background = 0.0.".format(
                    path, np.nanmin(block), np.nanmax(block)))
        result[i:i + chunk] = np.round(block * 255.0).astype(np.uint8)
    return result


def prepare_from_authors_npy(src, out, n_train=OFFICIAL_N_TRAIN, n_test=OFFICIAL_N_TEST,
                             images_per_char=OFFICIAL_IMAGES_PER_CHAR):
    """The authors' ``src/{train,test}.npy`` -> ``out/{train,test}.npy`` (uint8)
    + manifest with source "authors-npy". Returns "up-to-date" or "prepared".
    """
    shapes = _split_shapes(n_train, n_test, images_per_char)
    paths = {s: os.path.join(src, s + ".npy") for s in SPLITS}
    for s, p in paths.items():
        if not os.path.isfile(p):
            raise DataPrepError(
                "{} is missing: the authors' format needs both train.npy and "
                "test.npy in {}. Add it, or prepare from the official archives "
                "instead (pass --download).".format(p, src))
    if os.path.abspath(src) == os.path.abspath(out):
        raise DataPrepError("--src and --out are the same folder ({}); choose "
                            "another --out.".format(out))
    sources = [_source_entry(paths[s]) for s in SPLITS]
    if _manifest_matches(out, "authors-npy", None, sources, shapes):
        _log("{}: Omniglot data is up to date (authors' .npy files).".format(out))
        return "up-to-date"
    arrays = {s: _load_authors_split(paths[s], shapes[s]) for s in SPLITS}
    for s in SPLITS:
        if arrays[s].mean() > 127:
            _log("warning: {} is mostly bright (mean {:.0f}/255): ink should be "
                 "1.0 and background 0.0; is it inverted?".format(paths[s], arrays[s].mean()))
    classes = {s: None for s in SPLITS}  # the authors' files do not name their classes
    _write_outputs(out, arrays, _manifest("authors-npy", None, sources, arrays, classes))
    _log("wrote {} from the authors' .npy files".format(out))
    return "prepared"


def prepare(src, out, seed=1, download=False, n_train=OFFICIAL_N_TRAIN,
            n_test=OFFICIAL_N_TEST, expected_chars=None,
            images_per_char=OFFICIAL_IMAGES_PER_CHAR):
    """Prepare Omniglot from ``src`` into ``out``; the command line's work.

    Uses the official archives if both are in ``src``; else the authors'
    train.npy / test.npy if present; else, with ``download``, fetches the
    missing archives (md5-checked) first. Returns "up-to-date" or "prepared";
    raises :class:`DataPrepError` on any bad input.
    """
    zips = [os.path.join(src, a) for a in ARCHIVES]
    missing = [z for z in zips if not os.path.isfile(z)]
    has_npy = any(os.path.isfile(os.path.join(src, s + ".npy")) for s in SPLITS)
    if missing and has_npy and not download:
        return prepare_from_authors_npy(src, out, n_train, n_test, images_per_char)
    if missing and download:
        os.makedirs(src, exist_ok=True)
        for z in missing:
            name = os.path.basename(z)
            download_file(OFFICIAL_URL.format(name=name), z, OFFICIAL_MD5[name])
    elif missing:
        raise DataPrepError(
            "Missing Omniglot archive(s): {}. Pass --download to fetch them "
            "from https://github.com/brendenlake/omniglot (python/ folder), "
            "or put images_background.zip and images_evaluation.zip (or the "
            "authors' train.npy and test.npy) into {}.".format(", ".join(missing), src))
    return prepare_from_archives(src, out, seed, n_train, n_test, expected_chars,
                                 images_per_char)


def main(argv=None):
    """Command line entry point; returns the exit code (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.omniglot",
        description="Prepare Omniglot (Vinyals split, 4 rotations per character) "
                    "as uint8 train.npy [4800,20,784] and test.npy [1692,20,784].")
    parser.add_argument("--src", required=True,
                        help="folder with images_background.zip and "
                             "images_evaluation.zip (or the authors' train.npy/test.npy)")
    parser.add_argument("--out", default="data/omniglot", help="output folder")
    parser.add_argument("--download", action="store_true",
                        help="download missing archives from the official repository")
    parser.add_argument("--seed", type=int, default=1, help="seed of the character split")
    args = parser.parse_args(argv)
    try:
        prepare(args.src, args.out, seed=args.seed, download=args.download)
    except DataPrepError as e:
        print("error: {}".format(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
