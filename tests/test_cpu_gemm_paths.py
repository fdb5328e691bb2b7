"""The CPU kernels' two tile GEMMs (csrc/cpu/tile_product.h): oneDNN for float32 tiles
of at least 2^21 multiply-adds on a non-Intel CPU (or with DNNRL_CPU_TILE_GEMM=onednn),
at::mm otherwise or with torch.backends.mkldnn off.

The property tests mostly draw shapes below that size, so these cases are large enough
for the oneDNN path and run every op both ways against the reference. A last check
shows that the two paths really differ (in the last bits of the distances), so the
comparison cannot pass by running one path twice.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings, strategies as st

import dnnrl_ext
from ops_testutil import (eps, r_atol, require_compiled, row_scale, run_triplet,
                          tie_free_anchors)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN: every tile goes to at::mm")

PATHS = ["onednn", "at_mm"]


@contextlib.contextmanager
def _paths(path):
    """oneDNN tiles forced on any CPU, or every tile through at::mm (the user's mkldnn switch)."""
    old = os.environ.get("DNNRL_CPU_TILE_GEMM")
    os.environ["DNNRL_CPU_TILE_GEMM"] = "onednn" if path == "onednn" else "auto"
    try:
        with torch.backends.mkldnn.flags(enabled=(path == "onednn")):
            yield
    finally:
        if old is None:
            os.environ.pop("DNNRL_CPU_TILE_GEMM", None)
        else:
            os.environ["DNNRL_CPU_TILE_GEMM"] = old


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        return None


def _knn_data(seed=0, Q=400, N=1500, D=512, C=7):
    # D = 512: at small D both libraries happen to sum in the same order
    g = torch.Generator().manual_seed(seed)
    # unit rows, like embeddings: the tie-free tolerance scales with the largest norm
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)  # noqa: E731
    return unit(Q), unit(N), torch.randint(0, C, (N,), generator=g)


def _tie_free_rows(q, g, k):
    """Queries whose k+1 nearest are separated by more than the summation-order error."""
    rel = eps(torch.float32) * (64 * q.shape[1] ** 0.5 + 64)
    q64, g64 = q.double(), g.double()  # float64 GEMM: error far below the gap asked for
    d = (q64 * q64).sum(1)[:, None] - 2 * q64 @ g64.T + (g64 * g64).sum(1)[None, :]
    d = np.sort(d.numpy(), axis=1)[:, :k + 1]
    return (np.diff(d, axis=1) > rel * row_scale(torch.cat([q, g]))).all(1)


@pytest.mark.parametrize("path", PATHS)
def test_knn_and_vote_match_reference_on_both_gemm_paths(path):
    require_compiled("cpu")
    q, g, labels = _knn_data()
    k = 5
    want_d, want_i = dnnrl_ext.knn(q, g, k, backend="reference")
    want_p = dnnrl_ext.knn_vote(q, g, labels, k, 7, backend="reference")
    with _paths(path):
        d, i = dnnrl_ext.knn(q, g, k, backend="compiled")
        p = dnnrl_ext.knn_vote(q, g, labels, k, 7, backend="compiled")
    rows = _tie_free_rows(q, g, k)
    assert rows.sum() >= len(rows) // 2  # the index comparison covers most queries
    assert torch.equal(i[rows], want_i[rows])
    atol = eps(torch.float32) * (4 * q.shape[1] ** 0.5 + 16) * row_scale(torch.cat([q, g]))
    torch.testing.assert_close(d, want_d, atol=atol, rtol=0)
    assert torch.equal(p[rows], want_p[rows])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "easy_positive"])
def test_loss_matches_reference_on_both_gemm_paths(path, mining):
    require_compiled("cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(300, 512, generator=gen), dim=1)
    labels = torch.randint(0, 7, (300,), generator=gen)
    kw = dict(mining=mining, loss="exp", alpha=0.5, gamma=0.0, margin=0.2, reduction="sum")
    want, _ = run_triplet("reference", x, labels, **kw)
    with _paths(path):
        got, got_grad = run_triplet("compiled", x, labels, **kw)
    ok = torch.as_tensor(tie_free_anchors(x, labels, mining, 0.0, "exp", 0.2))
    assert ok.sum() >= len(ok) // 2
    assert torch.equal(got.pos[ok], want.pos[ok]) and torch.equal(got.neg[ok], want.neg[ok])
    torch.testing.assert_close(got.r, want.r, atol=r_atol(x), rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=300 * 0.5 * r_atol(x) + 1e-4, rtol=1e-5)
    # Gradient: the reference on the triplets the kernel mined (ties cannot interfere).
    a = got.valid.nonzero().flatten()
    xr = x.clone().requires_grad_(True)
    dnnrl_ext.triplet_loss_from_triplets(xr, a, got.pos[a], got.neg[a], loss="exp", alpha=0.5,
                                         gamma=0.0, reduction="sum", backend="reference").backward()
    torch.testing.assert_close(got_grad, xr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B, dtype", [(300, torch.float32), (3000, torch.float32), (2100, torch.float64)])
def test_semi_hard_with_and_without_the_kept_tiles(B, dtype):
    """Semi-hard mining keeps its first pass's tile products for the second pass up to
    16 MiB of tiles (csrc/cpu/triplet_loss_cpu.cpp, kTileCacheBytes); beyond that (float32
    B = 3000, float64 B = 2100) it computes them again. Both agree with the reference, and
    the kept tiles give the second pass the very values the first pass mined with."""
    require_compiled("cpu")
    gen = torch.Generator().manual_seed(B)
    x = torch.nn.functional.normalize(torch.randn(B, 16, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, 7, (B,), generator=gen)
    kw = dict(mining="semi_hard", loss="exp", alpha=0.5, gamma=0.1, margin=0.2, reduction="sum")
    want, _ = run_triplet("reference", x, labels, **kw)
    got, _ = run_triplet("compiled", x, labels, **kw)
    ok = torch.as_tensor(tie_free_anchors(x, labels, "semi_hard", 0.1, "exp", 0.2))
    assert ok.sum() >= len(ok) // 2
    assert torch.equal(got.pos[ok], want.pos[ok]) and torch.equal(got.neg[ok], want.neg[ok])
    torch.testing.assert_close(got.r, want.r, atol=r_atol(x), rtol=0)


def test_the_two_gemm_paths_are_both_taken():
    """oneDNN and MKL sum in different orders: some distance differs in the last bits.
    (Were one path silently used for both, the tests above would compare it twice.)"""
    require_compiled("cpu")
    q, g, _ = _knn_data(seed=2)
    with _paths("onednn"):
        d1, _ = dnnrl_ext.knn(q, g, 10, backend="compiled")
    with _paths("at_mm"):
        d2, _ = dnnrl_ext.knn(q, g, 10, backend="compiled")
    assert not torch.equal(d1, d2)


def test_the_default_tile_gemm_follows_the_cpu_vendor(monkeypatch):
    """Default ("auto"): at::mm on an Intel CPU (MKL takes its AVX-512 code there and costs
    less per tile), oneDNN elsewhere; DNNRL_CPU_TILE_GEMM overrides it, the user's mkldnn
    switch turns oneDNN off, a bad value is an error naming the variable, and the default
    computes what the path it names computes, bit for bit."""
    require_compiled("cpu")
    from dnnrl_ext._extension import cpu_tile_gemm
    vendor = _cpu_vendor()
    if vendor is None:
        pytest.skip("no /proc/cpuinfo vendor_id to check the default against")
    monkeypatch.delenv("DNNRL_CPU_TILE_GEMM", raising=False)
    want = "mm" if vendor == "GenuineIntel" else "onednn"
    assert cpu_tile_gemm() == want
    q, g, _ = _knn_data(seed=4)
    d_default, _ = dnnrl_ext.knn(q, g, 10, backend="compiled")
    for setting in ("onednn", "mm", "auto"):
        monkeypatch.setenv("DNNRL_CPU_TILE_GEMM", setting)
        assert cpu_tile_gemm() == (want if setting == "auto" else setting)
        with torch.backends.mkldnn.flags(enabled=False):
            assert cpu_tile_gemm() == "mm"
    monkeypatch.setenv("DNNRL_CPU_TILE_GEMM", want)
    d_named, _ = dnnrl_ext.knn(q, g, 10, backend="compiled")
    assert torch.equal(d_default, d_named)
    monkeypatch.setenv("DNNRL_CPU_TILE_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="DNNRL_CPU_TILE_GEMM must be auto, onednn or mm"):
        dnnrl_ext.knn(q, g, 10, backend="compiled")


@pytest.mark.parametrize("path", PATHS)
def test_nan_and_inf_rank_like_the_reference_on_both_gemm_paths(path):
    """NaN / inf rows through the big-tile path: NaN distances rank last, ties by index."""
    require_compiled("cpu")
    q, g, labels = _knn_data(seed=3, Q=300)
    g[7, 3] = float("nan")
    g[900, 0] = float("inf")
    q[5, 10] = float("nan")
    with _paths(path):
        d, i = dnnrl_ext.knn(q, g, 10, backend="compiled")
        p = dnnrl_ext.knn_vote(q, g, labels, 10, 7, backend="compiled")
    want_d, want_i = dnnrl_ext.knn(q, g, 10, backend="reference")
    assert torch.equal(d.isnan(), want_d.isnan())
    assert torch.equal(i[5], torch.arange(10))  # an all-NaN row: the first ten by index
    rows = torch.as_tensor(_tie_free_rows(q, g, 10))
    rows[5] = False
    assert torch.equal(i[rows], want_i[rows])
    assert torch.equal(p[rows], dnnrl_ext.knn_vote(q, g, labels, 10, 7, backend="reference")[rows])


@settings(max_examples=12, deadline=None)
@given(Q=st.integers(40, 700), N=st.integers(1025, 2600), D=st.integers(48, 700), k=st.integers(1, 20),
       seed=st.integers(0, 2 ** 31), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       path=st.sampled_from(PATHS))
def test_knn_on_random_big_shapes_matches_reference(Q, N, D, k, seed, dtype, path):
    """Random shapes above the oneDNN threshold (tail tiles of every size, low-precision
    inputs converted to float32 first), through either GEMM, against the reference."""
    require_compiled("cpu")
    q, g, labels = _knn_data(seed=seed, Q=Q, N=N, D=D)
    q, g = q.to(dtype), g.to(dtype)
    with _paths(path):
        d, i = dnnrl_ext.knn(q, g, k, backend="compiled")
    want_d, want_i = dnnrl_ext.knn(q, g, k, backend="reference")
    rows = _tie_free_rows(q.float(), g.float(), k)
    note("Q=%d N=%d D=%d k=%d %s: %d tie-free rows" % (Q, N, D, k, dtype, rows.sum()))
    assert torch.equal(i[rows], want_i[rows])
    atol = eps(torch.float32) * (4 * D ** 0.5 + 16) * row_scale(torch.cat([q.float(), g.float()]))
    torch.testing.assert_close(d, want_d, atol=atol, rtol=0)
