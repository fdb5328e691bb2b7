"""CPU benchmark: dnnrl_ext against what users would otherwise pick, side by side.

1. Fused mining + exponential triplet loss, forward + backward, vs the plain-PyTorch
   version (cdist + masks + max/min) and pytorch-metric-learning (BatchHardMiner +
   TripletMarginLoss), B in {128, 512, 2048}, D = 512, 7 classes, float32; and with
   semi-hard and easy-positive mining vs the plain-PyTorch versions of those (and, for
   easy-positive, the app's earlier way: mining in PyTorch ops + the fused indexed loss).
2. k-NN vote at FER-2013 scale (3,589 queries x 28,709 gallery x 512, k = 10) vs
   scikit-learn (brute), faiss-cpu IndexFlatL2 + vote, and the chunked reference;
   time and peak memory, each method in its own process so peaks don't mix.
3. Our loss and k-NN vote with their float32 tiles through oneDNN and through at::mm,
   alternating: which GEMM this host's default should take (csrc/cpu/tile_product.h).

Usage:  python3 benchmarks/bench_cpu.py [--quick] [--out benchmarks/results/X.json]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alternatives  # noqa: E402
import common  # noqa: E402

import dnnrl_ext  # noqa: E402

KNN_METHODS = ("dnnrl_ext", "faiss", "sklearn", "reference")


def loss_inputs(B, D=512, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.randint(0, classes, (B,), generator=g)
    return x, y


def bench_loss(sizes, repeats):
    rows = []
    pml = alternatives.PMLBatchHard()
    for B in sizes:
        x0, y = loss_inputs(B)

        def step(loss_fn):
            x = x0.clone().requires_grad_(True)
            loss_fn(x, y).backward()

        candidates = {
            "dnnrl_ext": lambda x, y: dnnrl_ext.triplet_loss(x, y),
            "plain_pytorch": alternatives.plain_pytorch_exp_triplet,
            "pytorch_metric_learning": pml,
            # semi-hard, the mining the README recommends for one's own loop (PML's semi-hard
            # miner returns every semi-hard triplet, another loss, so it has no column here)
            "dnnrl_ext_semi_hard": lambda x, y: dnnrl_ext.triplet_loss(x, y, mining="semi_hard"),
            "plain_pytorch_semi_hard": alternatives.plain_pytorch_exp_triplet_semi_hard,
            "dnnrl_ext_easy_positive": lambda x, y: dnnrl_ext.triplet_loss(x, y, mining="easy_positive"),
            "plain_pytorch_easy_positive": alternatives.plain_pytorch_exp_triplet_easy_positive,
            "python_mining_easy_positive": alternatives.python_mining_easy_positive,
        }
        times = {name: common.time_cpu(lambda f=f: step(f), repeats=repeats, min_seconds=0.5)
                 for name, f in candidates.items()}
        row = {"B": B, **{name + "_ms": t * 1e3 for name, t in times.items()}}
        row["speedup_vs_plain"] = times["plain_pytorch"] / times["dnnrl_ext"]
        row["speedup_vs_pml"] = times["pytorch_metric_learning"] / times["dnnrl_ext"]
        row["semi_hard_speedup_vs_plain"] = times["plain_pytorch_semi_hard"] / times["dnnrl_ext_semi_hard"]
        row["easy_positive_speedup_vs_plain"] = times["plain_pytorch_easy_positive"] / times["dnnrl_ext_easy_positive"]
        row["easy_positive_speedup_vs_python_mining"] = (times["python_mining_easy_positive"]
                                                         / times["dnnrl_ext_easy_positive"])
        rows.append(row)
        print("loss B=%d done" % B, flush=True)
    return rows


def knn_inputs(Q, N, D, classes=7, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((N, D), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((Q, D), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, g, rng.integers(0, classes, N).astype(np.int64)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) so that the temporaries of input
    generation do not hide the method's own peak; returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes():
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one_knn(method, Q, N, D, k, repeats):
    """Child process: one method, its median time and its peak memory above the inputs."""
    q, g, lab = knn_inputs(Q, N, D)
    tq, tg, tl = torch.from_numpy(q), torch.from_numpy(g), torch.from_numpy(lab)
    fns = {
        "dnnrl_ext": lambda: dnnrl_ext.knn_vote(tq, tg, tl, k, 7),
        "reference": lambda: dnnrl_ext.knn_vote(tq, tg, tl, k, 7, backend="reference"),
        "faiss": lambda: alternatives.faiss_knn_vote(q, g, lab, k, 7),
        "sklearn": lambda: alternatives.sklearn_knn_vote(q, g, lab, k, 7),
    }
    base = reset_peak_rss()
    pred = np.asarray(fns[method]())  # first call: peak memory + the prediction to compare
    extra = peak_rss_bytes() - base
    t = common.time_cpu(fns[method], repeats=repeats, warmup=0)
    return {"method": method, "seconds": t, "peak_extra_mib": extra / 2**20,
            "pred_head": pred[:200].tolist()}


def bench_knn(Q, N, D, k, repeats):
    rows = []
    for method in KNN_METHODS:
        out = subprocess.run([sys.executable, __file__, "--knn-child", method, "--Q", str(Q),
                              "--N", str(N), "--D", str(D), "--k", str(k), "--repeats", str(repeats)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append({"method": method, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("knn %s done" % method, flush=True)
    ours = next((r for r in rows if r["method"] == "dnnrl_ext" and "seconds" in r), None)
    ours_pred = ours["pred_head"] if ours else None
    for r in rows:
        if "seconds" not in r:
            continue
        pred = r.pop("pred_head")
        if ours:
            r["ours_speedup"] = r["seconds"] / ours["seconds"]
            r["same_predictions_as_ours"] = pred == ours_pred
    return rows


TILE_GEMMS = ("onednn", "mm")


def bench_tile_gemm(sizes, Q, N, D, k, rounds):
    """Our loss (batch-hard, forward + backward) and k-NN vote with their float32 tiles
    through oneDNN and through at::mm (DNNRL_CPU_TILE_GEMM), alternating round by round
    so that both see the same machine: which GEMM the default ("auto", by CPU vendor)
    should take on this host (csrc/cpu/tile_product.h). Medians over the rounds."""
    if not torch.backends.mkldnn.is_available():
        return []
    old = os.environ.get("DNNRL_CPU_TILE_GEMM")
    rows = []
    try:
        cases = []
        for B in sizes:
            x0, y = loss_inputs(B)

            def step(x0=x0, y=y):
                x = x0.clone().requires_grad_(True)
                dnnrl_ext.triplet_loss(x, y).backward()
            cases.append(("loss fwd+bwd B=%d" % B, step, 1e3, "ms"))
        q, g, lab = (torch.from_numpy(a) for a in knn_inputs(Q, N, D))
        cases.append(("knn_vote %dx%dx%d" % (Q, N, D), lambda: dnnrl_ext.knn_vote(q, g, lab, k, 7), 1.0, "s"))
        for name, fn, scale, unit in cases:
            times = {t: [] for t in TILE_GEMMS}
            for _ in range(rounds):
                for t in TILE_GEMMS:
                    os.environ["DNNRL_CPU_TILE_GEMM"] = t
                    times[t].append(common.time_cpu(fn, repeats=3, min_seconds=0.3 if unit == "ms" else 0.0))
            med = {t: statistics.median(v) for t, v in times.items()}
            rows.append({"case": name, "unit": unit, **{t: med[t] * scale for t in TILE_GEMMS},
                         "onednn_over_mm": med["onednn"] / med["mm"]})
            print("tile GEMM %s done" % name, flush=True)
    finally:
        if old is None:
            os.environ.pop("DNNRL_CPU_TILE_GEMM", None)
        else:
            os.environ["DNNRL_CPU_TILE_GEMM"] = old
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<cpu>-<date>.json)")
    ap.add_argument("--knn-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--Q", type=int, default=3589)
    ap.add_argument("--N", type=int, default=28709)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.knn_child:
        print(json.dumps(run_one_knn(args.knn_child, args.Q, args.N, args.D, args.k, args.repeats)))
        return
    sizes = (128, 512) if args.quick else (128, 512, 2048)
    if args.quick:
        args.Q, args.N = 500, 4000
    info = common.machine("cpu")
    info["gemm_gflops_per_core_512x1024x512"] = common.cpu_gemm_gflops()
    print("machine:", info, flush=True)
    loss_rows = bench_loss(sizes, repeats=5 if args.quick else 10)
    knn_rows = bench_knn(args.Q, args.N, args.D, args.k, args.repeats)
    gemm_rows = bench_tile_gemm(sizes, args.Q, args.N, args.D, args.k, rounds=3 if args.quick else 5)
    print("\n## Fused loss forward+backward, D=512, 7 classes, float32 (%s)" % info["cpu"])
    loss_md = common.print_table(loss_rows, ["B", "dnnrl_ext_ms", "plain_pytorch_ms",
                                             "pytorch_metric_learning_ms", "speedup_vs_plain",
                                             "speedup_vs_pml"])
    print("\n## The same, semi-hard mining (gamma = 0)")
    loss_md += "\n\n" + common.print_table(loss_rows, ["B", "dnnrl_ext_semi_hard_ms", "plain_pytorch_semi_hard_ms",
                                                     "semi_hard_speedup_vs_plain"])
    print("\n## The same, easy-positive mining (gamma = 0)")
    loss_md += "\n\n" + common.print_table(loss_rows, [
        "B", "dnnrl_ext_easy_positive_ms", "plain_pytorch_easy_positive_ms", "python_mining_easy_positive_ms",
        "easy_positive_speedup_vs_plain", "easy_positive_speedup_vs_python_mining"])
    print("\n## knn_vote Q=%d N=%d D=%d k=%d" % (args.Q, args.N, args.D, args.k))
    knn_md = common.print_table(knn_rows, ["method", "seconds", "peak_extra_mib", "ours_speedup",
                                           "same_predictions_as_ours"])
    print("\n## Our tiles through oneDNN and through at::mm (default here: %s)" % info.get("cpu_tile_gemm"))
    gemm_md = common.print_table(gemm_rows, ["case", "unit", "onednn", "mm", "onednn_over_mm"])
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "%s-%s%s.json" % (common.card_slug(info), info["date"],
                                                     "-quick" if args.quick else ""))
    common.write_json(out, {"machine": info, "loss": loss_rows, "knn_vote": knn_rows,
                            "knn_shape": {"Q": args.Q, "N": args.N, "D": args.D, "k": args.k},
                            "tile_gemm": gemm_rows,
                            "markdown": loss_md + "\n\n" + knn_md + "\n\n" + gemm_md})


if __name__ == "__main__":
    main()
