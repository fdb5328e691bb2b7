"""knn / knn_vote: compiled kernels vs the reference (property tests, grid and
continuous inputs), vs scikit-learn, and hand-built tie / NaN / layout cases."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, note, strategies as st
from sklearn.neighbors import KNeighborsClassifier

import dnnrl_ext
from ops_testutil import (DTYPES, acc_dtype, device_params, dtype_params, grid_embeddings,
                          knn_tie_free, layout, require_compiled, row_scale)


@st.composite
def knn_case(draw, grid: bool):
    dtype = draw(st.sampled_from(DTYPES))
    Q = draw(st.integers(0, 8) | st.integers(8, 200))
    N = draw(st.integers(1, 16) | st.integers(16, 400))
    D = draw(st.integers(1, 8) | st.integers(8, 300))
    k = draw(st.integers(1, min(N, 64)) | st.just(N))
    C = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if grid:
        spread = draw(st.sampled_from([1, 2, 3]))
        q = grid_embeddings(rng, Q, D, dtype, spread, 0, dup=False)
        g = grid_embeddings(rng, N, D, dtype, spread, 0, dup=draw(st.booleans()))
    else:
        s = draw(st.sampled_from([0.1, 1.0, 10.0]))
        q = torch.as_tensor(rng.normal(size=(Q, D)) * s, dtype=dtype)
        g = torch.as_tensor(rng.normal(size=(N, D)) * s, dtype=dtype)
    labels = torch.as_tensor(rng.integers(0, C, N), dtype=torch.int64)
    mem = draw(st.sampled_from(["contig", "transposed", "strided"]))
    return dict(q=q, g=g, k=k, labels=labels, C=C, mem=mem, seed=seed)


def _desc(c):
    return "Q=%d N=%d D=%d k=%d C=%d %s mem=%s seed=%d" % (
        c["q"].shape[0], c["g"].shape[0], c["q"].shape[1], c["k"], c["C"], c["q"].dtype,
        c["mem"], c["seed"])


def _compare_knn(case, device, exact):
    q, g, k = case["q"], case["g"], case["k"]
    acc = acc_dtype(q.dtype)
    want_d, want_i = dnnrl_ext.knn(q, g, k, backend="reference")
    want_p, want_v = dnnrl_ext.knn_vote(q, g, case["labels"], k, case["C"], return_votes=True,
                                        backend="reference")
    for dev in [device] + (["cpu"] if device != "cpu" else []):
        qd, gd = layout(q.to(dev), case["mem"]), layout(g.to(dev), case["mem"])
        d, i = dnnrl_ext.knn(qd, gd, k, backend="compiled")
        tag = dev + " " + _desc(case)
        assert d.dtype == acc and i.dtype == torch.int64, tag
        assert d.shape == (q.shape[0], k) and i.shape == (q.shape[0], k), tag
        assert torch.equal(i.cpu(), want_i), "idx differs; " + tag
        assert bool((d[~d.isnan()] >= 0).all()), "negative distance; " + tag
        if exact:
            assert torch.equal(d.cpu(), want_d), "dist differs; " + tag
        else:
            atol = torch.finfo(acc).eps * (4 * q.shape[1] ** 0.5 + 16) * row_scale(torch.cat([q, g]))
            torch.testing.assert_close(d.cpu(), want_d, atol=atol, rtol=0, msg=lambda m: m + "\n" + tag)
        pred, votes = dnnrl_ext.knn_vote(qd, gd, case["labels"].to(dev), k, case["C"],
                                         return_votes=True, backend="compiled")
        assert pred.dtype == torch.int64 and votes.dtype == torch.int64, tag
        assert votes.shape == (q.shape[0], case["C"]), tag
        assert torch.equal(votes.cpu(), want_v), "votes differ; " + tag
        assert torch.equal(pred.cpu(), want_p), "pred differs; " + tag


@pytest.mark.parametrize("device", device_params())
@given(case=knn_case(grid=True))
def test_knn_grid_inputs_match_reference(device, case):
    """Grid inputs: exact distances, so ties (smaller index first) must match too."""
    require_compiled(device)
    note(_desc(case))
    _compare_knn(case, device, exact=True)


@pytest.mark.parametrize("device", device_params())
@given(case=knn_case(grid=False))
def test_knn_continuous_inputs_match_reference(device, case):
    require_compiled(device)
    assume(knn_tie_free(case["q"], case["g"], case["k"]))
    note(_desc(case))
    _compare_knn(case, device, exact=False)


# --------------------------------------------------------------------------- scikit-learn
def _sk_data(seed, Q=60, N=150, D=5, C=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, D)) * 2
    y = rng.integers(0, C, N)
    g = centres[y] + rng.normal(size=(N, D))
    yq = rng.integers(0, C, Q)
    q = centres[yq] + rng.normal(size=(Q, D))
    return q, g, y


@pytest.mark.parametrize("k", [1, 4, 7, 20])
def test_knn_matches_sklearn_neighbours(impl, k):
    q, g, y = _sk_data(0)
    assert knn_tie_free(torch.as_tensor(q), torch.as_tensor(g), k)
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", weights="uniform").fit(g, y)
    sk_d, sk_i = sk.kneighbors(q)
    d, i = dnnrl_ext.knn(torch.as_tensor(q, device=impl.device), torch.as_tensor(g, device=impl.device),
                         k, backend=impl.backend)
    assert np.array_equal(i.cpu().numpy(), sk_i)
    np.testing.assert_allclose(d.cpu().numpy(), sk_d ** 2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [1, 3, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_vote_matches_sklearn_where_the_vote_has_no_tie(impl, k, dtype):
    q, g, y = _sk_data(1)
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", weights="uniform").fit(g, y)
    sk_pred = sk.predict(q)
    pred, votes = dnnrl_ext.knn_vote(torch.as_tensor(q, dtype=dtype, device=impl.device),
                                     torch.as_tensor(g, dtype=dtype, device=impl.device),
                                     torch.as_tensor(y, device=impl.device), k, 3,
                                     return_votes=True, backend=impl.backend)
    votes = votes.cpu().numpy()
    top2 = np.sort(votes, axis=1)[:, -2:]
    no_tie = top2[:, 1] > top2[:, 0]
    assert no_tie.sum() >= len(q) // 2  # the comparison covers most queries
    assert np.array_equal(pred.cpu().numpy()[no_tie], sk_pred[no_tie])
    assert (votes.sum(1) == k).all()
    np.testing.assert_allclose(votes / k, sk.predict_proba(q), atol=1e-12)


# --------------------------------------------------------------------------- hand-built
def _knn(impl, q, g, k):
    d, i = dnnrl_ext.knn(torch.as_tensor(q, dtype=torch.float64, device=impl.device),
                         torch.as_tensor(g, dtype=torch.float64, device=impl.device), k,
                         backend=impl.backend)
    return d.cpu(), i.cpu()


def test_knn_ties_go_to_the_smaller_index(impl):
    g = [[2.0], [1.0], [-1.0], [1.0], [-2.0], [0.0], [-1.0]]
    d, i = _knn(impl, [[0.0]], g, 7)
    assert i.tolist() == [[5, 1, 2, 3, 6, 0, 4]]
    assert d.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 4.0, 4.0]]


def test_knn_ties_across_a_large_gallery(impl):
    """Equal distances at far-apart gallery indices (different tiles of a kernel)."""
    N = 5000
    g = torch.full((N, 2), 10.0, dtype=torch.float64)
    tied = [4999, 17, 2500, 4096, 1]
    g[tied] = torch.tensor([3.0, 4.0], dtype=torch.float64)  # d = 25 from the origin
    g[3000] = torch.tensor([0.0, 4.0], dtype=torch.float64)  # d = 16, nearest
    d, i = _knn(impl, torch.zeros(2, 2, dtype=torch.float64), g, 6)
    assert i.tolist() == [[3000, 1, 17, 2500, 4096, 4999]] * 2
    assert d[0].tolist() == [16.0] + [25.0] * 5


def test_knn_nan_gallery_rows_sort_last(impl):
    g = [[0.0], [float("nan")], [3.0], [1.0]]
    d, i = _knn(impl, [[0.0]], g, 4)
    assert i.tolist() == [[0, 3, 2, 1]]
    assert torch.isnan(d[0, 3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_knn_rows_with_inf_or_nan_are_at_nan_distance(impl, dtype):
    """A row with an inf or NaN element is at NaN distance from every row, whatever the
    signs: the expansion alone gives inf for q.g = -inf and inf - inf = NaN for q.g = +inf,
    and 3xTF32 products NaN for both, so the order would differ between backends."""
    inf, nan = float("inf"), float("nan")
    g = torch.tensor([[nan, 0.0], [inf, 1.0], [1.0, 0.0], [-inf, -1.0], [0.5, 0.5], [0.0, -inf]], dtype=dtype)
    q = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [inf, 0.0]], dtype=dtype)
    d, i = dnnrl_ext.knn(q.to(impl.device), g.to(impl.device), 6, backend=impl.backend)
    d, i = d.cpu().double(), i.cpu()
    assert i.tolist() == [[4, 2, 0, 1, 3, 5], [2, 4, 0, 1, 3, 5], [4, 2, 0, 1, 3, 5], [0, 1, 2, 3, 4, 5]]
    assert d[:3, :2].tolist() == [[2.5, 4.0], [0.0, 0.5], [0.5, 1.0]]
    assert torch.isnan(d[:3, 2:]).all() and torch.isnan(d[3]).all()
    pred, votes = dnnrl_ext.knn_vote(q.to(impl.device), g.to(impl.device), torch.tensor([0, 1, 2, 1, 3, 1]).to(
        impl.device), 3, 4, return_votes=True, backend=impl.backend)
    assert pred.tolist() == [3, 2, 3, 0]  # neighbours [4, 2, 0], [2, 4, 0], [4, 2, 0], [0, 1, 2]
    assert votes.cpu().tolist() == [[1, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]]


def test_knn_float32_norm_overflow_is_nan_like_a_non_finite_row(impl):
    """A float32 row whose squared norm overflows (3e19^2 > float32 max) follows the same
    rule: NaN distances, last; float64 holds the same row and ranks it."""
    g = [[3e19, 0.0], [1.0, 0.0], [0.0, 1.0]]
    for dtype, order in ((torch.float32, [1, 2, 0]), (torch.float64, [1, 2, 0])):
        d, i = dnnrl_ext.knn(torch.zeros(1, 2, dtype=dtype, device=impl.device),
                             torch.tensor(g, dtype=dtype, device=impl.device), 3, backend=impl.backend)
        assert i.tolist()[0] == order
        assert torch.isnan(d[0, 2]) == (dtype == torch.float32)


def test_knn_nan_query_does_not_crash(impl):
    d, i = _knn(impl, [[float("nan")], [0.0]], [[0.0], [1.0], [2.0]], 2)
    assert torch.isnan(d[0]).all()
    assert set(i[0].tolist()) <= {0, 1, 2}
    assert i[1].tolist() == [0, 1]


def test_knn_empty_query(impl):
    d, i = _knn(impl, torch.zeros(0, 3), torch.zeros(4, 3), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def test_knn_k_equals_gallery_size_sorts_everything(impl):
    g = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d, i = _knn(impl, g[:5], g, 50)
    assert sorted(i[0].tolist()) == list(range(50))
    assert bool((d[:, 1:] >= d[:, :-1]).all())
    assert i[:, 0].tolist() == [0, 1, 2, 3, 4]  # every query finds itself first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_distance_of_a_query_to_its_own_copy_is_clamped_at_zero(impl, dtype):
    """Queries that are gallery rows: ||q||^2 - 2 q.g + ||g||^2 cancels to a rounding
    error of either sign, which the kernels (like the reference) clamp at 0."""
    gen = torch.Generator().manual_seed(4)
    g = (torch.randn(300, 77, generator=gen, dtype=torch.float64) * 10).to(dtype).to(impl.device)
    d, i = dnnrl_ext.knn(g[::3], g, 4, backend=impl.backend)
    assert bool((d >= 0).all()), d[:, 0].min().item()
    assert i[:, 0].cpu().tolist() == list(range(0, 300, 3))
    assert float(d[:, 0].max()) <= 1e-3 * float(d[:, 1].min())


@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_equal_distances_in_one_simd_step_keep_the_smaller_indices(impl, k):
    """k + 1 gallery rows at the same distance, right after the k rows that fill a
    query's list: the CPU kernel scans them in one AVX2 step of 8 rows, and once the k-th
    of them is in, the last is not below the worst and must stay out (ties keep the
    smaller index). Random grid inputs reach that only now and then."""
    rows = [[20.0 + j, 0.0] for j in range(40)]
    for j in range(k, 2 * k + 1):
        rows[j] = [3.0, 4.0] if j % 2 else [5.0, 0.0]  # d = 25 each, below every far row
    g = torch.tensor(rows, dtype=torch.float32, device=impl.device)
    d, i = dnnrl_ext.knn(torch.zeros(1, 2, device=impl.device), g, k, backend=impl.backend)
    assert i[0].cpu().tolist() == list(range(k, 2 * k)) and d[0].cpu().tolist() == [25.0] * k


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("mem", ["transposed", "strided"])
def test_knn_non_contiguous(impl, dtype, mem):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(20, 9, generator=gen).to(dtype).to(impl.device)
    g = torch.randn(60, 9, generator=gen).to(dtype).to(impl.device)
    labels = torch.randint(0, 4, (120,), generator=gen).to(impl.device)
    want = dnnrl_ext.knn(q, g, 5, backend=impl.backend)
    got = dnnrl_ext.knn(layout(q, mem), layout(g, mem), 5, backend=impl.backend)
    assert torch.equal(got[1], want[1])
    if impl.backend == "compiled":  # the kernels run on a contiguous copy: bitwise equal
        assert torch.equal(got[0], want[0])
    else:  # the reference's matmul rounds differently per layout
        torch.testing.assert_close(got[0], want[0])
    want_v = dnnrl_ext.knn_vote(q, g, labels[::2].contiguous(), 5, 4, return_votes=True, backend=impl.backend)
    got_v = dnnrl_ext.knn_vote(layout(q, mem), layout(g, mem), labels[::2], 5, 4, return_votes=True,
                               backend=impl.backend)
    assert torch.equal(got_v[0], want_v[0]) and torch.equal(got_v[1], want_v[1])


def _vote(impl, q, g, labels, k, C):
    p, v = dnnrl_ext.knn_vote(torch.as_tensor(q, dtype=torch.float64, device=impl.device),
                              torch.as_tensor(g, dtype=torch.float64, device=impl.device),
                              torch.as_tensor(labels, device=impl.device), k, C,
                              return_votes=True, backend=impl.backend)
    return p.cpu().tolist(), v.cpu().tolist()


def test_knn_vote_tie_goes_to_class_ranked_first(impl):
    # neighbours of 0 in order: 1 (class 2), 2 (class 0), 3 (class 0), 4 (class 2)
    g = [[1.0], [2.0], [3.0], [4.0], [9.0]]
    labels = [2, 0, 0, 2, 1]
    pred, votes = _vote(impl, [[0.0]], g, labels, 4, 3)
    assert votes == [[2, 0, 2]] and pred == [2]
    # mirrored query: order 4 (class 2)... from 5.0: 4.0 (2), 3.0 (0), 9.0 (1) vs 2.0 (0)
    pred, votes = _vote(impl, [[10.0]], g, labels, 2, 3)   # 9 (class 1), 4 (class 2): 1-1 tie
    assert votes == [[0, 1, 1]] and pred == [1]


def test_knn_vote_tie_uses_distance_rank_not_class_id(impl):
    # classes 0 and 5 tie 2-2; class 5's member is nearest -> 5, although 0 < 5
    g = [[1.0], [2.0], [3.0], [4.0]]
    pred, votes = _vote(impl, [[0.0]], g, [5, 0, 0, 5], 4, 6)
    assert pred == [5] and votes[0][5] == 2 and votes[0][0] == 2


def test_knn_vote_with_distance_ties_uses_index_order(impl):
    # two gallery rows at the same distance: the smaller index ranks first, so its
    # class wins the 1-1 vote
    g = [[1.0], [-1.0]]
    pred, _ = _vote(impl, [[0.0]], g, [3, 1], 2, 4)
    assert pred == [3]
    pred, _ = _vote(impl, [[0.0]], g, [1, 3], 2, 4)
    assert pred == [1]


def test_knn_vote_majority_and_unused_classes(impl):
    g = [[0.0], [0.1], [0.2], [5.0]]
    pred, votes = _vote(impl, [[0.05]], g, [1, 1, 2, 0], 3, 10)
    assert pred == [1] and votes == [[0, 2, 1, 0, 0, 0, 0, 0, 0, 0]]


def test_knn_vote_uint8_labels(impl):
    g = [[0.0], [1.0], [2.0]]
    p, v = dnnrl_ext.knn_vote(torch.tensor([[0.1]], device=impl.device),
                              torch.tensor(g, device=impl.device),
                              torch.tensor([2, 2, 0], dtype=torch.uint8, device=impl.device), 3, 3,
                              return_votes=True, backend=impl.backend)
    assert p.tolist() == [2] and v.tolist() == [[1, 0, 2]]
