"""CUDA knn / knn_vote, float32: the two opt-in fast paths against the exact 3xTF32 path
(DNNRL_KNN_EXACT=1) and the reference (csrc/cuda/knn_cuda.cu):

* candidates (DNNRL_KNN_CANDIDATES=1): a float16 pass, an exact float32 re-rank of 32
  candidates and an error-bound certificate;
* filter (DNNRL_KNN_FILTER=1): a float16 bound pass over a gallery subset, a float16
  filter pass against a proven threshold, an exact float32 re-rank of the rows within
  the error band; more than 512 candidates send a query to the exact pass.

On inputs that take either branch: clear neighbourhoods (answered by the fast path),
neighbourhoods denser than the bound (the candidate path falls back; the filter path
answers them, or falls back when they overflow its slots), duplicates, NaN / inf and
extreme magnitudes (always the exact pass).

Every test runs on a GPU where there is one and in the CPU emulator of the CUDA kernels
(the ``gpu`` fixture, tests/conftest.py), except the one about cuBLAS itself."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings, strategies as st

import dnnrl_ext
from ops_testutil import grid_embeddings, row_scale

K_CAND = 32  # candidates per query in the kernel


def _bound(D: int) -> float:
    """The kernel's c: |approximate dot - float32 dot| <= c ||q|| ||g||."""
    u = 2.0 ** -11
    return 1.25 * (2 * u + u * u + D * 2.0 ** -22 + D * 2.0 ** -23)


FAST_PATHS = ("candidates", "filter")
PATH_VARS = {"candidates": "DNNRL_KNN_CANDIDATES", "filter": "DNNRL_KNN_FILTER"}
# the environment of each path; filter_bk32 / filter_tile64: the filter pass with 32-wide D
# chunks / on the 64x64 tile at any size (A/B timings of bench_gpu.py)
PATH_ENV = {"exact": {"DNNRL_KNN_EXACT": "1"}, "candidates": {"DNNRL_KNN_CANDIDATES": "1"},
            "filter": {"DNNRL_KNN_FILTER": "1"},
            "filter_bk32": {"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_BK": "32"},
            "filter_tile64": {"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_TILE": "64"}}


def _set_path(monkeypatch, path: str) -> None:
    """Environment for one k-NN path: "exact", or an opt-in one (PATH_ENV)."""
    for var in {v for env in PATH_ENV.values() for v in env}:
        monkeypatch.delenv(var, raising=False)
    for var, value in PATH_ENV[path].items():
        monkeypatch.setenv(var, value)


def _run(gpu, q, g, labels, k, C, path: str, monkeypatch):
    """(dist, idx, pred, votes) from the compiled CUDA kernels, on the chosen path."""
    _set_path(monkeypatch, path)
    qd, gd, ld = q.to(gpu.device), g.to(gpu.device), labels.to(gpu.device)
    d, i = dnnrl_ext.knn(qd, gd, k, backend="compiled")
    p, v = dnnrl_ext.knn_vote(qd, gd, ld, k, C, return_votes=True, backend="compiled")
    gpu.sync()
    return d.cpu(), i.cpu(), p.cpu(), v.cpu()


def dist64(q, g) -> np.ndarray:
    """(Q, N) float64 squared distances by the expansion |q|^2 + |g|^2 - 2 q.g: unlike
    ops_testutil.cross64 (explicit differences, exact on grid inputs) no (Q, N, D)
    temporary, 5 GB at the sizes here; float64 leaves ~1e-16 relative error, far below
    the float32 gaps these tests look at."""
    a, b = q.double().numpy(), g.double().numpy()
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _exact_pass_count(gpu, q, g, k, monkeypatch, path: str = "candidates") -> int:
    """Queries the fast path left to the exact pass (its DNNRL_KNN_STATS warning)."""
    _set_path(monkeypatch, path)
    counts = _stats_counts(gpu, q, g, k, monkeypatch)
    assert len(counts) == 1, "the %s path did not run" % path
    return counts[0]


def _stats_counts(gpu, q, g, k, monkeypatch) -> list:
    """The exact-pass counts that one knn call under DNNRL_KNN_STATS=1 warned about."""
    import re
    import warnings
    monkeypatch.setenv("DNNRL_KNN_STATS", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dnnrl_ext.knn(q.to(gpu.device), g.to(gpu.device), k, backend="compiled")
        gpu.sync()
    monkeypatch.delenv("DNNRL_KNN_STATS")
    return [int(m.group(1)) for w in caught
            for m in [re.search(r"(\d+) of \d+ queries took the exact pass", str(w.message))] if m]


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_paths_are_opt_in(gpu, path, monkeypatch):
    """Without its variable every query takes the exact pass (the default); with it, and
    DNNRL_KNN_EXACT=1 beside it, too; with it alone the fast path runs."""
    gen = torch.Generator().manual_seed(3)
    q, g = torch.randn(50, 64, generator=gen), torch.randn(1000, 64, generator=gen)
    for var in ("DNNRL_KNN_EXACT", *PATH_VARS.values()):
        monkeypatch.delenv(var, raising=False)
    assert _stats_counts(gpu, q, g, 5, monkeypatch) == []
    monkeypatch.setenv(PATH_VARS[path], "1")
    monkeypatch.setenv("DNNRL_KNN_EXACT", "1")
    assert _stats_counts(gpu, q, g, 5, monkeypatch) == []
    monkeypatch.delenv("DNNRL_KNN_EXACT")
    assert len(_stats_counts(gpu, q, g, 5, monkeypatch)) == 1


def test_filter_path_takes_precedence_over_the_candidate_path(gpu, monkeypatch):
    """Both variables set: the filter path runs. Told apart by a neighbourhood denser than
    the candidate path's certificate: the candidate path sends that query to the exact
    pass, the filter path answers it."""
    gen = torch.Generator().manual_seed(4)
    q = _unit(torch.randn(10, 64, generator=gen))
    g = torch.cat([_unit(q[:1] + 1e-4 * torch.randn(100, 64, generator=gen)),
                   _unit(torch.randn(2000, 64, generator=gen))])
    assert _exact_pass_count(gpu, q, g, 10, monkeypatch, "candidates") >= 1
    assert _exact_pass_count(gpu, q, g, 10, monkeypatch, "filter") == 0
    monkeypatch.setenv("DNNRL_KNN_CANDIDATES", "1")  # _set_path("filter") left only the filter's on
    assert _stats_counts(gpu, q, g, 10, monkeypatch) == [0]


def _tie_free_rows(q, g, k, rel=None) -> np.ndarray:
    """Rows whose k+1 nearest float64 distances are separated by more than float32
    noise, measured against the row's own magnitudes (4 (||q||^2 + max ||g||^2 over
    those neighbours))."""
    if rel is None:
        rel = torch.finfo(torch.float32).eps * (4 * math.sqrt(q.shape[1]) + 16)
    d = dist64(q, g)
    order = np.argsort(d, axis=1, kind="stable")[:, :k + 1]
    near = np.take_along_axis(d, order, axis=1)
    qn = (q.double() ** 2).sum(1).numpy()
    gn = (g.double() ** 2).sum(1).numpy()
    scale = 4 * (qn + gn[order].max(axis=1)) + 1e-300
    return (np.diff(near, axis=1) > rel * scale[:, None]).all(axis=1) & np.isfinite(near).all(axis=1)


def _approx_dist(q, g) -> np.ndarray:
    """float64 distances from the kernel's float16 copies (rows scaled by 2^(15-E))."""
    def half(x):
        E = torch.frexp(x.double().abs().max(dim=1).values)[1]
        h = (x.double() * torch.pow(2.0, 15 - E.double())[:, None]).half().double()
        return h * torch.pow(2.0, E.double() - 15)[:, None]
    qh, gh = half(q), half(g)
    qn = (q.double() ** 2).sum(1)
    gn = (g.double() ** 2).sum(1)
    return (qn[:, None] + gn[None, :] - 2 * qh @ gh.T).clamp_min(0).numpy()


def _check_against_reference(q, g, labels, k, C, got, rows):
    want_d, want_i = dnnrl_ext.knn(q, g, k, backend="reference")
    want_p, want_v = dnnrl_ext.knn_vote(q, g, labels, k, C, return_votes=True, backend="reference")
    d, i, p, v = got
    r = torch.as_tensor(rows)
    assert r.any(), "no tie-free row to compare"
    assert torch.equal(i[r], want_i[r]), "indices differ from the reference"
    atol = torch.finfo(torch.float32).eps * (4 * q.shape[1] ** 0.5 + 16) * row_scale(torch.cat([q, g]))
    torch.testing.assert_close(d[r], want_d[r], atol=atol, rtol=0)
    assert torch.equal(v[r], want_v[r]) and torch.equal(p[r], want_p[r]), "votes differ from the reference"


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("path", FAST_PATHS + ("filter_bk32",))
@pytest.mark.parametrize("D", [3, 64, 512])
@pytest.mark.parametrize("k", [1, 5, 10, 16, 32])
def test_fast_path_matches_reference_and_exact_path(gpu, path, D, k, monkeypatch):
    if D == 512 or (D == 64 and k not in (1, 10, 32)):
        gpu.skip_slow_emulation("300 x 4000 queries at D = %d" % D)
    if path == "candidates" and k > 16:
        pytest.skip("the candidate path runs for k <= 16")
    gen = torch.Generator().manual_seed(D * 100 + k)
    q = _unit(torch.randn(300, D, generator=gen))
    g = _unit(torch.randn(4000, D, generator=gen))
    labels = torch.randint(0, 7, (4000,), generator=gen)
    fast = _run(gpu, q, g, labels, k, 7, path, monkeypatch)
    exact = _run(gpu, q, g, labels, k, 7, "exact", monkeypatch)
    rows = _tie_free_rows(q, g, k)
    _check_against_reference(q, g, labels, k, 7, fast, rows)
    _check_against_reference(q, g, labels, k, 7, exact, rows)
    if D >= 64 or path != "candidates":  # (nearly) every query answered, so the fast pass counts
        assert _exact_pass_count(gpu, q, g, k, monkeypatch, path) <= 0.05 * q.shape[0]


def test_dense_neighbourhoods_fall_back_to_the_exact_pass(gpu, monkeypatch):
    """Over 32 gallery rows within the error bound of each query: no certificate can
    hold, so every row must come from the exact pass, and still be right."""
    gen = torch.Generator().manual_seed(1)
    D, k = 128, 10
    q = _unit(torch.randn(20, D, generator=gen, dtype=torch.float64))
    shells = []
    for row in q:  # 100 rows at distances 1e-5 * (1..100): all far inside the bound
        v = torch.randn(100, D, generator=gen, dtype=torch.float64)
        v = _unit(v - (v @ row)[:, None] * row)  # orthogonal to the query
        t = torch.sqrt(1e-5 * torch.arange(1, 101, dtype=torch.float64))
        shells.append(_unit(row + t[:, None] * v))
    g = torch.cat(shells + [_unit(torch.randn(3000, D, generator=gen, dtype=torch.float64))])
    q, g = q.float(), g.float()
    labels = torch.randint(0, 5, (g.shape[0],), generator=gen)
    # the premise: the 32nd-nearest approximate distance minus the bound lies below the
    # k-th exact one for every query, so no certificate can hold
    e = 2 * _bound(D) + 2.0 ** -20 * 2
    approx = np.sort(_approx_dist(q, g), axis=1)
    exact_d = np.sort(dist64(q, g), axis=1)
    assert (approx[:, K_CAND - 1] - e < exact_d[:, k - 1] - 1e-6).all()
    assert _exact_pass_count(gpu, q, g, k, monkeypatch) == q.shape[0]
    fast = _run(gpu, q, g, labels, k, 5, "candidates", monkeypatch)
    exact = _run(gpu, q, g, labels, k, 5, "exact", monkeypatch)
    for a, b in zip(fast, exact):
        assert torch.equal(a, b), "the fallback rows must be the exact path's, bit for bit"
    _check_against_reference(q, g, labels, k, 5, fast, _tie_free_rows(q, g, k, rel=1e-7))
    # the filter path has no such limit: all 100 rows are candidates and re-ranked exactly
    assert _exact_pass_count(gpu, q, g, k, monkeypatch, "filter") == 0
    filt = _run(gpu, q, g, labels, k, 5, "filter", monkeypatch)
    _check_against_reference(q, g, labels, k, 5, filt, _tie_free_rows(q, g, k, rel=1e-7))


def _shell(row, n, spread, gen):
    """n unit rows at squared distances spread * (1..n) from the unit row `row`."""
    v = torch.randn(n, row.shape[0], generator=gen, dtype=torch.float64)
    v = _unit(v - (v @ row)[:, None] * row)
    t = torch.sqrt(spread * torch.arange(1, n + 1, dtype=torch.float64))
    return _unit(row + t[:, None] * v)


def test_filter_path_overflow_falls_back_to_the_exact_pass(gpu, monkeypatch):
    """Query 0 has 700 gallery rows within the filter's threshold (more than its 512
    slots): that query, and only it, takes the exact pass, bit for bit. The others have
    150 rows of their own spread out nearby, so their thresholds stay far below the
    distance to query 0's crowd (modelled on the CPU: about 120-250 candidates each)."""
    gen = torch.Generator().manual_seed(6)
    D, k = 64, 10
    q = _unit(torch.randn(30, D, generator=gen, dtype=torch.float64))
    g = torch.cat([_shell(q[0], 700, 1e-7, gen)] + [_shell(row, 150, 2e-3, gen) for row in q[1:]]
                  + [_unit(torch.randn(3000, D, generator=gen, dtype=torch.float64))])
    q, g = q.float(), g.float()
    labels = torch.randint(0, 5, (g.shape[0],), generator=gen)
    assert _exact_pass_count(gpu, q, g, k, monkeypatch, "filter") == 1
    filt = _run(gpu, q, g, labels, k, 5, "filter", monkeypatch)
    exact = _run(gpu, q, g, labels, k, 5, "exact", monkeypatch)
    for a, b in zip(filt, exact):
        assert torch.equal(a[:1], b[:1]), "the overflowing query must be the exact path's, bit for bit"
    _check_against_reference(q, g, labels, k, 5, filt, _tie_free_rows(q, g, k))


@pytest.mark.parametrize("path", ["filter", "filter_bk32", "filter_tile64"])
def test_filter_path_in_query_chunks_with_the_large_tiles(gpu, path, monkeypatch):
    """8,500 queries: two chunks (8,192 queries each at most). In the first, 64 row tiles
    give the bound pass (3 column tiles of its 267-row subset) and the filter pass at least
    132 tiles, so both take the 128 x 128 engine on an H100 / H200 (filter_tile64: the filter
    pass on the 64 x 64 one all the same); the second chunk's 308 queries take the 64 x 64
    engine in both."""
    gpu.skip_slow_emulation("8,500 queries")
    gen = torch.Generator().manual_seed(8)
    q = _unit(torch.randn(8500, 16, generator=gen))
    g = _unit(torch.randn(3200, 16, generator=gen))
    labels = torch.randint(0, 6, (3200,), generator=gen)
    assert _exact_pass_count(gpu, q, g, 10, monkeypatch, path) <= 0.05 * q.shape[0]
    filt = _run(gpu, q, g, labels, 10, 6, path, monkeypatch)
    exact = _run(gpu, q, g, labels, 10, 6, "exact", monkeypatch)
    rows = torch.as_tensor(_tie_free_rows(q, g, 10))
    assert rows[:8192].sum() > 1000 and rows[8192:].sum() > 50, "both chunks need tie-free rows"
    for a, b in zip(filt[1:], exact[1:]):
        assert torch.equal(a[rows], b[rows]), "indices / votes differ from the exact path"
    atol = torch.finfo(torch.float32).eps * (4 * 16 ** 0.5 + 16) * row_scale(torch.cat([q, g]))
    torch.testing.assert_close(filt[0], exact[0], atol=atol, rtol=0)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_duplicates_and_ties_follow_the_index_rule(gpu, path, monkeypatch):
    """Grid values: exact distances in every path, many exact ties (duplicated rows)."""
    rng = np.random.default_rng(2)
    q = grid_embeddings(rng, 200, 24, torch.float32, 2, 0, dup=False)
    g = grid_embeddings(rng, 900, 24, torch.float32, 2, 0, dup=True)
    labels = torch.as_tensor(rng.integers(0, 4, 900))
    for k in (1, 7, 16):
        want_d, want_i = dnnrl_ext.knn(q, g, k, backend="reference")
        want_p, want_v = dnnrl_ext.knn_vote(q, g, labels, k, 4, return_votes=True, backend="reference")
        d, i, p, v = _run(gpu, q, g, labels, k, 4, path, monkeypatch)
        assert torch.equal(i, want_i) and torch.equal(d, want_d), k
        assert torch.equal(p, want_p) and torch.equal(v, want_v), k


@pytest.mark.parametrize("path", FAST_PATHS)
def test_non_finite_rows(gpu, path, monkeypatch):
    """A NaN / inf gallery row stops every certificate; a NaN query row its own. The
    results are then the exact path's (NaN distances last, as on the CPU)."""
    gen = torch.Generator().manual_seed(3)
    q = _unit(torch.randn(50, 32, generator=gen))
    g = _unit(torch.randn(500, 32, generator=gen))
    labels = torch.randint(0, 3, (500,), generator=gen)
    q_nan = q.clone()
    q_nan[5] = float("nan")
    g_bad = g.clone()
    g_bad[7, 3] = float("nan")
    g_bad[400, 0] = float("inf")
    for qq, gg in ((q_nan, g), (q, g_bad), (q_nan, g_bad)):
        fast = _run(gpu, qq, gg, labels, 10, 3, path, monkeypatch)
        exact = _run(gpu, qq, gg, labels, 10, 3, "exact", monkeypatch)
        # the CPU kernel (on a GPU run; in the emulator the CPU kernel is the emulated one) and the reference
        cpu_i = dnnrl_ext.knn(qq, gg, 10, backend="compiled" if gpu.name == "cuda" else "reference")[1]
        rows = torch.as_tensor(_tie_free_rows(qq, gg, 10))
        rows[5] = True  # the NaN query row: all distances NaN, so indices 0..9 in order
        assert rows.sum() > 25
        for a, b in zip(fast[1:], exact[1:]):
            assert torch.equal(a[rows], b[rows])
        torch.testing.assert_close(fast[0][rows], exact[0][rows], equal_nan=True, rtol=0, atol=1e-5)
        assert torch.equal(fast[1][rows], cpu_i[rows]), "CUDA and CPU kernels order NaN rows alike"
        if gg is g_bad:  # no certificate: every row is the exact pass's, bit for bit
            assert _exact_pass_count(gpu, qq, gg, 10, monkeypatch, path) == qq.shape[0]
            for a, b in zip(fast, exact):
                assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
        else:  # only the NaN query row (and perhaps a few unclear ones)
            assert 1 <= _exact_pass_count(gpu, qq, gg, 10, monkeypatch, path) <= 5


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("exp_range", [10, 40, 58])
def test_rows_of_very_different_magnitudes(gpu, path, exp_range, monkeypatch):
    """Row scales 2^-r .. 2^r: the float16 copies are scaled per row; rows beyond 2^+-48
    are never certified (exact pass)."""
    gen = torch.Generator().manual_seed(exp_range)
    s_q = 2.0 ** torch.randint(-exp_range, exp_range + 1, (200, 1), generator=gen).double()
    s_g = 2.0 ** torch.randint(-exp_range, exp_range + 1, (2000, 1), generator=gen).double()
    q = (torch.randn(200, 16, generator=gen, dtype=torch.float64) * s_q).float()
    g = (torch.randn(2000, 16, generator=gen, dtype=torch.float64) * s_g).float()
    labels = torch.randint(0, 4, (2000,), generator=gen)
    fast = _run(gpu, q, g, labels, 8, 4, path, monkeypatch)
    exact = _run(gpu, q, g, labels, 8, 4, "exact", monkeypatch)
    rows = torch.as_tensor(_tie_free_rows(q, g, 8))
    assert rows.float().mean() > 0.25, "too few unambiguous rows for the test to mean anything"
    assert torch.equal(fast[1][rows], exact[1][rows])
    want_i = dnnrl_ext.knn(q.double(), g.double(), 8, backend="reference")[1]
    assert torch.equal(fast[1][rows], want_i[rows])


@settings(max_examples=20, deadline=None)
@given(Q=st.integers(1, 200), N=st.integers(1, 1500), D=st.integers(1, 128), k=st.integers(1, 32),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2 ** 31 - 1),
       path=st.sampled_from(FAST_PATHS))
def test_fast_and_exact_paths_agree(gpu, Q, N, D, k, scale, seed, path):
    # the candidate path runs for k <= 16 and N > 32, the filter path for k <= 32 (k = N
    # and small N included: the subset stride falls to 1); outside, both are the exact pass
    k = min(k, N, 16 if path == "candidates" else 32)
    note("Q=%d N=%d D=%d k=%d scale=%g seed=%d path=%s" % (Q, N, D, k, scale, seed, path))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=gen) * scale
    g = torch.randn(N, D, generator=gen) * scale
    labels = torch.randint(0, 5, (N,), generator=gen)
    with pytest.MonkeyPatch.context() as mp:
        fast = _run(gpu, q, g, labels, k, 5, path, mp)
        exact = _run(gpu, q, g, labels, k, 5, "exact", mp)
    rows = torch.as_tensor(_tie_free_rows(q, g, k))
    assert torch.equal(fast[1][rows], exact[1][rows])
    assert torch.equal(fast[2][rows], exact[2][rows])
    atol = torch.finfo(torch.float32).eps * (4 * D ** 0.5 + 16) * row_scale(torch.cat([q, g]))
    torch.testing.assert_close(fast[0], exact[0], atol=atol, rtol=0)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_tiny_magnitudes_everywhere(gpu, path, monkeypatch):
    """Every row near 2^-45 (norms near 2^-90): the bound must not underflow (it once was
    formed as sqrt(|q|^2 max|g|^2), whose product is below float32's range here)."""
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(200, 32, generator=gen, dtype=torch.float64) * 2.0 ** -45).float()
    g = (torch.randn(3000, 32, generator=gen, dtype=torch.float64) * 2.0 ** -45).float()
    labels = torch.randint(0, 4, (3000,), generator=gen)
    fast = _run(gpu, q, g, labels, 10, 4, path, monkeypatch)
    exact = _run(gpu, q, g, labels, 10, 4, "exact", monkeypatch)
    rows = torch.as_tensor(_tie_free_rows(q, g, 10))
    assert rows.float().mean() > 0.5
    assert torch.equal(fast[1][rows], exact[1][rows])
    want_i = dnnrl_ext.knn(q.double(), g.double(), 10, backend="reference")[1]
    assert torch.equal(fast[1][rows], want_i[rows])


@pytest.mark.parametrize("D", [64, 512, 2048])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuBLAS itself, not our kernels)")
def test_float16_tensor_core_accumulation_stays_within_the_bound(D):
    """The certificate assumes that a float16 tensor-core product with float32
    accumulation errs by at most D 2^-22 ||q|| ||g|| on exactly representable inputs
    (the accumulation part of the kernel's c; the rest covers the float16 rounding of
    the inputs). Measured here through cuBLAS (torch.mm with out_dtype=float32: the same
    tensor cores, other kernels than ours, so a proxy) on inputs built to cancel: large
    partial sums that return to about zero, with small terms added while they are large,
    where a truncating float32 accumulator loses the most. A sanity check, not a proof:
    a sequential truncating float32 emulation stays 15-30x under the bound on these
    inputs, and an accumulator of 19 significand bits or fewer fails it."""
    gen = torch.Generator().manual_seed(D)
    third = D // 3
    rows = []
    for _ in range(64):
        big = torch.randint(512, 1024, (third,), generator=gen).double()
        small = torch.randint(1, 1024, (D - 2 * third,), generator=gen).double() * 2.0 ** -10
        rows.append(torch.cat([big, small, -big]))           # partials rise to ~D 2^8, then cancel
        rows.append(torch.cat([big, -big, small]))
        rows.append(torch.cat([big, small, -big])[torch.randperm(D, generator=gen)])
    g = torch.stack(rows)                                   # exact in float16 (11-bit significands)
    q = torch.ones(4, D, dtype=torch.float64)
    q[1, third:] = 2.0                                      # other weights on the small terms
    q[2] = torch.randint(1, 4, (D,), generator=gen).double()
    q[3, ::2] = -1.0
    a, b = q.half(), g.half()
    assert torch.equal(a.double(), q) and torch.equal(b.double(), g), "inputs must be exact in float16"
    prev = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        got = torch.mm(a.cuda(), b.cuda().t(), out_dtype=torch.float32).double().cpu()
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = prev
    exact = q @ g.t()
    rel = (got - exact).abs() / (q.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    max_rel = rel.max().item()
    assert max_rel <= D * 2.0 ** -22, "accumulation error %.3g > D 2^-22 = %.3g" % (max_rel, D * 2.0 ** -22)
