"""dnnrl.data: CSV, Kaggle folder layout, archives, class folders, errors, cache."""
import io
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from dnnrl.data import CLASS_NAMES, DataError, load_dataset


def _png(value: int, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# (relative path, class) of a tiny Kaggle-layout tree; the pixel value encodes the class
KAGGLE = [("train/%s/Training_%d.png" % (c, i), c) for c in ("happy", "angry", "surprise") for i in range(3)] + [
    ("test/happy/PublicTest_1.png", "happy"), ("test/angry/PublicTest_2.png", "angry"),
    ("test/happy/PrivateTest_3.png", "happy"), ("test/surprise/PrivateTest_4.png", "surprise"),
    ("test/surprise/PrivateTest_5.png", "surprise")]


def _value(c):
    return 10 * CLASS_NAMES.index(c) + 5


def _write_tree(root, entries, top=""):
    for rel, c in entries:
        path = os.path.join(root, top, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(_png(_value(c)))


def _check_kaggle(ds):
    assert ds.class_names == list(CLASS_NAMES)
    assert {s: len(v[1]) for s, v in ds.splits.items()} == {"train": 9, "val": 2, "test": 3}
    for s, (x, y) in ds.splits.items():
        # labels in CSV order (happy = 3, angry = 0, surprise = 5), not alphabetical
        np.testing.assert_array_equal(x[:, 0, 0], 10 * y + 5)
    assert sorted(set(ds.splits["test"][1].tolist())) == [3, 5]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_kaggle_folder_and_prefix_split(tmp_path, cache):
    _write_tree(str(tmp_path / "d"), KAGGLE, "fer2013")
    ds = load_dataset(str(tmp_path / "d"), cache_dir=cache)
    _check_kaggle(ds)
    assert not ds.from_cache
    again = load_dataset(str(tmp_path / "d"), cache_dir=cache)
    assert again.from_cache
    _check_kaggle(again)


@pytest.mark.parametrize("folders", [("Training", "PublicTest", "PrivateTest"), ("train", "validation", "test"),
                                     ("training", "val", "test")])
def test_split_folders_by_name(tmp_path, cache, folders):
    """Split folders named like the CSV's Usage column (or train / val(idation) / test),
    with files not named by split prefix: the folder decides the split."""
    train_dir, val_dir, test_dir = folders
    entries = [("%s/happy/a%d.png" % (train_dir, i), "happy") for i in range(3)] + [
        ("%s/angry/b.png" % train_dir, "angry"), ("%s/angry/c.png" % val_dir, "angry"),
        ("%s/happy/d.png" % val_dir, "happy"), ("%s/surprise/e.png" % test_dir, "surprise")]
    root = tmp_path / "split_dirs"
    _write_tree(str(root), entries)
    ds = load_dataset(str(root), cache_dir=cache)
    assert {s: v[1].tolist() for s, v in ds.splits.items()} == {"train": [0, 3, 3, 3], "val": [0, 3], "test": [5]}


def test_zip_archive_in_place(tmp_path, cache):
    path = str(tmp_path / "fer.zip")
    with zipfile.ZipFile(path, "w") as zf:
        for rel, c in KAGGLE:
            zf.writestr("fer2013/" + rel, _png(_value(c)))
    _check_kaggle(load_dataset(path, cache_dir=cache))


def test_images_come_in_path_order_whatever_the_archive_order(tmp_path, cache):
    """The same images stored in opposite orders read as the same arrays, row for row
    (each image has its own grey value, so a different order shows)."""
    entries = [(rel, 3 + 11 * i) for i, (rel, _) in enumerate(KAGGLE)]
    read = []
    for name, order in (("fwd", entries), ("rev", entries[::-1])):
        path = str(tmp_path / (name + ".zip"))
        with zipfile.ZipFile(path, "w") as zf:
            for rel, value in order:
                zf.writestr("fer2013/" + rel, _png(value))
        read.append(load_dataset(path, cache_dir=cache))
    fwd, rev = read
    assert fwd.splits.keys() == rev.splits.keys()
    for s in fwd.splits:
        np.testing.assert_array_equal(fwd.splits[s][0], rev.splits[s][0])
        np.testing.assert_array_equal(fwd.splits[s][1], rev.splits[s][1])
    assert len(np.unique(fwd.splits["train"][0][:, 0, 0])) == 9  # distinct images, so order shows


@pytest.mark.parametrize("mode,ext", [("w:gz", ".tar.gz"), ("w:xz", ".tar.xz"), ("w", ".tar")])
def test_tar_archive_in_place(tmp_path, cache, mode, ext):
    path = str(tmp_path / ("fer" + ext))
    with tarfile.open(path, mode) as tf:
        for rel, c in KAGGLE:
            data = _png(_value(c))
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    _check_kaggle(load_dataset(path, cache_dir=cache))


def _csv(path, header, rows):
    with open(path, "w") as fh:
        fh.write(header + "\n")
        for r in rows:
            fh.write(r + "\n")


def _row(label, value, usage, n=48 * 48):
    return '%d,"%s",%s' % (label, " ".join([str(value)] * n), usage)


@pytest.mark.parametrize("header", ["emotion,pixels,Usage", "emotion, pixels, Usage"])
def test_csv_both_header_spellings(tmp_path, cache, header):
    path = str(tmp_path / "fer.csv")
    rows = [_row(3, 35, "Training"), _row(0, 5, "Training"), _row(6, 65, "PublicTest"), _row(2, 25, "PrivateTest")]
    _csv(path, header, rows)
    ds = load_dataset(path, cache_dir=cache)
    assert ds.class_names == list(CLASS_NAMES)
    assert ds.splits["train"][1].tolist() == [3, 0] and ds.splits["val"][1].tolist() == [6]
    assert ds.splits["test"][1].tolist() == [2]
    assert ds.splits["train"][0].shape == (2, 48, 48) and ds.splits["train"][0][0, 0, 0] == 35


def test_csv_malformed_row_names_the_row_or_is_skipped(tmp_path, cache):
    path = str(tmp_path / "bad.csv")
    _csv(path, "emotion,pixels,Usage", [_row(3, 35, "Training"), _row(1, 5, "Training", n=99),
                                        _row(0, 5, "Training")])
    with pytest.raises(DataError, match=r"row 3"):
        load_dataset(path, cache_dir=cache)
    ds = load_dataset(path, cache_dir=cache, skip_bad=True)
    assert ds.splits["train"][1].tolist() == [3, 0]
    assert len(ds.skipped) == 1 and "row 3" in ds.skipped[0]


@pytest.mark.parametrize("bad,problem", [
    ('1,"%s"' % " ".join(["5"] * 48 * 48), "2 fields, expected 3"),
    (_row(7, 5, "Training"), "emotion 7 is not in 0..6"),
    (_row(-1, 5, "Training"), "emotion -1 is not in 0..6"),
    (_row(1, 256, "Training"), "pixel values outside 0..255"),
    (_row(1, 5, "Training", n=0), "0 pixel values is not a square image"),
    (_row(1, 5, "Training", n=47 * 48), "2256 pixel values is not a square image"),
    (_row(1, 5, "Validation"), "unknown Usage 'Validation'"),
    ('x,"1 2 3 4",Training', "invalid literal"),
])
def test_csv_each_bad_row_says_what_is_wrong(tmp_path, cache, bad, problem):
    """Every malformed-row check names the file, the row and the problem (or, with
    skip_bad, skips that row only); empty lines are not rows."""
    path = str(tmp_path / "bad.csv")
    # "" and ",," (a spreadsheet's empty line) are no rows at all
    _csv(path, "emotion,pixels,Usage", [_row(3, 35, "Training"), ",,", bad, _row(0, 5, "PublicTest")])
    with pytest.raises(DataError, match="bad.csv: row 4: malformed CSV row") as exc:
        load_dataset(path, cache_dir=cache)
    assert problem in str(exc.value)
    ds = load_dataset(path, cache_dir=cache, skip_bad=True)
    assert ds.splits["train"][1].tolist() == [3] and ds.splits["val"][1].tolist() == [0]
    assert len(ds.skipped) == 1 and problem in ds.skipped[0]


@pytest.mark.parametrize("content,problem", [("", "empty CSV file"), ("label,image\n1,2\n", "'emotion' and 'pixels'"),
                                             ("emotion,pixels,Usage\n\n", "no data rows")])
def test_csv_without_usable_rows_says_so(tmp_path, cache, content, problem):
    path = tmp_path / "odd.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=problem):
        load_dataset(str(path), cache_dir=cache)


def test_csv_without_usage_is_split_by_row_hash_and_other_sizes_are_resized(tmp_path, cache):
    """No Usage column: a stable hash of the row number splits ~10 % / 10 % off for
    validation / test; 24x24 images are resized to 48x48 (bilinear; a flat image stays flat)."""
    path = str(tmp_path / "small.csv")
    rows = ['%d,"%s"' % (i % 7, " ".join([str(i % 250)] * 24 * 24)) for i in range(400)]
    _csv(path, "emotion,pixels", rows)
    ds = load_dataset(path, cache_dir=cache)
    sizes = {s: len(v[1]) for s, v in ds.splits.items()}
    assert sum(sizes.values()) == 400 and set(sizes) == {"train", "val", "test"}
    assert 20 <= sizes["val"] <= 60 and 20 <= sizes["test"] <= 60
    for x, y in ds.splits.values():
        assert x.shape[1:] == (48, 48) and (x.min(axis=(1, 2)) == x.max(axis=(1, 2))).all()
    again = load_dataset(path, cache_dir=str(tmp_path / "other-cache"))
    for s in ds.splits:  # the split is a function of the file, not of a random state
        np.testing.assert_array_equal(again.splits[s][1], ds.splits[s][1])
        np.testing.assert_array_equal(again.splits[s][0], ds.splits[s][0])


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, cache):
    root = tmp_path / "d"
    _write_tree(str(root), KAGGLE)
    bad = root / "train" / "happy" / "Training_broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="Training_broken.jpg"):
        load_dataset(str(root), cache_dir=cache)
    ds = load_dataset(str(root), cache_dir=cache, skip_bad=True)
    assert len(ds.skipped) == 1 and "Training_broken.jpg" in ds.skipped[0]
    assert len(ds.splits["train"][1]) == 9


def test_generic_class_folders_split_and_order(tmp_path, cache):
    root = tmp_path / "other"
    entries = [("%s/img%02d.png" % (c, i), c) for c in ("surprise", "neutral", "happy") for i in range(20)]
    _write_tree(str(root), entries)
    ds = load_dataset(str(root), cache_dir=cache)
    assert ds.class_names == list(CLASS_NAMES)
    sizes = {s: len(v[1]) for s, v in ds.splits.items()}
    assert sizes == {"train": 48, "val": 6, "test": 6}
    # stratified: each class keeps its share in each split (10 %, 10 %, the rest)
    uneven = tmp_path / "uneven"
    _write_tree(str(uneven), [("%s/img%02d.png" % (c, i), c) for c, n in (("surprise", 25), ("neutral", 25),
                                                                        ("happy", 10)) for i in range(n)])
    split = load_dataset(str(uneven), cache_dir=cache).splits
    # (a draw of 6 of all 60 paths by their hash gives surprise 3, neutral 2)
    for s, want in (("train", [8, 21, 21]), ("val", [1, 2, 2]), ("test", [1, 2, 2])):  # happy, surprise, neutral
        assert np.bincount(split[s][1], minlength=7)[[3, 5, 6]].tolist() == want, s
    # a different data set's own classes: alphabetical after none of the FER names
    root2 = tmp_path / "animals"
    _write_tree(str(root2), [("zebra/a%d.png" % i, "happy") for i in range(5)]
                + [("cat/b%d.png" % i, "angry") for i in range(5)])
    assert load_dataset(str(root2), cache_dir=cache).class_names == ["cat", "zebra"]


def test_images_resized_to_48(tmp_path, cache):
    root = tmp_path / "big"
    os.makedirs(root / "happy")
    Image.fromarray(np.full((96, 80), 200, np.uint8)).convert("RGB").save(root / "happy" / "x.jpg")
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(root / "happy" / "y.png")
    ds = load_dataset(str(root), cache_dir=cache, val_fraction=0, test_fraction=0)
    assert ds.splits["train"][0].shape == (2, 48, 48)


def test_cache_invalidated_when_source_changes(tmp_path, cache):
    path = str(tmp_path / "fer.csv")
    _csv(path, "emotion,pixels,Usage", [_row(3, 35, "Training")])
    assert not load_dataset(path, cache_dir=cache).from_cache
    assert load_dataset(path, cache_dir=cache).from_cache
    _csv(path, "emotion,pixels,Usage", [_row(3, 35, "Training"), _row(4, 45, "Training")])
    os.utime(path, ns=(1, 10 ** 18))
    ds = load_dataset(path, cache_dir=cache)
    assert not ds.from_cache and ds.splits["train"][1].tolist() == [3, 4]


def test_csv_pixels_are_read_row_by_row_and_survive_the_cache(tmp_path, cache):
    """FER-2013's CSV lists each image's pixels row by row (left to right, top to bottom).
    The other tests use flat images, which read the same in any order; these have a
    different value at every pixel, and must come back the same from the cache."""
    path = str(tmp_path / "grid.csv")
    imgs = [(np.arange(48 * 48).reshape(48, 48) * (i + 1)) % 251 for i in range(3)]
    rows = ['%d,"%s",%s' % (i, " ".join(map(str, im.ravel())), u)
            for i, (im, u) in enumerate(zip(imgs, ["Training", "Training", "PublicTest"]))]
    _csv(path, "emotion,pixels,Usage", rows)
    for attempt in range(2):  # the second load comes from the cache
        ds = load_dataset(path, cache_dir=cache)
        assert ds.from_cache == (attempt == 1)
        np.testing.assert_array_equal(ds.splits["train"][0], np.stack(imgs[:2]).astype(np.uint8))
        np.testing.assert_array_equal(ds.splits["val"][0][0], imgs[2].astype(np.uint8))
        assert ds.splits["train"][0][0, 0, 1] == 1 and ds.splits["train"][0][0, 1, 0] == 48


def test_class_folder_aliases_and_case(tmp_path, cache):
    """Folder names another data set spells differently name the FER classes."""
    root = tmp_path / "aliases"
    _write_tree(str(root), [("Anger/a%d.png" % i, "angry") for i in range(10)]
                + [("happiness/b%d.png" % i, "happy") for i in range(10)]
                + [("Surprised/c%d.png" % i, "surprise") for i in range(10)])
    ds = load_dataset(str(root), cache_dir=cache, val_fraction=0, test_fraction=0)
    assert ds.class_names == list(CLASS_NAMES)
    x, y = ds.splits["train"]
    np.testing.assert_array_equal(x[:, 0, 0], 10 * y + 5)
    assert sorted(set(y.tolist())) == [0, 3, 5]


def test_macos_leftovers_and_stray_folders_are_ignored(tmp_path, cache):
    """A zip made on a Mac carries __MACOSX/ copies and ._ resource forks (not images);
    in the Kaggle layout, files outside the split folders are no split's."""
    path = str(tmp_path / "mac.zip")
    with zipfile.ZipFile(path, "w") as zf:
        for rel, c in KAGGLE:
            zf.writestr("fer2013/" + rel, _png(_value(c)))
            zf.writestr("__MACOSX/fer2013/" + os.path.dirname(rel) + "/._" + os.path.basename(rel), b"\0junk")
        zf.writestr("fer2013/train/happy/._Training_9.png", b"\0junk")
        zf.writestr("fer2013/extra/happy/stray.png", _png(_value("happy")))
    _check_kaggle(load_dataset(path, cache_dir=cache))


def test_csv_images_of_another_size_are_resized_bilinear(tmp_path, cache):
    """A 24x24 CSV image becomes 48x48 as pillow's bilinear resize makes it (the resize of
    image files and of training), not by repeating pixels."""
    from PIL import Image as PILImage
    small = (np.arange(24 * 24) * 7 % 256).astype(np.uint8).reshape(24, 24)
    path = str(tmp_path / "small.csv")
    _csv(path, "emotion,pixels,Usage", ['2,"%s",Training' % " ".join(map(str, small.ravel()))])
    got = load_dataset(path, cache_dir=cache).splits["train"][0][0]
    want = np.asarray(PILImage.fromarray(small).resize((48, 48), PILImage.BILINEAR))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.asarray(PILImage.fromarray(small).resize((48, 48), PILImage.NEAREST)))
