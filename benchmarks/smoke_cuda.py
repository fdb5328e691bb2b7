"""Quick check of the CUDA paths that a GPU session's training runs rely on, before
they start (benchmarks/gpu_session.sh): a few seconds, against the reference.

Exit status, a bit per failed part (0 = all good):
  1  float32 k-NN, the default exact pass (fall back: --backend reference)
  2  the loss with its fused launches (fall back: DNNRL_LOSS_FEWER_LAUNCHES=0)
  4  the loss with its separate launches (fall back: --backend reference)
  8  the op's easy-positive mining, the recipe's (fall back: DNNRL_EASY_POSITIVE_IN_PYTHON=1,
     the triplets formed in Python and passed to the explicit-triplet op)
(the loss: the mined forms at B = 128-1000, and the explicit triplets of the Python fallback)

`--opt-in` instead compares the opt-in k-NN paths (candidate, filter) with the default
pass, printed only, exit 0. A process of its own: a fault there (a sticky CUDA error, a
crash) must not decide the runs' backend, which the status above does.
"""
import os
import sys

import torch

import dnnrl_ext


KNN_CASES = [(500, 4000, 64, 10, "rand"), (3589, 28709, 512, 10, "rand"), (300, 5000, 128, 16, "dense")]


def _knn_inputs(Q, N, D, kind):
    g = torch.Generator(device="cuda").manual_seed(Q + N)
    q = torch.nn.functional.normalize(torch.randn(Q, D, device="cuda", generator=g), dim=1)
    gal = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=1)
    if kind == "dense":
        gal[:200] = torch.nn.functional.normalize(
            q[:1] + 1e-3 * torch.randn(200, D, device="cuda", generator=g), dim=1)
    return q, gal


def _clear_knn_env():
    for var in ("DNNRL_KNN_EXACT", "DNNRL_KNN_CANDIDATES", "DNNRL_KNN_FILTER", "DNNRL_KNN_FILTER_BK"):
        os.environ.pop(var, None)


def knn_ok() -> bool:
    """The default float32 k-NN (the exact pass, what the runs use) against the reference."""
    ok = True
    for Q, N, D, k, kind in KNN_CASES:
        q, gal = _knn_inputs(Q, N, D, kind)
        _clear_knn_env()
        _, i2 = dnnrl_ext.knn(q, gal, k)
        _, ir = dnnrl_ext.knn(q[:200].cpu(), gal.cpu(), k, backend="reference")
        torch.cuda.synchronize()
        same_ref = (i2[:200].cpu() == ir).all(1).float().mean().item()
        print("knn Q=%d N=%d D=%d k=%d %s: default pass equal to the reference in %.4f of the rows"
              % (Q, N, D, k, kind, same_ref), flush=True)
        ok = ok and same_ref > 0.98
    return ok


def opt_in_knn_report() -> None:
    """The opt-in float32 k-NN paths (DNNRL_KNN_CANDIDATES=1, DNNRL_KNN_FILTER=1) against the
    default pass, printed only: the runs never take them (`--opt-in`, a process of its own)."""
    for Q, N, D, k, kind in KNN_CASES:
        q, gal = _knn_inputs(Q, N, D, kind)
        _clear_knn_env()
        d2, i2 = dnnrl_ext.knn(q, gal, k)
        line = "knn Q=%d N=%d D=%d k=%d %s, opt-in paths against the default" % (Q, N, D, k, kind)
        for name, var in (("candidate", "DNNRL_KNN_CANDIDATES"), ("filter", "DNNRL_KNN_FILTER")):
            os.environ[var] = "1"
            os.environ["DNNRL_KNN_STATS"] = "1"  # a warning with the number of exact-pass queries
            try:
                d1, i1 = dnnrl_ext.knn(q, gal, k)
                torch.cuda.synchronize()
                same = (i1 == i2).all(1).float().mean().item()
                err = (d1 - d2).abs().max().item()
                line += "; %s path equal in %.4f of the rows, max distance difference %.2e" % (name, same, err)
                if not (same > 0.99 and err < 1e-4):
                    line += " (DISAGREES)"
            except Exception as exc:
                line += "; %s path FAILED: %s" % (name, str(exc).splitlines()[0][:80])
            finally:
                os.environ.pop("DNNRL_KNN_STATS", None)
                os.environ.pop(var, None)
        print(line, flush=True)


def loss_ok(fewer_launches: bool) -> bool:
    os.environ.pop("DNNRL_LOSS_FEWER_LAUNCHES", None)
    if not fewer_launches:
        os.environ["DNNRL_LOSS_FEWER_LAUNCHES"] = "0"
    ok = True
    try:
        for B, mining, dtype in [(128, "batch_hard", torch.float32), (128, "semi_hard", torch.bfloat16),
                                 (300, "semi_hard", torch.float32), (1000, "batch_hard", torch.float32)]:
            g = torch.Generator().manual_seed(B)
            x = torch.nn.functional.normalize(torch.randn(B, 512, generator=g), dim=1)
            y = torch.randint(0, 7, (B,), generator=g)
            xa = x.to(dtype).cuda().detach().clone().requires_grad_(True)
            out = dnnrl_ext.triplet_loss(xa, y.cuda(), mining=mining, gamma=-0.3, return_details=True)
            out.loss.backward()
            v = out.valid.cpu()
            xr = x.to(dtype).double().detach().clone().requires_grad_(True)
            want = dnnrl_ext.triplet_loss_from_triplets(xr, torch.arange(B)[v], out.pos.cpu()[v],
                                                        out.neg.cpu()[v], gamma=-0.3, backend="reference")
            want.backward()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            lerr = abs(out.loss.item() - want.item())
            gerr = (xa.grad.double().cpu() - xr.grad).abs().max().item()
            gscale = xr.grad.abs().max().item() + 1e-12
            print("loss B=%d %s %s fewer_launches=%s: |loss diff| %.2e, max |grad diff| / max |grad| %.2e"
                  % (B, mining, dtype, fewer_launches, lerr, gerr / gscale), flush=True)
            ok = ok and lerr <= tol * max(1.0, abs(want.item())) and gerr <= tol * gscale
        ok = indexed_loss_ok(fewer_launches) and ok
    except Exception as exc:  # a launch failure must not stop the session
        print("loss fewer_launches=%s raised %s" % (fewer_launches, exc), flush=True)
        ok = False
    finally:
        os.environ.pop("DNNRL_LOSS_FEWER_LAUNCHES", None)
    return ok


def indexed_loss_ok(fewer_launches: bool) -> bool:
    """The loss on explicit triplets (what the session's recipe trains with: easy-positive
    mining forms one triplet per anchor in Python), mean-reduced, against the reference."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(7)
        B = 128
        x = torch.nn.functional.normalize(torch.randn(B, 512, generator=g), dim=1)
        a, p, n = torch.arange(B), torch.randint(0, B, (B,), generator=g), torch.randint(0, B, (B,), generator=g)
        xa = x.to(dtype).cuda().requires_grad_(True)
        loss = dnnrl_ext.triplet_loss_from_triplets(xa, a.cuda(), p.cuda(), n.cuda(), gamma=-0.3, validate=False)
        loss.backward()
        xr = x.to(dtype).double().requires_grad_(True)
        want = dnnrl_ext.triplet_loss_from_triplets(xr, a, p, n, gamma=-0.3, backend="reference")
        want.backward()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        lerr = abs(loss.item() - want.item())
        gscale = xr.grad.abs().max().item() + 1e-12
        gerr = (xa.grad.double().cpu() - xr.grad).abs().max().item() / gscale
        print("indexed loss B=%d %s fewer_launches=%s: |loss diff| %.2e, max |grad diff| / max |grad| %.2e"
              % (B, dtype, fewer_launches, lerr, gerr), flush=True)
        ok = ok and lerr <= tol * max(1.0, abs(want.item())) and gerr <= tol
    return ok


def easy_positive_ok() -> bool:
    """The op's easy-positive mining on CUDA, both launch settings, against the reference on
    the CPU: the same nearest positive and negative per anchor (inputs without ties), the same
    loss and gradient. B = 128 float32 is the recipe's step (embeddings go in as float32)."""
    ok = True
    try:
        for B, C, dtype in [(128, 7, torch.float32), (128, 7, torch.bfloat16), (300, 7, torch.float32),
                            (1000, 50, torch.float32), (77, 3, torch.float32)]:
            g = torch.Generator().manual_seed(B + C)
            x = torch.nn.functional.normalize(torch.randn(B, 512, generator=g), dim=1).to(dtype)
            y = torch.randint(0, C, (B,), generator=g)
            xr = x.double().requires_grad_(True)
            want = dnnrl_ext.triplet_loss(xr, y, mining="easy_positive", gamma=-0.3, return_details=True,
                                          backend="reference")
            want.loss.backward()
            for fewer in ("1", "0"):
                os.environ["DNNRL_LOSS_FEWER_LAUNCHES"] = fewer
                xa = x.cuda().requires_grad_(True)
                out = dnnrl_ext.triplet_loss(xa, y.cuda(), mining="easy_positive", gamma=-0.3, return_details=True)
                out.loss.backward()
                same = ((out.pos.cpu() == want.pos) & (out.neg.cpu() == want.neg)
                        & (out.valid.cpu() == want.valid)).float().mean().item()
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                lerr = abs(out.loss.item() - want.loss.item())
                gscale = xr.grad.abs().max().item() + 1e-12
                gerr = (xa.grad.double().cpu() - xr.grad).abs().max().item() / gscale
                print("easy-positive B=%d C=%d %s fewer_launches=%s: same triplets in %.4f of the anchors, "
                      "|loss diff| %.2e, max |grad diff| / max |grad| %.2e" % (B, C, dtype, fewer, same, lerr, gerr),
                      flush=True)
                # bfloat16 rounds the distances: a near tie may pick the other neighbour
                ok = ok and same >= (1.0 if dtype == torch.float32 else 0.97)
                ok = ok and lerr <= tol * max(1.0, abs(want.loss.item())) and (gerr <= tol or same < 1.0)
    except Exception as exc:  # a launch failure must not stop the session
        print("easy-positive raised %s" % exc, flush=True)
        ok = False
    finally:
        os.environ.pop("DNNRL_LOSS_FEWER_LAUNCHES", None)
    return ok


def main() -> int:
    if "--opt-in" in sys.argv[1:]:
        opt_in_knn_report()
        return 0
    status = 0
    try:
        if not knn_ok():
            status |= 1
    except Exception as exc:
        print("knn raised %s" % exc, flush=True)
        status |= 1
    if not loss_ok(True):
        status |= 2
    if not loss_ok(False):
        status |= 4
    if not easy_positive_ok():
        status |= 8
    print("smoke_cuda: status %d" % status, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
