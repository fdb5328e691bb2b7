"""Autograd and dispatcher integration of the compiled ops: gradcheck in float64,
torch.library.opcheck of all five ops, and a torch.compile(fullgraph=True) training
step that matches eager."""
import pytest
import torch

import dnnrl_ext
from ops_testutil import tie_free_anchors

F64 = torch.float64


def _away_from_kinks(seed, B=9, D=3, gamma=0.0, margin=0.5, mining="batch_hard", loss="exp", classes=3):
    """A float64 batch whose mining decisions and kinks are at least 1e-2 * scale away,
    so the finite differences of gradcheck (eps 1e-6) never cross them."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(B, D, dtype=F64, generator=g)
        labels = torch.randint(0, classes, (B,), generator=g)
        if tie_free_anchors(x, labels, mining, gamma, loss, margin, rel=1e-2).all():
            return x, labels
    raise AssertionError("no kink-free input found")


CONFIGS = [
    dict(mining="batch_hard", loss="exp", gamma=-3.0, alpha=0.7),   # negative gamma: most triplets active
    dict(mining="batch_hard", loss="exp", gamma=0.0, alpha=0.2),
    dict(mining="semi_hard", loss="exp", gamma=0.3, alpha=1.3),
    dict(mining="batch_hard", loss="hinge", gamma=0.0, margin=2.0),
    dict(mining="semi_hard", loss="hinge", gamma=-0.5, margin=1.0),
    dict(mining="easy_positive", loss="exp", gamma=-0.2, alpha=0.9),
    dict(mining="easy_positive", loss="hinge", gamma=0.0, margin=0.5),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "%s-%s-g%s" % (c["mining"], c["loss"], c["gamma"]))
def test_gradcheck_mined(impl, cfg, reduction):
    x, labels = _away_from_kinks(1, gamma=cfg["gamma"], margin=cfg.get("margin", 0.2),
                                 mining=cfg["mining"], loss=cfg["loss"])
    x = x.to(impl.device).requires_grad_(True)
    labels = labels.to(impl.device)
    out = dnnrl_ext.triplet_loss(x, labels, reduction=reduction, return_details=True,
                                 backend=impl.backend, **cfg)
    assert out.valid.any()

    def f(inp):
        return dnnrl_ext.triplet_loss(inp, labels, reduction=reduction, backend=impl.backend, **cfg)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["exp", "hinge"])
def test_gradcheck_indexed(impl, loss, reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, dtype=F64, generator=g)
    # repeated indices; triplets chosen with r away from gamma / margin
    a = torch.tensor([0, 0, 1, 2, 3, 5, 5, 4])
    p = torch.tensor([1, 1, 0, 3, 2, 4, 4, 5])
    n = torch.tensor([2, 3, 4, 0, 1, 0, 1, 0])
    r = ((x[a] - x[n]) ** 2).sum(1) - ((x[a] - x[p]) ** 2).sum(1)
    gamma = float(r.min()) - 0.5           # every exp triplet active
    margin = float(r.max()) + 0.5          # every hinge triplet active
    x = x.to(impl.device).requires_grad_(True)
    idx = [t.to(impl.device) for t in (a, p, n)]

    def f(inp):
        return dnnrl_ext.triplet_loss_from_triplets(inp, *idx, loss=loss, alpha=0.4, gamma=gamma,
                                                    margin=margin, reduction=reduction,
                                                    backend=impl.backend)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- opcheck
def _mined_args(device, dtype, reduction, grad=True):
    x, labels = _away_from_kinks(3, B=10, D=4, gamma=-1.0)
    x = x.to(device=device, dtype=dtype).requires_grad_(grad)
    return (x, labels.to(device), 0, 0, 0.5, -1.0, 0.2, reduction)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_triplet_loss(compiled_device, dtype, reduction):
    op = torch.ops.dnnrl_ext.triplet_loss.default
    torch.library.opcheck(op, _mined_args(compiled_device, dtype, reduction))
    # semi-hard and hinge too, and easy-positive
    x, labels, *_ = _mined_args(compiled_device, dtype, reduction)
    torch.library.opcheck(op, (x, labels, 1, 1, 0.5, 0.1, 0.3, reduction))
    torch.library.opcheck(op, (x, labels, 2, 0, 0.5, -1.0, 0.2, reduction))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_triplet_loss_indexed(compiled_device, dtype, reduction):
    dev = compiled_device
    x = torch.randn(7, 3, device=dev).to(dtype).requires_grad_(True)
    idx = [torch.tensor(v, device=dev) for v in ([0, 1, 2, 2], [1, 0, 3, 3], [4, 5, 6, 0])]
    torch.library.opcheck(torch.ops.dnnrl_ext.triplet_loss_indexed.default,
                          (x, *idx, 0, 0.3, -2.0, 0.2, reduction))
    torch.library.opcheck(torch.ops.dnnrl_ext.triplet_loss_indexed.default,
                          (x, *idx, 1, 0.3, 0.0, 5.0, reduction))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_triplet_loss_backward(compiled_device, dtype, reduction):
    dev = compiled_device
    args = _mined_args(dev, dtype, reduction, grad=False)
    x = args[0]
    loss, pos, neg, r, valid = torch.ops.dnnrl_ext.triplet_loss(*args)
    grad = torch.rand_like(loss)
    # mined form: anchor None, valid given
    torch.library.opcheck(torch.ops.dnnrl_ext.triplet_loss_backward.default,
                          (grad, x, None, pos, neg, r, valid, 0, 0.5, -1.0, 0.2, reduction))
    # indexed form: anchor given, valid None
    a = torch.tensor([0, 1, 2], device=dev)
    p = torch.tensor([1, 0, 3], device=dev)
    n = torch.tensor([4, 5, 0], device=dev)
    loss_i, r_i = torch.ops.dnnrl_ext.triplet_loss_indexed(x, a, p, n, 0, 0.5, -1.0, 0.2, reduction)
    torch.library.opcheck(torch.ops.dnnrl_ext.triplet_loss_backward.default,
                          (torch.rand_like(loss_i), x, a, p, n, r_i, None, 0, 0.5, -1.0, 0.2, reduction))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_knn_and_knn_vote(compiled_device, dtype):
    dev = compiled_device
    g = torch.Generator().manual_seed(4)
    q = torch.randn(9, 5, generator=g).to(dtype).to(dev)
    gal = torch.randn(30, 5, generator=g).to(dtype).to(dev)
    labels = torch.randint(0, 4, (30,), generator=g).to(dev)
    torch.library.opcheck(torch.ops.dnnrl_ext.knn.default, (q, gal, 7))
    torch.library.opcheck(torch.ops.dnnrl_ext.knn_vote.default, (q, gal, labels, 7, 4))
    # with inputs that need gradients: the registered autograd of knn's distances
    torch.library.opcheck(torch.ops.dnnrl_ext.knn.default,
                          (q.clone().requires_grad_(), gal.clone().requires_grad_(), 7))


# --------------------------------------------------------------------------- knn gradients
def _knn_inputs(seed, Q=7, N=25, D=4, k=5):
    """float64 query / gallery whose k nearest are at least 1e-2 from the (k+1)-th, so the
    neighbours of gradcheck's perturbed inputs stay the same."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        q, gal = torch.randn(Q, D, dtype=F64, generator=g), torch.randn(N, D, dtype=F64, generator=g)
        d = torch.cdist(q, gal).pow(2).sort(1).values
        if (d[:, 1:k + 1] - d[:, :k] > 1e-2).all():
            return q, gal
    raise AssertionError("no tie-free input found")


def test_gradcheck_knn_distances(impl):
    q, gal = (t.to(impl.device).requires_grad_(True) for t in _knn_inputs(5))
    assert torch.autograd.gradcheck(lambda a, b: dnnrl_ext.knn(a, b, 5, backend=impl.backend)[0], (q, gal),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_knn_gradients_match_the_reference(compiled_device, dtype):
    """The compiled knn's distances carry the reference's gradients (they were None
    before, with only torch's warning that no autograd kernel was registered), in the
    inputs' dtypes; only the inputs that need one get one."""
    q0, g0 = (t.to(dtype).to(compiled_device) for t in _knn_inputs(6, Q=12, N=40, D=6, k=4))
    w = torch.randn(12, 4, dtype=F64).to(compiled_device)
    grads = {}
    for backend in ("compiled", "reference"):
        q, gal = q0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
        dist, idx = dnnrl_ext.knn(q, gal, 4, backend=backend)
        (dist.double() * w).sum().backward()
        grads[backend] = (idx, q.grad, gal.grad)
    (i_c, gq_c, gg_c), (i_r, gq_r, gg_r) = grads["compiled"], grads["reference"]
    assert torch.equal(i_c, i_r)
    assert gq_c.dtype == dtype and gg_c.dtype == dtype
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gq_c, gq_r, **tol)
    torch.testing.assert_close(gg_c, gg_r, **tol)
    assert gg_c.abs().sum(1).gt(0).sum() <= 12 * 4  # only neighbours get a gradient
    q = q0.clone().requires_grad_(True)
    dnnrl_ext.knn(q, g0, 4)[0].sum().backward()  # the gallery needs none
    assert q.grad is not None and q.grad.shape == q0.shape


# --------------------------------------------------------------------------- torch.compile
def test_compiled_training_step_matches_eager(compiled_device):
    """A fullgraph-compiled step (linear model + ExpTripletLoss) gives eager's loss and
    gradients; one SGD step from both gives the same weights."""
    if compiled_device != "cpu":
        pytest.skip("the compile test runs on the cpu")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    # gamma < 0 so that violating triplets of an untrained model still have gradients
    criterion = dnnrl_ext.ExpTripletLoss(alpha=0.2, gamma=-7.0, mining="batch_hard")

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(10, 6)

    def step(model, inp, lab):
        return criterion(model(inp), lab)

    eager_model, comp_model = make(), make()
    eager_loss = step(eager_model, x, y)
    eager_loss.backward()
    compiled = torch.compile(step, fullgraph=True)
    comp_loss = compiled(comp_model, x, y)
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert eager_model.weight.grad.abs().sum() > 0
    for pe, pc in zip(eager_model.parameters(), comp_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6)
    # a second call with other labels reuses the graph and stays equal
    y2 = torch.randint(0, 3, (32,), generator=g)
    torch.testing.assert_close(compiled(comp_model, x, y2), step(eager_model, x, y2), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- backward host work
@pytest.mark.parametrize("form", ["mined", "indexed"])
def test_backward_fills_no_zero_gradients_for_the_index_outputs(compiled_device, form):
    """Only the loss output is differentiable. The backward must not build zeros_like
    gradients for pos / neg / r / valid (set_materialize_grads(false) in csrc/autograd.cpp):
    on the H200, B = 128, those four allocations and fill launches were most of the
    backward's host time. The gradient itself is still the reference's."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    y = torch.randint(0, 3, (24,), generator=g)
    a, p, n = (torch.randint(0, 24, (10,), generator=g) for _ in range(3))
    grads = {}
    for backend in ("compiled", "reference"):
        x = x0.to(compiled_device).requires_grad_(True)
        if form == "mined":
            loss = dnnrl_ext.triplet_loss(x, y.to(compiled_device), gamma=-3.0, backend=backend)
        else:
            loss = dnnrl_ext.triplet_loss_from_triplets(x, a.to(x.device), p.to(x.device), n.to(x.device),
                                                        gamma=-3.0, backend=backend)
        if backend == "compiled":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss.backward()
            names = {e.key for e in prof.key_averages()}
            assert "dnnrl_ext::triplet_loss_backward" in names, sorted(names)
            assert not names & {"aten::zeros", "aten::zeros_like"}, sorted(names)
        else:
            loss.backward()
        grads[backend] = x.grad.cpu()
    torch.testing.assert_close(grads["compiled"], grads["reference"], rtol=1e-4, atol=1e-6)
