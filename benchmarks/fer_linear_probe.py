"""Linear probe: can a triplet loss improve the k-NN accuracy of fixed features?

Embeds the training and validation images once with a trained network (frozen,
evaluation transform), then trains only a D x D linear map (initialised to the
identity) on those features with one loss at a time, P x K batches, SGD with
momentum, and prints the k-NN validation accuracy (k = 1, 10, 20) before training and
every ``--every`` steps. Separates what a loss does to a metric from how a deep
network trains (docs/app.md, "a linear probe").

Usage:
  python3 benchmarks/fer_linear_probe.py --checkpoint runs/dnn --data fer2013.tar.xz \\
      [--losses semi_g0,ephn_g0,...] [--steps 1500] [--out probe.json]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
import dnnrl_ext  # noqa: E402
from dnnrl.train import easy_positive_triplets, random_triplets  # noqa: E402


def mined(**kw):
    return lambda e, y, g: dnnrl_ext.triplet_loss(e, y, **kw)


def explicit(former, **kw):
    def loss(e, y, g):
        a, p, n = former(e, y) if former is easy_positive_triplets else former(y, g)
        return dnnrl_ext.triplet_loss_from_triplets(e, a, p, n, **kw)
    return loss


# name -> (loss(e, y, generator), lr)
LOSSES = {
    "semi_g0": (mined(mining="semi_hard", gamma=0.0, alpha=0.2, reduction="sum"), 1e-3),
    "semi_g0_lr1e-2": (mined(mining="semi_hard", gamma=0.0, alpha=0.2, reduction="sum"), 1e-2),
    "bh_g0": (mined(mining="batch_hard", gamma=0.0, alpha=0.2, reduction="sum"), 1e-3),
    "bh_gm4_a1": (mined(mining="batch_hard", gamma=-4.0, alpha=1.0, reduction="sum"), 1e-2),
    "bh_gm4_a1_lr0.5": (mined(mining="batch_hard", gamma=-4.0, alpha=1.0, reduction="sum"), 0.5),
    "ephn_g0": (explicit(easy_positive_triplets, gamma=0.0, alpha=0.2, reduction="sum"), 1e-3),
    "ephn_gm4_a1": (explicit(easy_positive_triplets, gamma=-4.0, alpha=1.0, reduction="sum"), 1e-2),
    "ephn_gm4_a1_lr0.5": (explicit(easy_positive_triplets, gamma=-4.0, alpha=1.0, reduction="sum"), 0.5),
    "ephn_gm1_a2_lr0.05": (explicit(easy_positive_triplets, gamma=-1.0, alpha=2.0, reduction="sum"), 0.05),
    "random_g0 (paper literal)": (explicit(random_triplets, gamma=0.0, alpha=0.2, reduction="sum"), 1e-3),
    "random_gm4_a1": (explicit(random_triplets, gamma=-4.0, alpha=1.0, reduction="sum"), 1e-2),
    "random_gm4_a1_lr0.5": (explicit(random_triplets, gamma=-4.0, alpha=1.0, reduction="sum"), 0.5),
    "hinge_bh": (mined(mining="batch_hard", loss="hinge", margin=0.2, reduction="mean"), 1e-2),
    "hinge_semi": (mined(mining="semi_hard", loss="hinge", margin=0.2, reduction="mean"), 1e-2),
}


def features(checkpoint, data, cache_dir):
    """{split: (features (N, D) float32, labels (N,))} for train and val."""
    from dnnrl.cli import _load_checkpoint
    from dnnrl.runtime import load_data, place_data
    from dnnrl.train import augment_config, build
    from dnnrl.transforms import evaluate_transform
    _, cfg, classes, state = _load_checkpoint(checkpoint)
    cfg.data, cfg.cache_dir, cfg.train_subset, cfg.val_subset = data or cfg.data, cache_dir, None, None
    dev = torch.device("cpu")
    splits, _ = place_data(load_data(cfg), dev)
    model = build(cfg, len(classes), dev)
    model.load_state_dict(state)
    model.eval()
    aug, out = augment_config(cfg), {}
    for split in ("train", "val"):
        x, y = splits[split]
        with torch.no_grad():
            f = [model.features(evaluate_transform(x[i:i + 512], aug)) for i in range(0, len(y), 512)]
        out[split] = (torch.cat(f).float(), y)
    return out, len(classes)


def knn_accuracy(W, feats, C, ks=(1, 10, 20)):
    ftr, ytr = feats["train"]
    fva, yva = feats["val"]
    with torch.no_grad():
        g, q = F.normalize(ftr @ W.T, dim=1), F.normalize(fva @ W.T, dim=1)
        _, idx = dnnrl_ext.knn(q, g, max(ks))
        return {k: float((dnnrl_ext.reference.vote(ytr[idx[:, :k]], C)[0] == yva).float().mean()) for k in ks}


def pk_batch(y, C, K, gen):
    return torch.cat([(y == c).nonzero().flatten()[torch.randint(int((y == c).sum()), (K,), generator=gen)]
                      for c in range(C) if (y == c).any()])


def probe(loss, lr, feats, C, steps, every, K=18, seed=1):
    ftr, ytr = feats["train"]
    W = torch.eye(ftr.shape[1]).requires_grad_(True)
    opt = torch.optim.SGD([W], lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    trip_gen = torch.Generator().manual_seed(seed + 1)
    hist = [knn_accuracy(W.detach(), feats, C)]
    for s in range(steps):
        b = pk_batch(ytr, C, K, gen)
        e = F.normalize(ftr[b] @ W.T, dim=1)
        opt.zero_grad()
        loss(e, ytr[b], trip_gen).backward()
        opt.step()
        if (s + 1) % every == 0:
            hist.append(knn_accuracy(W.detach(), feats, C))
    return hist


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a dnnrl train run directory or best.pt")
    ap.add_argument("--data", default=None, help="the data (default: the run's)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma-separated names: " + ", ".join(LOSSES))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        ap.error("unknown loss %s; choose from %s" % (unknown, list(LOSSES)))
    torch.manual_seed(0)
    feats, C = features(args.checkpoint, args.data, args.cache_dir)
    results = {}
    for name in names:
        loss, lr = LOSSES[name]
        results[name] = {"lr": lr, "knn_accuracy": probe(loss, lr, feats, C, args.steps, args.every)}
        print(name, " | ".join("k1 %.3f k10 %.3f" % (h[1], h[10]) for h in results[name]["knn_accuracy"]),
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
