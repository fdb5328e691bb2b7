"""Draw a benchmark result (bench_gpu.py or bench_cpu.py JSON) as one PNG, ours beside
the alternatives on the same inputs:

* the fused loss, forward + backward: time against the batch size B (log-log), one line
  per implementation and dtype, and the allocator's / process's peak extra memory;
* knn_vote: time per implementation, one group of bars per input shape (GPU) or one bar
  per method (CPU, FER-2013 scale).

Usage:  python3 benchmarks/plot_bench.py results/nvidia-h200-2026-11-28.json [--out FILE.png]
(default: the JSON's name with .png). Missing or failed measurements (an "error: ..."
string in the JSON) are left out of the picture, never drawn as zero.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

# JSON key prefix -> legend name, in drawing order
LOSS_IMPLS = (("dnnrl_ext", "dnnrl_ext"), ("dnnrl_ext_6_launches", "dnnrl_ext, 6 launches"),
              ("plain_pytorch", "plain PyTorch"), ("pml", "pytorch-metric-learning"),
              ("pytorch_metric_learning", "pytorch-metric-learning"))
# (before 2026-11-28 s7 "dnnrl_ext" was the candidate path and "dnnrl_ext_exact" the
# exact pass; since then "dnnrl_ext" is the default exact pass, "dnnrl_ext_candidates" opt-in)
KNN_IMPLS = (("dnnrl_ext", "dnnrl_ext"), ("dnnrl_ext_exact", "dnnrl_ext, exact pass"),
             ("dnnrl_ext_candidates", "dnnrl_ext, candidate path"),
             ("dnnrl_ext_filter", "dnnrl_ext, filter path"),
             ("chunked_torch", "chunked torch (cdist + topk)"))
STYLES = {"float32": "-", "bfloat16": "--", None: "-"}


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def loss_lines(rows: List[dict], unit: str = "ms") -> Dict[Tuple[str, Optional[str]], Tuple[List[int], List[float]]]:
    """{(implementation key, dtype or None): (batch sizes, values)} of the loss rows, for
    ``unit`` "ms" (time) or "mib" (peak memory); measurements that failed are skipped."""
    lines = {}
    for key, _ in LOSS_IMPLS:
        for r in sorted(rows, key=lambda r: r.get("B", 0)):
            v = _num(r.get("%s_%s" % (key, unit)))
            if v is None or _num(r.get("B")) is None:
                continue
            xs, ys = lines.setdefault((key, r.get("dtype")), ([], []))
            xs.append(int(r["B"]))
            ys.append(v)
    return lines


CPU_METHODS = {"faiss": "faiss-cpu IndexFlatL2 + vote", "sklearn": "scikit-learn (brute)",
               "reference": "chunked reference"}


def knn_bars(payload: dict, memory: bool = False) -> Tuple[List[str], Dict[str, List[Optional[float]]], str]:
    """(group labels, {implementation legend: values per group}, unit) of the k-NN part:
    times, or with ``memory`` the peak extra MiB. GPU JSON: a group per (Q, N, data) row,
    ms. CPU JSON: one group, seconds per method. The first implementation is ours."""
    rows = payload.get("knn_vote") or []
    if rows and "method" in rows[0]:  # bench_cpu.py: one row per method at one shape
        shape = payload.get("knn_shape") or {}
        label = "%s x %s x %s, k=%s" % (shape.get("Q"), shape.get("N"), shape.get("D"), shape.get("k"))
        key = "peak_extra_mib" if memory else "seconds"
        rows = sorted(rows, key=lambda r: r["method"] != "dnnrl_ext")
        return [label], {CPU_METHODS.get(r["method"], r["method"]): [_num(r.get(key))] for r in rows}, (
            "MiB" if memory else "s")
    groups = ["%s x %s%s" % (f"{r['Q']:,}", f"{r['N']:,}", ", %s" % r["data"] if r.get("data") else "")
              for r in rows]
    bars = {}
    for key, name in KNN_IMPLS:
        vals = [_num(r.get(key + ("_mib" if memory else "_ms"))) for r in rows]
        if any(v is not None for v in vals):
            bars[name] = vals
    return groups, bars, "MiB" if memory else "ms"


def _bar_panel(ax, groups, bars, title):
    """Grouped bars on a log axis; every bar but the first of a group is labelled with
    how many times the first (ours) it is."""
    if not (groups and bars):
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return
    width = 0.8 / len(bars)
    ours = next(iter(bars.values()))
    for i, (name, vals) in enumerate(bars.items()):
        for g, v in enumerate(vals):
            if v is None:
                continue
            x = g + (i - (len(bars) - 1) / 2) * width
            ax.bar([x], [v], width, color="C%d" % i, label=name if g == next(
                j for j, w in enumerate(vals) if w is not None) else None)
            if i > 0 and ours[g]:
                ax.text(x, v, "%.1fx" % (v / ours[g]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")


def machine_label(payload: dict) -> str:
    m = payload.get("machine") or {}
    what = m.get("gpu") or "%s, %s cores" % (m.get("cpu", "?"), m.get("cores", "?"))
    return "%s, torch %s, %s" % (what, m.get("torch", "?"), m.get("date", "?"))


def draw(payload: dict):
    """The matplotlib figure of one benchmark payload (three panels: loss time, loss
    memory, knn_vote time). Raises ValueError when the payload holds neither part."""
    if not payload.get("loss") and not payload.get("knn_vote"):
        raise ValueError("the benchmark JSON has neither a 'loss' nor a 'knn_vote' part")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m, ax_k) = plt.subplots(1, 3, figsize=(16, 5))
    names = dict(LOSS_IMPLS)
    colours = {key: "C%d" % i for i, (key, _) in enumerate(LOSS_IMPLS)}
    colours["pytorch_metric_learning"] = colours["pml"]
    for ax, unit, title in ((ax_t, "ms", "loss forward + backward, D = 512: time (ms)"),
                            (ax_m, "mib", "loss forward + backward: peak extra memory (MiB)")):
        lines = loss_lines(payload.get("loss") or [], unit)
        if unit == "mib" and not lines:  # bench_cpu.py measures memory for the k-NN only
            groups, bars, u = knn_bars(payload, memory=True)
            if any(v is not None for vals in bars.values() for v in vals):
                _bar_panel(ax, groups, bars, "knn_vote: peak extra memory (%s; 2.0x = twice ours)" % u)
                continue
        for (key, dtype), (xs, ys) in lines.items():
            ax.plot(xs, ys, STYLES.get(dtype, ":"), marker="o", color=colours[key],
                    label=names[key] + (" (%s)" % dtype if dtype else ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch size B")
        if lines:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3, which="both")
    groups, bars, unit = knn_bars(payload)
    _bar_panel(ax_k, groups, bars, "knn_vote, D = 512, k = 10: time (%s; 2.0x = twice ours)" % unit)
    fig.suptitle("dnnrl_ext against the alternatives, same inputs, one run: " + machine_label(payload))
    fig.tight_layout()
    return fig


def plot_file(json_path: str, out_path: Optional[str] = None) -> str:
    """Read a benchmark JSON, draw it, write the PNG (default: beside the JSON)."""
    import matplotlib.pyplot as plt
    with open(json_path) as fh:
        payload = json.load(fh)
    out_path = out_path or os.path.splitext(json_path)[0] + ".png"
    fig = draw(payload)
    try:
        fig.savefig(out_path, dpi=90)
    finally:
        plt.close(fig)
    return out_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench_gpu.py / bench_cpu.py JSON file")
    ap.add_argument("--out", default=None, help="PNG to write (default: the JSON's name with .png)")
    args = ap.parse_args(argv)
    try:
        print(plot_file(args.result, args.out))
    except (OSError, ValueError) as exc:
        print("plot_bench.py: error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
