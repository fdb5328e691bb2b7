"""What users would write or install instead of dnnrl_ext, on the same inputs.

Each loss function returns a scalar loss whose .backward() the benchmark times too.
"""
import numpy as np
import torch


def _pairwise(x, labels):
    """(B, B) squared distances (cdist), the positive mask (same label, not self) and the
    negative mask, as the plain versions below all start."""
    d = torch.cdist(x, x).pow(2)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d, same & ~eye, ~same


def _exp_mean(d_ap, d_an, alpha, gamma):
    """The exp loss of the mined pairs, the mean over anchors with both a positive and a negative."""
    valid = torch.isfinite(d_ap) & torch.isfinite(d_an)
    r = d_an - d_ap
    per = torch.where(r > gamma, torch.exp(-alpha * (r - gamma)), torch.ones_like(r))
    return per[valid].mean()


def plain_pytorch_exp_triplet(x, labels, alpha=0.2, gamma=0.0):
    """The obvious PyTorch version: cdist + masks + max/min, B x B matrices throughout."""
    d, pos, neg = _pairwise(x, labels)
    d_ap = torch.where(pos, d, torch.full_like(d, float("-inf"))).max(1).values
    d_an = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
    return _exp_mean(d_ap, d_an, alpha, gamma)


def plain_pytorch_exp_triplet_semi_hard(x, labels, alpha=0.2, gamma=0.0):
    """The same with semi-hard negatives (nearest beyond d(a,p) + gamma, else the nearest)."""
    d, pos, neg = _pairwise(x, labels)
    d_ap = torch.where(pos, d, torch.full_like(d, float("-inf"))).max(1).values
    neg_d = torch.where(neg, d, torch.full_like(d, float("inf")))
    beyond = torch.where(neg_d > (d_ap + gamma)[:, None], neg_d, torch.full_like(d, float("inf"))).min(1).values
    d_an = torch.where(torch.isfinite(beyond), beyond, neg_d.min(1).values)
    return _exp_mean(d_ap, d_an, alpha, gamma)


def plain_pytorch_exp_triplet_easy_positive(x, labels, alpha=0.2, gamma=0.0):
    """The same with the nearest positive instead of the farthest (easy-positive mining)."""
    d, pos, neg = _pairwise(x, labels)
    d_ap = torch.where(pos, d, torch.full_like(d, float("inf"))).min(1).values
    d_an = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
    return _exp_mean(d_ap, d_an, alpha, gamma)


def python_mining_easy_positive(x, labels, alpha=0.2, gamma=0.0):
    """The app's easy-positive criterion before the op had the mode (dnnrl.train.
    ExplicitTripletLoss: B x B distances and argmins in PyTorch ops, then dnnrl_ext's
    fused indexed loss): the same loss as dnnrl_ext's mining="easy_positive"."""
    from dnnrl.train import ExplicitTripletLoss
    return ExplicitTripletLoss("exp", alpha=alpha, gamma=gamma, margin=0.2, reduction="mean", backend="auto",
                               mining="easy_positive")(x, labels)


class PMLBatchHard:
    """pytorch-metric-learning: BatchHardMiner + TripletMarginLoss, squared L2 distances."""

    def __init__(self, margin=0.2):
        from pytorch_metric_learning import losses, miners
        from pytorch_metric_learning.distances import LpDistance
        dist = LpDistance(normalize_embeddings=False, p=2, power=2)
        self.miner = miners.BatchHardMiner(distance=dist)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=dist)

    def __call__(self, x, labels):
        return self.loss(x, labels, self.miner(x, labels))


def vote_numpy(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote, ties to the class whose nearest member ranks first (our rule)."""
    Q, k = neighbour_labels.shape
    counts = np.zeros((Q, num_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(Q), k), neighbour_labels.ravel()), 1)
    first = np.full((Q, num_classes), k, dtype=np.int64)
    for j in range(k - 1, -1, -1):
        first[np.arange(Q), neighbour_labels[:, j]] = j
    return np.argmax(counts * (k + 1) + (k - first), axis=1)


def faiss_knn_vote(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int, num_classes: int):
    import faiss
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(gallery)
    _, idx = index.search(query, k)
    return vote_numpy(labels[idx], num_classes)


def sklearn_knn_vote(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int, num_classes: int):
    from sklearn.neighbors import KNeighborsClassifier
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(gallery, labels)
    return clf.predict(query)


def chunked_torch_knn_vote(query, gallery, labels, k, num_classes, chunk=8192):
    """cdist + topk per gallery chunk, merged; then the vote (GPU users' usual code)."""
    best_d = query.new_empty((query.shape[0], 0))
    best_i = torch.empty((query.shape[0], 0), dtype=torch.long, device=query.device)
    for s in range(0, gallery.shape[0], chunk):
        d = torch.cdist(query, gallery[s:s + chunk]).pow(2)
        dk, ik = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_d = torch.cat([best_d, dk], 1)
        best_i = torch.cat([best_i, ik + s], 1)
        best_d, order = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False)
        best_i = best_i.gather(1, order)
    lab = labels[best_i]
    votes = torch.nn.functional.one_hot(lab, num_classes).sum(1)
    return votes.argmax(1)
