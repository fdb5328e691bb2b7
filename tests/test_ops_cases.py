"""Hand-built cases of triplet_loss / triplet_loss_from_triplets with known answers:
tie rules, NaN, empty and degenerate batches, layouts, hand-computed loss and gradient.

Every test runs on the reference and (when built) on the compiled kernels of every
device through the ``impl`` fixture, so both must give the answers written here.
"""
import math

import pytest
import torch

import dnnrl_ext
from ops_testutil import dtype_params, layout

F64 = torch.float64


def mined(impl, x, labels, grad=True, **kw):
    """Run the mined loss on impl's device; returns (details on cpu, grad on cpu or None)."""
    x = x.to(impl.device)
    leaf = x.detach().clone().requires_grad_(grad)
    out = dnnrl_ext.triplet_loss(leaf, labels.to(impl.device), return_details=True,
                                 backend=impl.backend, **kw)
    g = None
    if grad:
        out.loss.sum().backward()
        g = leaf.grad.cpu() if leaf.grad is not None else torch.zeros_like(leaf).cpu()
    return type(out)(*(t.detach().cpu() for t in out)), g


def T(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def L(values):
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------- tie rules
def test_positive_tie_goes_to_smallest_index(impl):
    # anchor 0: positives 1 (d=4), 2 (d=1), 3 (d=4) -> farthest tie 1 vs 3 -> 1
    x = T([[0, 0], [2, 0], [1, 0], [0, 2], [9, 9]])
    out, _ = mined(impl, x, L([0, 0, 0, 0, 1]), grad=False)
    assert out.pos[0] == 1
    # anchor 2: positives 0 (d=1), 1 (d=1), 3 (d=1+4=5) -> 3; anchor 3: 1 (8) vs 0,2 -> 1
    assert out.pos.tolist()[:4] == [1, 3, 3, 1]


def test_negative_tie_goes_to_smallest_index(impl):
    # anchor 0: negatives 1 (d=9), 2 (d=4), 3 (d=4), 4 (d=4) -> nearest tie -> 2
    x = T([[0, 0], [3, 0], [2, 0], [0, 2], [-2, 0], [0, 1]])
    out, _ = mined(impl, x, L([0, 1, 1, 1, 1, 0]), grad=False)
    assert out.neg[0] == 2
    assert out.pos[0] == 5


def test_ties_far_apart_in_a_large_batch(impl):
    """Tied candidates at distant indices (other threads / blocks of a parallel kernel)."""
    B, D = 300, 3
    x = torch.zeros(B, D, dtype=F64)
    labels = torch.ones(B, dtype=torch.int64)
    labels[:150] = 0
    x[1:150, 0] = 1.0          # positives of anchor 0 at d = 1 ...
    x[[7, 149, 60], 0] = 2.0   # ... except three tied farthest at d = 4
    x[150:, 1] = 3.0           # negatives at d = 9 ...
    x[[299, 151, 220], 1] = 2.0  # ... except three tied nearest at d = 4
    out, _ = mined(impl, x, labels, grad=False)
    assert out.pos[0] == 7
    assert out.neg[0] == 151


def test_semi_hard_picks_nearest_negative_beyond_threshold_with_ties(impl):
    # anchor 0: positive 1 at d=4; gamma = 1 -> threshold 5 (strict: d > 5)
    # negatives: 2 (d=1), 3 (d=5, exactly at the threshold: not beyond),
    #            4 (d=9), 5 (d=9), 6 (d=16) -> semi-hard tie 4 vs 5 -> 4
    x = T([[0, 0], [2, 0], [0, 1], [1, 2], [0, 3], [-3, 0], [0, -4]])
    labels = L([0, 0, 1, 1, 1, 1, 1])
    out, _ = mined(impl, x, labels, grad=False, mining="semi_hard", gamma=1.0)
    assert out.pos[0] == 1
    assert out.neg[0] == 4
    assert out.r[0] == 9 - 4
    bh, _ = mined(impl, x, labels, grad=False, mining="batch_hard", gamma=1.0)
    assert bh.neg[0] == 2


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B", [16, 32, 48])
def test_semi_hard_tie_at_the_threshold_in_a_full_tile(impl, B, dtype):
    """The case above padded with far rows of a third class to B rows, so that the CPU
    kernel's tiles hold 16 columns or more and its AVX2 sweep (16 columns a step), not
    the scalar remainder, meets the negative that lies exactly at the threshold. Random
    grid inputs reach that tie only now and then (a full mutation run once missed it)."""
    base = [[0, 0], [2, 0], [0, 1], [1, 2], [0, 3], [-3, 0], [0, -4]]
    x = T(base + [[100 + i, 100] for i in range(B - len(base))], dtype)  # float32: the AVX2 sweep
    labels = L([0, 0, 1, 1, 1, 1, 1] + [2] * (B - len(base)))
    out, _ = mined(impl, x, labels, grad=False, mining="semi_hard", gamma=1.0)
    assert out.pos[0] == 1 and out.neg[0] == 4 and out.r[0] == 9 - 4
    assert out.neg[1] == 4 and out.r[1] == 13 - 4  # anchor 1: negatives 2 and 3 at exactly d = 5


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B", [64, 80])
def test_batch_hard_ties_in_one_simd_lane_go_to_the_smaller_index(impl, B, dtype):
    """Two positives at the same largest distance and two negatives at the same smallest
    one, 16 columns apart: in the CPU kernel's 32-column tiles (B = 64, 80) the AVX2 sweep
    keeps both members of each pair in the same lane, where only a strict comparison keeps
    the first. Random grid inputs put a tie in one lane only now and then."""
    rows = [[100 + i, 100] for i in range(B)]
    labels = [2] * B
    for j, xy, lab in ((0, [0, 0], 0), (1, [2, 0], 0), (17, [0, 2], 0), (3, [1, 0], 1), (19, [0, 1], 1)):
        rows[j], labels[j] = xy, lab
    out, _ = mined(impl, T(rows, dtype), L(labels), grad=False, mining="batch_hard")
    assert out.pos[0] == 1 and out.neg[0] == 3 and out.r[0] == 1 - 4


@pytest.mark.parametrize("extra", [1e154, math.inf])
def test_mining_with_a_row_the_norm_expansion_cannot_take(impl, extra):
    """The semi-hard case above plus a far negative whose squared norm overflows the
    expansion ||a||^2 + ||b||^2 - 2 a.b (1e154: ~1e308, beyond max / 16; inf: inf - inf).
    Its distances are explicit differences (as in the reference): it is the farthest
    negative, never the nearest, and the ties and the strict threshold still hold."""
    x = T([[0, 0], [2, 0], [0, 1], [1, 2], [0, 3], [-3, 0], [0, -4], [extra, 0]])
    labels = L([0, 0, 1, 1, 1, 1, 1, 1])
    out, _ = mined(impl, x, labels, grad=False, mining="semi_hard", gamma=1.0)
    assert out.pos[0] == 1 and out.neg[0] == 4 and out.r[0] == 9 - 4
    # anchor 1 (positive 0 at d=4, threshold 5): negatives 2 and 3 lie exactly at d=5, not beyond
    assert out.neg[1] == 4 and out.r[1] == 13 - 4
    bh, _ = mined(impl, x, labels, grad=False, mining="batch_hard", gamma=1.0)
    assert bh.neg[0] == 2 and bh.r[0] == 1 - 4
    assert bh.pos[6] == 7 and bh.neg[6] == 0  # the far row as the farthest positive of anchor 6


def test_easy_positive_takes_the_nearest_positive_with_ties(impl):
    # anchor 0: positives 1 (d=4), 2 (d=1), 3 (d=4), 5 (d=1) -> nearest tie 2 vs 5 -> 2;
    # negative: the nearest, as batch-hard (4 at d=81, 6 at d=9 -> 6)
    x = T([[0, 0], [2, 0], [1, 0], [0, 2], [9, 0], [0, -1], [3, 0]])
    labels = L([0, 0, 0, 0, 1, 0, 1])
    out, g = mined(impl, x, labels, mining="easy_positive", gamma=-100.0, alpha=0.01)
    assert out.pos.tolist()[:4] == [2, 2, 0, 0]  # anchor 1: 2 (d=1); anchors 2 and 3: 0 (d=1 / d=4)
    assert out.pos[5] == 0 and out.neg[0] == 6 and out.r[0] == 9 - 1
    # anchor 4 (class 1): its one positive 6; negatives 0, 1, 2, 3, 5 at d = 81, 49, 64, 85, 82 -> 1
    assert out.valid.all() and out.pos[4] == 6 and out.neg[4] == 1
    # the same batch, batch-hard: the farthest positive (tie 1 vs 3 -> 1)
    bh, _ = mined(impl, x, labels, grad=False, mining="batch_hard", gamma=-100.0, alpha=0.01)
    assert bh.pos[0] == 1 and bh.neg[0] == 6
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # every triplet active (r > gamma)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B", [16, 64, 80])
def test_easy_positive_ties_in_a_full_tile_go_to_the_smaller_index(impl, B, dtype):
    """Two positives at the same smallest distance: 16 columns apart (2 and 18, one AVX2
    lane of the CPU kernel's 32- and 40-column tiles at B = 64, 80) or, at B = 16, in one
    16-column step (2 and 14); a farther positive before them, and the anchor's own row
    (d = 0) never its positive."""
    t = 18 if B > 18 else 14
    rows = [[100 + i, 100] for i in range(B)]
    labels = [2] * B
    for j, xy, lab in ((0, [0, 0], 0), (1, [3, 0], 0), (2, [0, 1], 0), (3, [2, 0], 1), (t, [0, -1], 0)):
        rows[j], labels[j] = xy, lab
    out, _ = mined(impl, T(rows, dtype), L(labels), grad=False, mining="easy_positive")
    assert out.pos[0] == 2 and out.neg[0] == 3 and out.r[0] == 4 - 1
    # to row 0: d = 1 from 2 and from t, 9 from 1; row 2 to t: 4
    assert out.pos[2] == 0 and out.pos[t] == 0 and out.pos[1] == 0


@pytest.mark.parametrize("extra", [1e154, math.inf])
def test_easy_positive_with_a_row_the_norm_expansion_cannot_take(impl, extra):
    """A far positive whose squared norm overflows the expansion: never the nearest
    positive of another anchor; its own nearest positive is the nearest finite row."""
    x = T([[0, 0], [2, 0], [1, 0], [0, 3], [extra, 0]])
    labels = L([0, 0, 0, 1, 0])
    out, _ = mined(impl, x, labels, grad=False, mining="easy_positive")
    assert out.pos.tolist()[:3] == [2, 2, 0] and out.neg[0] == 3 and out.r[0] == 9 - 1
    # from the far row every positive lies at the same distance (1e308 or inf: a - 2 == a
    # at 1e154): the tie goes to the smallest index
    assert out.pos[4] == 0 and out.neg[4] == 3


def test_semi_hard_falls_back_to_batch_hard_negative(impl):
    # anchor 0: positive at d=16; every negative is nearer than 16 + gamma -> nearest (tie -> 2)
    x = T([[0, 0], [4, 0], [0, 1], [1, 0], [0, 2]])
    labels = L([0, 0, 1, 1, 1])
    out, _ = mined(impl, x, labels, grad=False, mining="semi_hard", gamma=0.0)
    assert out.neg[0] == 2
    assert out.r[0] == 1 - 16


def test_semi_hard_negative_gamma_lowers_threshold(impl):
    # positive d=4, gamma=-2 -> threshold 2: negatives 2 (d=1), 3 (d=4) -> 3
    x = T([[0, 0], [2, 0], [1, 0], [0, 2]])
    out, _ = mined(impl, x, L([0, 0, 1, 1]), grad=False, mining="semi_hard", gamma=-2.0)
    assert out.neg[0] == 3


# --------------------------------------------------------------------------- hand-computed values
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_exp_loss_and_gradient_by_hand(impl, reduction):
    """SPEC section 2 formulas, computed here in float64 independently of both sides."""
    x = T([[0, 0], [1, 0], [0, 3]])
    labels = L([0, 0, 1])
    alpha, gamma = 0.2, 0.5
    out, g = mined(impl, x, labels, alpha=alpha, gamma=gamma, reduction=reduction)
    # anchor 0: p=1 (d=1), n=2 (d=9): r=8; anchor 1: p=0 (d=1), n=2 (d=10): r=9; anchor 2 invalid
    assert out.pos.tolist() == [1, 0, -1] and out.neg.tolist() == [2, 2, -1]
    assert out.valid.tolist() == [True, True, False]
    assert out.r.tolist() == [8.0, 9.0, 0.0]
    per = [math.exp(-alpha * (8 - gamma)), math.exp(-alpha * (9 - gamma)), 0.0]
    want = {"none": per, "sum": sum(per), "mean": sum(per) / 2}[reduction]
    torch.testing.assert_close(out.loss, torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-12)
    scale = 0.5 if reduction == "mean" else 1.0
    expect = torch.zeros(3, 2, dtype=F64)
    for a, p, n, l_ in ((0, 1, 2, per[0]), (1, 0, 2, per[1])):
        c = scale * (-alpha * l_)
        expect[a] += 2 * c * (x[p] - x[n])
        expect[p] += 2 * c * (x[a] - x[p])
        expect[n] += 2 * c * (x[n] - x[a])
    torch.testing.assert_close(g, expect, atol=1e-12, rtol=1e-12)


def test_hinge_loss_and_gradient_by_hand(impl):
    x = T([[0, 0], [2, 0], [0, 1], [5, 5]])
    labels = L([0, 0, 1, 1])
    out, g = mined(impl, x, labels, loss="hinge", margin=1.0, reduction="sum")
    # anchor 0: p=1 (4), n=2 (1): r=-3 -> 4; anchor 1: p=0 (4), n=2 (5): r=1 = margin -> 0, flat
    # anchor 2: p=3 (41), n=0 (1): r=-40 -> 41; anchor 3: p=2 (41), n=1 (34): r=-7 -> 8
    assert out.loss.item() == 4 + 0 + 41 + 8
    expect = torch.zeros(4, 2, dtype=F64)
    for a, p, n in ((0, 1, 2), (2, 3, 0), (3, 2, 1)):
        c = -1.0
        expect[a] += 2 * c * (x[p] - x[n])
        expect[p] += 2 * c * (x[a] - x[p])
        expect[n] += 2 * c * (x[n] - x[a])
    torch.testing.assert_close(g, expect, atol=1e-12, rtol=0)


def test_exp_kink_r_equal_gamma_is_flat(impl):
    # anchor 0: r = 9 - 1 = 8 == gamma -> loss exactly 1; anchor 1: r = 9 > 8
    x = T([[0, 0], [1, 0], [0, 3]])
    out, _ = mined(impl, x, L([0, 0, 1]), gamma=8.0, reduction="none")
    assert out.loss[0] == 1.0 and out.r[0] == 8.0 and out.loss[1] < 1.0
    # gamma = 9: anchor 0 below, anchor 1 exactly at the kink: every gradient is 0
    alone, g0 = mined(impl, x, L([0, 0, 1]), gamma=9.0, reduction="none")
    assert alone.loss.tolist() == [1.0, 1.0, 0.0]
    assert bool((g0 == 0).all())


def test_hinge_kink_margin_equal_r_is_flat(impl):
    x = T([[0, 0], [1, 0], [0, 3]])
    out, g = mined(impl, x, L([0, 0, 1]), loss="hinge", margin=9.0, reduction="sum")
    # anchor 0: r=8 -> 1 (active); anchor 1: r=9 == margin -> 0 and flat
    assert out.loss.item() == 1.0
    expect = torch.zeros(3, 2, dtype=F64)
    a, p, n = 0, 1, 2
    expect[a] += -2 * (x[p] - x[n])
    expect[p] += -2 * (x[a] - x[p])
    expect[n] += -2 * (x[n] - x[a])
    torch.testing.assert_close(g, expect, atol=1e-12, rtol=0)


def test_strongly_violating_triplet_has_finite_zero_gradient(impl):
    """r far below gamma: exp loss 1 and a gradient of exactly 0 (not NaN from
    exp overflow in the untaken branch)."""
    x = T([[0.0], [40.0], [1.0], [41.0]], dtype=torch.float32)
    out, g = mined(impl, x, L([0, 0, 1, 1]), alpha=0.2)
    assert out.loss.item() == 1.0
    assert bool(torch.isfinite(g).all()), g
    assert bool((g == 0).all()), g


# --------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("loss", ["exp", "hinge"])
def test_nan_embedding_gives_nan_loss(impl, dtype, mining, loss):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[2, 1] = float("nan")
    labels = L([0, 0, 0, 1, 1, 1])
    for reduction in ("mean", "sum"):
        out, g = mined(impl, x, labels, mining=mining, loss=loss, reduction=reduction)
        assert torch.isnan(out.loss), (reduction, out.loss)
        assert g.shape == x.shape
    out, _ = mined(impl, x, labels, mining=mining, loss=loss, reduction="none")
    # anchors 0 and 1: the NaN row wins the farthest-positive comparison
    assert out.pos[0] == 2 and out.pos[1] == 2
    assert torch.isnan(out.loss[:3]).all() and torch.isnan(out.r[:3]).all()
    # anchors 3..5: the NaN row wins the nearest-negative comparison
    assert out.neg[3:].tolist() == [2, 2, 2]
    assert torch.isnan(out.loss[3:]).all()


def test_nan_wins_with_smallest_index_among_nans(impl):
    x = T([[0.0], [1.0], [float("nan")], [float("nan")], [5.0], [6.0]])
    out, _ = mined(impl, x, L([0, 0, 0, 0, 1, 1]), grad=False, reduction="none")
    assert out.pos[0] == 2 and out.pos[1] == 2
    assert out.neg[4] == 2


# --------------------------------------------------------------------------- degenerate batches
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(impl, reduction):
    x = torch.zeros(0, 5)
    out, g = mined(impl, x, torch.zeros(0, dtype=torch.int64), reduction=reduction)
    assert out.loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.loss.item() == 0.0
    for t in (out.pos, out.neg, out.r, out.valid):
        assert t.shape == (0,)
    assert g.shape == (0, 5)


@pytest.mark.parametrize("dtype", dtype_params())
def test_single_row_batch(impl, dtype):
    out, g = mined(impl, torch.ones(1, 3, dtype=dtype), L([4]))
    assert out.loss.item() == 0.0
    assert out.valid.tolist() == [False] and out.pos.tolist() == [-1] and out.neg.tolist() == [-1]
    assert out.r.tolist() == [0.0]
    assert g.dtype == dtype and bool((g == 0).all())


@pytest.mark.parametrize("labels", [[3, 3, 3, 3, 3], [0, 1, 2, 3, 4]], ids=["one-class", "singletons"])
@pytest.mark.parametrize("loss", ["exp", "hinge"])
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_no_valid_anchor(impl, labels, loss, mining):
    """One class (no negatives) or all singletons (no positives): mean 0, zero gradient."""
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    for reduction in ("mean", "sum", "none"):
        out, g = mined(impl, x, L(labels), loss=loss, mining=mining, reduction=reduction)
        assert bool((out.loss == 0).all()), out.loss
        assert not out.valid.any()
        assert out.pos.tolist() == [-1] * 5 and out.neg.tolist() == [-1] * 5
        assert bool((out.r == 0).all())
        assert bool((g == 0).all()) and bool(torch.isfinite(g).all())


def test_mean_counts_only_valid_anchors(impl):
    # anchors 0, 1 valid (class 0 pair vs class 1), anchor 2 alone in class 1 has
    # negatives but no positive -> invalid; mean divides by 2
    x = T([[0, 0], [1, 0], [0, 3]])
    mean, _ = mined(impl, x, L([0, 0, 1]), grad=False)
    total, _ = mined(impl, x, L([0, 0, 1]), grad=False, reduction="sum")
    torch.testing.assert_close(mean.loss, total.loss / 2, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- layouts, dtypes
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("mem", ["transposed", "strided"])
def test_non_contiguous_inputs_give_the_contiguous_result(impl, dtype, mem):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=g).to(dtype)
    labels = torch.randint(0, 4, (80,), generator=g)
    ref_out, ref_g = mined(impl, x, labels[::2].contiguous(), reduction="none", gamma=-0.5)
    xs = layout(x.to(impl.device), mem)
    assert not xs.is_contiguous()
    out, gr = mined(impl, xs, labels[::2], reduction="none", gamma=-0.5)  # strided labels too
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b)
    assert torch.equal(gr, ref_g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_equals_promoted_input(dtype):
    """The reference computes in float32 for half inputs: same values as float32 input."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 7, generator=g).to(dtype)
    labels = torch.randint(0, 3, (30,), generator=g)
    a = dnnrl_ext.triplet_loss(x, labels, reduction="none", return_details=True, backend="reference")
    b = dnnrl_ext.triplet_loss(x.float(), labels, reduction="none", return_details=True,
                               backend="reference")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", dtype_params())
def test_output_dtypes(impl, dtype):
    x = torch.randn(8, 3).to(dtype)
    out, g = mined(impl, x, L([0, 1] * 4))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == acc and out.r.dtype == acc
    assert g.dtype == dtype


@pytest.mark.parametrize("label_dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes_give_the_same_result(impl, label_dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 5, dtype=F64, generator=g)
    labels = torch.randint(0, 5, (24,), generator=g)
    want, _ = mined(impl, x, labels, grad=False, reduction="none")
    got, _ = mined(impl, x, labels.to(label_dtype), grad=False, reduction="none")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_negative_label_values_are_just_labels(impl):
    x = T([[0, 0], [1, 0], [0, 3], [0, 4]])
    a, _ = mined(impl, x, L([-7, -7, 2, 2]), grad=False, reduction="none")
    b, _ = mined(impl, x, L([0, 0, 1, 1]), grad=False, reduction="none")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------- explicit triplets
def from_triplets(impl, x, a, p, n, **kw):
    leaf = x.to(impl.device).detach().clone().requires_grad_(True)
    loss, r = dnnrl_ext.triplet_loss_from_triplets(
        leaf, L(a).to(impl.device), L(p).to(impl.device), L(n).to(impl.device),
        return_r=True, backend=impl.backend, **kw)
    loss.sum().backward()
    return loss.detach().cpu(), r.cpu(), leaf.grad.cpu()


def test_triplets_by_hand_with_repeats(impl):
    x = T([[0.0], [1.0], [3.0]])
    alpha = 0.2
    # (0,1,2): r = 9 - 1 = 8; (0,0,1): r = 1 - 0 = 1; repeated (0,1,2)
    loss, r, g = from_triplets(impl, x, [0, 0, 0], [1, 0, 1], [2, 1, 2], alpha=alpha, reduction="none")
    assert r.tolist() == [8.0, 1.0, 8.0]
    torch.testing.assert_close(loss, torch.tensor([math.exp(-1.6), math.exp(-0.2), math.exp(-1.6)],
                                                  dtype=F64), atol=1e-12, rtol=0)
    expect = torch.zeros(3, 1, dtype=F64)
    for (a, p, n), l_ in zip(((0, 1, 2), (0, 0, 1), (0, 1, 2)),
                             (math.exp(-1.6), math.exp(-0.2), math.exp(-1.6))):
        c = -alpha * l_
        expect[a] += 2 * c * (x[p] - x[n])
        expect[p] += 2 * c * (x[a] - x[p])
        expect[n] += 2 * c * (x[n] - x[a])
    torch.testing.assert_close(g, expect, atol=1e-12, rtol=0)


def test_triplets_mean_counts_every_triplet(impl):
    x = T([[0.0], [1.0], [3.0]])
    a, p, n = [0, 1, 2, 2], [1, 0, 2, 1], [2, 2, 0, 0]
    none, _, _ = from_triplets(impl, x, a, p, n, reduction="none", gamma=-1.0)
    mean, _, _ = from_triplets(impl, x, a, p, n, reduction="mean", gamma=-1.0)
    total, _, _ = from_triplets(impl, x, a, p, n, reduction="sum", gamma=-1.0)
    torch.testing.assert_close(mean, none.sum() / 4, atol=1e-12, rtol=0)
    torch.testing.assert_close(total, none.sum(), atol=1e-12, rtol=0)


def test_triplets_empty(impl):
    x = T([[0.0], [1.0]])
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss, r, g = from_triplets(impl, x, [], [], [], reduction=reduction)
        assert loss.shape == shape and r.shape == (0,)
        assert bool((loss == 0).all()) and bool((g == 0).all())


def test_triplets_with_non_contiguous_indices(impl):
    x = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    idx = torch.randint(0, 10, (3, 40), generator=torch.Generator().manual_seed(7))
    dev = impl.device
    want = dnnrl_ext.triplet_loss_from_triplets(x.to(dev), *[i.to(dev).contiguous() for i in idx],
                                                reduction="none", backend=impl.backend)
    got = dnnrl_ext.triplet_loss_from_triplets(layout(x.to(dev), "strided"),
                                               *[i.to(dev)[::2] for i in idx.repeat_interleave(2, 1)],
                                               reduction="none", backend=impl.backend)
    assert torch.equal(got, want)


def test_triplets_nan_gives_nan(impl):
    x = T([[0.0], [float("nan")], [3.0]])
    loss, r, g = from_triplets(impl, x, [0, 2], [1, 0], [2, 0], reduction="mean")
    assert torch.isnan(loss)
