"""How many dimensions a trained run's embeddings really use, and how its k-NN vote
compares with its softmax head, on the validation split.

    python3 benchmarks/embedding_report.py RUN [RUN ...] --data fer2013.tar.xz [--out report.json]

For each run (a `dnnrl train` directory or best.pt) it embeds the validation split
with no test-time views and reports the PCA variance shares of the embeddings
(``dims_99`` / ``dims_999``: components holding 99 % / 99.9 % of the variance; with
C classes, a softmax-trained network whose features have collapsed onto its class
means needs only C - 1). With ``--knn`` it also embeds the training split with the
run's (or ``--tta``) views, and reports the k-NN accuracy (k chosen on validation),
the softmax head's accuracy and how often the two agree. Runs on the CPU in about
15 s per run without --knn (CPU preset) and about 1.5 minutes with it.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

from dnnrl.bundle import load_checkpoint, model_from_state  # noqa: E402
from dnnrl.config import TTA_MODES  # noqa: E402
from dnnrl.data import load_dataset  # noqa: E402
from dnnrl.runtime import embed  # noqa: E402
from dnnrl.train import augment_config  # noqa: E402
from dnnrl_ext import KNNClassifier  # noqa: E402


def variance_shares(emb: torch.Tensor) -> np.ndarray:
    """(N, D) embeddings -> (D,) PCA variance shares, largest first (float64, sum 1)."""
    ev = torch.linalg.eigvalsh(torch.cov(emb.double().T)).flip(0).clamp_min(0)
    return (ev / ev.sum()).numpy()


def report(run: str, splits: dict, num_classes: int, knn: bool, tta, k_max: int,
           device: torch.device) -> dict:
    """The figures of one run (see the module docstring)."""
    _, cfg, _, state = load_checkpoint(run)
    model = model_from_state(cfg, num_classes, state, device)
    xv, yv = splits["val"]
    cfg_tta, cfg.tta = cfg.tta, "none"
    share = variance_shares(embed(model, xv, augment_config(cfg), device, amp="off").cpu())
    cum = np.cumsum(share)
    out = {"run": run, "method": cfg.method, "weight_decay": cfg.weight_decay,
           "softmax_weight": cfg.softmax_weight, "alpha": cfg.alpha,
           "dims_99": int(np.searchsorted(cum, 0.99) + 1), "dims_999": int(np.searchsorted(cum, 0.999) + 1),
           "top_shares": [round(float(s), 4) for s in share[:10]]}
    if knn:
        cfg.tta = tta or cfg_tta
        aug = augment_config(cfg)
        xt, yt = splits["train"]
        et, ev = (embed(model, x, aug, device, amp="off") for x in (xt, xv))
        head = embed(model, xv, aug, device, amp="off", head=True).argmax(1).cpu()
        clf = KNNClassifier(num_classes=num_classes).fit(et, yt.to(et.device), val=(ev, yv.to(ev.device)),
                                                         k_max=k_max)
        pred = clf.predict(ev).cpu()
        out.update({"tta": cfg.tta, "k": clf.k, "knn_accuracy": float((pred == yv).float().mean()),
                    "head_accuracy": float((head == yv).float().mean()),
                    "knn_head_agreement": float((pred == head).float().mean())})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("runs", nargs="+", help="`dnnrl train` run directories or best.pt files")
    ap.add_argument("--data", required=True, help="the data the runs were trained on (needs a val split)")
    ap.add_argument("--knn", action="store_true", help="also k-NN vs softmax head (embeds the training split)")
    ap.add_argument("--tta", default=None, choices=TTA_MODES, help="views for --knn (default: each run's)")
    ap.add_argument("--k-max", type=int, default=50, help="largest k tried on validation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help="also write the reports as a JSON list here")
    args = ap.parse_args(argv)
    ds = load_dataset(args.data)
    if "val" not in ds.splits or (args.knn and "train" not in ds.splits):
        ap.error("--data needs a validation split%s" % (" and a training split" if args.knn else ""))
    splits = {s: (torch.from_numpy(x), torch.from_numpy(y)) for s, (x, y) in ds.splits.items()}
    reports = []
    for run in args.runs:
        r = report(run, splits, len(ds.class_names), args.knn, args.tta, args.k_max, torch.device(args.device))
        print(json.dumps(r), flush=True)
        reports.append(r)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(reports, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
