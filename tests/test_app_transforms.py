"""dnnrl.transforms: batched affine preprocessing."""
import torch
import torch.nn.functional as F

from dnnrl.transforms import PIXEL_MEAN, PIXEL_STD, AugmentConfig, augment, evaluate_transform, train_theta


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
    angle = torch.rad2deg(torch.atan2(lin[:, 0, 1], lin[:, 0, 0]))
    assert angle.abs().max() <= 15 + 1e-3 and angle.abs().max() > 14


def test_no_jitter_no_rotation_centre_crop_equals_eval():
    cfg = AugmentConfig(scale_jitter=0, rotation=0, pad_to=108)  # no room to crop: offset 0
    x = _images()
    torch.testing.assert_close(augment(x, cfg, torch.Generator().manual_seed(0)), evaluate_transform(x, cfg))


def test_scaled_output_size():
    cfg = AugmentConfig(out_size=48)
    x = _images()
    assert augment(x, cfg, torch.Generator().manual_seed(0)).shape == (4, 1, 48, 48)
    assert evaluate_transform(x, cfg).shape == (4, 1, 48, 48)
