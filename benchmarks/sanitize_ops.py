"""Exercise every CUDA op once per code path on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python3 benchmarks/sanitize_ops.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_ops.py

Also checks each result against the reference so that a run that "passes" the
sanitizer but computes garbage does not go unnoticed. Exit code 1 on a mismatch.
"""
import os
import sys

import torch

import dnnrl_ext
from dnnrl_ext import reference as ref

DEV = os.environ.get("DNNRL_SANITIZE_DEVICE", "cuda")
failures = []


def check(name, got, want, atol=1e-3, rtol=1e-3):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        err = (got - want).abs().max().item() if got.shape == want.shape else "shape %s vs %s" % (got.shape, want.shape)
        failures.append("%s: max err %s" % (name, err))


def main():
    quick = "--quick" in sys.argv  # fewer combinations, for the slower racecheck
    torch.manual_seed(0)
    dtypes = ((torch.float32, 1e-4), (torch.float64, 1e-9), (torch.bfloat16, 2e-2), (torch.float16, 5e-3))
    shapes = ((0, 8), (1, 8), (37, 19), (130, 72), (257, 130))
    if quick:
        dtypes, shapes = dtypes[::2], shapes[::2]
    for dtype, tol in dtypes:
        for B, D in shapes:
            x = torch.randn(B, D, device=DEV).to(dtype)
            y = torch.randint(0, 5, (B,), device=DEV)
            for mining in ("batch_hard", "semi_hard"):
                for loss in ("exp", "hinge"):
                    for reduction in (("mean",) if quick else ("mean", "none")):
                        for deterministic in (False, True):
                            torch.use_deterministic_algorithms(deterministic)
                            xa = x.clone().requires_grad_(True)
                            out = dnnrl_ext.triplet_loss(xa, y, mining=mining, loss=loss, gamma=-0.5,
                                                         reduction=reduction, return_details=True)
                            out.loss.sum().backward()
                            xr = x.detach().cpu().clone().requires_grad_(True)
                            want = dnnrl_ext.triplet_loss(xr, y.cpu(), mining=mining, loss=loss, gamma=-0.5,
                                                          reduction=reduction, backend="reference")
                            want.sum().backward()
                            tag = "%s B=%d %s %s %s det=%s" % (dtype, B, mining, loss, reduction, deterministic)
                            check("loss " + tag, out.loss, want, tol, tol)
                            if B:
                                check("grad " + tag, xa.grad, xr.grad, tol * 10, tol * 10)
            torch.use_deterministic_algorithms(False)
            if B:
                T = 3 * B
                a, p, n = (torch.randint(0, B, (T,), device=DEV) for _ in range(3))
                xa = x.clone().requires_grad_(True)
                dnnrl_ext.triplet_loss_from_triplets(xa, a, p, n, gamma=-0.5).backward()
                xr = x.detach().cpu().clone().requires_grad_(True)
                dnnrl_ext.triplet_loss_from_triplets(xr, a.cpu(), p.cpu(), n.cpu(), gamma=-0.5,
                                                     backend="reference").backward()
                check("indexed grad %s B=%d" % (dtype, B), xa.grad, xr.grad, tol * 10, tol * 10)
                for k in (1, min(B, 10), B):
                    d, i = dnnrl_ext.knn(x, x.flip(0).contiguous(), k)
                    dr, _ = ref.knn(x.cpu(), x.flip(0).cpu(), k)
                    check("knn %s B=%d k=%d" % (dtype, B, k), d, dr, tol * 10, tol * 10)
                    pred = dnnrl_ext.knn_vote(x, x.flip(0).contiguous(), y, k, 5)
                    assert pred.shape == (B,)
    # mining with a row the norm expansion cannot take (inf; a finite row whose squared
    # norm overflows it): mine_pass takes those pairs by explicit differences, reading the
    # two rows from global memory; the mined indices must be the reference's
    cases = [(dtype, B, bad, tile) for dtype, big in ((torch.float32, 1e19), (torch.float64, 1e154),
                                                       (torch.bfloat16, 1e19), (torch.float16, None))
             for B in (37, 130) for bad in (float("inf"), big) if bad is not None
             for tile in ("tiny", "small", "large")]  # DNNRL_MINE_TILE: each mining tile
    for dtype, B, bad, tile in cases:
        os.environ["DNNRL_MINE_TILE"] = tile
        try:
            x = torch.randn(B, 24, device=DEV, dtype=torch.float64)
            x[B // 2, 3] = bad
            x = x.to(dtype)
            y = torch.randint(0, 5, (B,), device=DEV)
            for mining in ("batch_hard", "semi_hard"):
                out = dnnrl_ext.triplet_loss(x, y, mining=mining, return_details=True)
                want = dnnrl_ext.triplet_loss(x.cpu(), y.cpu(), mining=mining, return_details=True,
                                              backend="reference")
                tag = "mining with a %s row, %s B=%d %s, %s tile" % (bad, dtype, B, mining, tile)
                # where the bad row is chosen, and what its own anchor chooses (elsewhere
                # float rounding may break a near-tie differently from the reference)
                for name in ("pos", "neg"):
                    got, exp = getattr(out, name).cpu(), getattr(want, name)
                    if not (torch.equal(got == B // 2, exp == B // 2) and got[B // 2] == exp[B // 2]):
                        failures.append("%s: %s indices differ" % (tag, name))
        finally:
            os.environ.pop("DNNRL_MINE_TILE", None)
    # float32 k-NN through the opt-in candidate path (DNNRL_KNN_CANDIDATES=1) with a
    # neighbourhood denser than its error bound: query 0 takes the exact fallback pass
    # (flagged rows only), the others are certified
    q = torch.randn(20, 64, device=DEV)
    g = torch.cat([q[:1] + 1e-2 * torch.randn(60, 64, device=DEV), torch.randn(200, 64, device=DEV)])
    lab = torch.randint(0, 5, (g.shape[0],), device=DEV)
    # The opt-in filter path (DNNRL_KNN_FILTER=1) on the same rows (query 0's 60 rows are
    # candidates, re-ranked), and with query 1 crowded by 600 near copies: more than its
    # 512 candidate slots, so it takes the exact fallback pass.
    g_crowd = torch.cat([g, q[1:2] + 1e-4 * torch.randn(600, 64, device=DEV)])
    lab_crowd = torch.randint(0, 5, (g_crowd.shape[0],), device=DEV)
    os.environ.pop("DNNRL_KNN_EXACT", None)  # (it would keep the paths off)
    # (DNNRL_KNN_FILTER_BK=32 / DNNRL_KNN_FILTER_TILE=64: the filter pass's A/B variants)
    for env, gal, labels in (({"DNNRL_KNN_CANDIDATES": "1"}, g, lab), ({"DNNRL_KNN_FILTER": "1"}, g, lab),
                             ({"DNNRL_KNN_FILTER": "1"}, g_crowd, lab_crowd),
                             ({"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_BK": "32"}, g_crowd, lab_crowd),
                             ({"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_TILE": "64"}, g_crowd, lab_crowd)):
        os.environ.update(env)
        try:
            for k in (1, 10, 16, 32):
                if "DNNRL_KNN_CANDIDATES" in env and k > 16:
                    continue
                d, i = dnnrl_ext.knn(q, gal, k)
                dr, _ = ref.knn(q.cpu(), gal.cpu(), k)
                check("knn float32 dense, %s, N=%d, k=%d" % (env, gal.shape[0], k), d, dr, 1e-3, 1e-3)
                pred = dnnrl_ext.knn_vote(q, gal, labels, k, 5)
                assert pred.shape == (20,)
        finally:
            for var in env:
                os.environ.pop(var, None)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print("sanitize_ops: %d mismatches" % len(failures))
    for f in failures[:30]:
        print("  ", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
