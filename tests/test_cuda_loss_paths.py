"""CUDA triplet loss: the code paths chosen by size inside the kernels, against each
other and against the reference: norms computed inside mine_pass (B <= 256) or by
their own launch, the mean / sum formed by mine_finalize's last block, the backward
gather (coefficients on the spot, deterministic) or scatter (atomics), and bitwise
reproducibility of the backward under torch.use_deterministic_algorithms(True).

Every test runs on a GPU where there is one and in the CPU emulator of the CUDA kernels
(the ``gpu`` fixture, tests/conftest.py)."""
import pytest
import torch

import dnnrl_ext


def _batch(B, D, C, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, C, (B,), generator=g)
    return x.to(dtype), y


def _grad(gpu, x, y, **kw):
    xa = x.clone().to(gpu.device).requires_grad_(True)
    loss = dnnrl_ext.triplet_loss(xa, y.to(gpu.device), **kw)
    loss.backward()
    gpu.sync()
    return loss.detach().cpu(), xa.grad.cpu()


@pytest.mark.parametrize("B", [1, 2, 7, 128, 256, 257, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "easy_positive"])
def test_fused_reduction_equals_the_reduced_rows(gpu, B, reduction, mining):
    x, y = _batch(B, 48, 5, B)
    xd, yd = x.to(gpu.device), y.to(gpu.device)
    out = dnnrl_ext.triplet_loss(xd, yd, mining=mining, gamma=-0.3, reduction=reduction, return_details=True)
    rows = dnnrl_ext.triplet_loss(xd, yd, mining=mining, gamma=-0.3, reduction="none")
    valid = out.valid
    want = rows.sum() if reduction == "sum" else rows.sum() / max(1, int(valid.sum()))
    torch.testing.assert_close(out.loss.cpu(), want.cpu(), rtol=1e-6, atol=1e-7)
    ref = dnnrl_ext.triplet_loss(x, y, mining=mining, gamma=-0.3, reduction=reduction, backend="reference")
    torch.testing.assert_close(out.loss.cpu(), ref.float(), rtol=1e-4, atol=1e-5)


def test_inline_norms_agree_with_the_norm_launch(gpu):
    """B = 256 (norms inside mine_pass) against the same rows plus one far row of its own
    class (B = 257: norms by their own launch): same mining, same r, same loss."""
    x, y = _batch(256, 64, 6, 0)
    far = torch.full((1, 64), 100.0)
    x2, y2 = torch.cat([x, far]), torch.cat([y, torch.tensor([99])])
    a = dnnrl_ext.triplet_loss(x.to(gpu.device), y.to(gpu.device), return_details=True)
    b = dnnrl_ext.triplet_loss(x2.to(gpu.device), y2.to(gpu.device), return_details=True)
    assert not bool(b.valid[256])
    assert torch.equal(a.pos.cpu(), b.pos[:256].cpu()) and torch.equal(a.neg.cpu(), b.neg[:256].cpu())
    assert torch.equal(a.r.cpu(), b.r[:256].cpu())
    torch.testing.assert_close(a.loss.cpu(), b.loss.cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_is_bitwise_reproducible_and_matches_atomics(gpu, dtype):
    """B = 4500: B * T above 2^24, so the default backward scatters with atomics; under
    use_deterministic_algorithms it gathers, and two runs are equal bit for bit."""
    x, y = _batch(4500, 32, 7, 1, dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        l1, g1 = _grad(gpu, x, y)
        l2, g2 = _grad(gpu, x, y)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    l3, g3 = _grad(gpu, x, y)  # atomics
    assert torch.equal(l1, l3)  # the forward has no atomics
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(g3.float(), g1.float(), rtol=tol, atol=tol * float(g1.float().abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gather_backward_matches_the_reference_gradient(gpu, reduction):
    """The gradient of the mined loss against the reference's on the kernel's own mined
    triplets (so near-ties in the mining cannot make the two differ)."""
    x, y = _batch(300, 40, 4, 2)
    up = torch.linspace(-1, 2, 300)
    xa = x.clone().to(gpu.device).requires_grad_(True)
    out = dnnrl_ext.triplet_loss(xa, y.to(gpu.device), mining="semi_hard", gamma=-0.5, reduction=reduction,
                                 return_details=True)
    (out.loss * up.to(gpu.device) if reduction == "none" else out.loss).sum().backward()
    v = out.valid.cpu()
    anchors = torch.arange(300)[v]
    xr = x.clone().double().requires_grad_(True)
    want = dnnrl_ext.triplet_loss_from_triplets(xr, anchors, out.pos.cpu()[v], out.neg.cpu()[v], gamma=-0.5,
                                                reduction=reduction, backend="reference")
    (want * up[v].double() if reduction == "none" else want).sum().backward()
    assert v.any()
    torch.testing.assert_close(xa.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B", [128, 300])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fewer_launches_switch_gives_the_same_loss_and_gradient(gpu, B, reduction, monkeypatch):
    """DNNRL_LOSS_FEWER_LAUNCHES=0 (norms, reduction and backward coefficients in launches
    of their own) against the default fused forms."""
    x, y = _batch(B, 64, 5, B + 7)
    up = torch.linspace(-1, 1, B).to(gpu.device)

    def run():
        xa = x.clone().to(gpu.device).requires_grad_(True)
        out = dnnrl_ext.triplet_loss(xa, y.to(gpu.device), mining="semi_hard", gamma=-0.2, reduction=reduction,
                                     return_details=True)
        (out.loss * up if reduction == "none" else out.loss).sum().backward()
        gpu.sync()
        return out.loss.detach().cpu(), out.pos.cpu(), out.neg.cpu(), xa.grad.cpu()

    monkeypatch.delenv("DNNRL_LOSS_FEWER_LAUNCHES", raising=False)
    fused = run()
    monkeypatch.setenv("DNNRL_LOSS_FEWER_LAUNCHES", "0")
    legacy = run()
    assert torch.equal(fused[1], legacy[1]) and torch.equal(fused[2], legacy[2])
    torch.testing.assert_close(fused[0], legacy[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[3], legacy[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B", [2, 33, 128, 300, 700])
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "easy_positive"])
def test_the_three_mining_tiles_agree(gpu, B, mining, dtype, monkeypatch):
    """DNNRL_MINE_TILE=tiny / small / large on the same batch (the tile is otherwise chosen
    by B: tiny up to 320 rows on a 132-SM card, large from 1,409 (ceil(B / 128)^2 >= 132)). Each product is
    accumulated in the same order whatever the tile, so the mined indices and r agree
    exactly; the loss and gradient to rounding, and the tiny tile's with the reference."""
    x, y = _batch(B, 72, 5, B + 11, dtype)  # D = 72: a partial last 32-wide chunk

    def run():
        xa = x.clone().to(gpu.device).requires_grad_(True)
        out = dnnrl_ext.triplet_loss(xa, y.to(gpu.device), mining=mining, gamma=-0.2, return_details=True)
        out.loss.backward()
        gpu.sync()
        return out, xa.grad.cpu()

    got = {}
    for tile in ("tiny", "small", "large"):
        monkeypatch.setenv("DNNRL_MINE_TILE", tile)
        got[tile] = run()
    monkeypatch.delenv("DNNRL_MINE_TILE")
    (tiny, g_tiny) = got["tiny"]
    for tile in ("small", "large"):
        out, g = got[tile]
        assert torch.equal(out.pos.cpu(), tiny.pos.cpu()) and torch.equal(out.neg.cpu(), tiny.neg.cpu()), tile
        assert torch.equal(out.r.cpu(), tiny.r.cpu()), tile
        torch.testing.assert_close(out.loss.cpu(), tiny.loss.cpu(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, g_tiny, rtol=1e-5, atol=1e-7)
    ref = dnnrl_ext.triplet_loss(x, y, mining=mining, gamma=-0.2, return_details=True, backend="reference")
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    # (a near-tie among ~B candidates may go either way between 3xTF32 and the reference)
    agree = (ref.pos == tiny.pos.cpu()) & (ref.neg == tiny.neg.cpu())
    assert agree.float().mean() >= (0.99 if dtype in (torch.float32, torch.float64) else 0.9)
    torch.testing.assert_close(tiny.loss.cpu().double(), ref.loss.double(), rtol=tol, atol=tol)


def test_a_misspelt_mining_tile_is_an_error(gpu, monkeypatch):
    x, y = _batch(16, 8, 3, 0)
    monkeypatch.setenv("DNNRL_MINE_TILE", "medium")
    with pytest.raises(RuntimeError, match="DNNRL_MINE_TILE must be tiny, small or large"):
        dnnrl_ext.triplet_loss(x.to(gpu.device), y.to(gpu.device))
