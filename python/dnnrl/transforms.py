"""Batched on-device preprocessing (SPEC section 5): one affine per image, one
``affine_grid`` + ``grid_sample`` per batch.

Training (paper 3.1): resize the face to 96x96, jitter that size by [-10, 10] px,
zero-pad to 120x120, rotate by [-15, 15] degrees about the centre, take a random
108x108 crop. The five steps compose into one output->input affine map per image,
so a batch costs a single bilinear resample straight from the stored 48x48 uint8
pixels. Evaluation: resize to 96x96, centred in 108x108 (zeros around it).

All sizes are given at the paper's 108-px scale and scaled by ``out_size / 108`` for
the reduced CPU preset, so the geometry stays the same at any output size.

Derivation (pixel units of the 120x120 canvas, centre c = 60; the face of size S
sits centred on the canvas): an output pixel u of the crop with offset o is canvas
point u + o; relative to the centre that is u + o - c; undoing the rotation R gives
R^-1 (u + o - c); dividing by S/2 gives grid_sample's normalised input coordinate.
In affine_grid's normalised output coordinates (align_corners=False) u = h (x + 1)
with h = crop/2, so  theta = (2/S) R^-1 [h I | h + o - c].
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# the normalisation of the uint8 pixels (roughly zero mean, unit spread on faces)
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


@dataclass
class AugmentConfig:
    """Geometry at the paper's scale (108-px crops); ``out_size`` rescales all of it."""
    out_size: int = 108
    resize: float = 96.0
    scale_jitter: float = 10.0   # +- pixels on the resized face size
    pad_to: float = 120.0
    rotation: float = 15.0       # +- degrees
    crop: float = 108.0
    flip: bool = False           # horizontal flip (not in the paper; off by default)
    tta_flip: bool = False       # evaluation: average over the image and its mirror image
    tta_shift: float = 0.0       # evaluation: also the 4 diagonal shifts by this many pixels
                                 # (at the 108-px scale), each with its mirror image when tta_flip
    erase_prob: float = 0.0      # training: chance that one random rectangle of an image is set
                                 # to the mean grey (random erasing; not in the paper; off)
    erase_area: tuple = (0.02, 0.25)   # its area as a fraction of the image
    erase_aspect: tuple = (0.3, 3.3)   # its height / width (drawn log-uniformly)

    def scaled(self):
        f = self.out_size / self.crop
        return (self.resize * f, self.scale_jitter * f, self.pad_to * f, self.crop * f)


def _to_input(images: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, W) or (B, 1, H, W) uint8 -> (B, 1, H, W) float in [0, 1]."""
    if images.dim() == 3:
        images = images[:, None]
    return images.to(dtype).div_(255.0)


def _sample(images: Tensor, theta: Tensor, out_size: int, dtype: torch.dtype) -> Tensor:
    x = _to_input(images, dtype)
    grid = F.affine_grid(theta.to(dtype), [x.shape[0], 1, out_size, out_size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def eval_theta(batch: int, cfg: AugmentConfig, device=None, shift=(0.0, 0.0)) -> Tensor:
    """(batch, 2, 3) affine of the deterministic evaluation transform; ``shift`` moves the
    face by (dx, dy) output pixels at the 108-px scale (test-time views)."""
    resize, _, _, crop = cfg.scaled()
    f = cfg.out_size / cfg.crop
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = crop / resize  # (2/S) * h with h = crop/2
    theta[:, 0, 2] = -2.0 * shift[0] * f / resize    # x_in = (crop/S) (x_out - 2 t / crop)
    theta[:, 1, 2] = -2.0 * shift[1] * f / resize
    return theta


def _uniform(batch: int, count: int, generator: Optional[torch.Generator], device) -> Tensor:
    """(batch, count) uniform [0, 1) numbers drawn on ``generator``'s device (the CPU without
    one), then moved to ``device``."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, count, generator=generator, device=gdev).to(device)


def train_theta(batch: int, cfg: AugmentConfig, generator: Optional[torch.Generator] = None,
                device=None) -> Tensor:
    """(batch, 2, 3) random training affines (see the module docstring).

    Random numbers are drawn on ``generator``'s device (CPU generators are fine for
    CUDA batches: only 5 numbers per image cross over) so runs are reproducible.
    """
    resize, jitter, pad, crop = cfg.scaled()
    u = _uniform(batch, 5, generator, device)
    u_size, u_angle, u_x, u_y, u_flip = u.unbind(1)
    size = resize + (2 * u_size - 1) * jitter                       # S
    angle = (2 * u_angle - 1) * math.radians(cfg.rotation)
    span = pad - crop                                               # crop offsets in [0, span]
    ox, oy = u_x * span, u_y * span
    h, c = crop / 2.0, pad / 2.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    k = 2.0 / size
    # R^-1 = [[cos, sin], [-sin, cos]] (rotate the sampling grid back by +angle)
    tx, ty = h + ox - c, h + oy - c
    # the six entries (B,) each, row-major; stacked once at the end: this runs every
    # training step, and item-by-item assignment cost about twice the launches
    t00, t01, t02 = k * cos * h, k * sin * h, k * (cos * tx + sin * ty)
    t10, t11, t12 = -k * sin * h, k * cos * h, k * (-sin * tx + cos * ty)
    if cfg.flip:
        sign = torch.where(u_flip < 0.5, -1.0, 1.0)
        t00, t10 = t00 * sign, t10 * sign  # mirror the output x axis (column 0)
    return torch.stack([t00, t01, t02, t10, t11, t12], 1).view(batch, 2, 3)


def erase_mask(batch: int, size: int, cfg: AugmentConfig, generator: Optional[torch.Generator] = None,
               device=None) -> Tensor:
    """(batch, size, size) bool: one random axis-aligned rectangle per image, drawn with
    probability ``cfg.erase_prob`` (all False for the others).

    Why not torchvision's RandomErasing: it draws each image's rectangle in a Python loop
    from host-side random numbers; here the whole batch is drawn at once on the
    generator's device, so a training step stays free of host syncs (and capturable).
    """
    u = _uniform(batch, 5, generator, device)
    lo, hi = cfg.erase_area
    area = (lo + (hi - lo) * u[:, 0]) * size * size
    log_lo, log_hi = math.log(cfg.erase_aspect[0]), math.log(cfg.erase_aspect[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])                 # height / width
    h = torch.sqrt(area * aspect).clamp(max=size)
    w = torch.sqrt(area / aspect).clamp(max=size)
    top, left = u[:, 2] * (size - h), u[:, 3] * (size - w)
    centres = torch.arange(size, device=device, dtype=u.dtype) + 0.5       # pixel centres
    rows = (centres >= top[:, None]) & (centres < (top + h)[:, None])        # (batch, size)
    cols = (centres >= left[:, None]) & (centres < (left + w)[:, None])
    chosen = u[:, 4] < cfg.erase_prob
    return rows[:, :, None] & cols[:, None, :] & chosen[:, None, None]


def augment(images: Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Training transform: (B, H, W) uint8 on the training device -> (B, 1, out, out) float
    (random affine; random erasing when ``cfg.erase_prob`` > 0)."""
    theta = train_theta(images.shape[0], cfg, generator, images.device)
    out = _sample(images, theta, cfg.out_size, dtype)
    if cfg.erase_prob > 0:  # (skipped at 0 so that the random stream of older runs is unchanged)
        mask = erase_mask(images.shape[0], cfg.out_size, cfg, generator, images.device)
        out.masked_fill_(mask[:, None], 0.0)  # 0 = the mean grey after normalisation
    return out


def evaluate_transform(images: Tensor, cfg: AugmentConfig, dtype: torch.dtype = torch.float32,
                       shift=(0.0, 0.0)) -> Tensor:
    """Evaluation transform (deterministic): (B, H, W) uint8 -> (B, 1, out, out) float."""
    return _sample(images, eval_theta(images.shape[0], cfg, images.device, shift), cfg.out_size, dtype)


def tta_shifts(cfg: AugmentConfig):
    """The (dx, dy) face shifts of the test-time views: the centre, plus the four
    diagonal ones when ``cfg.tta_shift`` > 0."""
    t = cfg.tta_shift
    return [(0.0, 0.0)] + ([(-t, -t), (t, -t), (-t, t), (t, t)] if t > 0 else [])
