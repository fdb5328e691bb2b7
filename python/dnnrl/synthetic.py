"""Procedural synthetic facial-expression data: the built-in default data set.

Seven expressions (the FER-2013 classes, same label order) drawn on 48x48 grayscale
faces from a few facial action parameters, with random identity (face shape, skin
and background tone, eye spacing, feature positions), pose (in-plane rotation,
shift, scale), lighting (a linear gradient) and pixel noise. Pure numpy, vectorised
over images, deterministic by seed; ~5k faces take well under a second.

Per expression (means; each drawn with per-face noise so classes overlap a little):

    class      brow height  brow tilt  eye opening  mouth curve  mouth open  width  asym
    angry         low        inner down   narrow       slight down   closed    narrow
    disgust       low        inner down   squint       down          slight    narrow  one corner up
    fear          high       inner up     wide         slight down   open      wide
    happy         mid        flat         mid          up (smile)    slight    wide
    sad           mid        inner up     mid          down          closed    narrow
    surprise      highest    flat         wide         flat          round O   small
    neutral       mid        flat         mid          flat          closed    normal
"""
from typing import Tuple

import numpy as np

from .data import CLASS_NAMES, Dataset

# brow_raise, brow_tilt, eye_open, mouth_curve, mouth_open, mouth_width, asym
_EXPR = np.array([
    [0.09, -0.08, 0.040, -0.03, 0.000, 0.85, 0.00],   # angry
    [0.10, -0.05, 0.028, -0.06, 0.025, 0.85, 0.08],   # disgust
    [0.20, 0.06, 0.080, -0.03, 0.060, 1.15, 0.00],    # fear
    [0.15, 0.00, 0.050, 0.12, 0.030, 1.15, 0.00],     # happy
    [0.14, 0.08, 0.042, -0.10, 0.000, 0.90, 0.00],    # sad
    [0.25, 0.00, 0.085, 0.00, 0.130, 0.65, 0.00],     # surprise
    [0.15, 0.00, 0.058, 0.00, 0.000, 1.00, 0.00],     # neutral
], dtype=np.float32)
# per-face noise on those parameters (standard deviations)
_EXPR_SD = np.array([0.02, 0.02, 0.010, 0.02, 0.012, 0.08, 0.02], dtype=np.float32)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of a signed distance d (positive inside)."""
    return np.clip(d / width + 0.5, 0.0, 1.0)


def render(labels: np.ndarray, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Draw one face per label: (N,) int -> (N, size, size) uint8."""
    n = labels.shape[0]
    col = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)  # noqa: E731
    p = _EXPR[labels] + rng.normal(0, 1, (n, _EXPR.shape[1])).astype(np.float32) * _EXPR_SD
    raise_, tilt, eye_open, curve, mopen, mwidth, asym = [p[:, i, None, None] for i in range(7)]
    eye_open = np.maximum(eye_open, 0.012)
    mopen = np.maximum(mopen, 0.0)
    asym = asym * rng.choice([-1.0, 1.0], (n, 1, 1)).astype(np.float32)
    # pose: image coords -> face coords (rotate, shift, scale)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    X, Y = np.meshgrid(t, t)
    ang = np.deg2rad(col(-12, 12))
    sc = col(0.88, 1.08)
    dx, dy = col(-0.08, 0.08), col(-0.08, 0.08)
    xs, ys = (X - dx) / sc, (Y - dy) / sc
    u = np.cos(ang) * xs + np.sin(ang) * ys
    v = -np.sin(ang) * xs + np.cos(ang) * ys
    px = 2.0 / size  # one pixel in face units, the anti-aliasing width
    # identity
    a, b = col(0.60, 0.74), col(0.78, 0.92)
    skin, bg = col(0.45, 0.85), col(0.0, 0.35)
    ex, ey, ew = col(0.24, 0.32), col(-0.22, -0.12), col(0.09, 0.12)
    my, mw = col(0.36, 0.48), col(0.24, 0.32) * mwidth
    dark = col(0.05, 0.25)
    face = _soft((1 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * np.minimum(a, b), px)
    img = bg + (skin - bg) * face
    ink = np.zeros_like(img)  # how much of each pixel is a dark facial feature
    for s in (-1.0, 1.0):
        # eye: ellipse whose height is the eye opening
        r = np.sqrt(((u - s * ex) / ew) ** 2 + ((v - ey) / eye_open) ** 2)
        ink = np.maximum(ink, _soft((1 - r) * eye_open, px))
        # brow: segment from the inner end (x0, y0) to the outer end (x1, y1)
        x0, x1 = s * (ex - ew * 1.1), s * (ex + ew * 1.2)
        y1 = ey - eye_open - raise_
        y0 = y1 - tilt
        vx, vy = x1 - x0, y1 - y0
        h = np.clip(((u - x0) * vx + (v - y0) * vy) / (vx * vx + vy * vy), 0, 1)
        dist = np.sqrt((u - x0 - h * vx) ** 2 + (v - y0 - h * vy) ** 2)
        ink = np.maximum(ink, _soft(0.03 - dist, px))
    # mouth: a parabola (corners up for positive curve) opened to a lens of half-height
    # mopen, one corner lifted by asym
    q = np.clip(u / mw, -1.5, 1.5)
    yc = my + curve * (1 - q ** 2) - curve * 0.5 - asym * q
    half = mopen * np.sqrt(np.clip(1 - q ** 2, 0, 1)) + 0.022
    inside_x = _soft((1 - np.abs(q)) * mw, px)
    ink = np.maximum(ink, _soft(half - np.abs(v - yc), px) * inside_x)
    # nose: a faint short vertical line
    ink = np.maximum(ink, 0.35 * _soft(0.018 - np.abs(u), px) * _soft(0.12 - np.abs(v - 0.12), px))
    img = img * (1 - ink * face) + dark * ink * face
    # lighting gradient and sensor noise
    gx, gy = col(-0.3, 0.3), col(-0.3, 0.3)
    img = img * (1 + gx * X + gy * Y)
    img = img + rng.normal(0, 1, img.shape).astype(np.float32) * col(0.01, 0.05)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _split(n_per_class: int, rng: np.random.Generator, size: int, chunk: int = 1024
           ) -> Tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(CLASS_NAMES)), n_per_class)
    labels = labels[rng.permutation(labels.shape[0])]
    images = np.concatenate([render(labels[i:i + chunk], rng, size)
                             for i in range(0, labels.shape[0], chunk)])
    return images, labels.astype(np.int64)


def make_synthetic(train_per_class: int = 600, val_per_class: int = 100, test_per_class: int = 200,
                   seed: int = 0, size: int = 48) -> Dataset:
    """The synthetic data set: balanced train / val / test splits, deterministic by seed."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        if n > 0:
            splits[name] = _split(n, rng, size)
    return Dataset(splits, list(CLASS_NAMES), "synthetic(seed=%d)" % seed)
