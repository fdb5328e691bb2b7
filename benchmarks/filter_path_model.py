"""A CPU model of the k-NN filter path (DNNRL_KNN_FILTER=1, csrc/cuda/knn_cuda.cu):
how many candidates a query keeps and how many reach the exact re-rank, at a given
scale, with the kernel's own float16 copies, error bound, subset stride and slot cap.

It runs the path's arithmetic in float64 on the CPU (the float16 copies are exact in
float64; the kernel sums their products in float32, well inside the bound) and checks
the proof's premise (|approximate - float32 distance| <= e) and its conclusion (the
true top k lies in the re-ranked set). It says nothing about speed; the kernel's speed
is bench_gpu.py's column dnnrl_ext_filter.

    python3 benchmarks/filter_path_model.py                       # FER-2013 scale, k = 10
    python3 benchmarks/filter_path_model.py --k 1 32 --data clustered
"""
import argparse
import math
import time

import torch

CAP = 512          # kFilterCap
MAX_STRIDE = 16    # kFilterMaxStride
BUCKETS = 16       # kBoundBuckets: column groups per thread of the bound pass
MAX_SPLITS = 8     # kBoundMaxSplits
MULT = 7919        # gather_subset's first multiplier (the next odd number coprime to Ns)
CHUNK = 8192       # kFilterChunk: queries per bound + filter pass


def stride(N: int, k: int) -> int:
    """filter_stride() of the kernel."""
    s = max(1, min(MAX_STRIDE, CAP // (4 * k)))
    return max(1, min(s, N // k))


def subset_columns(N: int, k: int) -> torch.Tensor:
    """(Ns,) the gallery rows of the bound pass's subset, in gather_subset's order."""
    s = stride(N, k)
    Ns = -(-N // s)
    mult = MULT
    while math.gcd(mult, Ns) != 1:
        mult += 2
    return (torch.arange(Ns, dtype=torch.int64) * (mult % Ns) % Ns) * s


def bound_groups(Q: int, Ns: int, num_sms: int = 132) -> torch.Tensor:
    """(Ns,) the group of each subset column in knn_bound_kernel, for a chunk of Q queries:
    the tile is 128 wide once ceil(Q / 128) ceil(Ns / 128) >= num_sms, else 64; tile t goes
    to split t mod splits (splits = min(tiles, 8)); within a tile the 2 threads of a row and
    their 16 buckets take the columns by their index mod 32 (relabelled per row)."""
    bn = 128 if -(-min(Q, CHUNK) // 128) * -(-Ns // 128) >= num_sms else 64
    splits = min(-(-Ns // bn), MAX_SPLITS)
    i = torch.arange(Ns)
    return (i // bn) % splits * 32 + i % 32


def half_scaled(x: torch.Tensor) -> torch.Tensor:
    """The kernel's float16 copy of each row (scaled by 2^(15-E)), scaled back, in float64."""
    E = torch.frexp(x.double().abs().max(dim=1).values)[1].double()
    h = (x.double() * torch.pow(2.0, 15 - E)[:, None]).half().double()
    return h * torch.pow(2.0, E - 15)[:, None]


def inputs(kind: str, Q: int, N: int, D: int, seed: int):
    """Unit rows as bench_gpu.py builds them: "random" or "clustered" (1,000 centres); or
    "sorted": 7 class centres with spread, the gallery sorted by class (ImageFolder order)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, g = torch.randn(Q, D, generator=gen), torch.randn(N, D, generator=gen)
    elif kind == "sorted":
        c = torch.randn(7, D, generator=gen)
        q = c[torch.randint(0, 7, (Q,), generator=gen)] + 1.5 * torch.randn(Q, D, generator=gen)
        g = c[torch.randint(0, 7, (N,), generator=gen).sort().values] + 1.5 * torch.randn(N, D, generator=gen)
    else:
        c = torch.randn(1000, D, generator=gen)
        q = c[torch.randint(0, 1000, (Q,), generator=gen)] + 0.5 * torch.randn(Q, D, generator=gen)
        g = c[torch.randint(0, 1000, (N,), generator=gen)] + 0.5 * torch.randn(N, D, generator=gen)
    return torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)


def group_bound(sub: torch.Tensor, k: int, groups: torch.Tensor) -> torch.Tensor:
    """(Q,) the bound pass's tau: the k-th smallest of the group minima of the subset's
    approximate distances sub (Q, Ns), column j in group groups[j]."""
    Q, Ns = sub.shape
    G = int(groups.max()) + 1
    minima = torch.full((Q, G), float("inf"), dtype=sub.dtype)
    minima.scatter_reduce_(1, groups.expand(Q, Ns), sub, reduce="amin")
    return minima.kthvalue(k, dim=1).values


def model(q: torch.Tensor, g: torch.Tensor, k: int, num_sms: int = 132) -> dict:
    """Candidate and re-rank counts of the filter path for queries q (Q, D), gallery g (N, D),
    on a card with num_sms SMs (it picks the bound pass's tile)."""
    D = q.shape[1]
    qn, gn = (q.double() ** 2).sum(1), (g.double() ** 2).sum(1)
    approx = (qn[:, None] + gn[None, :] - 2 * half_scaled(q) @ half_scaled(g).T).clamp_min(0)
    exact = (qn[:, None] + gn[None, :] - 2 * q.double() @ g.double().T).clamp_min(0)
    u = 2.0 ** -11
    c_dot = 1.25 * (2 * u + u * u + D * 2.0 ** -22 + D * 2.0 ** -23)
    gmax = gn.max()
    e = 2 * c_dot * qn.sqrt() * gmax.sqrt() + (qn + gmax) * 2.0 ** -20
    slack = 2 * e + (qn + gmax) * 2.0 ** -20                      # filter_slack()
    cols = subset_columns(g.shape[0], k)
    groups = bound_groups(q.shape[0], cols.numel(), num_sms)
    tau = group_bound(approx[:, cols], k, groups)                 # the bound pass
    cand = approx <= (tau + slack)[:, None]                       # the filter pass
    count = cand.sum(1)
    alpha = torch.where(cand, approx, torch.full_like(approx, float("inf"))).kthvalue(k, dim=1).values
    rerank = cand & (approx <= (alpha + slack)[:, None])          # the re-rank's set
    top = exact.topk(k, dim=1, largest=False).indices
    return {"k": k, "stride": stride(g.shape[0], k), "groups": int(groups.max()) + 1, "max_err_over_e": float(((approx - exact).abs() / e[:, None]).max()),
            "candidates_mean": float(count.double().mean()), "candidates_p99": float(count.double().quantile(0.99)),
            "candidates_max": int(count.max()), "overflow_rows": int((count > CAP).sum()),
            "reranked_mean": float(rerank.sum(1).double().mean()), "reranked_max": int(rerank.sum(1).max()),
            "top_k_covered": float(rerank.gather(1, top).all(1).double().mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3589, help="Q (FER-2013 PublicTest: 3,589)")
    p.add_argument("--gallery", type=int, default=28709, help="N (FER-2013 Training: 28,709)")
    p.add_argument("--dim", type=int, default=512, help="D")
    p.add_argument("--k", type=int, nargs="+", default=[10])
    p.add_argument("--data", nargs="+", default=["random", "clustered", "sorted"],
                   choices=["random", "clustered", "sorted"])
    p.add_argument("--sms", type=int, default=132, help="the card's SM count (132: H100 / H200)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for kind in a.data:
        q, g = inputs(kind, a.queries, a.gallery, a.dim, a.seed)
        for k in a.k:
            t = time.time()
            r = model(q, g, k, a.sms)
            print("%s Q=%d N=%d D=%d k=%d stride %d, %d groups: candidates mean %.1f, p99 %.0f, max %d of %d "
                  "(%d rows overflow); re-ranked mean %.1f, max %d; |approx - exact| <= %.3f e; "
                  "true top k inside the re-ranked set: %.4f of the rows (%.0f s)"
                  % (kind, a.queries, a.gallery, a.dim, k, r["stride"], r["groups"], r["candidates_mean"], r["candidates_p99"],
                     r["candidates_max"], CAP, r["overflow_rows"], r["reranked_mean"], r["reranked_max"],
                     r["max_err_over_e"], r["top_k_covered"], time.time() - t), flush=True)


if __name__ == "__main__":
    main()
