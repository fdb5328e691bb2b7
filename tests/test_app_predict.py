"""dnnrl.bundle / faces / predict: bundles, face detection on composite photos, bad
inputs, videos and the ``predict`` / ``export`` CLI functions.

Faces come from ../shared/data/fer2013.tar.xz (read in memory with tarfile, never
written into the repo); the tests skip cleanly where it is absent. The model is a
randomly initialised width-0.125 network (fast); its k-NN gallery is made of a few
dozen FER-2013 training faces. Detection tests need OpenCV 4.x's Haar cascade and
skip (with the reason) on OpenCV 5, which removed it.
"""
import argparse
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dnnrl import bundle as B
from dnnrl import faces as F
from dnnrl.config import Config
from dnnrl.data import CLASS_NAMES
from dnnrl.model import DNNRLNet
from dnnrl.predict import Predictor, add_export_parser, add_predict_parser, run_export, run_predict
from dnnrl.train import save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "fer2013.tar.xz")
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 4

needs_haar = pytest.mark.skipif(not F.haar_available(),
                                reason="OpenCV Haar cascade unavailable (OpenCV 5 removed it; "
                                       "pip install 'opencv-python-headless<5')")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fer():
    """{"train": (x (70, 48, 48) uint8, y), "val": (x (28, 48, 48), y)}: the first faces of
    every class folder of the archive (one streamed pass, ~4 s)."""
    if not os.path.exists(ARCHIVE):
        pytest.skip("FER-2013 archive not found at %s" % ARCHIVE)
    want = {"train": TRAIN_PER_CLASS, "test": VAL_PER_CLASS}
    got = {s: {c: [] for c in CLASS_NAMES} for s in want}
    with tarfile.open(ARCHIVE, "r|*") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 4 or parts[-3] not in want or parts[-2] not in CLASS_NAMES:
                continue
            bucket = got[parts[-3]][parts[-2]]
            if len(bucket) < want[parts[-3]]:
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("L")
                bucket.append(np.array(img, dtype=np.uint8))
    out = {}
    for s, name in (("train", "train"), ("test", "val")):
        xs, ys = [], []
        for c, lab in zip(CLASS_NAMES, range(7)):
            xs += got[s][c]
            ys += [lab] * len(got[s][c])
        out[name] = (np.stack(xs), np.array(ys, dtype=np.int64))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    """A best.pt of a randomly initialised small network, as `dnnrl train` writes it."""
    torch.manual_seed(0)
    cfg = Config(image_size=48, width=0.125, method="dnnrl", preset="cpu", out=str(workdir / "run"))
    model = DNNRLNet(num_classes=7, width=cfg.width).eval()
    os.makedirs(cfg.out, exist_ok=True)
    save_model(os.path.join(cfg.out, "best.pt"), model, cfg, list(CLASS_NAMES), {"epoch": 1, "val_loss": 0.9})
    return cfg.out


@pytest.fixture(scope="module")
def bundle_file(workdir, checkpoint, fer):
    path = str(workdir / "small.pt")
    facts = B.export_bundle(checkpoint, fer, path, k_max=9, gallery_dim=16, sweep_dims=(8, 16, 64),
                            device="cpu", meta={"note": "test"})
    return path, facts


def _background(h, w, seed):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(70, 170, w)[None, :] + np.linspace(-20, 20, h)[:, None]
    return np.clip(ramp + rng.normal(0, 5, (h, w)), 0, 255).astype(np.uint8)


def _paste(canvas, face, x, y, scale):
    big = np.array(Image.fromarray(face).resize((48 * scale, 48 * scale), Image.BICUBIC))
    canvas[y:y + big.shape[0], x:x + big.shape[1]] = big
    return [x, y, big.shape[1], big.shape[0]]


def _composite(faces, seed, size=(440, 920), scale=3):
    """An (H, W) photo with the given faces side by side; returns (image, truth boxes)."""
    img = _background(*size, seed)
    boxes = []
    step = size[1] // len(faces)
    for j, f in enumerate(faces):
        s = scale + (j % 2)
        x = j * step + (step - 48 * s) // 2
        y = 40 + 60 * (j % 2)
        boxes.append(_paste(img, f, x, y, s))
    return img, boxes


def _match(truth, found):
    """Best IoU of every truth box among the found boxes."""
    return [max([F.iou(t, f) for f in found] or [0.0]) for t in truth]


def _parser():
    ap = argparse.ArgumentParser(prog="dnnrl")
    sub = ap.add_subparsers(dest="command")
    add_predict_parser(sub)
    add_export_parser(sub)
    return ap


# --------------------------------------------------------------------------- bundle
def test_bundle_round_trip(bundle_file, checkpoint, fer):
    path, facts = bundle_file
    raw = torch.load(path, weights_only=False)
    assert raw["format"] == B.FORMAT and raw["class_names"] == list(CLASS_NAMES)
    assert raw["gallery"].dtype == torch.float16 and raw["gallery"].shape == (70, 16)
    assert raw["gallery_labels"].dtype == torch.uint8
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())
    assert raw["projection"]["components"].shape == (512, 16)
    assert raw["meta"]["note"] == "test" and raw["meta"]["checkpoint_epoch"] == 1
    assert facts["file_mb"] < B.SHIP_LIMIT_MB and facts["under_ship_limit"]
    assert set(facts["pca_sweep"]) == {8, 16, 64}
    assert 1 <= facts["k"] <= 9 and 0 <= facts["val_accuracy"] <= 1 and 0 <= facts["val_accuracy_float32"] <= 1

    model, clf, names, cfg, meta = B.load_bundle(path)
    assert isinstance(clf, B.ProjectedKNNClassifier) and clf.k == facts["k"] and not model.training
    assert cfg.width == 0.125 and names == list(CLASS_NAMES) and meta["val_accuracy"] == facts["val_accuracy"]
    # the float16 weights give the float32 network's embeddings to ~1e-2
    _, _, _, state = B.load_checkpoint(checkpoint)
    ref = B.model_from_state(cfg, 7, state)
    from dnnrl.runtime import embed
    from dnnrl.train import augment_config
    xv, yv = fer["val"]
    e16 = embed(model, torch.from_numpy(xv), augment_config(cfg), torch.device("cpu"), amp="off")
    e32 = embed(ref, torch.from_numpy(xv), augment_config(cfg), torch.device("cpu"), amp="off")
    assert torch.allclose(e16, e32, atol=2e-2)
    # the recorded val accuracy is the loaded classifier's
    assert clf.score(e16, yv) == pytest.approx(facts["val_accuracy"], abs=1.5 / len(yv))


def test_checkpoint_with_data_and_default_bundle_error(checkpoint, fer, monkeypatch, tmp_path):
    # (without data a checkpoint takes the run's own: test_export_and_predict_without_data_take_the_runs_own)
    p = Predictor(checkpoint, data=fer, detect=False, device="cpu")
    assert p.classifier.gallery.shape == (70, 512) and p.classifier.gallery.dtype == torch.float32
    out = p.predict(fer["val"][0][0])
    assert len(out) == 1 and out[0]["box"] == [0, 0, 48, 48]
    assert sum(out[0]["scores"].values()) == pytest.approx(1.0)
    monkeypatch.delenv("DNNRL_BUNDLE", raising=False)
    monkeypatch.setattr(B, "DEFAULT_BUNDLE", str(tmp_path / "absent.pt"))
    with pytest.raises(B.BundleError, match="--bundle"):
        Predictor(None, detect=False)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(B.BundleError, match="cannot read"):
        Predictor(str(tmp_path / "junk.pt"), detect=False)


def test_predict_inputs_kinds(bundle_file, fer):
    p = Predictor(bundle_file[0], detect=False, device="cpu")
    face = fer["val"][0][3]
    a = p.predict(face)[0]
    for variant in (Image.fromarray(face), face.astype(np.float32) / 255.0, np.repeat(face[..., None], 3, 2),
                    face.astype(np.uint16) * 257):
        r = p.predict(variant)[0]
        assert r["expression"] == a["expression"] and r["scores"] == pytest.approx(a["scores"])
    with pytest.raises(F.ImageError, match="shape"):
        p.predict(np.zeros((4, 4, 2), np.uint8))


# --------------------------------------------------------------------------- detection
@needs_haar
def test_composites_found_and_labelled_like_no_detect(bundle_file, fer, tmp_path):
    xv = fer["val"][0]
    det = Predictor(bundle_file[0], detect=True, device="cpu")
    nodet = Predictor(bundle_file[0], detect=False, device="cpu")
    ious, labels, crops_dir = [], [], tmp_path / "crops"
    crops_dir.mkdir()
    for i in range(4):
        img, truth = _composite([xv[(4 * i + j) % len(xv)] for j in range(4)], seed=i)
        found = det.predict(img)
        ious += _match(truth, [f["box"] for f in found])
        for f in found:  # nothing on the plain background (a part of a face may be found)
            assert max(F._inter(f["box"], t) for t in truth) > 0.5 * f["box"][2] * f["box"][3], f["box"]
            crop = F.crop_face(img, f["box"], det.margin)
            path = crops_dir / ("c%d_%d.png" % (i, len(labels)))
            Image.fromarray(crop).save(path)
            labels.append((path.name, f["expression"], f["scores"]))
            # the same crop without detection: the same vote
            r = nodet.predict(crop)[0]
            assert r["expression"] == f["expression"] and r["scores"] == pytest.approx(f["scores"])
    hits = sum(v >= 0.5 for v in ious)
    assert hits >= 0.6 * len(ious), ious
    # and through the CLI with --no-detect on the saved crops
    out = tmp_path / "nodet.json"
    args = _parser().parse_args(["predict", str(crops_dir), "--bundle", bundle_file[0], "--no-detect",
                                 "--output", str(out), "--device", "cpu", "--quiet", "--batch-size", "5"])
    assert run_predict(args) == 0
    got = {os.path.basename(r["source"]): r["faces"][0]["expression"] for r in json.load(open(out))["results"]}
    assert got == {name: e for name, e, _ in labels}


@needs_haar
def test_error_paths_and_image_formats(bundle_file, fer, tmp_path, capsys):
    face = fer["val"][0][9]
    d = tmp_path / "in"
    d.mkdir()
    img, truth = _composite([face], seed=7, size=(300, 320), scale=4)
    Image.fromarray(img).save(d / "gray.png")
    Image.fromarray(np.dstack([img, img, img, np.full_like(img, 255)])).save(d / "rgba.png")
    Image.fromarray(img.astype(np.uint16) * 257).save(d / "deep16.png")
    assert Image.open(d / "deep16.png").mode.startswith("I")
    Image.fromarray(np.dstack([img] * 3)).save(d / "color.jpg", quality=95)
    # huge: detection runs downscaled, boxes come back in the original pixels
    huge = _background(3600, 4800, 3)
    htruth = _paste(huge, face, 2000, 1200, 14)
    Image.fromarray(huge).save(d / "huge.png", compress_level=1)
    Image.fromarray(_background(200, 260, 5)).save(d / "noface.png")
    good = open(d / "color.jpg", "rb").read()
    (d / "truncated.jpg").write_bytes(good[:200])
    (d / "notes.jpg").write_text("this is not an image\n")
    (d / "empty.png").write_bytes(b"")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "res.json"
    args = _parser().parse_args(["predict", str(d), str(empty), str(tmp_path / "missing.jpg"), "--bundle",
                                 bundle_file[0], "--output", str(out), "--device", "cpu"])
    assert run_predict(args) == 1
    printed = capsys.readouterr()
    assert "ERROR" in printed.out and "(no face found)" in printed.out and "3 failed" not in printed.err
    results = json.load(open(out))["results"]
    # in input order (a folder's files sorted), the unreadable ones too, though the readable
    # ones wait for a batch of faces to fill before they are classified
    assert [os.path.basename(r["source"]) for r in results] == sorted(os.listdir(d)) + ["emptydir", "missing.jpg"]
    recs = {os.path.basename(r["source"]): r for r in results}
    for bad, why in (("truncated.jpg", "not a readable image"), ("notes.jpg", "not a readable image"),
                     ("empty.png", "empty file"), ("emptydir", "no images"), ("missing.jpg", "no such file")):
        assert why in recs[bad]["error"] and bad in recs[bad]["error"], recs[bad]
    assert recs["noface.png"]["error"] is None and recs["noface.png"]["faces"] == []
    for ok in ("gray.png", "rgba.png", "deep16.png", "color.jpg"):
        r = recs[ok]
        assert r["error"] is None and len(r["faces"]) >= 1, ok
        assert _match(truth, [f["box"] for f in r["faces"]])[0] >= 0.5, ok
    # every format gives the same face and the same label
    assert len({recs[k]["faces"][0]["expression"] for k in ("gray.png", "rgba.png", "deep16.png")}) == 1
    h = recs["huge.png"]
    assert (h["width"], h["height"]) == (4800, 3600)
    assert _match([htruth], [f["box"] for f in h["faces"]])[0] >= 0.5, h["faces"]


# --------------------------------------------------------------------------- video
def _write_video(path, face, n=24, size=(240, 320)):
    import cv2
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12.0, (size[1], size[0]))
    assert vw.isOpened()
    boxes = []
    for i in range(n):
        img = _background(*size, 100 + i)
        boxes.append(_paste(img, face, 30 + 5 * i, 40, 3))
        vw.write(np.dstack([img] * 3))
    vw.release()
    return boxes


def test_video_frames_and_every(bundle_file, fer, tmp_path):
    pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    truth = _write_video(path, fer["val"][0][9])
    detect = F.haar_available()
    p = Predictor(bundle_file[0], detect=detect, device="cpu", batch_size=4)
    recs = list(p.predict_paths([str(path)], every=5))
    assert [r["frame"] for r in recs] == [0, 5, 10, 15, 20]
    assert all(r["kind"] == "video" and r["error"] is None and (r["width"], r["height"]) == (320, 240)
               for r in recs)
    assert recs[1]["time_s"] == pytest.approx(5 / 12.0, rel=1e-3)
    if detect:
        hits = [_match([truth[r["frame"]]], [f["box"] for f in r["faces"]])[0] >= 0.5 for r in recs]
        assert sum(hits) >= 4, [r["faces"] for r in recs]
    assert len(list(p.predict_paths([str(path)], every=1))) == 24
    # CLI: CSV rows per face with the frame column, annotated .avi
    out, ann = tmp_path / "v.csv", tmp_path / "ann"
    argv = ["predict", str(path), "--bundle", bundle_file[0], "--every", "8", "--output", str(out),
            "--annotate", str(ann), "--device", "cpu", "--quiet"] + ([] if detect else ["--no-detect"])
    assert run_predict(_parser().parse_args(argv)) == 0
    rows = list(csv.DictReader(open(out)))
    assert sorted({int(r["frame"]) for r in rows}) == [0, 8, 16]
    assert set(CLASS_NAMES) <= set(rows[0])
    assert os.path.getsize(ann / "clip.avi") > 0
    # not a video at all
    (tmp_path / "fake.mp4").write_text("nope")
    bad = list(p.predict_paths([str(tmp_path / "fake.mp4")]))
    assert len(bad) == 1 and bad[0]["error"]
    # one path, not a list: the path itself (a str was read letter by letter, '.' as a folder)
    one = list(p.predict_paths(str(path), every=8))
    assert [r["frame"] for r in one] == [0, 8, 16] and all(r["source"] == str(path) for r in one)
    assert [r["frame"] for r in p.predict_paths(path, every=12)] == [0, 12]
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be an integer >= 1"):
            next(p.predict_paths([str(path)], every=every))


# --------------------------------------------------------------------------- CLI
def test_cli_export_and_predict(checkpoint, fer, tmp_path, capsys):
    pytest.importorskip("cv2")  # --annotate draws with OpenCV
    # export reads data through dnnrl.data; give it a tiny Kaggle-layout folder
    root = tmp_path / "fer"
    for split, (x, y), prefix in (("train", fer["train"], "Training"), ("test", fer["val"], "PublicTest")):
        for i, (img, lab) in enumerate(zip(x, y)):
            d = root / split / CLASS_NAMES[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / ("%s_%d.png" % (prefix, i)))
    out = tmp_path / "b.pt"
    args = _parser().parse_args(["export", "--checkpoint", checkpoint, "--data", str(root), "--out", str(out),
                                 "--gallery-dim", "32", "--gallery-per-class", "6", "--sweep-dims", "8,32",
                                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--k-max", "7"])
    assert run_export(args) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["gallery_rows"] == 6 * 7 and facts["gallery_dim"] == 32 and facts["under_ship_limit"]
    assert torch.load(out, weights_only=False)["gallery"].shape == (42, 32)
    # predict with the exported bundle; annotated copies written
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(3):
        Image.fromarray(fer["val"][0][i]).save(img_dir / ("f%d.png" % i))
    ann = tmp_path / "ann"
    args = _parser().parse_args(["predict", str(img_dir), "--bundle", str(out), "--no-detect",
                                 "--annotate", str(ann), "--device", "cpu"])
    assert run_predict(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["source", "frame", "face"] and table.count("f0.png") == 1
    assert sorted(os.listdir(ann)) == ["f0.png", "f1.png", "f2.png"]
    # usage errors (a checkpoint without --data takes the run's own: test_export_and_predict_without_data_...)
    with pytest.raises(SystemExit):  # checked at parse time (argtypes)
        _parser().parse_args(["predict", str(img_dir), "--bundle", str(out), "--every", "0"])
    with pytest.raises(SystemExit):  # --bundle and --checkpoint exclude each other
        _parser().parse_args(["predict", "x.jpg", "--bundle", "a", "--checkpoint", "b"])


def test_detector_unavailable_is_clear(bundle_file, monkeypatch, capsys, tmp_path):
    def no_cascade(path=None):
        raise F.DetectorUnavailable("OpenCV 5.0 has no Haar cascade detector: pip install "
                                    "'opencv-python-headless<5', or use --no-detect")
    monkeypatch.setattr(F, "_cascade", no_cascade)
    with pytest.raises(F.DetectorUnavailable):
        Predictor(bundle_file[0], detect=True)
    Image.fromarray(_background(50, 50, 0)).save(tmp_path / "a.png")
    assert run_predict(_parser().parse_args(["predict", str(tmp_path / "a.png"), "--bundle",
                                             bundle_file[0]])) == 2
    assert "--no-detect" in capsys.readouterr().err
    assert not F.haar_available()


def test_load_image_scales_every_gray_depth_to_uint8():
    """Float images are taken as [0, 1] (NaN as 0, clipped), 32-bit integer ones as 0..255
    unless they exceed it (then 0..65535), 1-bit ones and bool arrays as black / white."""
    f = np.array([[0.0, 0.5, 1.0, 2.0], [-1.0, np.nan, 0.25, 1.0]], np.float32)
    np.testing.assert_array_equal(F.load_image(Image.fromarray(f, mode="F")),
                                  [[0, 128, 255, 255], [0, 0, 64, 255]])
    small = np.array([[0, 17, 255, 128]], np.int32)
    np.testing.assert_array_equal(F.load_image(Image.fromarray(small, mode="I")), small)
    deep = np.array([[0, 65535, 257 * 17, 256]], np.int32)
    np.testing.assert_array_equal(F.load_image(Image.fromarray(deep, mode="I")), [[0, 255, 17, 1]])
    bits = Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).convert("1")
    np.testing.assert_array_equal(F.load_image(bits), [[0, 255, 255, 0]])
    # NumPy arrays the same way: bool masks as black / white, floats in [0, 1], 16-bit counts
    np.testing.assert_array_equal(F.load_image(np.array([[False, True]])), [[0, 255]])
    np.testing.assert_array_equal(F.load_image(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])
    np.testing.assert_array_equal(F.load_image(np.array([[0, 257 * 17, 65535]], np.uint16)), [[0, 17, 255]])


def test_load_image_modes(tmp_path):
    g = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint8)
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    np.testing.assert_array_equal(F.load_image(str(tmp_path / "a16.png")), g)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white, as viewers show it
    Image.fromarray(rgba).save(tmp_path / "t.png")
    gray, rgb = F.load_image(str(tmp_path / "t.png"), color=True)
    assert gray.min() == 255 and rgb.shape == (30, 40, 3)
    pal = Image.fromarray(g).convert("P")
    assert F.load_image(pal).shape == (30, 40)
    # EXIF orientation 6 (rotate 90 CW to view) is applied
    im = Image.fromarray(g)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    assert F.load_image(str(tmp_path / "rot.jpg")).shape == (40, 30)
    with pytest.raises(F.ImageError, match="folder"):
        F.load_image(str(tmp_path))
    box = F.expand_box([10, 10, 100, 50], 0.1)
    assert box == (0, 5, 120, 60)
    assert F.crop_face(g, [-10, -10, 30, 30], 0.0).shape == (48, 48)


@pytest.mark.parametrize("box", [[-10, -6, 30, 30], [25, 14, 30, 30], [-4, 3, 60, 20]])
def test_crop_past_the_border_keeps_each_pixel_in_its_place(box):
    """The part of a (grown) box outside the image is zero and the rest is the image
    where it lies: at the top-left, the bottom-right and both sides of a wide box."""
    g = (np.arange(40 * 50).reshape(40, 50) % 251 + 1).astype(np.uint8)  # no zeros inside the image
    x, y, w, h = box
    want = np.zeros((h, w), dtype=np.uint8)
    for r in range(h):
        for c in range(w):
            if 0 <= y + r < 40 and 0 <= x + c < 50:
                want[r, c] = g[y + r, x + c]
    got = F.crop_face(g, box, 0.0, size=max(w, h))
    np.testing.assert_array_equal(got, F.resize_face(want, max(w, h)))
    if w == h:  # no resize: the canvas itself
        np.testing.assert_array_equal(got, want)


def test_face_crops_are_resized_like_training_images():
    """A detected face is resized as dnnrl.data.decode_image resizes a training image of
    another size (pillow's bilinear filter), so the network sees the same kind of pixels."""
    from dnnrl.data import decode_image
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (97, 83), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="PNG")
    np.testing.assert_array_equal(F.resize_face(face, 48), decode_image(buf.getvalue(), 48, "face.png"))
    np.testing.assert_array_equal(F.crop_face(face, [0, 0, 83, 97], 0.0, size=48), F.resize_face(face, 48))


# --------------------------------------------------------------------------- options and output
def test_k_option_sets_the_vote_capped_at_the_gallery(bundle_file, fer):
    """--k replaces the bundle's k (capped at the gallery's rows); the vote shares follow it."""
    path, facts = bundle_file
    face = fer["val"][0][5]
    assert Predictor(path, detect=False, device="cpu").classifier.k == facts["k"]
    p = Predictor(path, detect=False, device="cpu", k=4)
    assert p.classifier.k == 4
    shares = p.predict(face)[0]["scores"].values()
    assert all(abs(s * 4 - round(s * 4)) < 1e-6 for s in shares)  # k = 4 votes: shares in quarters
    assert Predictor(path, detect=False, device="cpu", k=10_000).classifier.k == 70  # the gallery's rows


def test_predict_on_the_cpu_runs_float32(bundle_file):
    """bf16 autocast is for CUDA: on the CPU the network runs in float32 even for a
    bundle trained with --amp bf16 (the same rule as training's --amp auto)."""
    bundle = torch.load(bundle_file[0], weights_only=False)
    bundle["config"] = dict(bundle["config"], amp="bf16")
    p = Predictor(bundle, detect=False, device="cpu")
    assert p.config.amp == "bf16" and p.amp == "off"


def _face_record(source, scores, box=(1, 2, 30, 40)):
    best = max(scores, key=scores.get)
    return {"source": source, "kind": "image", "frame": None, "time_s": None, "width": 64, "height": 64,
            "error": None, "faces": [{"box": list(box), "expression": best, "label": CLASS_NAMES.index(best),
                                      "share": scores[best], "scores": scores}]}


def test_table_names_the_runner_up_never_the_winner():
    from dnnrl.predict import format_table
    shares = dict.fromkeys(CLASS_NAMES, 0.0)
    two = dict(shares, happy=0.6, sad=0.4)
    alone = dict(shares, fear=1.0)
    lines = list(format_table([_face_record("a.png", two), _face_record("b.png", alone)], CLASS_NAMES))
    assert lines[1].split()[-4:] == ["happy", "0.60", "sad", "0.40"]
    assert lines[2].split()[-2:] == ["fear", "1.00"]  # no runner-up with a share above 0


def test_csv_rows_have_every_column_and_the_shares_in_class_order(tmp_path):
    """One row per face, and one for an input without faces or with an error, each as
    long as the header; the share columns follow class_names, not the order of the scores."""
    from dnnrl.predict import write_output
    scores = {n: s for n, s in zip(reversed(CLASS_NAMES), (0.05, 0.1, 0.15, 0.2, 0.0, 0.5, 0.0))}
    face = _face_record("face.png", scores)
    face["image"] = np.zeros((4, 4), np.uint8)  # kept for --annotate, never written
    none = dict(_face_record("empty.png", scores), faces=[])
    bad = dict(none, source="bad.jpg", error="bad.jpg: not a readable image")
    out = tmp_path / "r.csv"
    write_output([face, none, bad], str(out), CLASS_NAMES, {"k": 3})
    rows = list(csv.reader(open(out)))
    assert all(len(r) == len(rows[0]) for r in rows), [len(r) for r in rows]
    head = rows[0]
    got = dict(zip(head, rows[1]))
    assert [float(got[n]) for n in CLASS_NAMES] == [scores[n] for n in CLASS_NAMES]
    assert got["expression"] == "disgust" and float(got["share"]) == 0.5 and got["error"] == ""
    assert dict(zip(head, rows[2]))["error"] == "no face found" and dict(zip(head, rows[3]))["error"] == bad["error"]
    write_output([face], str(tmp_path / "r.json"), CLASS_NAMES, {"k": 3})  # the image is left out of JSON too
    assert "image" not in json.load(open(tmp_path / "r.json"))["results"][0]


def test_detected_boxes_come_largest_first_without_nested_ones(monkeypatch):
    """detect_faces on a fake cascade: boxes sorted by area, a box mostly inside a larger
    one (an eye or a mouth found beside its face) dropped, and boxes found on the
    downscaled detection image returned in the original pixels."""
    pytest.importorskip("cv2")
    found = [[10, 10, 30, 30], [100, 20, 80, 80], [110, 30, 20, 20], [5, 120, 50, 50]]

    class FakeCascade:
        def detectMultiScale(self, img, **kw):
            return np.array(found)
    monkeypatch.setattr(F, "_cascade", lambda path=None: FakeCascade())
    gray = np.zeros((200, 200), np.uint8)
    assert F.detect_faces(gray).tolist() == [[100, 20, 80, 80], [5, 120, 50, 50], [10, 10, 30, 30]]
    keep_all = F.detect_faces(gray, F.DetectorConfig(nested_overlap=1.0)).tolist()
    assert keep_all == [[100, 20, 80, 80], [5, 120, 50, 50], [10, 10, 30, 30], [110, 30, 20, 20]]
    big = F.detect_faces(np.zeros((800, 400), np.uint8), F.DetectorConfig(max_side=200))
    assert big.tolist() == [[400, 80, 320, 320], [20, 480, 200, 200], [40, 40, 120, 120]]


def test_export_and_predict_without_data_take_the_runs_own(tmp_path, capsys):
    """A run trained on the built-in synthetic set (the quick start's) exports and predicts
    without --data: the set is regenerated with the run's sizes and seed, the same gallery
    as passing it by hand. A run whose data file has gone names the file (both needed
    --data before)."""
    from dnnrl.synthetic import make_synthetic
    torch.manual_seed(1)
    cfg = Config(image_size=48, width=0.125, method="dnnrl", preset="cpu", out=str(tmp_path / "demo"), seed=4,
                 synthetic_train_per_class=12, synthetic_val_per_class=3, synthetic_test_per_class=2)
    os.makedirs(cfg.out)
    save_model(os.path.join(cfg.out, "best.pt"), DNNRLNet(num_classes=7, width=cfg.width).eval(), cfg,
               list(CLASS_NAMES), {"epoch": 1, "val_loss": 0.9})
    out = tmp_path / "demo.pt"
    assert run_export(_parser().parse_args(["export", "--checkpoint", cfg.out, "--out", str(out),
                                            "--device", "cpu", "--k-max", "5"])) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["gallery_rows"] == 7 * 12
    by_hand, _ = B.build_bundle(cfg.out, make_synthetic(12, 3, 2, seed=4), k_max=5, device="cpu")
    own = torch.load(out, weights_only=False)
    assert torch.equal(own["gallery"], by_hand["gallery"]) and own["k"] == by_hand["k"]
    img = tmp_path / "face.png"
    Image.fromarray(make_synthetic(1, 1, 1, seed=9).splits["val"][0][0]).save(img)
    assert run_predict(_parser().parse_args(["predict", str(img), "--checkpoint", cfg.out, "--no-detect",
                                             "--device", "cpu", "--output", str(tmp_path / "p.json")])) == 0
    assert json.load(open(tmp_path / "p.json"))["results"][0]["faces"][0]["expression"] in CLASS_NAMES
    gone = Config(**dict(cfg.to_dict(), data=str(tmp_path / "gone.csv"), out=str(tmp_path / "gone")))
    os.makedirs(gone.out)
    save_model(os.path.join(gone.out, "best.pt"), DNNRLNet(num_classes=7, width=cfg.width).eval(), gone,
               list(CLASS_NAMES), {"epoch": 1, "val_loss": 0.9})
    capsys.readouterr()
    assert run_export(_parser().parse_args(["export", "--checkpoint", gone.out, "--out", str(tmp_path / "g.pt"),
                                            "--device", "cpu"])) == 2
    assert "was trained on %s, which is not there now: pass the training data with --data" % (
        tmp_path / "gone.csv") in capsys.readouterr().err
