"""KNNClassifier and accuracy_per_k: fit / predict / predict_proba / score, k selection
on validation data, and agreement with knn_vote and scikit-learn."""
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import dnnrl_ext
from dnnrl_ext import KNNClassifier, accuracy_per_k


def _blobs(seed, n, C=4, D=6):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(C, D)) * 2.5
    y = rng.integers(0, C, n)
    return torch.as_tensor(centres[y] + rng.normal(size=(n, D)), dtype=torch.float32), torch.as_tensor(y)


def _clf(impl, **kw):
    return KNNClassifier(backend=impl.backend, **kw)


def _to(impl, *ts):
    return [t.to(impl.device) for t in ts]


def test_fit_predict_proba_score(impl):
    gx, gy = _to(impl, *_blobs(0, 300))
    qx, qy = _to(impl, *_blobs(1, 80))
    clf = _clf(impl, k=5).fit(gx, gy)
    assert clf.num_classes == 4
    pred = clf.predict(qx)
    assert pred.dtype == torch.int64 and pred.shape == (80,)
    proba = clf.predict_proba(qx)
    assert proba.shape == (80, 4)
    torch.testing.assert_close(proba.sum(1), torch.ones(80, device=proba.device))
    assert bool((proba * 5 == (proba * 5).round()).all())  # vote shares of k = 5
    assert bool((proba.argmax(1)[proba.max(1).values > 0.5] == pred[proba.max(1).values > 0.5]).all())
    score = clf.score(qx, qy)
    assert score == pytest.approx(float((pred == qy).double().mean()))
    assert score > 0.8  # separable blobs


def test_predict_equals_knn_vote(impl):
    gx, gy = _to(impl, *_blobs(2, 200))
    qx, _ = _to(impl, *_blobs(3, 50))
    clf = _clf(impl, k=7, num_classes=6).fit(gx, gy)
    want = dnnrl_ext.knn_vote(qx, gx, gy, 7, 6, backend=impl.backend)
    assert torch.equal(clf.predict(qx), want)
    assert clf.predict_proba(qx).shape == (50, 6)


def test_matches_sklearn_on_tie_free_votes(impl):
    gx, gy = _blobs(4, 250)
    qx, qy = _blobs(5, 70)
    k = 5
    clf = _clf(impl, k=k).fit(*_to(impl, gx, gy))
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", weights="uniform").fit(gx.numpy(), gy.numpy())
    proba = clf.predict_proba(qx.to(impl.device)).cpu().numpy()
    np.testing.assert_allclose(proba, sk.predict_proba(qx.numpy()), atol=1e-6)
    top2 = np.sort(proba, 1)[:, -2:]
    no_tie = top2[:, 1] > top2[:, 0]
    assert np.array_equal(clf.predict(qx.to(impl.device)).cpu().numpy()[no_tie], sk.predict(qx.numpy())[no_tie])
    assert clf.score(qx.to(impl.device), qy.to(impl.device)) == pytest.approx(sk.score(qx.numpy(), qy.numpy()))


# 1-D gallery: class 0 at 0, 1, 2; a class-1 outlier at 2.6; class 1 at 10, 11, 12
_GALLERY = torch.tensor([[0.0], [1.0], [2.0], [2.6], [10.0], [11.0], [12.0]])
_GALLERY_Y = torch.tensor([0, 0, 0, 1, 1, 1, 1])


def test_select_k_finds_the_known_best_k(impl):
    # query 2.5 (class 0): neighbours 2.6 (1), 2 (0), 1 (0), 0 (0):
    #   k=1 wrong, k=2 1-1 tie -> class of the nearest (1) wrong, k=3, 4 right
    # query 11 (class 1): right for every k <= 4
    val_x = torch.tensor([[2.5], [11.0]])
    val_y = torch.tensor([0, 1])
    clf = _clf(impl).fit(*_to(impl, _GALLERY, _GALLERY_Y), val=_to(impl, val_x, val_y), k_max=4)
    assert clf.val_accuracy_per_k == {1: 0.5, 2: 0.5, 3: 1.0, 4: 1.0}
    assert clf.k == 3  # 3 and 4 tie: the smaller k


def test_select_k_ties_go_to_the_smaller_k(impl):
    # query 2.5 (class 0): right for k >= 3; query 2.58 (class 1): neighbours 2.6 (1),
    # 2 (0), 1 (0): right for k = 1, 2 (tie -> nearest), wrong for k = 3, 4
    val_x = torch.tensor([[2.5], [2.58]])
    val_y = torch.tensor([0, 1])
    clf = _clf(impl).fit(*_to(impl, _GALLERY, _GALLERY_Y), val=_to(impl, val_x, val_y), k_max=4)
    assert clf.val_accuracy_per_k == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}
    assert clf.k == 1


def test_select_k_caps_k_max_at_gallery_size(impl):
    clf = _clf(impl).fit(*_to(impl, _GALLERY, _GALLERY_Y),
                         val=_to(impl, torch.tensor([[11.0]]), torch.tensor([1])), k_max=50)
    assert sorted(clf.val_accuracy_per_k) == list(range(1, 8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_per_k_equals_knn_vote_for_every_k(impl, seed):
    gx, gy = _to(impl, *_blobs(10 + seed, 120, C=5))
    qx, qy = _to(impl, *_blobs(20 + seed, 90, C=5))
    # coarse grid so that votes tie often and the tie rule matters
    gx, qx = (gx * 0.6).round(), (qx * 0.6).round()
    k_max = 25
    _, idx = dnnrl_ext.knn(qx, gx, k_max, backend=impl.backend)
    acc = accuracy_per_k(gy[idx], qy, 5, chunk=32)
    assert acc.shape == (k_max,) and acc.dtype == torch.float64
    for k in range(1, k_max + 1):
        pred = dnnrl_ext.knn_vote(qx, gx, gy, k, 5, backend=impl.backend)
        assert acc[k - 1].item() == pytest.approx(float((pred == qy).double().mean()), abs=1e-12), k


def test_select_k_equals_best_knn_vote_accuracy(impl):
    gx, gy = _to(impl, *_blobs(30, 150, C=3))
    vx, vy = _to(impl, *_blobs(31, 60, C=3))
    gx, vx = gx * 0.3, vx * 0.3  # overlapping classes: accuracy varies with k
    clf = _clf(impl).fit(gx, gy, val=(vx, vy), k_max=30)
    accs = [float((dnnrl_ext.knn_vote(vx, gx, gy, k, 3, backend=impl.backend) == vy).double().mean())
            for k in range(1, 31)]
    assert clf.k == int(np.argmax(accs)) + 1
    assert [clf.val_accuracy_per_k[k] for k in range(1, 31)] == pytest.approx(accs)


def test_accepts_numpy_and_lists(impl):
    if impl.device != "cpu":
        pytest.skip("numpy inputs live on the cpu")
    gx, gy = _blobs(40, 60)
    clf = _clf(impl, k=3).fit(gx.numpy(), gy.tolist())
    assert clf.predict(gx[:5].numpy()).tolist() == clf.predict(gx[:5]).tolist()


def test_state_dict_round_trip(impl):
    gx, gy = _to(impl, *_blobs(41, 80))
    clf = _clf(impl, k=4).fit(gx, gy)
    clone = KNNClassifier.from_state_dict(clf.state_dict(), backend=impl.backend)
    assert clone.k == 4 and clone.num_classes == clf.num_classes
    assert torch.equal(clone.predict(gx[:20]), clf.predict(gx[:20]))


def test_kneighbors_uses_k(impl):
    gx, gy = _to(impl, *_blobs(42, 50))
    clf = _clf(impl, k=6).fit(gx, gy)
    d, i = clf.kneighbors(gx[:3])
    assert d.shape == (3, 6) and i[:, 0].tolist() == [0, 1, 2]
    d2, i2 = clf.kneighbors(gx[:3], k=2)  # an explicit k wins over the fitted one
    assert d2.shape == (3, 2) and torch.equal(i2, i[:, :2]) and torch.equal(d2, d[:, :2])


def test_queries_take_the_gallery_dtype(impl):
    """A float32 gallery queried with a NumPy float64 array (NumPy's default) or float16
    rows answers as if queried in float32; a float64 gallery takes float32 queries."""
    gx, gy = _to(impl, *_blobs(7, 120))
    qx, _ = _blobs(8, 30)
    clf = _clf(impl, k=3).fit(gx, gy)
    want = clf.predict(qx.to(impl.device))
    assert torch.equal(clf.predict(qx.double().numpy()), want)
    assert torch.equal(clf.predict(qx.half().to(impl.device)), clf.predict(qx.half().float().to(impl.device)))
    clf64 = _clf(impl, k=3).fit(gx.double(), gy)
    assert torch.equal(clf64.predict(qx.to(impl.device)), clf64.predict(qx.double().to(impl.device)))
    assert clf.kneighbors(qx.double().numpy())[0].dtype == torch.float32
