"""The drop-in modules ExpTripletLoss and TripletLoss: their defaults are the paper's
(SPEC section 2: alpha 0.2, gamma 0, batch-hard mining, the mean over valid anchors), and
a module built with given arguments computes what the functional op computes with the
same arguments: loss, gradient and mined indices, each argument reaching the op (the
inputs are chosen so that a different value of any one of them changes the loss)."""
import pytest
import torch

from dnnrl_ext import ExpTripletLoss, TripletLoss, triplet_loss

MININGS = ["batch_hard", "semi_hard", "easy_positive"]
REDUCTIONS = ["none", "mean", "sum"]


def _batch(impl, seed=0, B=24, D=5, C=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 0.3  # r spreads around 0
    return x.to(impl.device), (torch.arange(B) % C).to(impl.device)


def _loss_and_grad(fn, x, y):
    x = x.clone().requires_grad_(True)
    out = fn(x, y)
    out.sum().backward()
    return out.detach(), x.grad


def test_defaults_are_the_papers():
    exp, hinge = ExpTripletLoss(), TripletLoss()
    assert (exp.alpha, exp.gamma, exp.mining, exp.reduction, exp.backend) == (0.2, 0.0, "batch_hard", "mean", "auto")
    assert (hinge.margin, hinge.mining, hinge.reduction, hinge.backend) == (0.2, "batch_hard", "mean", "auto")
    assert repr(exp) == "ExpTripletLoss(alpha=0.2, gamma=0, mining='batch_hard', reduction='mean')"
    assert repr(hinge) == "TripletLoss(margin=0.2, mining='batch_hard', reduction='mean')"


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exp_module_is_the_op_with_its_arguments(impl, mining, reduction):
    x, y = _batch(impl)
    args = dict(mining=mining, alpha=0.7, gamma=-1.0, reduction=reduction)
    module = ExpTripletLoss(backend=impl.backend, **args)
    got, got_grad = _loss_and_grad(module, x, y)
    want, want_grad = _loss_and_grad(lambda a, b: triplet_loss(a, b, loss="exp", backend=impl.backend, **args), x, y)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # each argument matters on this input: the op with one of them changed differs
    for name, other in (("alpha", 0.2), ("gamma", 0.0), ("reduction", "sum" if reduction == "mean" else "mean"),
                        ("mining", "semi_hard" if mining == "batch_hard" else "batch_hard")):
        changed = triplet_loss(x, y, loss="exp", backend=impl.backend, **dict(args, **{name: other}))
        assert changed.shape != got.shape or not torch.equal(changed, got), name
    details = module(x, y, return_details=True)
    op_details = triplet_loss(x, y, loss="exp", backend=impl.backend, return_details=True, **args)
    for field in details._fields:
        assert torch.equal(getattr(details, field), getattr(op_details, field)), field


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hinge_module_is_the_op_with_its_arguments(impl, mining, reduction):
    x, y = _batch(impl, seed=1)
    args = dict(mining=mining, margin=0.05, reduction=reduction)
    module = TripletLoss(backend=impl.backend, **args)
    got, got_grad = _loss_and_grad(module, x, y)
    want, want_grad = _loss_and_grad(
        lambda a, b: triplet_loss(a, b, loss="hinge", gamma=0.0, backend=impl.backend, **args), x, y)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    for name, other in (("margin", 0.2), ("reduction", "sum" if reduction == "mean" else "mean"),
                        ("mining", "semi_hard" if mining == "batch_hard" else "batch_hard")):
        changed = triplet_loss(x, y, loss="hinge", gamma=0.0, backend=impl.backend, **dict(args, **{name: other}))
        assert changed.shape != got.shape or not torch.equal(changed, got), name
