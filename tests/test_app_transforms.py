"""dnnrl.transforms: batched affine preprocessing."""
import torch
import torch.nn.functional as F

import pytest
from hypothesis import given, settings, strategies as st

from dnnrl.transforms import (PIXEL_MEAN, PIXEL_STD, AugmentConfig, augment, erase_mask, evaluate_transform,
                              train_theta)


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 48, 48), generator=g, dtype=torch.uint8)


def test_eval_is_resize_96_centred_in_108():
    x = _images()
    out = evaluate_transform(x, AugmentConfig())
    assert out.shape == (4, 1, 108, 108)
    ref = F.interpolate(x[:, None].float() / 255, size=96, mode="bilinear", align_corners=False)
    ref = (F.pad(ref, (6, 6, 6, 6)) - PIXEL_MEAN) / PIXEL_STD
    # interior equal; the outer ring is zero padding (the 1-px seam blends with zeros)
    torch.testing.assert_close(out[..., 7:101, 7:101], ref[..., 7:101, 7:101], atol=1e-4, rtol=0)
    assert torch.all(out[..., :5, :] == -PIXEL_MEAN / PIXEL_STD)
    torch.testing.assert_close(out, evaluate_transform(x, AugmentConfig()))  # deterministic


def test_augment_shapes_randomness_and_seed():
    x = _images(8)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == (8, 1, 108, 108)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_train_theta_ranges():
    cfg = AugmentConfig()
    th = train_theta(4096, cfg, torch.Generator().manual_seed(0))
    lin = th[:, :, :2]
    # |det| = (crop / S)^2 with S in [86, 106]
    det = torch.det(lin)
    assert det.min() >= (108 / 106) ** 2 - 1e-4 and det.max() <= (108 / 86) ** 2 + 1e-4
    assert det.min() < (108 / 105) ** 2 and det.max() > (108 / 87) ** 2  # both ends of +-10 px drawn
    angle = torch.rad2deg(torch.atan2(lin[:, 0, 1], lin[:, 0, 0]))
    assert angle.abs().max() <= 15 + 1e-3 and angle.min() < -14 and angle.max() > 14  # both ways
    assert abs(float((angle > 0).float().mean()) - 0.5) < 0.05


def test_crop_offsets_are_drawn_independently_across_the_padding():
    """No jitter or rotation: the translation is the crop's offset in [0, 120 - 108] on
    each axis, drawn separately for x and y."""
    cfg = AugmentConfig(scale_jitter=0, rotation=0)
    th = train_theta(4096, cfg, torch.Generator().manual_seed(0))
    # theta[:, :, 2] = (2 / 96) (54 + o - 60) for an offset o in [0, 12]
    o = th[:, :, 2] * 96 / 2 + 6
    assert o.min() >= -1e-4 and o.max() <= 12 + 1e-4 and o.min() < 0.1 and o.max() > 11.9
    assert abs(float(torch.corrcoef(o.T)[0, 1])) < 0.05  # x and y offsets independent


def test_no_jitter_no_rotation_centre_crop_equals_eval():
    cfg = AugmentConfig(scale_jitter=0, rotation=0, pad_to=108)  # no room to crop: offset 0
    x = _images()
    torch.testing.assert_close(augment(x, cfg, torch.Generator().manual_seed(0)), evaluate_transform(x, cfg))


@pytest.mark.parametrize("out_size", [108, 48])
def test_flip_mirrors_left_right_about_half_the_images(out_size):
    """--flip: with no jitter, rotation or crop offset, each training image is the
    evaluation image or its left-right mirror (never upside down), mirrored for about
    half of a batch; without --flip none is mirrored."""
    x = _images(200, seed=3)
    base = dict(scale_jitter=0, rotation=0, pad_to=108, out_size=out_size)
    plain = evaluate_transform(x, AugmentConfig(**base))
    mirror = torch.flip(plain, dims=[-1])
    out = augment(x, AugmentConfig(flip=True, **base), torch.Generator().manual_seed(0))
    err_plain = (out - plain).abs().amax(dim=(1, 2, 3))
    err_mirror = (out - mirror).abs().amax(dim=(1, 2, 3))
    assert torch.all(torch.minimum(err_plain, err_mirror) < 1e-4), "an image neither as is nor mirrored"
    mirrored = (err_mirror < err_plain).float().mean().item()
    assert 0.35 < mirrored < 0.65, mirrored
    off = augment(x, AugmentConfig(**base), torch.Generator().manual_seed(0))
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=0)


def test_scaled_output_size():
    cfg = AugmentConfig(out_size=48)
    x = _images()
    assert augment(x, cfg, torch.Generator().manual_seed(0)).shape == (4, 1, 48, 48)
    assert evaluate_transform(x, cfg).shape == (4, 1, 48, 48)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(8, 108), seed=st.integers(0, 2**31 - 1),
       area=st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 0.5)).map(sorted))
def test_erase_mask_is_one_rectangle_of_the_drawn_area(size, seed, area):
    """--erase 1: every image gets exactly one axis-aligned rectangle (the outer product of a
    contiguous run of rows and one of columns) whose area is the drawn fraction of the image
    up to the pixel grid, and which lies inside the image."""
    cfg = AugmentConfig(erase_prob=1.0, erase_area=tuple(area))
    m = erase_mask(64, size, cfg, torch.Generator().manual_seed(seed))
    assert m.shape == (64, size, size) and m.dtype == torch.bool
    rows, cols = m.any(2), m.any(1)
    assert torch.equal(m, rows[:, :, None] & cols[:, None, :])
    for line in torch.cat([rows, cols]):
        hit = line.nonzero().flatten()
        if hit.numel():
            assert hit[-1] - hit[0] + 1 == hit.numel()  # contiguous
    # counting pixel centres moves each side by < 1 px: |count - h w| < h + w + 1 with
    # h, w <= sqrt(3.34 A) (aspect in [0.3, 3.3]) for A = area x size^2
    frac = m.flatten(1).float().mean(1)
    slack = (2.0 * (3.34 * area[1]) ** 0.5 * size + 1.0) / size ** 2
    assert torch.all(frac <= area[1] + slack + 1e-6)
    if area[1] < 0.3:  # (larger ones may be clamped to the image's side)
        assert torch.all(frac >= area[0] - slack - 1e-6)


def test_erase_mask_probability_area_and_aspect():
    cfg = AugmentConfig(erase_prob=0.5)
    m = erase_mask(8192, 108, cfg, torch.Generator().manual_seed(0))
    erased = m.flatten(1).any(1)
    assert 0.47 < erased.float().mean() < 0.53
    frac = m[erased].flatten(1).float().mean(1)
    assert 0.015 < frac.min() and frac.max() < 0.27 and 0.11 < frac.mean() < 0.16  # (0.02 + 0.25) / 2
    tall = m[erased].any(2).sum(1) > m[erased].any(1).sum(1)
    assert 0.4 < tall.float().mean() < 0.6  # log-uniform aspect around 1
    assert not erase_mask(256, 108, AugmentConfig(erase_prob=0.0), torch.Generator()).any()


@pytest.mark.parametrize("size", [48, 108])
def test_augment_with_erase_blanks_only_the_rectangle(size):
    """Same generator: the erased batch is the plain batch with the drawn rectangles set to
    0 (the mean grey); with erase_prob 0 the random stream is the one of older runs."""
    x = _images(16)
    plain = augment(x, AugmentConfig(out_size=size), torch.Generator().manual_seed(3))
    cfg = AugmentConfig(out_size=size, erase_prob=1.0)
    erased = augment(x, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    train_theta(16, cfg, g)                      # the draws augment makes first
    mask = erase_mask(16, size, cfg, g)[:, None]
    assert mask.flatten(1).any(1).all()
    torch.testing.assert_close(erased, plain.masked_fill(mask, 0.0), atol=0, rtol=0)
    assert torch.all(erased[mask] == 0) and (plain[mask] != 0).any()
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment(x, AugmentConfig(out_size=size, erase_prob=0.0), g0)
    train_theta(16, cfg, g1)
    assert torch.equal(g0.get_state(), g1.get_state())  # erase_prob 0 draws nothing more
