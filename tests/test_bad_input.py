"""Bad arguments: every case raises a specific error type whose message names the
offending argument. The checks live in the Python wrappers, so they are tested on the
reference backend (always) and the compiled one (when built)."""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dnnrl_ext
from dnnrl_ext import ExtensionNotAvailable, KNNClassifier


@pytest.fixture(params=["reference", "compiled"])
def backend(request):
    if request.param == "compiled":
        from ops_testutil import require_compiled
        require_compiled("cpu")
    return request.param


def X(B=6, D=3, dtype=torch.float32):
    return torch.randn(B, D, dtype=dtype)


def Y(B=6):
    return torch.tensor([0, 0, 1, 1, 2, 2][:B] + [0] * max(0, B - 6))


def loss(backend, x=None, y=None, **kw):
    return dnnrl_ext.triplet_loss(X() if x is None else x, Y() if y is None else y, backend=backend, **kw)


def triplets(backend, x=None, a=(0, 1), p=(1, 0), n=(2, 3), **kw):
    t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return dnnrl_ext.triplet_loss_from_triplets(X() if x is None else x, t(a), t(p), t(n),
                                                backend=backend, **kw)


# --------------------------------------------------------------------------- triplet_loss
@pytest.mark.parametrize("shape", [(6,), (6, 3, 1), ()])
def test_embeddings_wrong_rank(backend, shape):
    with pytest.raises(ValueError, match="embeddings"):
        loss(backend, x=torch.zeros(shape))


def test_embeddings_integer_dtype(backend):
    with pytest.raises(TypeError, match="embeddings"):
        loss(backend, x=torch.zeros(6, 3, dtype=torch.int64))


def test_embeddings_not_a_tensor(backend):
    with pytest.raises(TypeError, match="embeddings"):
        loss(backend, x=[[0.0, 1.0]] * 6)


def test_labels_wrong_rank(backend):
    with pytest.raises(ValueError, match="labels"):
        loss(backend, y=torch.zeros(6, 1, dtype=torch.int64))


def test_labels_length_mismatch(backend):
    with pytest.raises(ValueError, match="labels"):
        loss(backend, y=torch.zeros(5, dtype=torch.int64))


def test_labels_float(backend):
    with pytest.raises(TypeError, match="labels"):
        loss(backend, y=torch.zeros(6))


def test_labels_bool(backend):
    with pytest.raises(TypeError, match="labels"):
        loss(backend, y=torch.zeros(6, dtype=torch.bool))


@pytest.mark.parametrize("name,value", [("mining", "hardest"), ("mining", None),
                                        ("loss", "softplus"), ("reduction", "max"),
                                        ("reduction", 1)])
def test_bad_mode_strings(backend, name, value):
    with pytest.raises(ValueError, match=name):
        loss(backend, **{name: value})


@pytest.mark.parametrize("name", ["alpha", "gamma", "margin"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_parameters(backend, name, value):
    with pytest.raises(ValueError, match=name):
        loss(backend, **{name: value})


@pytest.mark.parametrize("value", [0.0, -0.2, -1])
def test_alpha_must_be_positive_for_the_exp_loss(backend, value):
    """alpha <= 0 would make exp(-alpha r) grow with violated triplets (or constant)."""
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        loss(backend, alpha=value)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        triplets(backend, alpha=value)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        dnnrl_ext.ExpTripletLoss(alpha=value)
    loss(backend, alpha=value, loss="hinge")  # the hinge loss ignores alpha


@pytest.mark.parametrize("name", ["alpha", "gamma", "margin"])
@pytest.mark.parametrize("value", ["0.2", True, None, [0.2], torch.ones(2)])
def test_loss_parameters_must_be_numbers(backend, name, value):
    with pytest.raises(TypeError, match="%s must be a number" % name):
        loss(backend, **{name: value})


def test_loss_modules_check_their_parameters_when_built():
    with pytest.raises(TypeError, match="alpha must be a number"):
        dnnrl_ext.ExpTripletLoss(alpha="0.2")
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        dnnrl_ext.ExpTripletLoss(gamma=math.nan)
    with pytest.raises(TypeError, match="margin must be a number"):
        dnnrl_ext.TripletLoss(margin=None)
    assert dnnrl_ext.ExpTripletLoss(alpha=np.float32(0.5), gamma=torch.tensor(-1.0)).alpha == 0.5


def test_bad_backend_string():
    with pytest.raises(ValueError, match="backend"):
        loss("fast")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_labels_on_other_device(backend):
    with pytest.raises(ValueError, match="labels"):
        loss(backend, x=X().cuda(), y=Y())


# the device checks without a card: a "meta" tensor is on another device and holds no data
def test_labels_on_the_meta_device(backend):
    with pytest.raises(ValueError, match="labels is on meta but the embeddings are on cpu"):
        loss(backend, y=Y().to("meta"))


@pytest.mark.parametrize("name", ["anchor", "positive", "negative"])
def test_triplet_index_on_the_meta_device(backend, name):
    kw = {name[0]: torch.tensor([0, 1], device="meta")}
    with pytest.raises(ValueError, match="%s is on meta" % name):
        triplets(backend, **kw)


# --------------------------------------------------------------------------- explicit triplets
@pytest.mark.parametrize("name,kw", [("anchor", dict(a=(0, 6))), ("positive", dict(p=(-1, 0))),
                                     ("negative", dict(n=(2, 100)))])
def test_triplet_index_out_of_range(backend, name, kw):
    with pytest.raises(IndexError, match=name):
        triplets(backend, **kw)


def test_triplet_validate_false_skips_only_the_python_range_check(monkeypatch):
    """validate=False: no read-back of the indices; the CPU kernel still refuses them."""
    from conftest import EMULATED_FULL
    from ops_testutil import require_compiled
    require_compiled("cpu")
    if EMULATED_FULL:  # DNNRL_TEST_EMULATED_CUDA=1: the CPU kernel is the emulated CUDA one, which trusts the caller
        pytest.skip("the CPU kernel's own range check; the CUDA kernels take validate=False at its word")
    calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real_tolist(self))
    triplets("compiled")  # in range, validated: one read-back
    assert len(calls) == 1
    triplets("compiled", validate=False)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="out of range"):
        triplets("compiled", a=(0, 60), validate=False)


@pytest.mark.parametrize("name,kw", [("positive", dict(p=(1, 0, 2))), ("negative", dict(n=(2,)))])
def test_triplet_length_mismatch(backend, name, kw):
    with pytest.raises(ValueError, match=name):
        triplets(backend, **kw)


def test_triplet_float_indices(backend):
    with pytest.raises(TypeError, match="anchor"):
        triplets(backend, a=torch.tensor([0.0, 1.0]))


def test_triplet_indices_wrong_rank(backend):
    with pytest.raises(ValueError, match="negative"):
        triplets(backend, n=torch.tensor([[2, 3]]))


def test_triplet_bad_loss_string(backend):
    with pytest.raises(ValueError, match="loss"):
        triplets(backend, loss="exponential")


def test_triplet_non_finite_alpha(backend):
    with pytest.raises(ValueError, match="alpha"):
        triplets(backend, alpha=math.nan)


# --------------------------------------------------------------------------- knn
def knn(backend, q=None, g=None, k=2):
    return dnnrl_ext.knn(X(4) if q is None else q, X(5) if g is None else g, k, backend=backend)


def vote(backend, labels, k=2, num_classes=3, q=None, g=None):
    return dnnrl_ext.knn_vote(X(4) if q is None else q, X(5) if g is None else g, labels, k,
                              num_classes, backend=backend)


def test_knn_query_wrong_rank(backend):
    with pytest.raises(ValueError, match="query"):
        knn(backend, q=torch.zeros(3))


def test_knn_gallery_wrong_rank(backend):
    with pytest.raises(ValueError, match="gallery"):
        knn(backend, g=torch.zeros(2, 3, 4))


def test_knn_dim_mismatch(backend):
    with pytest.raises(ValueError, match="gallery"):
        knn(backend, g=X(5, 4))


def test_knn_mixed_dtypes(backend):
    with pytest.raises(TypeError, match="gallery"):
        knn(backend, g=X(5, dtype=torch.float64))


def test_knn_integer_query(backend):
    with pytest.raises(TypeError, match="query"):
        knn(backend, q=torch.zeros(4, 3, dtype=torch.int32))


@pytest.mark.parametrize("k", [0, -1, 6])
def test_knn_k_out_of_range(backend, k):
    with pytest.raises(ValueError, match="k must"):
        knn(backend, k=k)


@pytest.mark.parametrize("k", [2.0, True, None])
def test_knn_k_not_int(backend, k):
    with pytest.raises(TypeError, match="k must"):
        knn(backend, k=k)


def test_knn_empty_gallery(backend):
    with pytest.raises(ValueError, match="gallery"):
        knn(backend, g=torch.zeros(0, 3), k=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_mixed_devices(backend):
    with pytest.raises(ValueError, match="gallery"):
        knn(backend, g=X(5).cuda())


def test_knn_gallery_and_its_labels_on_the_meta_device(backend):
    with pytest.raises(ValueError, match="query is on cpu but gallery is on meta"):
        knn(backend, g=X(5).to("meta"))
    with pytest.raises(ValueError, match="gallery_labels is on meta"):
        vote(backend, torch.tensor([0, 1, 1, 0, 0], device="meta"))


def test_vote_negative_label(backend):
    with pytest.raises(ValueError, match="gallery_labels"):
        vote(backend, torch.tensor([0, 1, -1, 2, 0]))


def test_vote_label_not_below_num_classes(backend):
    with pytest.raises(ValueError, match="gallery_labels"):
        vote(backend, torch.tensor([0, 1, 3, 2, 0]), num_classes=3)


def test_vote_float_labels(backend):
    with pytest.raises(TypeError, match="gallery_labels"):
        vote(backend, torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0]))


def test_vote_labels_length_mismatch(backend):
    with pytest.raises(ValueError, match="gallery_labels"):
        vote(backend, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("c", [0, -2, 2.5])
def test_vote_bad_num_classes(backend, c):
    # (the label range check would name num_classes too, so the message is matched whole)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        vote(backend, torch.tensor([0, 1, 1, 0, 0]), num_classes=c)


def test_vote_k_out_of_range(backend):
    with pytest.raises(ValueError, match="k must"):
        vote(backend, torch.tensor([0, 1, 1, 0, 0]), k=9)


# --------------------------------------------------------------------------- KNNClassifier
def test_classifier_predict_before_fit():
    with pytest.raises(RuntimeError, match="fit"):
        KNNClassifier(backend="reference").predict(X())


def test_classifier_float_labels():
    with pytest.raises(TypeError, match="labels"):
        KNNClassifier(backend="reference").fit(X(), torch.zeros(6))


def test_classifier_negative_labels():
    with pytest.raises(ValueError, match="labels"):
        KNNClassifier(backend="reference").fit(X(), torch.tensor([0, 1, -1, 0, 1, 0]))


def test_classifier_label_count_mismatch():
    with pytest.raises(ValueError, match="labels"):
        KNNClassifier(backend="reference").fit(X(), torch.tensor([0, 1]))


def test_classifier_empty_gallery():
    with pytest.raises(ValueError, match="embeddings"):
        KNNClassifier(backend="reference").fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


def test_classifier_labels_beyond_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        KNNClassifier(num_classes=2, backend="reference").fit(X(), Y())


def test_classifier_wrong_rank_embeddings():
    with pytest.raises(ValueError, match="embeddings"):
        KNNClassifier(backend="reference").fit(torch.zeros(6), Y())


@pytest.mark.parametrize("kwargs,name", [(dict(k=0), "k"), (dict(k=2.5), "k"), (dict(k=True), "k"),
                                         (dict(k="3"), "k"), (dict(num_classes=0), "num_classes"),
                                         (dict(backend="fast"), "backend")])
def test_classifier_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match="^%s must" % name):
        KNNClassifier(**kwargs)


def test_classifier_bad_k_max_and_kneighbors_k():
    clf = KNNClassifier(backend="reference").fit(X(), Y())
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="k_max must"):
            clf.select_k(X(), Y(), k_max=bad)
        with pytest.raises(ValueError, match="k must"):
            clf.kneighbors(X(), k=bad)
    assert clf.select_k(X(), Y(), k_max=1000) in range(1, 7)  # capped by the 6-row gallery
    assert len(clf.val_accuracy_per_k) == 6


def test_classifier_refuses_complex_embeddings():
    """.float() would drop the imaginary part (an all-zero gallery for imaginary input)."""
    with pytest.raises(TypeError, match="embeddings must be real"):
        KNNClassifier(backend="reference").fit(X().to(torch.complex64) * 1j, Y())
    clf = KNNClassifier(backend="reference").fit(X(), Y())
    with pytest.raises(TypeError, match="embeddings must be real"):
        clf.predict(X().to(torch.complex64))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_classifier_refuses_non_finite_rows(backend):
    """A NaN query got class 0 (the vote over gallery rows 0..k-1) and shares like
    [0.4, 0.4, 0.2]: an answer that looked real. Now every entry point names the rows."""
    bad = X().clone()
    bad[2, 1] = float("nan")
    bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings holds NaN or inf in 2 of 6 rows \(first: row 2\)"):
        KNNClassifier(backend=backend).fit(bad, Y())
    clf = KNNClassifier(k=3, backend=backend).fit(X(), Y())
    for call in (clf.predict, clf.predict_proba, clf.kneighbors, lambda q: clf.score(q, Y()),
                 lambda q: clf.select_k(q, Y())):
        with pytest.raises(ValueError, match="embeddings holds NaN or inf in 2 of 6 rows"):
            call(bad)


def test_classifier_val_must_be_a_pair_and_not_empty():
    for val in ((X(),), X(), "val", (X(), Y(), Y())):
        with pytest.raises(ValueError, match=r"val must be a pair \(embeddings, labels\)"):
            KNNClassifier(backend="reference").fit(X(), Y(), val=val)
    with pytest.raises(ValueError, match="validation embeddings are empty"):
        KNNClassifier(backend="reference").fit(X(), Y(), val=(torch.zeros(0, X().shape[1]), torch.zeros(0).long()))


# --------------------------------------------------------------------------- missing extension
def test_compiled_backend_without_extension_raises_with_rebuild_hint(no_extension):
    for call in (lambda: loss("compiled"), lambda: loss("auto"),
                 lambda: triplets("compiled"), lambda: knn("compiled"),
                 lambda: vote("compiled", torch.tensor([0, 1, 1, 0, 0]))):
        with pytest.raises(ExtensionNotAvailable, match="rebuild") as info:
            call()
        assert "backend='reference'" in str(info.value)
        assert "simulated: _C missing" in str(info.value)  # the load error is reported
    assert isinstance(info.value, RuntimeError)
    assert not dnnrl_ext.extension_available() and not dnnrl_ext.has_cuda_kernels()


def test_reference_backend_works_without_extension(no_extension):
    x = X().requires_grad_(True)
    out = dnnrl_ext.triplet_loss(x, Y(), backend="reference", gamma=-100.0)
    out.backward()
    assert torch.isfinite(out) and x.grad is not None
    assert triplets("reference").shape == ()
    assert knn("reference")[1].shape == (4, 2)
    assert vote("reference", torch.tensor([0, 1, 1, 0, 0])).shape == (4,)
    crit = dnnrl_ext.ExpTripletLoss(backend="reference")
    assert torch.isfinite(crit(X(), Y()))
    clf = KNNClassifier(k=1, backend="reference").fit(X(5), torch.tensor([0, 1, 1, 0, 0]))
    assert clf.predict(X(3)).shape == (3,)


def test_cuda_tensor_without_cuda_kernels_raises(monkeypatch):
    """A _C built without CUDA refuses cuda tensors with the rebuild hint (checked with
    a fake device test, no GPU needed)."""
    from ops_testutil import require_compiled
    require_compiled("cpu")
    monkeypatch.setattr(dnnrl_ext._extension._C, "compiled_with_cuda", lambda: False)
    with pytest.raises(ExtensionNotAvailable, match="without CUDA"):
        dnnrl_ext._extension.require(torch.device("cuda"))


@pytest.mark.parametrize("capability, supported", [((7, 5), False), ((7, 0), False), ((8, 0), True),
                                                   ((8, 9), True), ((9, 0), True), ((12, 0), True)])
def test_cuda_card_older_than_ampere_is_refused_by_name(monkeypatch, capability, supported):
    """A pre-Ampere card would fail at the first launch ("no kernel image is available");
    the ops refuse it first, naming the card, its capability and the way out; newer cards
    (compute_90 PTX in the default build) pass. Faked device queries, no GPU needed."""
    from ops_testutil import require_compiled
    require_compiled("cpu")
    ext = dnnrl_ext._extension
    monkeypatch.setattr(ext._C, "compiled_with_cuda", lambda: True)
    monkeypatch.setattr(ext, "_cuda_capability", {})
    if not torch.cuda.is_available():
        assert not dnnrl_ext.kernels_available("cuda")  # no driver: False, not an exception
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Fake Card %d" % index)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dnnrl_ext.kernels_available("cuda:0") is supported
    assert dnnrl_ext.kernels_available("cpu")
    if supported:
        dnnrl_ext._extension.require(torch.device("cuda"))
        return
    with pytest.raises(ExtensionNotAvailable) as info:
        dnnrl_ext._extension.require(torch.device("cuda"))  # no index: the current device
    msg = str(info.value)
    assert "8.0 or newer" in msg and "cuda:1 (Fake Card 1) has %d.%d" % capability in msg
    assert "backend='reference'" in msg
    from dnnrl import runtime  # the application falls back to the reference, saying why
    monkeypatch.setattr(runtime, "_warned_backend", False)
    assert runtime.resolve_backend("auto", torch.device("cuda:0")) == "reference"
    with pytest.raises(ExtensionNotAvailable, match="Fake Card 0"):
        runtime.resolve_backend("compiled", torch.device("cuda:0"))


# --------------------------------------------------------------------------- raw ops
def test_raw_ops_reject_bad_shapes_without_crashing():
    """Calling torch.ops.dnnrl_ext.* directly (no Python checks) with inconsistent
    arguments must raise, not crash: run in a subprocess so a segfault is reported."""
    from ops_testutil import require_compiled
    require_compiled("cpu")
    script = textwrap.dedent("""
        import torch, dnnrl_ext
        ops = torch.ops.dnnrl_ext
        x = torch.randn(6, 3)
        cases = {
            "labels length": lambda: ops.triplet_loss(x, torch.zeros(5, dtype=torch.long), 0, 0, .2, 0., .2, 1),
            "labels rank": lambda: ops.triplet_loss(x, torch.zeros(6, 1, dtype=torch.long), 0, 0, .2, 0., .2, 1),
            "x rank": lambda: ops.triplet_loss(torch.randn(6), torch.zeros(6, dtype=torch.long), 0, 0, .2, 0., .2, 1),
            "bad mining code": lambda: ops.triplet_loss(x, torch.zeros(6, dtype=torch.long), 7, 0, .2, 0., .2, 1),
            "bad reduction code": lambda: ops.triplet_loss(x, torch.zeros(6, dtype=torch.long), 0, 0, .2, 0., .2, 9),
            "index out of range": lambda: ops.triplet_loss_indexed(x, torch.tensor([0, 60]), torch.tensor([1, 2]), torch.tensor([2, 3]), 0, .2, 0., .2, 1),
            "negative index": lambda: ops.triplet_loss_indexed(x, torch.tensor([0, -1]), torch.tensor([1, 2]), torch.tensor([2, 3]), 0, .2, 0., .2, 1),
            "index lengths": lambda: ops.triplet_loss_indexed(x, torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 3]), 0, .2, 0., .2, 1),
            "k > N": lambda: ops.knn(x, x[:2], 3),
            "k = 0": lambda: ops.knn(x, x, 0),
            "dim mismatch": lambda: ops.knn(x, torch.randn(4, 2), 1),
            "vote label >= C": lambda: ops.knn_vote(x, x, torch.tensor([0, 1, 2, 3, 4, 9]), 2, 5),
            "vote label < 0": lambda: ops.knn_vote(x, x, torch.tensor([0, 1, 2, 3, 4, -1]), 2, 5),
        }
        bad = []
        for name, call in cases.items():
            try:
                call()
                bad.append(name)
            except RuntimeError:
                pass
            except Exception as exc:
                bad.append("%s (%s)" % (name, type(exc).__name__))
        print("NO-ERROR:", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "raw op crashed (rc %d): %s" % (proc.returncode, proc.stderr[-2000:])
    assert "NO-ERROR: []" in proc.stdout, (
        "raw ops accepted inconsistent arguments: " + proc.stdout[-2000:])


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5])
def test_kernels_available_names_a_bad_device(device):
    """torch's own parse error listed every device type it knows; now one ValueError names the argument."""
    with pytest.raises(ValueError, match="device must be a torch.device or a device string"):
        dnnrl_ext.kernels_available(device)
