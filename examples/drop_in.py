"""dnnrl_ext in your own training loop: ExpTripletLoss to learn an embedding, then a
KNNClassifier on it. Self-contained (torch + dnnrl_ext only) and small enough for a CPU:

    python3 examples/drop_in.py            # about 6 s on 2 CPU cores (2026-12-06)
    python3 examples/drop_in.py --device cuda --epochs 20
    python3 examples/drop_in.py --mining batch_hard   # the paper's literal setting: learns nothing

The data is made up on the spot: 7 classes of 24x24 grey images, each class a smooth
random pattern, each image that pattern shifted by up to 3 px under heavy noise. Swap
``make_images`` and ``EmbeddingNet`` for your own data and network; the three lines
marked "dnnrl_ext" are what carries over.

Why these loss settings: with the paper's gamma = 0, batch-hard mining hands an
untrained network only violating triplets (r < 0), whose loss is exactly 1 with no
gradient, so nothing is learned. Semi-hard mining picks, per anchor, the nearest
negative beyond the positive, which the exp loss does learn from; the loss is summed
over the batch as in the paper's Eq. 1 (with the mean, the steps are B times smaller).
Class-balanced batches (P classes x K images) give every anchor positives. Under
DistributedDataParallel, wrap the criterion in ``dnnrl_ext.DistributedLoss`` so that the
mining sees the rows of every process, not only this one's shard.
"""
import argparse
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dnnrl_ext


def make_patterns(classes: int, seed: int, size: int = 24) -> Tensor:
    """(classes, 1, size, size): one smooth random pattern per class."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(classes, 1, 6, 6, generator=g), size=size, mode="bilinear",
                         align_corners=False)


def make_images(patterns: Tensor, per_class: int, generator: torch.Generator, noise: float = 1.5
                ) -> Tuple[Tensor, Tensor]:
    """(classes * per_class, 1, size, size) images and (classes * per_class,) int64 labels:
    each image its class pattern, shifted by up to 3 px, under Gaussian noise."""
    labels = torch.arange(patterns.shape[0]).repeat_interleave(per_class)
    images = patterns[labels].clone()
    shifts = torch.randint(-3, 4, (labels.numel(), 2), generator=generator)
    for i, (dy, dx) in enumerate(shifts.tolist()):  # small, and only at data creation
        images[i] = torch.roll(images[i], (dy, dx), dims=(1, 2))
    return images + noise * torch.randn(images.shape, generator=generator), labels


def split(seed: int, classes: int, per_class: int):
    """Train / validation / test sets: the same class patterns, images of their own."""
    patterns = make_patterns(classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [make_images(patterns, n, g) for n in (per_class, max(per_class // 4, 1), max(per_class // 4, 1))]


class EmbeddingNet(nn.Module):
    """(B, 1, H, W) -> (B, dim) L2-normalised embeddings."""

    def __init__(self, dim: int = 32):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


def pk_batches(labels: Tensor, k: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch of class-balanced batches: every class, k images each, until the
    smallest class runs out. Yields (classes * k,) row indices."""
    by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    by_class = [rows[torch.randperm(rows.numel(), generator=generator)] for rows in by_class]
    for s in range(0, min(r.numel() for r in by_class) - k + 1, k):
        yield torch.cat([rows[s:s + k] for rows in by_class])


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, device: torch.device, batch: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(x[s:s + batch].to(device)) for s in range(0, x.shape[0], batch)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--per-class", type=int, default=200, help="training images per class")
    ap.add_argument("--k-per-class", type=int, default=10, help="images per class in a batch")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--mining", default="semi_hard", choices=("semi_hard", "batch_hard", "easy_positive"),
                    help="batch_hard shows the paper's literal setting: with gamma = 0 nothing is learned; "
                         "easy_positive (the nearest positive) learns less on this made-up data (test 0.69, seed 0)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.classes < 2 or args.per_class < 4 or not 2 <= args.k_per_class <= args.per_class:
        ap.error("need --epochs >= 1, --classes >= 2, --per-class >= 4 and 2 <= --k-per-class <= --per-class")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = split(args.seed, args.classes, args.per_class)

    model = EmbeddingNet().to(device)
    result = {"untrained_test_accuracy": knn_accuracy(model, (x_tr, y_tr), (x_val, y_val), (x_te, y_te),
                                                      args.classes, device)[2]}
    criterion = dnnrl_ext.ExpTripletLoss(alpha=0.2, gamma=0.0, mining=args.mining, reduction="sum")  # dnnrl_ext
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        total, steps = 0.0, 0
        for rows in pk_batches(y_tr, args.k_per_class, g):
            loss = criterion(model(x_tr[rows].to(device)), y_tr[rows].to(device))  # dnnrl_ext: fused mining + loss
            opt.zero_grad()
            loss.backward()                                                      # fused backward
            opt.step()
            total, steps = total + loss.item(), steps + 1
        result["loss_per_batch"] = total / max(steps, 1)
        print("epoch %d: loss per batch %.3f" % (epoch + 1, result["loss_per_batch"]))

    result["k"], result["val_accuracy"], result["test_accuracy"] = knn_accuracy(
        model, (x_tr, y_tr), (x_val, y_val), (x_te, y_te), args.classes, device)
    print("k = %d, validation accuracy %.3f, test accuracy %.3f (untrained network %.3f, chance %.3f)"
          % (result["k"], result["val_accuracy"], result["test_accuracy"], result["untrained_test_accuracy"],
             1.0 / args.classes))
    return result


def knn_accuracy(model, train, val, test, classes: int, device) -> Tuple[int, float, float]:
    """k-NN classification on the model's embeddings: the training set is the gallery,
    k is chosen on validation; (k, validation accuracy, test accuracy)."""
    gallery, queries_val, queries_test = (embed(model, x, device) for x, _ in (train, val, test))
    clf = dnnrl_ext.KNNClassifier(num_classes=classes).fit(  # dnnrl_ext: k chosen on validation
        gallery, train[1].to(device), val=(queries_val, val[1].to(device)), k_max=25)
    return clf.k, clf.score(queries_val, val[1].to(device)), clf.score(queries_test, test[1].to(device))


if __name__ == "__main__":
    main()
