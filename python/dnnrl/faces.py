"""Image loading, face detection and face crops for prediction on ordinary photos.

Pipeline of one image (``detect_faces`` + ``crop_faces``):

1. ``load_image``: any file pillow reads (JPEG, PNG incl. 16-bit / grayscale / RGBA /
   palette, BMP, TIFF, WebP, ...) -> (H, W) uint8 grayscale, EXIF orientation applied
   when present. Every failure is an :class:`ImageError` naming the file, so a batch
   run can report it and go on.
2. Detection with OpenCV's frontal-face Haar cascade (the XML files that
   opencv-python-headless 4.x ships in ``cv2.data.haarcascades``; nothing is
   downloaded). Large images are downscaled so their longer side is at most
   ``max_side`` for detection only; boxes are mapped back to the original pixels.
3. Each box is grown by ``margin`` per side, clipped to the image (zero-padded past
   the border), and resized with pillow's antialiased bilinear filter to 48x48
   uint8 — the stored format of FER-2013, on which the model's evaluation
   transform then runs unchanged.

Why margin = 0.02: pasting 200 FER-2013 validation faces (4x upscaled) onto plain
backgrounds, the cascade found 165 and its box was the FER crop shrunk to 0.97 of
its side (median; quartiles 0.89-1.04) about the same centre. Growing the box by
2 % per side therefore reproduces the framing of the training data.

OpenCV 5 removed ``cv2.CascadeClassifier``; there :func:`haar_available` is False,
detection raises :class:`DetectorUnavailable` with the fix (``pip install
"opencv-python-headless<5"``), and ``detect=False`` (whole image = one face) still
works, since loading and cropping need only pillow.
"""
import io
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

FACE_SIZE = 48                 # side of the stored training faces (FER-2013)
DEFAULT_MARGIN = 0.02          # per side, fraction of the box side (see the module docstring)
DEFAULT_MAX_SIDE = 1280        # longer side of the detection image
CASCADE = "haarcascade_frontalface_default.xml"


class ImageError(ValueError):
    """An input cannot be used as an image; the message names it and says why."""


class DetectorUnavailable(RuntimeError):
    """The Haar cascade cannot be loaded (no OpenCV, or OpenCV >= 5 without it)."""


# --------------------------------------------------------------------------- loading
def _to_gray_uint8(im) -> np.ndarray:
    """A pillow image of any mode -> (H, W) uint8 grayscale.

    16-bit and 32-bit integer images are rescaled by their nominal range (not by
    their own min/max, which would change the contrast of dark photos); float
    images are taken as [0, 1]. Alpha is composited onto white, which is how
    viewers show a transparent background.
    """
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype.kind not in "iu":
            a = np.asarray(im.convert("I"))
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return np.clip(a.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if mode == "1":
        im = im.convert("L")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = _flatten_alpha(im)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def load_image(source, color: bool = False) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Read one image.

    Args:
        source: a path, bytes, a numpy array ((H, W) gray, (H, W, 3) RGB, (H, W, 4)
            RGBA; any integer or float dtype) or a PIL image.
        color: also return an (H, W, 3) uint8 RGB copy (for annotated output).
    Returns:
        gray (H, W) uint8, or (gray, rgb) with ``color``.
    Raises:
        ImageError: unreadable, not an image, empty, or of an unsupported shape.
    """
    from PIL import Image, ImageOps
    name = source if isinstance(source, (str, os.PathLike)) else "<%s>" % type(source).__name__
    if isinstance(source, np.ndarray):
        im = _array_to_pil(source, name)
    elif isinstance(source, Image.Image):
        im = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                im = Image.open(io.BytesIO(source))
            else:
                if os.path.isdir(source):
                    raise ImageError("%s: is a folder, not an image" % name)
                if not os.path.exists(source):
                    raise ImageError("%s: no such file" % name)
                if os.path.getsize(source) == 0:
                    raise ImageError("%s: empty file" % name)
                im = Image.open(source)
            im.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError("%s: image too large to decode safely (%s)" % (name, exc)) from None
        except Exception as exc:  # pillow raises many types for broken / non-image files
            raise ImageError("%s: not a readable image (%s: %s)" % (name, type(exc).__name__, exc)) from None
        try:
            im = ImageOps.exif_transpose(im) or im  # no-op without EXIF
        except Exception:  # a corrupt EXIF block must not lose the image
            pass
    if im.size[0] == 0 or im.size[1] == 0:
        raise ImageError("%s: image has no pixels (%dx%d)" % (name, im.size[0], im.size[1]))
    try:
        gray = _to_gray_uint8(im)
        if not color:
            return gray
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
            rgb = np.asarray(_flatten_alpha(im).convert("RGB"), dtype=np.uint8)
        elif im.mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        else:  # gray of any depth: reuse the properly scaled gray
            rgb = np.repeat(gray[..., None], 3, 2)
        return gray, np.ascontiguousarray(rgb)
    except Exception as exc:
        raise ImageError("%s: cannot convert image mode %s (%s)" % (name, im.mode, exc)) from None


def _flatten_alpha(im):
    from PIL import Image
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)


def _array_to_pil(a: np.ndarray, name: str):
    """numpy (H, W) / (H, W, 1|3|4) of any real dtype -> pillow image (gray / RGB / RGBA)."""
    from PIL import Image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageError("%s: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape %s"
                         % (name, a.shape))
    if a.dtype == np.uint8:
        pass
    elif a.dtype.kind == "f":
        a = np.clip(np.nan_to_num(a.astype(np.float64)) * (255.0 if a.max(initial=0) <= 1.0 else 1.0),
                    0, 255).round().astype(np.uint8)
    elif a.dtype.kind in "iu":
        top = 65535 if a.dtype.itemsize >= 2 and a.max(initial=0) > 255 else 255
        a = np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        raise ImageError("%s: unsupported array dtype %s" % (name, a.dtype))
    return Image.fromarray(np.ascontiguousarray(a))


# --------------------------------------------------------------------------- detection
_CASCADES = {}


def haar_available() -> bool:
    """True when OpenCV with ``CascadeClassifier`` and its bundled XML files is importable."""
    try:
        _cascade()
        return True
    except DetectorUnavailable:
        return False


def _cascade(path: Optional[str] = None):
    try:
        import cv2
    except ImportError as exc:
        raise DetectorUnavailable("face detection needs OpenCV: pip install 'opencv-python-headless<5' "
                                  "(or predict whole images with --no-detect) [%s]" % exc) from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise DetectorUnavailable(
            "OpenCV %s has no Haar cascade detector (removed in OpenCV 5): pip install "
            "'opencv-python-headless<5', or predict whole images with --no-detect" % cv2.__version__)
    if path is None:
        base = getattr(getattr(cv2, "data", None), "haarcascades", "") or ""
        path = os.path.join(base, CASCADE)
    if path not in _CASCADES:
        if not os.path.exists(path):
            raise DetectorUnavailable("Haar cascade file %s not found (opencv-python-headless 4.x ships it "
                                      "in cv2.data.haarcascades)" % path)
        c = cv2.CascadeClassifier(path)
        if c.empty():
            raise DetectorUnavailable("cannot load the Haar cascade %s" % path)
        _CASCADES[path] = c
    return _CASCADES[path]


@dataclass
class DetectorConfig:
    """Haar cascade settings (see ``cv2.CascadeClassifier.detectMultiScale``)."""
    max_side: int = DEFAULT_MAX_SIDE   # detection image's longer side (downscale only)
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24                 # smallest face side, in detection-image pixels
    min_rel_size: float = 0.0          # also >= this fraction of the image's shorter side
    equalize: bool = True              # histogram-equalise the detection image
    cascade: Optional[str] = None      # another cascade XML (default: frontal face)
    nested_overlap: float = 0.5        # drop a box this much inside a larger one (1.0: keep all)


def detect_faces(gray: np.ndarray, cfg: Optional[DetectorConfig] = None) -> np.ndarray:
    """Face boxes of an (H, W) uint8 image -> (F, 4) int64 [x, y, w, h] in its pixels,
    largest first. Raises DetectorUnavailable without a usable OpenCV."""
    import cv2
    cfg = cfg or DetectorConfig()
    casc = _cascade(cfg.cascade)
    H, W = gray.shape
    scale = min(1.0, float(cfg.max_side) / max(H, W))
    small = gray
    if scale < 1.0:  # INTER_AREA: an antialiased downscale keeps the cascade's features
        small = cv2.resize(gray, (max(1, int(round(W * scale))), max(1, int(round(H * scale)))),
                           interpolation=cv2.INTER_AREA)
    if cfg.equalize:
        small = cv2.equalizeHist(np.ascontiguousarray(small))
    m = max(cfg.min_size, int(cfg.min_rel_size * min(small.shape)))
    if min(small.shape) < m:
        return np.zeros((0, 4), dtype=np.int64)
    boxes = casc.detectMultiScale(small, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors,
                                  minSize=(m, m))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if scale < 1.0:
        boxes = boxes / scale
    boxes = np.round(boxes).astype(np.int64)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1)
    order = np.argsort(-(boxes[:, 2] * boxes[:, 3]), kind="stable")
    return _drop_nested(boxes[order], cfg.nested_overlap)


def _drop_nested(boxes: np.ndarray, overlap: float) -> np.ndarray:
    """Drop every box (sorted largest first) with more than ``overlap`` of its area inside
    a kept larger box: the cascade sometimes fires on part of a face (an eye, the mouth)
    as well as on the whole, and faces in photos do not nest."""
    keep = []
    for b in boxes:
        area = float(b[2] * b[3])
        if all(_inter(b, k) <= overlap * area for k in keep):
            keep.append(b)
    return np.array(keep, dtype=np.int64).reshape(-1, 4)


def _inter(a, b) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return float(iw * ih)


# --------------------------------------------------------------------------- cropping
def expand_box(box: Sequence[int], margin: float) -> Tuple[int, int, int, int]:
    """[x, y, w, h] grown by ``margin`` * side on every side (may leave the image)."""
    x, y, w, h = [float(v) for v in box]
    dx, dy = margin * w, margin * h
    return (int(round(x - dx)), int(round(y - dy)), int(round(w + 2 * dx)), int(round(h + 2 * dy)))


def crop_face(gray: np.ndarray, box: Sequence[int], margin: float = DEFAULT_MARGIN,
              size: int = FACE_SIZE) -> np.ndarray:
    """(H, W) uint8 + [x, y, w, h] -> (size, size) uint8 crop, the box grown by ``margin``
    per side; parts outside the image are zero (like the training transform's padding)."""
    x, y, w, h = expand_box(box, margin)
    H, W = gray.shape
    canvas = np.zeros((max(h, 1), max(w, 1)), dtype=np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        canvas[y0 - y:y1 - y, x0 - x:x1 - x] = gray[y0:y1, x0:x1]
    return resize_face(canvas, size)


def resize_face(gray: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """(h, w) uint8 -> (size, size) uint8 with pillow's antialiased bilinear filter (what
    :func:`dnnrl.data.decode_image` does to training images of other sizes)."""
    from PIL import Image
    if gray.shape == (size, size):
        return np.ascontiguousarray(gray)
    return np.array(Image.fromarray(np.ascontiguousarray(gray)).resize((size, size), Image.BILINEAR),
                    dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def faces_of(gray: np.ndarray, detect: bool = True, detector: Optional[DetectorConfig] = None,
             margin: float = DEFAULT_MARGIN, size: int = FACE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes (F, 4) int64 [x, y, w, h], crops (F, size, size) uint8) of one image.

    ``detect=False`` treats the whole image as one face (a pre-cropped face photo).
    """
    if not detect:
        H, W = gray.shape
        return np.array([[0, 0, W, H]], dtype=np.int64), resize_face(gray, size)[None]
    boxes = detect_faces(gray, detector)
    crops = np.stack([crop_face(gray, b, margin, size) for b in boxes]) if len(boxes) else \
        np.zeros((0, size, size), dtype=np.uint8)
    return boxes, crops


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0
