"""Helpers shared by the dnnrl_ext op tests: devices, input strategies, tolerances,
the tie-free check and an independent loop-based mining oracle.

Two kinds of random inputs are used:

* *grid* embeddings: small integers times a power of two. Every squared distance,
  sum and difference of them is then exact in float32 (and in float64), whatever the
  summation order or the ``|a|^2 + |b|^2 - 2 a.b`` expansion, so the mined indices
  must match the reference exactly *including ties* (which are frequent), and r
  must match bit for bit.
* *continuous* embeddings (clustered Gaussians): rounding differs between
  implementations, so indices are compared only on inputs that :func:`tie_free_anchors`
  accepts (chosen distance separated from the runner-up by a margin well above the
  rounding of the accumulation dtype).
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import dnnrl_ext
from dnnrl_ext import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]
MININGS = ["batch_hard", "semi_hard", "easy_positive"]


def device_params():
    """pytest params for the devices, cuda marked."""
    return [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [], id=d) for d in DEVICES]


def dtype_params():
    return [pytest.param(t, id=str(t).replace("torch.", "")) for t in DTYPES]


def _must_run() -> bool:
    flag = os.environ.get("DNNRL_REQUIRE_EXTENSION", os.environ.get("CI", ""))
    return flag.lower() not in ("", "0", "false", "no")


def require_compiled(device: str) -> None:
    """Skip (or fail where DNNRL_REQUIRE_EXTENSION/CI is set) unless the compiled kernels
    can run on ``device``."""
    why = None
    if not dnnrl_ext.extension_available():
        why = ("dnnrl_ext._C is not built (%s); build it with "
               "`python3 setup.py build_ext --inplace`" % dnnrl_ext._extension._LOAD_ERROR)
    elif device == "cuda" and not dnnrl_ext.has_cuda_kernels():
        why = "dnnrl_ext._C was built without CUDA kernels (FORCE_CPU=1 or no nvcc)"
    if why is None:
        return
    if _must_run():
        pytest.fail(why + " -- DNNRL_REQUIRE_EXTENSION/CI is set, so compiled tests must run")
    pytest.skip(why)


# --------------------------------------------------------------------------- dtypes, tolerances
def acc_dtype(dtype):
    return ref.accumulation_dtype(dtype)


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def row_scale(x: torch.Tensor) -> float:
    """An upper bound of every squared distance between rows of x (float64)."""
    if x.numel() == 0:
        return 1.0
    n = (x.double() ** 2).sum(1)
    return float(4 * n.max()) + 1e-30


def r_atol(x: torch.Tensor) -> float:
    """Absolute tolerance of a squared distance / r computed in another summation order."""
    D = x.shape[1] if x.dim() == 2 else 1
    return eps(acc_dtype(x.dtype)) * (4 * math.sqrt(max(D, 1)) + 16) * row_scale(x)


def loss_tols(x, alpha, loss_type, reduction, n_terms):
    """(atol, rtol) for a loss value (or vector) in the accumulation dtype."""
    e = eps(acc_dtype(x.dtype))
    slope = abs(alpha) if loss_type == "exp" else 1.0
    per = slope * r_atol(x) + 8 * e
    n = max(n_terms, 1)
    atol = per * (n if reduction == "sum" else 1)
    return atol, 8 * e * (n if reduction != "none" else 1)


def assert_grad_close(got, want, x, alpha, loss_type, upstream_max, msg=""):
    """Gradient of the kernel (x.dtype) vs the reference gradient (float32/64)."""
    assert got.dtype == x.dtype, "gradient dtype %s != input dtype %s" % (got.dtype, x.dtype)
    assert got.shape == x.shape
    got = got.double().cpu()
    want = want.double().cpu()
    e_acc = eps(acc_dtype(x.dtype))
    slope = abs(alpha) if loss_type == "exp" else 1.0
    diff = float((x.double().max() - x.double().min()).abs()) if x.numel() else 0.0
    gscale = max(float(want.abs().max()) if want.numel() else 0.0,
                 upstream_max * max(slope, 1e-3) * 2 * diff) + 1e-30
    atol = gscale * (2 * slope * r_atol(x) + 64 * e_acc)
    rtol = 64 * e_acc
    if x.dtype in (torch.float16, torch.bfloat16):
        # the reference gradient is float32 rounded once to x.dtype
        rtol += eps(x.dtype)
        atol += 0.5 * eps(x.dtype) * gscale
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=(lambda m: m + "\n" + msg) if msg else None)


# --------------------------------------------------------------------------- input strategies
def make_labels(rng: np.random.Generator, B: int, kind: str, n_classes: int, dtype=torch.int64):
    """Labels of one of the kinds used by the strategies.

    kind: "random" (n_classes classes), "single" (one class), "singletons" (all
    distinct), "mixed" (a few classes plus some singletons).
    """
    hi = 255 if dtype == torch.uint8 else 10_000
    if kind == "single":
        lab = np.full(B, rng.integers(0, min(hi, 50)))
    elif kind == "singletons":
        lab = rng.permutation(min(hi, max(B, 1)) if B <= hi else B)[:B]
    elif kind == "mixed":
        lab = rng.integers(0, n_classes, B)
        single = rng.random(B) < 0.3
        lab = np.where(single, n_classes + np.arange(B), lab)
    else:
        lab = rng.integers(0, n_classes, B)
        # arbitrary label values: labels are compared for equality only
        values = rng.choice(np.arange(min(hi, 200)), size=n_classes, replace=False)
        lab = values[lab]
    lab = np.asarray(lab) % (hi + 1)
    return torch.as_tensor(lab, dtype=torch.int64).to(dtype)


def grid_embeddings(rng: np.random.Generator, B: int, D: int, dtype, spread: int, shift: int,
                    dup: bool) -> torch.Tensor:
    """Integers in [-spread, spread] times 2**-shift (exact in every dtype and sum)."""
    x = rng.integers(-spread, spread + 1, (B, D)).astype(np.float64)
    if dup and B >= 2:
        # repeated rows give exactly equal distances: ties for the tie rules
        src = rng.integers(0, B, B // 3 + 1)
        dst = rng.integers(0, B, B // 3 + 1)
        x[dst] = x[src]
    return torch.as_tensor(x * 2.0 ** -shift, dtype=dtype)


def grid_shift(D: int, spread: int, alpha: float) -> int:
    """Smallest shift keeping alpha * (largest distance) below 40 (the reference's exp
    of the untaken branch overflows to inf beyond ~88) and distances exact."""
    big = 4 * spread * spread * max(D, 1) * max(alpha, 1e-3)
    shift = 0
    while big * 4.0 ** -shift > 40:
        shift += 1
    return shift


def continuous_embeddings(rng: np.random.Generator, labels: torch.Tensor, D: int, dtype,
                          scale: float, sep: float) -> torch.Tensor:
    B = labels.shape[0]
    lab = labels.long().numpy()
    uniq, inv = np.unique(lab, return_inverse=True) if B else (np.zeros(0), np.zeros(0, int))
    centres = rng.normal(size=(len(uniq), D)) * sep
    x = centres[inv] + rng.normal(size=(B, D)) if B else np.zeros((0, D))
    return torch.as_tensor(x * scale / math.sqrt(D), dtype=dtype)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, other memory layout: "contig", "transposed" (column-major) or
    "strided" (every other column of a wider tensor)."""
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros((x.shape[0], 2 * x.shape[1]), dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        wide[:, 1::2] = 7.0  # garbage that must not leak into the result
        return wide[:, ::2]
    return x


@st.composite
def triplet_case(draw, grid: bool, max_b: int = 300, max_d: int = 600):
    """One random mined-loss case: a dict of tensors and parameters."""
    dtype = draw(st.sampled_from(DTYPES))
    # B = 0 has its own hand-written test (the property tests need a non-empty batch
    # for their tolerances)
    B = draw(st.integers(1, 12) | st.integers(12, max_b))
    D = draw(st.integers(1, 8) | st.integers(8, max_d))
    kind = draw(st.sampled_from(["random", "random", "random", "single", "singletons", "mixed"]))
    n_classes = draw(st.integers(1, 10))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    mining = draw(st.sampled_from(MININGS))
    loss = draw(st.sampled_from(["exp", "hinge"]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    alpha = draw(st.sampled_from([1e-3, 0.2, 1.0, 3.5]) | st.floats(0.01, 5.0))  # > 0: the wrappers refuse 0
    mem = draw(st.sampled_from(["contig", "contig", "transposed", "strided"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    labels = make_labels(rng, B, kind, n_classes, label_dtype)
    if grid:
        spread = draw(st.sampled_from([1, 2, 3]))
        shift = grid_shift(D, spread, alpha)
        x = grid_embeddings(rng, B, D, dtype, spread, shift, dup=draw(st.booleans()))
        step = 2.0 ** -(2 * shift)  # distances are multiples of step
        # gamma on the distance grid (r == gamma happens: the kink is tested exactly);
        # margin half a step off it (the hinge kink is a subgradient choice)
        gamma = step * draw(st.integers(-6, 6))
        margin = step * (draw(st.integers(-2, 12)) + 0.5)
    else:
        scale = draw(st.sampled_from([0.5, 1.0, 3.0]))
        x = continuous_embeddings(rng, labels, D, dtype, scale, sep=draw(st.sampled_from([0.0, 1.0, 3.0])))
        typical = 2 * scale * scale
        gamma = typical * draw(st.sampled_from([-1.0, -0.1, 0.0, 0.05, 0.5]))
        margin = typical * draw(st.sampled_from([0.0, 0.1, 1.0]))
        if alpha * row_scale(x) > 40:
            alpha = 40 / row_scale(x)
    return dict(x=x, labels=labels, mining=mining, loss=loss, reduction=reduction,
                alpha=alpha, gamma=gamma, margin=margin, mem=mem, seed=seed)


# --------------------------------------------------------------------------- tie-free check
def pairwise64(x: torch.Tensor) -> np.ndarray:
    """Exact-ish squared distances in float64 by explicit differences."""
    a = x.detach().double().cpu().numpy()
    return ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)


def _gap_ok(values: np.ndarray, pick_largest: bool, tol: float) -> bool:
    if values.size < 2:
        return True
    v = np.sort(values)
    first, second = (v[-1], v[-2]) if pick_largest else (v[0], v[1])
    return abs(first - second) > tol


def tie_free_anchors(x: torch.Tensor, labels: torch.Tensor, mining: str, gamma: float,
                     loss: str, margin: float, rel: float = None) -> np.ndarray:
    """Per anchor, True when every decision of the miner and of the loss is separated
    from its alternative by more than ``rel * scale`` (scale bounds the distances):
    farthest vs second-farthest positive (easy_positive: nearest vs second-nearest),
    nearest vs second-nearest (qualifying)
    negative, every negative vs the semi-hard threshold, and r vs the kink (gamma for
    exp, margin for hinge). Invalid anchors are always tie-free.
    """
    B = x.shape[0]
    if B == 0:
        return np.zeros(0, bool)
    acc = acc_dtype(x.dtype)
    scale = row_scale(x)
    if rel is None:
        D = x.shape[1]
        rel = eps(acc) * (64 * math.sqrt(D) + 64)
    tol = rel * scale
    d = pairwise64(x)
    lab = labels.long().cpu().numpy()
    ok = np.ones(B, bool)
    for i in range(B):
        same = lab == lab[i]
        pos_mask = same.copy()
        pos_mask[i] = False
        neg_mask = ~same
        if not pos_mask.any() or not neg_mask.any():
            continue
        dp = d[i][pos_mask]
        dn = d[i][neg_mask]
        easy = mining == "easy_positive"  # the nearest positive, not the farthest
        good = _gap_ok(dp, not easy, tol)
        d_ap = dp.min() if easy else dp.max()
        if mining == "semi_hard":
            thr = d_ap + gamma
            good &= bool(np.all(np.abs(dn - thr) > tol))
            beyond = dn[dn > thr]
            chosen = beyond if beyond.size else dn
            good &= _gap_ok(chosen, False, tol)
            d_an = chosen.min()
        else:
            good &= _gap_ok(dn, False, tol)
            d_an = dn.min()
        r = d_an - d_ap
        kink = gamma if loss == "exp" else margin
        good &= abs(r - kink) > 2 * tol
        ok[i] = good
    return ok


# --------------------------------------------------------------------------- loop oracle
def naive_mine(x: torch.Tensor, labels: torch.Tensor, mining: str, gamma: float):
    """Loop-based mining straight from SPEC section 2 (float64 distances; exact on grid
    inputs). Returns pos, neg (int lists, -1 when invalid), valid (bool list)."""
    d = pairwise64(x)
    lab = labels.long().tolist()
    B = len(lab)
    pos, neg, valid = [], [], []
    for i in range(B):
        p = -1
        for j in range(B):
            if j != i and lab[j] == lab[i]:
                # strict comparisons keep the smallest index on ties
                if p < 0 or (d[i, j] < d[i, p] if mining == "easy_positive" else d[i, j] > d[i, p]):
                    p = j
        n = -1
        for j in range(B):
            if lab[j] != lab[i] and (n < 0 or d[i, j] < d[i, n]):
                n = j
        if mining == "semi_hard" and p >= 0:
            s = -1
            for j in range(B):
                if lab[j] != lab[i] and d[i, j] > d[i, p] + gamma and (s < 0 or d[i, j] < d[i, s]):
                    s = j
            if s >= 0:
                n = s
        ok = p >= 0 and n >= 0
        pos.append(p if ok else -1)
        neg.append(n if ok else -1)
        valid.append(ok)
    return pos, neg, valid


# --------------------------------------------------------------------------- running the ops
def run_triplet(backend: str, x: torch.Tensor, labels: torch.Tensor, upstream=None, **kw):
    """Run the mined loss with return_details and backprop ``upstream`` (or a fixed
    pseudo-random weighting). Returns (TripletLossOutput detached, grad)."""
    leaf = x.detach().clone().requires_grad_(True) if not x.requires_grad else x
    out = dnnrl_ext.triplet_loss(leaf, labels, return_details=True, backend=backend, **kw)
    if upstream is None:
        upstream = torch.ones_like(out.loss)
    out.loss.backward(upstream.to(out.loss.device, out.loss.dtype))
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return type(out)(*(t.detach() for t in out)), grad


def upstream_for(reduction: str, B: int, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed % (2 ** 31))
    if reduction == "none":
        return torch.rand(B, generator=g, dtype=torch.float64).to(dtype) * 2 - 0.5
    return (torch.rand((), generator=g, dtype=torch.float64) * 2 + 0.25).to(dtype)


# --------------------------------------------------------------------------- knn helpers
def cross64(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """(Q, N) float64 squared distances by explicit differences."""
    a = q.detach().double().cpu().numpy()
    b = g.detach().double().cpu().numpy()
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def knn_tie_free(q: torch.Tensor, g: torch.Tensor, k: int, rel: float = None) -> bool:
    """True when, for every query, the k+1 smallest distances are pairwise separated by
    more than ``rel * scale``, so the k nearest and their order are unambiguous."""
    if q.shape[0] == 0:
        return True
    acc = acc_dtype(q.dtype)
    if rel is None:
        rel = eps(acc) * (64 * math.sqrt(q.shape[1]) + 64)
    scale = row_scale(torch.cat([q.double(), g.double()]))
    d = np.sort(cross64(q, g), axis=1)[:, :k + 1]
    if d.shape[1] < 2:
        return True
    return bool((np.diff(d, axis=1) > rel * scale).all())


def spawn_gloo(fn, world: int, *args) -> None:
    """Run ``fn(rank, port, *args)`` in ``world`` spawned processes, which join a gloo
    group at tcp://127.0.0.1:port (a port free when it was picked)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(port,) + args, nprocs=world, join=True)
