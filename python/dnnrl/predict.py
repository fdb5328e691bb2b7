"""Expression prediction on photos, folders and videos (``dnnrl predict``) and bundle
export (``dnnrl export``).

    from dnnrl.predict import Predictor
    p = Predictor("model.pt")                 # a bundle; None = the packaged model
    p.predict("group.jpg")                    # [{"box": [x, y, w, h], "expression": "happy",
                                              #   "label": 3, "share": 0.62, "scores": {...}}, ...]
    for rec in p.predict_paths(["photos/", "clip.mp4"], every=10): ...

Per image: load (faces.load_image) -> Haar face boxes -> 48x48 crops -> the model's
evaluation transform -> embeddings -> k-NN vote on the bundle's gallery. ``scores``
are the vote shares of every expression among the k neighbours (they sum to 1);
``expression`` is the vote's winner (ties: the class whose nearest member ranks
first, as dnnrl_ext.knn_vote). Folders are searched recursively and their faces
embedded in batches across images; videos are read with OpenCV, every Nth frame.
"""
import argparse
import csv
import json
import logging
import numbers
import os
import sys
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import argtypes as A
from . import faces as F
from .bundle import (FORMAT, BundleError, build_bundle, bundle_from_dict, default_bundle_path,
                     export_bundle)
from .config import CHOICES, TTA_MODES
from .data import IMAGE_EXTS

log = logging.getLogger("dnnrl")

VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


def _is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


class Predictor:
    """Face expression predictor.

    Args:
        model: a bundle file (``dnnrl export``), a ``dnnrl train`` run directory or
            best.pt / checkpoint.pt (then the training split of ``data``, or of the run's
            own data when None, becomes the k-NN gallery and its validation split chooses k), an
            in-memory bundle dict, or None for the packaged default model.
        data: training data for a checkpoint (path, Dataset or {split: (x, y)}).
        device: "auto" (cuda when available), "cpu", "cuda:0", ...
        detect: find faces with the Haar cascade; False = each image is one face.
        batch_size: faces per forward pass.
        margin: box growth per side before cropping (faces.DEFAULT_MARGIN).
        detector: faces.DetectorConfig (downscale limit, cascade settings).
        k: override the bundle's k (>= 1; capped at the gallery size).
    """

    def __init__(self, model=None, data=None, device: str = "auto", detect: bool = True,
                 batch_size: int = 64, margin: float = F.DEFAULT_MARGIN,
                 detector: Optional[F.DetectorConfig] = None, backend: str = "auto",
                 k: Optional[int] = None, cache_dir: Optional[str] = None, k_max: int = 50):
        from .runtime import pick_device, resolve_backend
        from .train import augment_config
        for name, value in (("batch_size", batch_size), ("k", 1 if k is None else k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError("%s must be an integer >= 1, got %r" % (name, value))
        self.device = pick_device(device or "auto")
        self.backend = resolve_backend(backend, self.device)
        self.detect, self.batch_size, self.margin = detect, batch_size, margin
        self.detector = detector or F.DetectorConfig()
        if detect:
            F._cascade(self.detector.cascade)  # fail now, with the fix, not on the first image
        bundle, self.source = self._resolve(model, data, cache_dir, k_max)
        (self.model, self.classifier, self.class_names, self.config,
         self.meta) = bundle_from_dict(bundle, self.device, self.backend)
        if k is not None:
            self.classifier.k = min(k, self.classifier.gallery.shape[0])
        self.aug = augment_config(self.config)
        self.amp = self.config.amp if self.device.type == "cuda" else "off"

    def _resolve(self, model, data, cache_dir, k_max) -> Tuple[dict, str]:
        if isinstance(model, dict):
            return model, "<in-memory bundle>"
        if model is None:
            model = default_bundle_path()
        model = str(model)
        if not os.path.exists(model):
            raise BundleError("model %s does not exist" % model)
        st = None
        if os.path.isfile(model):
            try:
                st = torch.load(model, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise BundleError("%s: cannot read (%s: %s)" % (model, type(exc).__name__, exc)) from None
        if isinstance(st, dict) and st.get("format") == FORMAT:
            return st, model
        del st
        log.info("building the k-NN gallery from %s (embedding the training split; once per run)",
                 "the run's own data" if data is None else data)
        bundle, facts = build_bundle(model, data, k_max=k_max, half=False, device=self.device,
                                     cache_dir=cache_dir, backend=self.backend)
        log.info("gallery: %d rows, k = %s (val accuracy %s)", facts["gallery_rows"], facts["k"],
                 facts.get("val_accuracy"))
        return bundle, model

    # ------------------------------------------------------------------ core
    @torch.no_grad()
    def classify(self, crops: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(F, 48, 48) uint8 face crops -> (labels (F,) int64, shares (F, C) float32)."""
        from .runtime import embed
        C = len(self.class_names)
        if len(crops) == 0:
            return np.zeros(0, np.int64), np.zeros((0, C), np.float32)
        crops = np.ascontiguousarray(crops)
        if not crops.flags.writeable:  # torch.from_numpy warns on read-only arrays
            crops = crops.copy()
        emb = embed(self.model, torch.from_numpy(crops), self.aug, self.device,
                    amp=self.amp, batch_size=self.batch_size)
        pred, shares = self.classifier.vote(emb)
        return pred.cpu().numpy(), shares.cpu().numpy()

    def _records(self, boxes: np.ndarray, labels: np.ndarray, shares: np.ndarray) -> List[dict]:
        out = []
        for b, lab, sh in zip(boxes, labels, shares):
            out.append({"box": [int(v) for v in b], "expression": self.class_names[int(lab)],
                        "label": int(lab), "share": float(sh[int(lab)]),
                        "scores": {n: float(s) for n, s in zip(self.class_names, sh)}})
        return out

    def faces(self, gray: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes (F, 4), crops (F, 48, 48) uint8) of an (H, W) uint8 image."""
        return F.faces_of(gray, self.detect, self.detector, self.margin)

    def predict(self, image) -> List[dict]:
        """Faces of one image (path, bytes, numpy array or PIL image), largest first:
        [{"box": [x, y, w, h], "expression", "label", "share", "scores": {name: share}}].
        Raises faces.ImageError for an unusable image; [] when no face is found."""
        gray = F.load_image(image)
        boxes, crops = self.faces(gray)
        return self._records(boxes, *self.classify(crops))

    # ------------------------------------------------------------------ many inputs
    def predict_paths(self, paths: Union[str, Sequence[str]], every: int = 1,
                      keep_image: bool = False) -> Iterator[dict]:
        """One record per image / processed video frame, in input order (``paths``: files
        or folders, or one path; ``every``: every n-th frame of a video):

            {"source": path, "kind": "image" | "video", "frame": int | None,
             "time_s": float | None, "width": W, "height": H, "faces": [...],
             "error": None | message}

        Faces of many images are embedded together (``batch_size`` per pass). A
        problem with one input is an ``error`` record (the face list empty); the
        iteration goes on. ``keep_image``: records carry "image" (H, W, 3) RGB uint8
        for drawing.
        """
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]  # one path, not a sequence of its characters
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError("every must be an integer >= 1 (every n-th video frame), got %r" % (every,))
        pending: List[Tuple[dict, np.ndarray, np.ndarray]] = []
        n_faces = 0
        for rec, gray in self._frames(paths, int(every), keep_image):
            if gray is None:
                if not pending:
                    yield rec
                    continue
                pending.append((rec, np.zeros((0, 4), np.int64), np.zeros((0, 48, 48), np.uint8)))
                continue
            try:
                boxes, crops = self.faces(gray)
            except F.DetectorUnavailable:
                raise
            except Exception as exc:  # keep going on a pathological image
                rec["error"] = "%s: face detection failed (%s: %s)" % (rec["source"], type(exc).__name__, exc)
                boxes, crops = np.zeros((0, 4), np.int64), np.zeros((0, 48, 48), np.uint8)
            pending.append((rec, boxes, crops))
            n_faces += len(crops)
            if n_faces >= self.batch_size:
                yield from self._flush(pending)
                pending, n_faces = [], 0
        yield from self._flush(pending)

    def _flush(self, pending) -> Iterator[dict]:
        if not pending:
            return
        crops = [c for _, _, c in pending if len(c)]
        labels, shares = self.classify(np.concatenate(crops) if crops else np.zeros((0, 48, 48), np.uint8))
        at = 0
        for rec, boxes, c in pending:
            n = len(c)
            rec["faces"] = self._records(boxes, labels[at:at + n], shares[at:at + n])
            at += n
            yield rec

    def _frames(self, paths: Sequence[str], every: int,
                keep_image: bool) -> Iterator[Tuple[dict, Optional[np.ndarray]]]:
        """(record skeleton, gray image or None on error) for every image / sampled frame."""
        for src in expand_inputs(paths):
            if isinstance(src, dict):  # an error from the expansion (missing path, empty folder)
                yield src, None
                continue
            path, kind = src
            if kind == "video":
                yield from self._video_frames(path, every, keep_image)
                continue
            rec = _skeleton(path, "image")
            try:
                if keep_image:
                    gray, rgb = F.load_image(path, color=True)
                    rec["image"] = rgb
                else:
                    gray = F.load_image(path)
            except F.ImageError as exc:
                rec["error"] = str(exc)
                yield rec, None
                continue
            except MemoryError:
                rec["error"] = "%s: image too large for memory" % path
                yield rec, None
                continue
            rec["height"], rec["width"] = int(gray.shape[0]), int(gray.shape[1])
            yield rec, gray

    def _video_frames(self, path: str, every: int, keep_image: bool):
        try:
            import cv2
        except ImportError:
            rec = _skeleton(path, "video")
            rec["error"] = "%s: reading videos needs OpenCV (pip install 'opencv-python-headless<5')" % path
            yield rec, None
            return
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            rec = _skeleton(path, "video")
            rec["error"] = "%s: cannot open as a video" % path
            yield rec, None
            return
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        i, got = 0, 0
        try:
            while True:
                if not cap.grab():  # grab only: undecoded skipped frames cost little
                    break
                if i % every == 0:
                    ok, frame = cap.retrieve()
                    if ok and frame is not None:
                        rec = _skeleton(path, "video")
                        rec["frame"] = i
                        rec["time_s"] = i / fps if fps > 0 else None
                        gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                        if gray.dtype != np.uint8:
                            gray = F.load_image(gray)
                        rec["height"], rec["width"] = int(gray.shape[0]), int(gray.shape[1])
                        if keep_image:
                            rec["image"] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else \
                                np.repeat(gray[..., None], 3, 2)
                            rec["fps"] = fps
                        got += 1
                        yield rec, np.ascontiguousarray(gray)
                i += 1
        finally:
            cap.release()
        if got == 0:
            rec = _skeleton(path, "video")
            rec["error"] = "%s: no frame could be decoded" % path
            yield rec, None


def _skeleton(path: str, kind: str) -> dict:
    return {"source": path, "kind": kind, "frame": None, "time_s": None, "width": None, "height": None,
            "faces": [], "error": None}


def expand_inputs(paths: Sequence[str]) -> Iterator:
    """(path, "image" | "video") for every input, folders searched recursively (sorted);
    an error record (dict) for a missing path or a folder without images / videos."""
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            found = 0
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    low = f.lower()
                    if low.startswith("."):
                        continue
                    if low.endswith(IMAGE_EXTS):
                        found += 1
                        yield os.path.join(root, f), "image"
                    elif low.endswith(VIDEO_EXTS):
                        found += 1
                        yield os.path.join(root, f), "video"
            if not found:
                rec = _skeleton(p, "folder")
                rec["error"] = "%s: folder holds no images (%s) or videos" % (p, ", ".join(IMAGE_EXTS))
                yield rec
        elif not os.path.exists(p):
            rec = _skeleton(p, "image")
            rec["error"] = "%s: no such file or folder" % p
            yield rec
        else:
            yield p, ("video" if _is_video(p) else "image")


# --------------------------------------------------------------------------- output
def format_table(records: Iterable[dict], class_names: Sequence[str]) -> Iterator[str]:
    """Terminal lines: one per face (or per image without faces / with an error)."""
    yield "%-40s %6s %4s %-22s %-9s %5s  %s" % ("source", "frame", "face", "box x,y,w,h", "expression",
                                               "share", "runner-up")
    for r in records:
        src = r["source"] if len(r["source"]) <= 40 else "..." + r["source"][-37:]
        fr = "" if r.get("frame") is None else str(r["frame"])
        if r.get("error"):
            yield "%-40s %6s %4s ERROR: %s" % (src, fr, "-", r["error"])
            continue
        if not r["faces"]:
            yield "%-40s %6s %4s (no face found)" % (src, fr, "-")
            continue
        for j, f in enumerate(r["faces"]):
            ranked = sorted(f["scores"].items(), key=lambda kv: -kv[1])
            runner = [kv for kv in ranked if kv[0] != f["expression"]][:1]
            yield "%-40s %6s %4d %-22s %-9s %5.2f  %s" % (
                src, fr, j, ",".join(str(v) for v in f["box"]), f["expression"], f["share"],
                "%s %.2f" % runner[0] if runner and runner[0][1] > 0 else "")


def write_output(records: List[dict], path: str, class_names: Sequence[str], model_info: dict) -> None:
    """.json: {"model", "class_names", "results": records}; .csv: one row per face
    (error / no-face rows have an empty face), a column per expression's share."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    clean = [{k: v for k, v in r.items() if k not in ("image", "fps")} for r in records]
    if path.lower().endswith(".csv"):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "kind", "frame", "time_s", "face", "x", "y", "w", "h", "expression", "share"]
                       + list(class_names) + ["error"])
            for r in clean:
                base = [r["source"], r["kind"], "" if r["frame"] is None else r["frame"],
                        "" if r["time_s"] is None else "%.3f" % r["time_s"]]
                if not r["faces"]:
                    w.writerow(base + [""] * (7 + len(class_names)) + [r["error"] or "no face found"])
                for j, f in enumerate(r["faces"]):
                    w.writerow(base + [j] + f["box"] + [f["expression"], "%.4f" % f["share"]]
                               + ["%.4f" % f["scores"][n] for n in class_names] + [""])
    else:
        with open(path, "w") as fh:
            json.dump({"model": model_info, "class_names": list(class_names), "results": clean}, fh, indent=1)


_COLORS = [(230, 60, 60), (150, 80, 200), (120, 120, 120), (40, 200, 60), (60, 110, 230), (240, 180, 30),
           (200, 200, 200)]


def draw_faces(rgb: np.ndarray, faces: List[dict]) -> np.ndarray:
    """A BGR copy of an (H, W, 3) RGB image with every face's box and "expression share"."""
    import cv2
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    H, W = img.shape[:2]
    for f in faces:
        x, y, w, h = f["box"]
        r, g, b = _COLORS[f["label"] % len(_COLORS)]
        color = (b, g, r)
        t = max(1, int(round(max(H, W) / 400)))
        cv2.rectangle(img, (x, y), (x + w, y + h), color, t)
        text = "%s %.0f%%" % (f["expression"], 100 * f["share"])
        scale = max(0.35, min(2.0, w / 180.0))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, t)
        ty = y - 4 if y - th - base - 4 >= 0 else min(H - 1, y + h + th + 4)
        cv2.rectangle(img, (x, ty - th - base), (x + tw + 4, ty + base), color, -1)
        cv2.putText(img, text, (x + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), t, cv2.LINE_AA)
    return img


class _Annotator:
    """Writes annotated copies into a folder: images as files (same name, .png when the
    format is not writable), a video's processed frames as an MJPG .avi."""

    WRITABLE = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.used = set()
        self.videos: Dict[str, object] = {}
        self.written: List[str] = []

    def _name(self, source: str, ext: Optional[str] = None) -> str:
        stem, e = os.path.splitext(os.path.basename(source))
        e = ext or (e if e.lower() in self.WRITABLE else ".png")
        name, i = stem + e, 1
        while name in self.used:
            name, i = "%s_%d%s" % (stem, i, e), i + 1
        self.used.add(name)
        return os.path.join(self.out_dir, name)

    def add(self, rec: dict) -> None:
        import cv2
        img = rec.get("image")
        if img is None:
            return
        drawn = draw_faces(img, rec["faces"])
        if rec["kind"] == "video":
            vw = self.videos.get(rec["source"])
            if vw is None:
                path = self._name(rec["source"], ".avi")
                fps = rec.get("fps") or 25.0
                vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (drawn.shape[1], drawn.shape[0]))
                self.videos[rec["source"]] = vw
                self.written.append(path)
            vw.write(drawn)
        else:
            path = self._name(rec["source"])
            if not cv2.imwrite(path, drawn):
                log.warning("could not write %s", path)
            else:
                self.written.append(path)

    def close(self) -> None:
        for vw in self.videos.values():
            vw.release()


# --------------------------------------------------------------------------- CLI
def _help_formatter():
    class Help(argparse.ArgumentDefaultsHelpFormatter):
        """Show a default only where it says something (not None / False / "")."""

        def _get_help_string(self, action):
            if action.nargs == 0 or action.default in (None, False, "") or "default" in (action.help or ""):
                return action.help
            return super()._get_help_string(action)
    return Help


def add_predict_parser(subparsers) -> "argparse.ArgumentParser":
    """Add ``predict`` to an argparse subparsers object; returns the sub-parser."""
    p = subparsers.add_parser(
        "predict", help="expressions of the faces in photos, folders or videos",
        formatter_class=_help_formatter(),
        description="Find faces (OpenCV Haar cascade), crop them like the training data and classify each "
                    "by a k-NN vote on the model's gallery. Prints a table; --output writes .json/.csv. "
                    "Exit code 1 when any input could not be read.")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or videos")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--bundle", default=None,
                   help="model bundle from `dnnrl export` (default: the packaged model, or $DNNRL_BUNDLE)")
    m.add_argument("--checkpoint", default=None,
                   help="a `dnnrl train` run directory or best.pt / checkpoint.pt")
    p.add_argument("--data", default=None, help="training data for --checkpoint: its training split is the "
                                                "k-NN gallery, its validation split chooses k (default: the "
                                                "run's own data, or the built-in synthetic set it was trained on)")
    p.add_argument("--no-detect", dest="detect", action="store_false",
                   help="no face detection: every image is one pre-cropped face")
    p.add_argument("--every", type=A.int_at_least(1), default=1, help="videos: classify every Nth frame")
    p.add_argument("--output", type=A.path_with_suffix((".json", ".csv")), default=None,
                   help="write the results to FILE (.json or .csv)")
    p.add_argument("--annotate", type=A.directory, default=None, metavar="DIR",
                   help="write copies with boxes and labels drawn into DIR (videos as MJPG .avi)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=CHOICES["backend"],
                   help="dnnrl_ext k-NN ops (auto: compiled kernels, else the reference with a warning)")
    p.add_argument("--batch-size", type=A.int_at_least(1), default=64, help="faces per forward pass")
    p.add_argument("--margin", type=A.float_above(-0.5), default=F.DEFAULT_MARGIN,
                   help="box growth per side before cropping, a fraction of the box (negative: shrink)")
    p.add_argument("--max-side", type=A.int_at_least(1), default=F.DEFAULT_MAX_SIDE,
                   help="longer side of the image face detection runs on (larger images are downscaled)")
    p.add_argument("--min-neighbors", type=A.int_at_least(0), default=5,
                   help="Haar cascade minNeighbors (higher: fewer, surer faces)")
    p.add_argument("--k", type=A.int_at_least(1), default=None,
                   help="override the bundle's k (capped at the gallery size)")
    p.add_argument("--threads", type=A.int_at_least(1), default=None,
                   help="CPU threads for torch and OpenCV (default: torch's; 1 is often faster on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no table on the terminal")
    return p


def _set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(max(1, int(n)))
        try:
            import cv2
            cv2.setNumThreads(max(1, int(n)))
        except ImportError:
            pass


def run_predict(args) -> int:
    """``dnnrl predict``; returns the exit code (0 ok, 1 some input failed, 2 no model / detector)."""
    _set_threads(getattr(args, "threads", None))
    model = args.bundle or args.checkpoint
    try:
        pred = Predictor(model, data=args.data, device=args.device, detect=args.detect,
                         batch_size=args.batch_size, margin=args.margin, k=args.k, backend=args.backend,
                         detector=F.DetectorConfig(max_side=args.max_side, min_neighbors=args.min_neighbors))
    except (BundleError, F.DetectorUnavailable, FileNotFoundError, RuntimeError, ValueError) as exc:
        print("dnnrl predict: %s" % exc, file=sys.stderr)
        return 2
    ann = _Annotator(args.annotate) if args.annotate else None
    records, failed, n_faces, t0 = [], 0, 0, time.time()
    out = sys.stdout
    header_done = False
    for rec in pred.predict_paths(args.inputs, every=args.every, keep_image=ann is not None):
        if rec.get("error"):
            failed += 1
        n_faces += len(rec["faces"])
        if ann is not None:
            ann.add(rec)
        rec.pop("image", None)
        records.append(rec)
        if not args.quiet:
            lines = list(format_table([rec], pred.class_names))
            if not header_done:
                print(lines[0], file=out)
                header_done = True
            for line in lines[1:]:
                print(line, file=out)
    if ann is not None:
        ann.close()
    dt = time.time() - t0
    info = {"source": pred.source, "k": pred.classifier.k, "gallery_rows": int(pred.classifier.gallery.shape[0]),
            "detect": pred.detect, "meta": _jsonable(pred.meta)}
    if args.output:
        write_output(records, args.output, pred.class_names, info)
    print("%d inputs, %d faces, %d failed, %.2f s%s" % (len(records), n_faces, failed, dt,
                                                         (" -> %s" % args.output) if args.output else ""),
          file=sys.stderr)
    return 1 if failed else 0


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


def _gallery_dim(text: str):
    """argparse type of --gallery-dim: a positive integer or "auto"."""
    if text == "auto":
        return text
    try:
        d = int(text)
    except ValueError:
        d = 0
    if d < 1:
        raise argparse.ArgumentTypeError("expected a positive integer or 'auto', got %r" % text)
    return d


def add_export_parser(subparsers) -> "argparse.ArgumentParser":
    """Add ``export`` to an argparse subparsers object; returns the sub-parser."""
    p = subparsers.add_parser(
        "export", help="write a model bundle (weights + k-NN gallery) for `dnnrl predict`",
        formatter_class=_help_formatter(),
        description="Embed the training split of --data as the k-NN gallery, choose k on its validation split "
                    "and save weights + gallery in float16 as one file. Prints the measured facts as JSON.")
    p.add_argument("--checkpoint", required=True, help="a `dnnrl train` run directory or best.pt / checkpoint.pt")
    p.add_argument("--data", default=None, help="the training data (CSV, folder or archive; default: the run's "
                                                "own, or the built-in synthetic set it was trained on)")
    p.add_argument("--out", required=True, help="bundle file to write (.pt)")
    p.add_argument("--gallery-dim", type=_gallery_dim, default=None,
                   help="store the gallery in a PCA space of this many dims, or 'auto': the most dims "
                        "that keep the file under 12 MB (default: full embedding)")
    p.add_argument("--gallery-per-class", type=A.int_at_least(1), default=None,
                   help="keep at most this many gallery images per class (seeded random subset)")
    p.add_argument("--sweep-dims", default="", help="also report val accuracy for these PCA dims, e.g. 32,64,128")
    p.add_argument("--k-max", type=A.int_at_least(1), default=50, help="largest k tried on validation")
    p.add_argument("--tta", default=None, choices=TTA_MODES,
                   help="test-time averaging stored in the bundle: the gallery is embedded with it and "
                        "predictions use it (default: the run's setting)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--backend", default="auto", choices=CHOICES["backend"],
                   help="dnnrl_ext k-NN ops (auto: compiled kernels, else the reference with a warning)")
    p.add_argument("--batch-size", type=A.int_at_least(1), default=512, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of --gallery-per-class")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default $DNNRL_CACHE or ~/.cache/dnnrl)")
    p.add_argument("--note", default=None, help="free text stored in the bundle's meta (e.g. the training command)")
    p.add_argument("--threads", type=A.int_at_least(1), default=None, help="CPU threads for torch (default: torch's)")
    return p


def run_export(args) -> int:
    """``dnnrl export``; prints the facts as JSON; returns the exit code."""
    _set_threads(getattr(args, "threads", None))
    try:
        dims = [int(d) for d in args.sweep_dims.split(",") if d.strip()] if args.sweep_dims else []
    except ValueError:
        print("dnnrl export: --sweep-dims must be integers separated by commas", file=sys.stderr)
        return 2
    try:
        facts = export_bundle(args.checkpoint, args.data, args.out, k_max=args.k_max,
                              gallery_dim=args.gallery_dim, gallery_per_class=args.gallery_per_class,
                              device=args.device, batch_size=args.batch_size, seed=args.seed, sweep_dims=dims,
                              meta={"note": args.note} if args.note else None, cache_dir=args.cache_dir,
                              backend=args.backend, tta=args.tta)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print("dnnrl export: %s" % exc, file=sys.stderr)
        return 2
    facts.pop("val_accuracy_per_k", None)
    print(json.dumps(_jsonable(facts), indent=1))
    return 0
