"""Property tests: compiled triplet_loss / triplet_loss_indexed vs dnnrl_ext.reference.

Loss values, r, mined indices, validity and the fused backward (vs PyTorch autograd of
the reference) on random shapes, labels, dtypes, mining modes, losses, reductions and
memory layouts. On cuda the CUDA kernel, the CPU kernel and the reference are compared
with the same tolerances and the same exact index equality.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, note, strategies as st

import dnnrl_ext
from ops_testutil import (DTYPES, acc_dtype, assert_grad_close, device_params, grid_embeddings, grid_shift,
                          layout, loss_tols, naive_mine, r_atol, require_compiled, run_triplet,
                          tie_free_anchors, triplet_case, upstream_for)

KW = ("mining", "loss", "alpha", "gamma", "margin", "reduction")


def _with(tag):
    """assert_close message: its own report followed by the case."""
    return lambda m: m + "\n" + tag


def _describe(case):
    x = case["x"]
    return ("B=%d D=%d dtype=%s labels=%s(%s) %s mem=%s seed=%d"
            % (x.shape[0], x.shape[1], x.dtype, case["labels"].dtype,
               case["labels"].tolist()[:20], {k: case[k] for k in KW}, case["mem"], case["seed"]))


def _reference(case, upstream):
    """Reference on the same (low-precision) values, promoted to the accumulation
    dtype so that its autograd accumulates like the fused backward does."""
    x = case["x"]
    return run_triplet("reference", x.to(acc_dtype(x.dtype)), case["labels"], upstream,
                       **{k: case[k] for k in KW})


def _check_against(name, got, got_grad, want, want_grad, case, upstream, exact_r):
    x, B = case["x"], case["x"].shape[0]
    acc = acc_dtype(x.dtype)
    tag = "%s: %s" % (name, _describe(case))
    # dtypes, shapes
    assert got.loss.dtype == acc and got.r.dtype == acc, tag
    assert got.pos.dtype == torch.int64 and got.neg.dtype == torch.int64, tag
    assert got.valid.dtype == torch.bool, tag
    assert got.loss.shape == ((B,) if case["reduction"] == "none" else ()), tag
    for t in (got.pos, got.neg, got.r, got.valid):
        assert t.shape == (B,), tag
    got = type(got)(*(t.cpu() for t in got))
    # mining decisions: exact
    assert torch.equal(got.valid, want.valid), "valid differs; " + tag
    assert torch.equal(got.pos, want.pos), "pos differs at %s; %s" % (
        (got.pos != want.pos).nonzero().flatten().tolist()[:10], tag)
    assert torch.equal(got.neg, want.neg), "neg differs at %s; %s" % (
        (got.neg != want.neg).nonzero().flatten().tolist()[:10], tag)
    # r: exact on grid inputs, else within the summation-order tolerance
    if exact_r:
        assert torch.equal(got.r, want.r), "r differs; " + tag
    else:
        torch.testing.assert_close(got.r, want.r, atol=r_atol(x), rtol=0, msg=_with(tag))
    assert bool((got.r[~got.valid] == 0).all()), "invalid anchors need r == 0; " + tag
    n_valid = int(want.valid.sum())
    atol, rtol = loss_tols(x, case["alpha"], case["loss"], case["reduction"], n_valid)
    torch.testing.assert_close(got.loss, want.loss, atol=atol, rtol=rtol, msg=_with(tag))
    assert_grad_close(got_grad, want_grad, x, case["alpha"], case["loss"],
                      float(upstream.abs().max()) if upstream.numel() else 0.0, msg=tag)


def _run_and_compare(case, device, exact_r):
    x, labels = case["x"], case["labels"]
    acc = acc_dtype(x.dtype)
    upstream = upstream_for(case["reduction"], x.shape[0], case["seed"], acc)
    want, want_grad = _reference(case, upstream)
    kw = {k: case[k] for k in KW}
    runs = {device: (x, labels)}
    if device != "cpu":
        runs["cpu"] = (x, labels)  # the CPU kernel must agree with CUDA and the reference
    for dev, (xx, ll) in runs.items():
        xd = layout(xx.to(dev), case["mem"])
        got, grad = run_triplet("compiled", xd, ll.to(dev), upstream.to(dev), **kw)
        assert got.loss.device.type == dev and grad.device.type == dev
        _check_against("compiled-" + dev, got, grad.cpu(), want, want_grad, case, upstream, exact_r)


@pytest.mark.parametrize("device", device_params())
@given(case=triplet_case(grid=True))
def test_mined_grid_inputs_match_reference(device, case):
    """Grid inputs: distances are exact, so indices (ties included) and r must be equal."""
    require_compiled(device)
    note(_describe(case))
    _run_and_compare(case, device, exact_r=True)


@pytest.mark.parametrize("device", device_params())
@given(case=triplet_case(grid=False, max_b=128, max_d=600))
def test_mined_continuous_inputs_match_reference(device, case):
    """Gaussian inputs that are tie-free (every decision separated from the runner-up)."""
    require_compiled(device)
    assume(tie_free_anchors(case["x"], case["labels"], case["mining"], case["gamma"],
                            case["loss"], case["margin"]).all())
    note(_describe(case))
    _run_and_compare(case, device, exact_r=False)


@given(case=triplet_case(grid=True, max_b=40, max_d=16))
def test_reference_mining_matches_loop_oracle(case):
    """The reference's vectorised mining agrees with a plain loop over SPEC section 2
    (grid inputs, so every tie is exact and the smallest-index rule is exercised)."""
    x, labels = case["x"], case["labels"]
    out = dnnrl_ext.triplet_loss(x, labels, mining=case["mining"], gamma=case["gamma"],
                                 return_details=True, backend="reference")
    pos, neg, valid = naive_mine(x, labels, case["mining"], case["gamma"])
    assert out.valid.tolist() == valid
    assert out.pos.tolist() == pos, _describe(case)
    assert out.neg.tolist() == neg, _describe(case)


@st.composite
def indexed_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 200))
    D = draw(st.integers(1, 300))
    T = draw(st.integers(0, 400))
    loss = draw(st.sampled_from(["exp", "hinge"]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    alpha = draw(st.sampled_from([1e-3, 0.2, 1.0]) | st.floats(0.01, 5.0))  # > 0: the wrappers refuse 0
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    spread = draw(st.sampled_from([1, 3]))
    shift = grid_shift(D, spread, alpha)
    x = grid_embeddings(rng, B, D, dtype, spread, shift, dup=False)
    step = 2.0 ** -(2 * shift)
    # few distinct indices -> many repeated rows in the scatter of the backward
    hi = draw(st.sampled_from([1, 3, B]))
    trip = [torch.as_tensor(rng.integers(0, min(hi, B), T), dtype=torch.int64) for _ in range(3)]
    return dict(x=x, trip=trip, loss=loss, reduction=reduction, alpha=alpha,
                gamma=step * draw(st.integers(-6, 6)), margin=step * (draw(st.integers(-2, 12)) + 0.5),
                mem=draw(st.sampled_from(["contig", "transposed", "strided"])), seed=seed)


def _run_indexed(backend, x, trip, upstream, case):
    leaf = x.detach().clone().requires_grad_(True)
    loss, r = dnnrl_ext.triplet_loss_from_triplets(
        leaf, *trip, loss=case["loss"], alpha=case["alpha"], gamma=case["gamma"],
        margin=case["margin"], reduction=case["reduction"], return_r=True, backend=backend)
    loss.backward(upstream.to(loss.device, loss.dtype))
    return loss.detach(), r, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


@pytest.mark.parametrize("device", device_params())
@given(case=indexed_case())
def test_indexed_matches_reference(device, case):
    """Explicit-triplets form incl. repeated indices (anchor == positive etc.)."""
    require_compiled(device)
    x, trip = case["x"], case["trip"]
    acc = acc_dtype(x.dtype)
    T = trip[0].shape[0]
    upstream = upstream_for(case["reduction"], T, case["seed"], acc)
    want, want_r, want_grad = _run_indexed("reference", x.to(acc), trip, upstream, case)
    devices = [device] + (["cpu"] if device != "cpu" else [])
    for dev in devices:
        xd = layout(x.to(dev), case["mem"])
        got, got_r, grad = _run_indexed("compiled", xd, [t.to(dev) for t in trip], upstream.to(dev), case)
        tag = "%s B=%d D=%d T=%d %s %s" % (dev, x.shape[0], x.shape[1], T, x.dtype,
                                          {k: case[k] for k in ("loss", "reduction", "alpha", "gamma", "margin", "mem")})
        assert got.dtype == acc and got_r.dtype == acc and got_r.shape == (T,), tag
        assert torch.equal(got_r.cpu(), want_r), tag  # grid inputs: exact
        atol, rtol = loss_tols(x, case["alpha"], case["loss"], case["reduction"], T)
        torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol, msg=_with(tag))
        assert_grad_close(grad.cpu(), want_grad, x, case["alpha"], case["loss"],
                          float(upstream.abs().max()) if upstream.numel() else 0.0, msg=tag)
