"""Readers for FER-2013 and similar facial-expression data (SPEC section 5).

Sources, all returning a :class:`Dataset` of uint8 (N, S, S) images (S = 48 by
default) and int64 labels in the CSV's order (0 angry, 1 disgust, 2 fear, 3 happy,
4 sad, 5 surprise, 6 neutral; never alphabetical folder order):

* the challenge CSV ``emotion,pixels,Usage`` (also with leading spaces in the
  column names); Usage Training / PublicTest / PrivateTest -> train / val / test;
* the Kaggle folder layout ``train/<class>/``, ``test/<class>/`` (PublicTest_ files
  are validation, PrivateTest_ files test, split by the filename prefix);
* the same layout inside a ``.zip`` or ``.tar`` / ``.tar.gz`` / ``.tar.xz`` archive,
  read in place (streamed, never unpacked to disk);
* any folder (or archive) of class sub-folders: a deterministic stratified split
  (10 % val, 10 % test by a hash of each file's path).

A corrupt image or malformed CSV row raises :class:`DataError` naming the file or
row; with ``skip_bad=True`` it is skipped and listed in ``Dataset.skipped``.
Decoded splits are cached (one .npy per split, keyed by the source's path, size and
modification time) so the second load takes well under a second.
"""
import csv
import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

log = logging.getLogger("dnnrl.data")

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
ALIASES = {"anger": "angry", "disgusted": "disgust", "fearful": "fear", "afraid": "fear",
           "happiness": "happy", "sadness": "sad", "surprised": "surprise"}
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_SPLIT_DIRS = {"train": "train", "training": "train", "test": "test", "val": "val",
               "valid": "val", "validation": "val", "publictest": "val", "privatetest": "test"}
_PREFIXES = {"training_": "train", "publictest_": "val", "privatetest_": "test"}
_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
_CACHE_VERSION = 1


class DataError(ValueError):
    """A data file cannot be read; the message names the file or CSV row."""


@dataclass
class Dataset:
    """Decoded data: ``splits[name] = (images uint8 (N, S, S), labels int64 (N,))``."""
    splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
    class_names: List[str]
    source: str = ""
    skipped: List[str] = field(default_factory=list)
    from_cache: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> Dict[str, object]:
        return {"source": self.source, "class_names": list(self.class_names),
                "sizes": {k: int(v[1].shape[0]) for k, v in self.splits.items()},
                "skipped": len(self.skipped), "from_cache": self.from_cache}


def canonical_class(name: str) -> str:
    n = name.strip().lower()
    return ALIASES.get(n, n)


def class_order(names) -> List[str]:
    """Label order: the 7 CSV classes first (when any folder is one of them), then the
    other folder names alphabetically (another data set's classes)."""
    names = {canonical_class(n) for n in names}
    extra = sorted(n for n in names if n not in CLASS_NAMES)
    return (list(CLASS_NAMES) + extra) if names & set(CLASS_NAMES) else extra


# --------------------------------------------------------------------------- decoding
def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Image bytes -> (size, size) uint8 grayscale (pillow); DataError naming ``where``."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # pillow raises many types for broken files
        raise DataError("%s: cannot decode image (%s: %s)" % (where, type(exc).__name__, exc)) from exc


# --------------------------------------------------------------------------- sources
def _is_archive(path: str) -> bool:
    low = path.lower()
    return os.path.isfile(path) and (low.endswith(".zip") or any(
        low.endswith(e) for e in (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")))


def _iter_files(path: str) -> Iterator[Tuple[str, bytes]]:
    """(relative path with '/' separators, bytes) of every image file under a folder or
    inside an archive, streamed in archive order."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    full = os.path.join(root, f)
                    with open(full, "rb") as fh:
                        yield os.path.relpath(full, path).replace(os.sep, "/"), fh.read()
    elif path.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and info.filename.lower().endswith(IMAGE_EXTS):
                    yield info.filename, zf.read(info)
    else:
        with tarfile.open(path, "r|*") as tf:  # stream mode: one pass, no seeking
            for member in tf:
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTS):
                    fh = tf.extractfile(member)
                    yield member.name, fh.read() if fh is not None else b""


def _place(rel: str) -> Optional[Tuple[Optional[str], str]]:
    """(split or None, class folder) of an image path; None when it has no class folder."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if len(parts) < 2 or parts[-1].startswith("._") or "__MACOSX" in parts:
        return None
    split = _SPLIT_DIRS.get(parts[-3].lower()) if len(parts) >= 3 else None
    if split is not None:
        prefix = parts[-1].lower()
        for p, s in _PREFIXES.items():
            if prefix.startswith(p):
                split = s
                break
    return split, parts[-2]


def _split_hash(rel: str) -> int:
    return zlib.crc32(rel.encode("utf-8"))


def read_image_tree(path: str, image_size: int = 48, skip_bad: bool = False,
                    val_fraction: float = 0.1, test_fraction: float = 0.1) -> Dataset:
    """Kaggle layout or any class-folder tree, from a folder, .zip or .tar(.gz/.xz)."""
    items = []  # (split or None, class name, rel, image)
    skipped = []
    where_root = os.path.basename(os.path.normpath(path))
    for rel, data in _iter_files(path):
        placed = _place(rel)
        if placed is None:
            continue
        where = "%s:%s" % (path, rel) if _is_archive(path) else os.path.join(path, rel)
        try:
            img = decode_image(data, image_size, where)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        items.append((placed[0], canonical_class(placed[1]), rel, img))
    if not items:
        raise DataError("%s: no images found in class folders (expected train/<class>/*.jpg, "
                        "test/<class>/*.jpg or <class>/*.jpg)" % path)
    names = class_order({c for _, c, _, _ in items})
    index = {n: i for i, n in enumerate(names)}
    kaggle = any(s is not None for s, _, _, _ in items)
    buckets: Dict[str, list] = {s: [] for s in SPLITS}
    if kaggle:
        for s, c, rel, img in items:
            if s is not None:  # stray files outside the split folders are ignored
                buckets[s].append((rel, index[c], img))
    else:  # stratified deterministic split by a hash of the path
        by_class: Dict[int, list] = {}
        for _, c, rel, img in items:
            by_class.setdefault(index[c], []).append((rel, index[c], img))
        for lab, rows in by_class.items():
            rows.sort(key=lambda r: (_split_hash(r[0]), r[0]))
            n_val = int(round(len(rows) * val_fraction))
            n_test = int(round(len(rows) * test_fraction))
            buckets["val"] += rows[:n_val]
            buckets["test"] += rows[n_val:n_val + n_test]
            buckets["train"] += rows[n_val + n_test:]
    splits = {}
    for s, rows in buckets.items():
        if rows:
            rows.sort(key=lambda r: r[0])  # deterministic order whatever the archive order
            splits[s] = (np.stack([r[2] for r in rows]), np.array([r[1] for r in rows], dtype=np.int64))
    log.info("read %s (%s): %s, %d skipped", where_root, "kaggle layout" if kaggle else "class folders",
             {s: len(v[1]) for s, v in splits.items()}, len(skipped))
    return Dataset(splits, names, path, skipped)


def read_csv(path: str, image_size: int = 48, skip_bad: bool = False,
             val_fraction: float = 0.1, test_fraction: float = 0.1) -> Dataset:
    """The challenge CSV: columns emotion, pixels (space-separated gray values of a
    square image) and optionally Usage; column names may carry leading spaces."""
    buckets: Dict[str, Tuple[list, list]] = {s: ([], []) for s in SPLITS}
    skipped = []
    no_usage = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DataError("%s: empty CSV file" % path)
        if "emotion" not in header or "pixels" not in header:
            raise DataError("%s: CSV header must have 'emotion' and 'pixels' columns, got %s"
                            % (path, header))
        ie, ip = header.index("emotion"), header.index("pixels")
        iu = header.index("usage") if "usage" in header else None
        for row_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                if len(row) < len(header):
                    raise ValueError("%d fields, expected %d" % (len(row), len(header)))
                label = int(row[ie])
                if not 0 <= label < len(CLASS_NAMES):
                    raise ValueError("emotion %d is not in 0..6" % label)
                values = np.array(row[ip].split(), dtype=np.int64)
                side = int(round(np.sqrt(values.size)))
                if values.size == 0 or side * side != values.size:
                    raise ValueError("%d pixel values is not a square image" % values.size)
                if values.min() < 0 or values.max() > 255:
                    raise ValueError("pixel values outside 0..255")
                img = values.astype(np.uint8).reshape(side, side)
                if side != image_size:
                    from PIL import Image
                    img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR))
                split = None
                if iu is not None:
                    usage = row[iu].strip().lower()
                    split = _USAGE.get(usage)
                    if split is None:
                        raise ValueError("unknown Usage %r" % row[iu])
            except ValueError as exc:
                msg = "%s: row %d: malformed CSV row (%s)" % (path, row_no, exc)
                if not skip_bad:
                    raise DataError(msg) from None
                skipped.append(msg)
                continue
            if split is None:
                no_usage.append((row_no, img, label))
            else:
                buckets[split][0].append(img)
                buckets[split][1].append(label)
    for row_no, img, label in no_usage:  # no Usage column: hash split like class folders
        h = (_split_hash(str(row_no)) % 1000) / 1000.0
        s = "val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"
        buckets[s][0].append(img)
        buckets[s][1].append(label)
    splits = {s: (np.stack(v[0]), np.array(v[1], dtype=np.int64)) for s, v in buckets.items() if v[0]}
    if not splits:
        raise DataError("%s: no data rows" % path)
    return Dataset(splits, list(CLASS_NAMES), path, skipped)


# --------------------------------------------------------------------------- cache
def default_cache_dir() -> str:
    return os.environ.get("DNNRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dnnrl")


def _fingerprint(path: str) -> List:
    st = os.stat(path)
    if not os.path.isdir(path):
        return [st.st_size, st.st_mtime_ns]
    count, total, newest = 0, 0, st.st_mtime_ns  # a folder: every file's size and mtime
    for root, dirs, files in os.walk(path):
        newest = max(newest, os.stat(root).st_mtime_ns)
        for f in files:
            s = os.stat(os.path.join(root, f))
            count, total, newest = count + 1, total + s.st_size, max(newest, s.st_mtime_ns)
    return [count, total, newest]


def cache_key(path: str, **options) -> str:
    ident = [os.path.abspath(path), _fingerprint(path), sorted(options.items()), _CACHE_VERSION]
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]


def _save_cache(ds: Dataset, cache_dir: str, key: str) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    for s, (x, y) in ds.splits.items():
        # one .npy per split: column 0 the label, then the S*S pixels
        rows = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], 1)
        tmp = os.path.join(cache_dir, "%s.%s.tmp.npy" % (key, s))
        np.save(tmp, rows)
        os.replace(tmp, os.path.join(cache_dir, "%s.%s.npy" % (key, s)))
    meta = {"source": ds.source, "class_names": ds.class_names, "splits": sorted(ds.splits),
            "image_size": int(next(iter(ds.splits.values()))[0].shape[1]), "skipped": ds.skipped}
    tmp = os.path.join(cache_dir, key + ".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, os.path.join(cache_dir, key + ".json"))


def _load_cache(cache_dir: str, key: str) -> Optional[Dataset]:
    meta_path = os.path.join(cache_dir, key + ".json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
        S = meta["image_size"]
        splits = {}
        for s in meta["splits"]:
            rows = np.load(os.path.join(cache_dir, "%s.%s.npy" % (key, s)))
            splits[s] = (np.ascontiguousarray(rows[:, 1:]).reshape(-1, S, S), rows[:, 0].astype(np.int64))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable cache %s (%s)", meta_path, exc)
        return None
    return Dataset(splits, meta["class_names"], meta["source"], meta["skipped"], from_cache=True)


def load_dataset(path: str, image_size: int = 48, skip_bad: bool = False,
                 cache_dir: Optional[str] = None, use_cache: bool = True,
                 val_fraction: float = 0.1, test_fraction: float = 0.1) -> Dataset:
    """Read any supported source (CSV file, folder, .zip, .tar*), through the cache.

    Args:
        path: a .csv, an image folder tree or an archive of one.
        image_size: stored side length S (FER-2013 is 48; other images are resized).
        skip_bad: skip (and list in ``skipped``) corrupt images / malformed rows
            instead of raising :class:`DataError`.
        cache_dir: where decoded splits are cached (default ``$DNNRL_CACHE`` or
            ``~/.cache/dnnrl``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError("data source %s does not exist" % path)
    opts = dict(image_size=image_size, skip_bad=skip_bad, val_fraction=val_fraction,
                test_fraction=test_fraction)
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(path, **opts) if use_cache else None
    if use_cache:
        ds = _load_cache(cache_dir, key)
        if ds is not None:
            log.info("loaded %s from cache %s (%s)", path, cache_dir, key)
            return ds
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        ds = read_csv(path, **opts)
    elif os.path.isdir(path) or _is_archive(path):
        ds = read_image_tree(path, **opts)
    else:
        raise DataError("%s: unsupported data source (expected a .csv, a folder, a .zip or a .tar archive)"
                        % path)
    if use_cache:
        try:
            _save_cache(ds, cache_dir, key)
        except OSError as exc:
            log.warning("could not write the data cache in %s (%s)", cache_dir, exc)
    return ds
