"""GPU benchmark: dnnrl_ext's CUDA kernels against the alternatives, same inputs, one run.

* Fused loss forward+backward vs the plain-PyTorch reference (cdist + masks + max/min)
  and pytorch-metric-learning (BatchHardMiner + TripletMarginLoss), B in {128, 1024,
  8192}, D = 512, float32 and bfloat16.
* knn_vote at FER-2013 scale (3,589 x 28,709 x 512, k = 10) and with a 1,000,000-row
  gallery vs chunked torch (cdist + topk).
* Last (new code that has not yet run on a GPU may fault): easy-positive mining, the fused
  op vs the PyTorch-ops mining + indexed loss (the app's form before session 24, its fallback
  now) and plain PyTorch, float32.
Times are medians of CUDA-event timings after warm-up; peak memory is the allocator's
peak above what the inputs already hold; "mm_fraction" is the distance work's FLOP rate
(2 B^2 D, or 2 Q N D) over the card's measured torch.mm rate in the same dtype.

Usage:  python3 benchmarks/bench_gpu.py [--quick] [--out DIR_OR_JSON]
"""
import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alternatives  # noqa: E402
import common  # noqa: E402

import dnnrl_ext  # noqa: E402

DEV = "cuda"


def mm_rate(dtype, n=8192):
    """Measured matrix-multiply FLOP/s of this card for dtype (float32 without TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    t = common.time_cuda(lambda: a @ b, repeats=10, warmup=3)
    return 2 * n ** 3 / t


def measure(fn, repeats):
    """(median seconds, peak extra MiB) of fn() on the GPU."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return common.time_cuda(fn, repeats=repeats), peak


# the environment of the loss's A/B columns: DNNRL_LOSS_FEWER_LAUNCHES=0, the launch sequence
# before session 3; DNNRL_MINE_TILE=small, the mining tile small batches had before session 9
LOSS_COLUMN_ENV = {"dnnrl_ext_6_launches": {"DNNRL_LOSS_FEWER_LAUNCHES": "0"},
                   "dnnrl_ext_small_tile": {"DNNRL_MINE_TILE": "small"}}


def bench_loss(sizes, dtypes, rates, repeats):
    rows = []
    pml = alternatives.PMLBatchHard()
    for dtype in dtypes:
        for B in sizes:
            g = torch.Generator(device=DEV).manual_seed(B)
            x0 = torch.nn.functional.normalize(torch.randn(B, 512, device=DEV, generator=g), dim=1).to(dtype)
            y = torch.randint(0, 7, (B,), device=DEV, generator=g)
            x = x0.clone().requires_grad_(True)

            def step(loss_fn):
                x.grad = None
                loss_fn(x, y).backward()

            row = {"dtype": str(dtype).replace("torch.", ""), "B": B}
            ours = lambda a, b: dnnrl_ext.triplet_loss(a, b)  # noqa: E731
            cands = {"dnnrl_ext": ours, "dnnrl_ext_6_launches": ours, "plain_pytorch": alternatives.plain_pytorch_exp_triplet,
                     "pml": pml}
            if B <= 1024:  # the 64 x 64 mining tile where the 32 x 32 one is chosen (B <= 320 on an H100 / H200)
                cands["dnnrl_ext_small_tile"] = ours
            for name, f in cands.items():
                os.environ.update(LOSS_COLUMN_ENV.get(name, {}))
                try:
                    t, mem = measure(lambda f=f: step(f), repeats)
                    row[name + "_ms"], row[name + "_mib"] = t * 1e3, mem
                except Exception as exc:  # an alternative that cannot run this dtype
                    row[name + "_ms"] = "error: %s" % str(exc).splitlines()[0][:60]
                finally:
                    for var in LOSS_COLUMN_ENV.get(name, {}):
                        os.environ.pop(var, None)
            with torch.no_grad():
                t_fwd = common.time_cuda(lambda: dnnrl_ext.triplet_loss(x0, y), repeats=repeats)
            row["ours_fwd_ms"] = t_fwd * 1e3
            row["mm_fraction"] = 2 * B * B * 512 / t_fwd / rates[dtype]
            for alt in ("plain_pytorch", "pml"):
                if isinstance(row.get(alt + "_ms"), float) and isinstance(row.get("dnnrl_ext_ms"), float):
                    row["x_vs_" + alt] = row[alt + "_ms"] / row["dnnrl_ext_ms"]
            rows.append(row)
            print(row, flush=True)
            del x, x0
            torch.cuda.empty_cache()
    return rows


def bench_easy_positive(sizes, repeats):
    """mining="easy_positive" forward + backward (float32, D = 512, 7 classes): the fused op
    against the PyTorch-ops mining + indexed loss (alternatives.python_mining_easy_positive,
    what `dnnrl train --mining easy_positive` runs with DNNRL_EASY_POSITIVE_IN_PYTHON=1) and
    plain PyTorch, and the largest
    difference of the fused loss from the PyTorch-ops one."""
    rows = []
    cands = {"dnnrl_ext": lambda a, b: dnnrl_ext.triplet_loss(a, b, mining="easy_positive"),
             "python_mining": alternatives.python_mining_easy_positive,
             "plain_pytorch": alternatives.plain_pytorch_exp_triplet_easy_positive}
    for B in sizes:
        g = torch.Generator(device=DEV).manual_seed(B)
        x0 = torch.nn.functional.normalize(torch.randn(B, 512, device=DEV, generator=g), dim=1)
        y = torch.randint(0, 7, (B,), device=DEV, generator=g)
        x = x0.clone().requires_grad_(True)
        row = {"B": B, "loss_diff": float((cands["dnnrl_ext"](x0, y) - cands["python_mining"](x0, y)).abs())}
        for name, f in cands.items():
            def step(f=f):
                x.grad = None
                f(x, y).backward()
            t, mem = measure(step, repeats)
            row[name + "_ms"], row[name + "_mib"] = t * 1e3, mem
        row["x_vs_python_mining"] = row["python_mining_ms"] / row["dnnrl_ext_ms"]
        row["x_vs_plain_pytorch"] = row["plain_pytorch_ms"] / row["dnnrl_ext_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _knn_inputs(Q, N, kind, g):
    """Unit-norm query / gallery rows: "random" (isotropic) or "clustered" (1,000 centres
    with spread: neighbourhoods as dense as trained FER-2013 embeddings' or denser)."""
    if kind == "random":
        q = torch.randn(Q, 512, device=DEV, generator=g)
        gal = torch.randn(N, 512, device=DEV, generator=g)
    else:
        centres = torch.randn(1000, 512, device=DEV, generator=g)
        q = centres[torch.randint(0, 1000, (Q,), device=DEV, generator=g)] + 0.5 * torch.randn(
            Q, 512, device=DEV, generator=g)
        gal = centres[torch.randint(0, 1000, (N,), device=DEV, generator=g)] + 0.5 * torch.randn(
            N, 512, device=DEV, generator=g)
    return torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(gal, dim=1)


FAST_PATHS = {"candidates": "DNNRL_KNN_CANDIDATES", "filter": "DNNRL_KNN_FILTER"}  # opt-in k-NN paths
# the environment of each timed column: the default exact pass, the opt-in paths, and the
# filter pass with 32-wide D chunks and on the 64x64 tile (A/B of its 64-wide, 128x128 default)
COLUMN_ENV = {"dnnrl_ext": {}, "dnnrl_ext_candidates": {"DNNRL_KNN_CANDIDATES": "1"},
              "dnnrl_ext_filter": {"DNNRL_KNN_FILTER": "1"},
              "dnnrl_ext_filter_bk32": {"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_BK": "32"},
              "dnnrl_ext_filter_tile64": {"DNNRL_KNN_FILTER": "1", "DNNRL_KNN_FILTER_TILE": "64"}}


def _exact_pass_queries(q, gal, lab, path):
    """How many queries the opt-in path ("candidates" or "filter") left to the exact pass
    (DNNRL_KNN_STATS warning); None where the path does not apply (shape / dtype outside it)."""
    import re
    import warnings
    os.environ["DNNRL_KNN_STATS"] = "1"
    os.environ[FAST_PATHS[path]] = "1"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dnnrl_ext.knn_vote(q, gal, lab, 10, 7)
            torch.cuda.synchronize()
    finally:
        os.environ.pop("DNNRL_KNN_STATS", None)
        os.environ.pop(FAST_PATHS[path], None)
    for w in caught:
        m = re.search(r"(\d+) of (\d+) queries took the exact pass", str(w.message))
        if m:
            return int(m.group(1))
    return None


def _time_column(row, name, q, gal, lab, repeats, ours):
    """Time knn_vote with column `name`'s environment into row; its predictions."""
    path = name[10:] or None
    os.environ.update(COLUMN_ENV[name])
    try:
        t, mem = measure(lambda: dnnrl_ext.knn_vote(q, gal, lab, 10, 7), repeats)
        row.update({name + "_ms": t * 1e3, name + "_mib": mem})
        pred = dnnrl_ext.knn_vote(q, gal, lab, 10, 7)
        if path is not None:  # agreement with the default exact pass
            row[path + "_pred_agreement"] = float((pred == ours).double().mean()) if ours is not None else None
        if isinstance(row.get("chunked_torch_ms"), float):
            row["x_vs_chunked" + name[9:]] = row["chunked_torch_ms"] / row[name + "_ms"]
        return pred
    except Exception as exc:
        row[name + "_ms"] = "error: %s" % str(exc).splitlines()[0][:60]
        return None
    finally:
        for var in COLUMN_ENV[name]:
            os.environ.pop(var, None)


def _clear_knn_env():
    for var in ("DNNRL_KNN_EXACT", "DNNRL_KNN_FILTER_BK", "DNNRL_KNN_FILTER_TILE",
                *FAST_PATHS.values()):  # each column sets its own
        if os.environ.pop(var, None) is not None:
            print("bench_knn: ignoring %s from the environment" % var, flush=True)


def bench_knn(shapes, rates, repeats):
    """knn_vote, ours (the default exact 3xTF32 pass) vs chunked torch. The opt-in paths
    are timed afterwards by bench_knn_opt_in, in the last section of the run."""
    _clear_knn_env()
    rows = []
    for Q, N, kind in shapes:
        g = torch.Generator(device=DEV).manual_seed(N)
        q, gal = _knn_inputs(Q, N, kind, g)
        lab = torch.randint(0, 7, (N,), device=DEV, generator=g)
        row = {"Q": Q, "N": N, "k": 10, "data": kind}
        alt = None
        try:
            t, mem = measure(lambda: alternatives.chunked_torch_knn_vote(q, gal, lab, 10, 7), repeats)
            row.update(chunked_torch_ms=t * 1e3, chunked_torch_mib=mem)
            alt = alternatives.chunked_torch_knn_vote(q, gal, lab, 10, 7)
        except Exception as exc:
            row["chunked_torch_ms"] = "error: %s" % str(exc).splitlines()[0][:60]
        ours = _time_column(row, "dnnrl_ext", q, gal, lab, repeats, None)
        if isinstance(row.get("dnnrl_ext_ms"), float):
            row["mm_fraction"] = 2 * Q * N * 512 / (row["dnnrl_ext_ms"] / 1e3) / rates[torch.float32]
        if ours is not None and alt is not None:
            row["pred_agreement"] = float((ours == alt).double().mean())
        rows.append(row)
        print(row, flush=True)
        del q, gal, lab
        torch.cuda.empty_cache()
    return rows


def bench_knn_opt_in(rows, repeats):
    """Adds the opt-in float32 paths (DNNRL_KNN_CANDIDATES=1, DNNRL_KNN_FILTER=1 and the
    filter pass with 32-wide chunks) to the rows of bench_knn, on the same inputs
    (regenerated from the same seed). Last in the run: an opt-in path that faults (a sticky
    CUDA error ends the process's use of the card) cannot cost the other sections."""
    _clear_knn_env()
    for row in rows:
        if row["N"] > 100_000:  # the float16 copies of the paths stop at 64 MiB: both are the exact pass
            continue
        Q, N = row["Q"], row["N"]
        g = torch.Generator(device=DEV).manual_seed(N)
        q, gal = _knn_inputs(Q, N, row["data"], g)
        lab = torch.randint(0, 7, (N,), device=DEV, generator=g)
        ours = dnnrl_ext.knn_vote(q, gal, lab, 10, 7)
        for name in COLUMN_ENV:
            if name != "dnnrl_ext":
                _time_column(row, name, q, gal, lab, repeats, ours)
        for path in FAST_PATHS:
            key = "exact_pass_queries" if path == "candidates" else path + "_exact_pass_queries"
            row[key] = _exact_pass_queries(q, gal, lab, path)
        print(row, flush=True)
        del q, gal, lab
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--out", default=None, help="JSON file or directory (default benchmarks/results/)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    info = common.machine("cuda")
    print("machine:", info, flush=True)
    rates = {torch.float32: mm_rate(torch.float32), torch.bfloat16: mm_rate(torch.bfloat16)}
    print("measured mm TFLOP/s: fp32 %.1f, bf16 %.1f" % (rates[torch.float32] / 1e12,
                                                         rates[torch.bfloat16] / 1e12), flush=True)
    repeats = 5 if args.quick else 20
    payload = {"machine": info, "mm_tflops": {"float32": rates[torch.float32] / 1e12,
                                              "bfloat16": rates[torch.bfloat16] / 1e12}}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if not out.endswith(".json"):
        out = os.path.join(out, "%s-%s.json" % (common.card_slug(info), info["date"]))
    # each section is written as soon as it is done: a run stopped by a time limit keeps
    # what it measured (FER-scale k-NN first, the 1M-row gallery last)
    try:
        shapes = [(3589, 28709, "random"), (3589, 28709, "clustered")]
        payload["knn_vote"] = bench_knn(shapes, rates, max(3, repeats // 4))
    except Exception:
        traceback.print_exc()
    common.write_json(out, payload)
    try:
        payload["loss"] = bench_loss((128, 1024, 8192), (torch.float32, torch.bfloat16), rates, repeats)
    except Exception:
        traceback.print_exc()
    common.write_json(out, payload)
    if not args.quick:
        try:
            payload["knn_vote"] = payload.get("knn_vote", []) + bench_knn([(3589, 1_000_000, "random")], rates,
                                                                         max(3, repeats // 4))
        except Exception:
            traceback.print_exc()
        common.write_json(out, payload)
    if payload.get("knn_vote"):  # last: see bench_knn_opt_in
        try:
            bench_knn_opt_in(payload["knn_vote"], max(3, repeats // 4))
        except Exception:
            traceback.print_exc()
    common.write_json(out, payload)
    try:  # after everything else: the easy-positive kernel's first run on a GPU
        payload["loss_easy_positive"] = bench_easy_positive((128, 1024, 8192), repeats)
    except Exception:
        traceback.print_exc()
    md = []
    if payload.get("loss"):
        print("\n## Fused loss forward+backward, D=512, 7 classes (%s)" % info.get("gpu"))
        md.append(common.print_table(payload["loss"], [
            "dtype", "B", "dnnrl_ext_ms", "dnnrl_ext_6_launches_ms", "dnnrl_ext_small_tile_ms", "plain_pytorch_ms",
            "pml_ms",
            "x_vs_plain_pytorch", "x_vs_pml",
            "dnnrl_ext_mib", "plain_pytorch_mib", "pml_mib", "ours_fwd_ms", "mm_fraction"]))
    if payload.get("loss_easy_positive"):
        print("\n## Easy-positive mining, forward+backward, float32, D=512, 7 classes (%s)" % info.get("gpu"))
        md.append(common.print_table(payload["loss_easy_positive"], [
            "B", "dnnrl_ext_ms", "python_mining_ms", "plain_pytorch_ms", "x_vs_python_mining", "x_vs_plain_pytorch",
            "dnnrl_ext_mib", "python_mining_mib", "plain_pytorch_mib", "loss_diff"]))
    if payload.get("knn_vote"):
        print("\n## knn_vote, D=512, k=10 (%s)" % info.get("gpu"))
        md.append(common.print_table(payload["knn_vote"], [
            "Q", "N", "data", "dnnrl_ext_ms", "dnnrl_ext_candidates_ms", "dnnrl_ext_filter_ms",
            "dnnrl_ext_filter_bk32_ms", "dnnrl_ext_filter_tile64_ms", "chunked_torch_ms", "x_vs_chunked",
            "x_vs_chunked_candidates", "x_vs_chunked_filter", "x_vs_chunked_filter_bk32",
            "x_vs_chunked_filter_tile64", "dnnrl_ext_mib",
            "dnnrl_ext_candidates_mib", "dnnrl_ext_filter_mib", "chunked_torch_mib", "mm_fraction", "pred_agreement",
            "candidates_pred_agreement", "filter_pred_agreement", "exact_pass_queries",
            "filter_exact_pass_queries"]))
    payload["markdown"] = "\n\n".join(md)
    common.write_json(out, payload)


if __name__ == "__main__":
    main()
