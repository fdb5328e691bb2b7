"""The CUDA kernels run by the CPU emulator (tools/cuda_emu), without a GPU.

* The emulator itself: a correct kernel gives the right numbers, and each planted fault
  (divergent barrier, a shuffle waiting for an exited lane or reading outside its mask,
  a cp.async destination read before its wait, a misaligned wmma load, a launch above
  the shared-memory limit, a deadlock, a race) is reported or shows, so its checks can fail.
* The real kernels: on grid inputs (exact distances, many ties) the emulated CUDA kernels
  and the CPU kernel agree exactly on mined indices, validity and r, and to rounding on
  the loss and gradient, over dtypes, minings, losses, reductions, SM counts (hence
  column splits) and the three k-NN paths; their results do not depend on the order in
  which the threads of a block take turns (a race would).

tests/test_cuda_loss_paths.py and tests/test_knn_cuda_paths.py run in the emulator too
(the ``gpu`` fixture); ``DNNRL_TEST_EMULATED_CUDA=1`` runs the op tests' CPU cases on it.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings, strategies as st

from conftest import load_emulator
from test_knn_cuda_paths import _set_path
from ops_testutil import (DTYPES, MININGS, acc_dtype, grid_embeddings, grid_shift, loss_tols, make_labels,
                          require_compiled)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = {"exp": 0, "hinge": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
MINING_CODES = {"batch_hard": 0, "semi_hard": 1, "easy_positive": 2}


@pytest.fixture(scope="module")
def emu():
    require_compiled("cpu")
    return load_emulator().load()


def _cpu():
    return torch.ops.dnnrl_ext


# --------------------------------------------------------------------------- the emulator itself
def test_a_correct_kernel_gives_the_right_numbers(emu):
    x = torch.arange(64, dtype=torch.float32)
    out = emu.selftest(0, x)
    a = (torch.arange(256) % 7).float().view(16, 16)        # row-major A
    b = (torch.arange(256) % 5).float().view(16, 16).t()    # column-major B: B[k][n] = hb[n * 16 + k]
    prod = a @ b
    assert out[:5].tolist() == [2016.0, 496.0, 3.0, float(prod[0, 0]), float(prod[15, 15])]


@pytest.mark.parametrize("case,message", [
    (1, "divergent barriers"),
    (2, "waits for lane 16, which has exited"),
    (4, "not 256-bit aligned"),
    (6, "above the kernel's limit"),
    (7, "deadlock"),
    (8, "not in the mask"),
])
def test_planted_faults_are_reported(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case, torch.arange(64, dtype=torch.float32))


def test_a_cp_async_destination_read_before_its_wait_is_the_poison(emu):
    out = emu.selftest(3, torch.arange(64, dtype=torch.float32) + 5)
    assert torch.isnan(out[0]) and out[1] == 5.0


def test_a_race_shows_as_a_schedule_dependent_result(emu, monkeypatch):
    got = {}
    for order in ("forward", "reverse"):
        monkeypatch.setenv("DNNRL_EMU_SCHEDULE", order)
        got[order] = float(emu.selftest(5, torch.zeros(64))[0])
    assert got == {"forward": 2.0, "reverse": 1.0}


def test_a_misspelt_schedule_is_an_error(emu, monkeypatch):
    monkeypatch.setenv("DNNRL_EMU_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="DNNRL_EMU_SCHEDULE must be forward, reverse or random:SEED"):
        emu.selftest(0, torch.zeros(64))


def test_the_rewrite_covers_every_launch_and_refuses_what_it_does_not_understand():
    import emulated_ops
    text, n = emulated_ops.rewrite("k<<<dim3(a, b), 256, smem, stream>>>(x, y);\n"
                                   "f<T, true><<<g, 32>>>(z);\n", "t.cu")
    assert n == 2 and "<<<" not in text
    assert "::dnnrl_emu::Launch(dim3(a, b), 256, smem, stream).go(k, x, y);" in text
    assert "::dnnrl_emu::Launch(g, 32).go(f<T, true>, z);" in text
    with pytest.raises(RuntimeError, match="launch"):
        emulated_ops.rewrite("(*table[i])<<<1, 32>>>(x);", "t.cu")
    with pytest.raises(RuntimeError, match="extern __shared__"):
        emulated_ops.rewrite("extern __shared__ float buf[];", "t.cu")
    cu = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))
    assert len(cu) >= 3
    for f in cu:  # every kernel source goes through the rewrite as it is
        emulated_ops.rewrite(open(os.path.join(ROOT, "csrc", "cuda", f)).read(), f)
    assert [s.split("(")[0] for s in emulated_ops.schemas()] == list(emulated_ops.OPS)


# --------------------------------------------------------------------------- the real kernels
@st.composite
def loss_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 12) | st.integers(12, 96))
    D = draw(st.integers(1, 8) | st.integers(8, 48))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    labels = make_labels(rng, B, draw(st.sampled_from(["random", "random", "single", "singletons", "mixed"])),
                         draw(st.integers(1, 6)))
    alpha = draw(st.sampled_from([0.2, 1.0, 3.5]))
    spread = draw(st.sampled_from([1, 2, 3]))
    shift = grid_shift(D, spread, alpha)
    x = grid_embeddings(rng, B, D, dtype, spread, shift, dup=draw(st.booleans()))
    step = 2.0 ** -(2 * shift)
    return dict(x=x, labels=labels, mining=draw(st.sampled_from(MININGS)), loss=draw(st.sampled_from(list(LOSSES))),
                reduction=draw(st.sampled_from(list(REDUCTIONS))), alpha=alpha,
                gamma=step * draw(st.integers(-6, 6)), margin=step * (draw(st.integers(-2, 12)) + 0.5),
                sms=draw(st.sampled_from([1, 3, 132])), tile=draw(st.sampled_from(["", "", "tiny", "small", "large"])),
                fewer=draw(st.sampled_from(["1", "1", "0"])), seed=seed)


def _loss_args(c):
    return (MINING_CODES[c["mining"]], LOSSES[c["loss"]], c["alpha"], c["gamma"], c["margin"],
            REDUCTIONS[c["reduction"]])


@settings(max_examples=25, deadline=None)
@given(case=loss_case())
def test_emulated_loss_equals_the_cpu_kernel_on_grid_inputs(emu, case, monkeypatch):
    """Mined indices, validity and r exactly; loss and gradient to rounding; forward and backward."""
    x, labels = case["x"], case["labels"]
    note({k: v for k, v in case.items() if k not in ("x", "labels")})
    note("B=%d D=%d %s" % (x.shape[0], x.shape[1], x.dtype))
    monkeypatch.setenv("DNNRL_EMU_SMS", str(case["sms"]))
    monkeypatch.setenv("DNNRL_LOSS_FEWER_LAUNCHES", case["fewer"])
    if case["tile"]:
        monkeypatch.setenv("DNNRL_MINE_TILE", case["tile"])
    args = _loss_args(case)
    got = emu.triplet_loss(x, labels, *args)
    want = _cpu().triplet_loss(x, labels, *args)
    for name, g, w in zip(("pos", "neg", "r", "valid"), got[1:], want[1:]):
        assert torch.equal(g, w), name
    acc = acc_dtype(x.dtype)
    assert got[0].dtype == acc and got[0].shape == want[0].shape
    atol, rtol = loss_tols(x, case["alpha"], case["loss"], case["reduction"], int(want[4].sum()))
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    up = torch.linspace(-1.0, 2.0, x.shape[0], dtype=acc) if case["reduction"] == "none" else torch.tensor(1.5, dtype=acc)
    bwd = (up, x, None, want[1], want[2], want[3], want[4], *args[1:])
    g_emu, g_cpu = emu.triplet_loss_backward(*bwd), _cpu().triplet_loss_backward(*bwd)
    assert g_emu.dtype == x.dtype and g_emu.shape == x.shape
    tol = 1e-5 if acc == torch.float32 else 1e-12
    if x.dtype in (torch.float16, torch.bfloat16):
        tol = 2 * torch.finfo(x.dtype).eps
    scale = float(g_cpu.double().abs().max()) if g_cpu.numel() else 0.0
    torch.testing.assert_close(g_emu.double(), g_cpu.double(), rtol=tol, atol=tol * scale + 1e-30)


@settings(max_examples=15, deadline=None)
@given(dtype=st.sampled_from(DTYPES), B=st.integers(1, 60), D=st.integers(1, 40), T=st.integers(0, 80),
       seed=st.integers(0, 2 ** 32 - 1), loss=st.sampled_from(list(LOSSES)),
       reduction=st.sampled_from(list(REDUCTIONS)))
def test_emulated_indexed_loss_equals_the_cpu_kernel(emu, dtype, B, D, T, seed, loss, reduction):
    rng = np.random.default_rng(seed)
    x = grid_embeddings(rng, B, D, dtype, 2, grid_shift(D, 2, 1.0), dup=True)
    trip = [torch.as_tensor(rng.integers(0, B, T), dtype=torch.int64) for _ in range(3)]
    args = (LOSSES[loss], 1.0, 0.25, 0.5, REDUCTIONS[reduction])
    got, want = emu.triplet_loss_indexed(x, *trip, *args), _cpu().triplet_loss_indexed(x, *trip, *args)
    assert torch.equal(got[1], want[1])
    atol, rtol = loss_tols(x, 1.0, loss, reduction, T)
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    acc = acc_dtype(dtype)
    up = torch.linspace(-1.0, 1.0, T, dtype=acc) if reduction == "none" else torch.tensor(0.7, dtype=acc)
    bwd = (up, x, trip[0], trip[1], trip[2], want[1], None, *args)
    g_emu, g_cpu = emu.triplet_loss_backward(*bwd), _cpu().triplet_loss_backward(*bwd)
    tol = 1e-5 if acc == torch.float32 else 1e-12
    if dtype in (torch.float16, torch.bfloat16):
        tol = 2 * torch.finfo(dtype).eps
    scale = float(g_cpu.double().abs().max()) if g_cpu.numel() else 0.0
    torch.testing.assert_close(g_emu.double(), g_cpu.double(), rtol=tol, atol=tol * scale + 1e-30)


KNN_PATHS = ("exact", "candidates", "filter", "filter_tile64")  # test_knn_cuda_paths.PATH_ENV's names


def _assert_knn_equal(emu, q, g, labels, k, C):
    """knn and knn_vote of the emulated kernels equal the CPU kernel's bit for bit."""
    for got, want in ((emu.knn(q, g, k), _cpu().knn(q, g, k)),
                      (emu.knn_vote(q, g, labels, k, C), _cpu().knn_vote(q, g, labels, k, C))):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), (a, b)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES), Q=st.integers(1, 40), N=st.integers(1, 400), D=st.integers(1, 40),
       k=st.integers(1, 40), C=st.integers(1, 6), seed=st.integers(0, 2 ** 32 - 1),
       path=st.sampled_from(KNN_PATHS), sms=st.sampled_from([1, 5, 132]), dup=st.booleans())
def test_emulated_knn_equals_the_cpu_kernel_on_grid_inputs(emu, dtype, Q, N, D, k, C, seed, path, sms, dup,
                                                           monkeypatch):
    """Exact distances: the same neighbours in the same order (ties to the smaller index), the
    same distances, the same votes and predictions, on every path and split count."""
    k = min(k, N)
    note("Q=%d N=%d D=%d k=%d %s %s sms=%d" % (Q, N, D, k, dtype, path, sms))
    rng = np.random.default_rng(seed)
    both = grid_embeddings(rng, Q + N, D, dtype, 2, 0, dup=dup)
    q, g = both[:Q], both[Q:]
    labels = torch.as_tensor(rng.integers(0, C, N), dtype=torch.int64)
    _set_path(monkeypatch, path)
    monkeypatch.setenv("DNNRL_EMU_SMS", str(sms))
    _assert_knn_equal(emu, q, g, labels, k, C)


def _all_outputs(emu, monkeypatch, B=150, D=40, seed=0):
    """Every op's outputs on one input (float32 and bfloat16 loss, three k-NN paths)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    y = torch.randint(0, 5, (B,), generator=gen)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for m in (0, 1, 2):
            res = emu.triplet_loss(x.to(dtype), y, m, 0, 1.0, -0.1, 0.2, 1)
            out += list(res)
            out.append(emu.triplet_loss_backward(torch.tensor(1.0), x.to(dtype), None, res[1], res[2], res[3],
                                                 res[4], 0, 1.0, -0.1, 0.2, 1))
    g = torch.randn(700, D, generator=gen)
    for path in ("exact", "candidates", "filter"):
        _set_path(monkeypatch, path)
        out += list(emu.knn(x[:40], g, 7)) + list(emu.knn_vote(x[:40], g, y.repeat(5)[:700], 7, 5))
    return out


def test_the_kernels_do_not_depend_on_the_thread_schedule(emu, monkeypatch):
    """forward, reverse and random turn orders give bitwise-equal outputs: no result depends on
    which thread of a block gets to a shared-memory word first between two barriers."""
    runs = {}
    for order in ("forward", "reverse", "random:7"):
        monkeypatch.setenv("DNNRL_EMU_SCHEDULE", order)
        runs[order] = _all_outputs(emu, monkeypatch)
    for order in ("reverse", "random:7"):
        for a, b in zip(runs["forward"], runs[order]):
            assert torch.equal(a, b), order


# --------------------------------------------------------------------------- fixed cases
# Deterministic counterparts of the property tests above (the mutation check counts only
# tests whose examples do not change from run to run): grid inputs with repeated rows, so
# the tie rules decide, on every dtype, mining, loss and split count.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("B,D,sms,tile", [(7, 3, 132, ""), (77, 20, 132, ""), (150, 33, 3, "small"),
                                          (90, 40, 1, "large")])
def test_fixed_grid_losses_equal_the_cpu_kernel(emu, dtype, mining, B, D, sms, tile, monkeypatch):
    rng = np.random.default_rng(B * 31 + D)
    labels = make_labels(rng, B, "mixed", 4)
    x = grid_embeddings(rng, B, D, dtype, 2, grid_shift(D, 2, 1.0), dup=True)
    step = 2.0 ** -(2 * grid_shift(D, 2, 1.0))
    monkeypatch.setenv("DNNRL_EMU_SMS", str(sms))
    if tile:
        monkeypatch.setenv("DNNRL_MINE_TILE", tile)
    for loss, reduction in (("exp", "mean"), ("hinge", "none")):
        case = dict(x=x, labels=labels, mining=mining, loss=loss, reduction=reduction, alpha=1.0,
                    gamma=2 * step, margin=5.5 * step)
        args = _loss_args(case)
        got, want = emu.triplet_loss(x, labels, *args), _cpu().triplet_loss(x, labels, *args)
        for name, g, w in zip(("pos", "neg", "r", "valid"), got[1:], want[1:]):
            assert torch.equal(g, w), (name, loss)
        atol, rtol = loss_tols(x, 1.0, loss, reduction, int(want[4].sum()))
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
        acc = acc_dtype(dtype)
        up = torch.linspace(-1.0, 2.0, B, dtype=acc) if reduction == "none" else torch.tensor(1.5, dtype=acc)
        bwd = (up, x, None, want[1], want[2], want[3], want[4], *args[1:])
        g_emu, g_cpu = emu.triplet_loss_backward(*bwd), _cpu().triplet_loss_backward(*bwd)
        tol = 2 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-5
        scale = float(g_cpu.double().abs().max())
        torch.testing.assert_close(g_emu.double(), g_cpu.double(), rtol=tol, atol=tol * scale + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("path", KNN_PATHS)
@pytest.mark.parametrize("Q,N,D,k,sms", [(5, 40, 3, 7, 132), (30, 350, 24, 10, 5), (9, 300, 16, 40, 1)])
def test_fixed_grid_knn_equals_the_cpu_kernel(emu, dtype, path, Q, N, D, k, sms, monkeypatch):
    rng = np.random.default_rng(Q * 7 + N)
    both = grid_embeddings(rng, Q + N, D, dtype, 2, 0, dup=True)
    q, g = both[:Q], both[Q:]
    q[0] = g[3]  # a query equal to a gallery row: distance 0
    labels = torch.as_tensor(rng.integers(0, 5, N), dtype=torch.int64)
    _set_path(monkeypatch, path)
    monkeypatch.setenv("DNNRL_EMU_SMS", str(sms))
    _assert_knn_equal(emu, q, g, labels, k, 5)


def _non_finite_rows(x):
    """x with rows the expansion ||a||^2 + ||b||^2 - 2 a.b cannot be trusted with: +inf and
    -inf entries, a NaN, and finite rows whose squared norm overflows (float32 / 16-bit)."""
    x = x.clone()
    big = 1e20 if x.dtype in (torch.float32, torch.float64) else 6e4
    x[2, 0] = float("inf")
    x[5, 1] = float("nan")
    x[7, 0] = -float("inf")
    x[9] = big
    x[11, 0] = -big
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("path", KNN_PATHS)
def test_fixed_non_finite_knn_equals_the_cpu_kernel(emu, dtype, path, monkeypatch):
    """k = N: every gallery row is ranked, so the order of inf against NaN distances counts
    (a row with a non-finite norm has only NaN distances; the expansion alone would give
    inf for some queries, by the signs)."""
    gen = torch.Generator().manual_seed(11)
    g = _non_finite_rows(torch.randn(24, 6, generator=gen).to(dtype))
    q = torch.cat([torch.randn(6, 6, generator=gen), -torch.randn(6, 6, generator=gen).abs()]).to(dtype)
    q[3, 2] = float("inf")
    labels = torch.arange(24) % 3
    _set_path(monkeypatch, path)
    for k in (24, 13):
        for got, want in ((emu.knn(q, g, k), _cpu().knn(q, g, k)),
                          (emu.knn_vote(q, g, labels, k, 3), _cpu().knn_vote(q, g, labels, k, 3))):
            for a, b in zip(got, want):
                if a.is_floating_point():  # distances of random rows: to rounding, NaN and inf in place
                    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-3 if dtype != torch.float64 else 1e-9,
                                               atol=1e-5)
                else:
                    assert torch.equal(a, b), (k, a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("mining", MININGS)
def test_fixed_non_finite_losses_equal_the_cpu_kernel(emu, dtype, mining):
    """Rows the expansion cannot be trusted with take their distances by explicit differences
    in mine_pass, as in the CPU kernel's exact mining: the same triplets and r."""
    gen = torch.Generator().manual_seed(12)
    x = _non_finite_rows(torch.randn(40, 6, generator=gen).to(dtype))
    labels = torch.arange(40) % 4
    args = (MINING_CODES[mining], 1, 1.0, 0.0, 0.5, 0)
    got, want = emu.triplet_loss(x, labels, *args), _cpu().triplet_loss(x, labels, *args)
    for name, a, b in zip(("loss", "pos", "neg", "r", "valid"), got, want):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------- memcheck
@pytest.mark.parametrize("case,report", [(9, "heap-buffer-overflow"), (10, "use-after-poison")])
def test_memcheck_reports_out_of_bounds_accesses(emu, case, report, tmp_path):
    """tools/cuda_emu/memcheck.sh (the emulator under AddressSanitizer) stops at a kernel's
    read one element past its input tensor (case 9) and its write one byte past its dynamic
    shared memory (case 10), and names the kernel."""
    import subprocess
    env = dict(os.environ, DNNRL_EMU_SELFTEST_CASE=str(case),
               ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:"
                            "detect_odr_violation=0:halt_on_error=1:log_path=%s" % (tmp_path / "asan"))
    res = subprocess.run(["bash", os.path.join(ROOT, "tools", "cuda_emu", "memcheck.sh"),
                          os.path.join(ROOT, "tests", "test_cuda_emulated.py"), "-k", "planted_fault_under_memcheck"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert report in logs and ("global_oob_kernel" if case == 9 else "shared_oob_kernel") in logs, logs[:3000]


def test_planted_fault_under_memcheck(emu):
    """Run by the test above, inside memcheck.sh."""
    case = os.environ.get("DNNRL_EMU_SELFTEST_CASE")
    if not case:
        pytest.skip("run by test_memcheck_reports_out_of_bounds_accesses under tools/cuda_emu/memcheck.sh")
    emu.selftest(int(case), torch.arange(64, dtype=torch.float32))
