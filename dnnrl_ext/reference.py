"""Pure-PyTorch reference of every dnnrl_ext op, written for clarity, not speed.

The tests compare the compiled kernels against these functions, and
``backend="reference"`` runs them directly (any device, autograd by PyTorch). The
semantics are those of SPEC sections 2-3:

* distances are squared Euclidean, accumulated in float32 (float64 for float64);
* ``r = d(a, n) - d(a, p)``; the exponential loss of one triplet is
  ``exp(-alpha * max(r - gamma, 0))`` (Eq. 1 of the paper with its sign typo fixed),
  the hinge loss ``max(margin - r, 0)``;
* mining ties go to the smallest index; a NaN distance wins every comparison, so a
  NaN embedding gives a NaN loss rather than a finite number;
* an anchor without a positive or without a negative is invalid: loss 0, index -1,
  r 0, not counted by the mean.
"""
from typing import Tuple

import torch
from torch import Tensor

BATCH_HARD, SEMI_HARD, EASY_POSITIVE = 0, 1, 2
EXP, HINGE = 0, 1
NONE, MEAN, SUM = 0, 1, 2

MINING_CODES = {"batch_hard": BATCH_HARD, "semi_hard": SEMI_HARD, "easy_positive": EASY_POSITIVE}
LOSS_CODES = {"exp": EXP, "hinge": HINGE}
REDUCTION_CODES = {"none": NONE, "mean": MEAN, "sum": SUM}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_distances(a: Tensor, b: Tensor, chunk: int = 128) -> Tensor:
    """Squared Euclidean distances by explicit differences, ``sum((a_i - b_j)^2)``.

    Args:
        a: (M, D), b: (N, D), any floating dtype.
    Returns:
        (M, N) in the accumulation dtype of ``a``.
    """
    acc = accumulation_dtype(a.dtype)
    a, b = a.to(acc), b.to(acc)
    rows = [((a[i:i + chunk, None, :] - b[None, :, :]) ** 2).sum(-1)
            for i in range(0, a.shape[0], chunk)]
    return torch.cat(rows) if rows else a.new_zeros((0, b.shape[0]))


def _pick(d: Tensor, mask: Tensor, largest: bool) -> Tuple[Tensor, Tensor]:
    """Per row, the masked max (largest) or min of ``d`` with the kernels' tie rules.

    NaN wins (first NaN index), otherwise ties go to the smallest index.
    Returns (found (M,) bool, index (M,) int64 with -1 where nothing is masked in).
    """
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(mask, d, torch.full_like(d, fill))
    best = masked.amax(1) if largest else masked.amin(1)  # NaN propagates
    is_nan = torch.isnan(masked) & mask
    row_has_nan = is_nan.any(1, keepdim=True)
    hit = torch.where(row_has_nan, is_nan, mask & (masked == best[:, None]))
    found = mask.any(1)
    # the smallest tied index (argmax's choice among equal values is not specified on CUDA)
    columns = torch.arange(d.shape[1], device=d.device).expand_as(hit)
    first = torch.where(hit, columns, torch.full_like(columns, d.shape[1])).amin(1)
    index = torch.where(found, first, torch.full_like(first, -1))
    return found, index


def _row_sq_dist(x: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``||x_i - x_j||^2`` for index vectors i, j, in the accumulation dtype (differentiable)."""
    acc = accumulation_dtype(x.dtype)
    return ((x[i].to(acc) - x[j].to(acc)) ** 2).sum(-1)


def _per_triplet_loss(r: Tensor, loss_type: int, alpha: float, gamma: float, margin: float) -> Tensor:
    # where() selects before exp / the hinge, so the branch not taken can neither
    # overflow (exp of a large positive number) nor leak a gradient at the kink
    if loss_type == EXP:
        excess = torch.where(r > gamma, r - gamma, torch.zeros_like(r))
        value = torch.exp(-alpha * excess)
    elif loss_type == HINGE:
        slack = margin - r
        value = torch.where(slack > 0, slack, torch.zeros_like(r))
    else:
        raise ValueError("loss_type must be 0 (exp) or 1 (hinge), got %r" % (loss_type,))
    # where() above would turn a NaN r into a finite number: keep NaN visible
    return torch.where(torch.isnan(r), r, value)


def _reduce(per: Tensor, valid: Tensor, reduction: int) -> Tensor:
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == NONE:
        return per
    total = per.sum()
    if reduction == SUM:
        return total
    if reduction == MEAN:
        return total / valid.sum().clamp(min=1).to(per.dtype)
    raise ValueError("reduction must be 0 (none), 1 (mean) or 2 (sum), got %r" % (reduction,))


def mine(x: Tensor, labels: Tensor, mining: int = BATCH_HARD, gamma: float = 0.0
         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-hard / semi-hard / easy-positive mining of one batch.

    Args:
        x: (B, D) embeddings; labels: (B,) integer labels.
        mining: BATCH_HARD (farthest positive, nearest negative), SEMI_HARD
            (farthest positive, nearest negative with d(a,n) > d(a,p) + gamma,
            falling back to the batch-hard negative where none exists) or
            EASY_POSITIVE (nearest positive, nearest negative).
    Returns:
        pos (B,) int64, neg (B,) int64 (-1 where invalid), valid (B,) bool.
    """
    B = x.shape[0]
    if B == 0:  # amax/amin refuse empty rows
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        d = squared_distances(x, x)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(B, dtype=torch.bool, device=x.device)
        if mining not in (BATCH_HARD, SEMI_HARD, EASY_POSITIVE):
            raise ValueError("mining must be 0 (batch_hard), 1 (semi_hard) or 2 (easy_positive), got %r"
                             % (mining,))
        has_pos, pos = _pick(d, same & ~eye, largest=mining != EASY_POSITIVE)
        has_neg, neg = _pick(d, ~same, largest=False)
        if mining == SEMI_HARD:
            d_ap = d.gather(1, pos.clamp(min=0)[:, None])
            beyond = (~same) & ((d > d_ap + gamma) | torch.isnan(d))
            has_semi, semi = _pick(d, beyond, largest=False)
            neg = torch.where(has_semi, semi, neg)
        valid = has_pos & has_neg
        minus_one = torch.full_like(pos, -1)
        return torch.where(valid, pos, minus_one), torch.where(valid, neg, minus_one), valid


def triplet_loss(x: Tensor, labels: Tensor, mining: int = BATCH_HARD, loss_type: int = EXP,
                 alpha: float = 0.2, gamma: float = 0.0, margin: float = 0.2,
                 reduction: int = MEAN) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mined triplet loss, same contract as ``torch.ops.dnnrl_ext.triplet_loss``.

    Args:
        x: (B, D) embeddings (any floating dtype); labels: (B,) integer labels.
    Returns:
        loss: () for mean/sum or (B,) for none, in the accumulation dtype;
        pos, neg: (B,) int64 mined indices (-1 for invalid anchors);
        r: (B,) relative distance d(a,n) - d(a,p) (0 for invalid anchors);
        valid: (B,) bool.
    Gradients flow to ``x`` through ``loss`` by PyTorch autograd.
    """
    pos, neg, valid = mine(x, labels, mining, gamma)
    anchors = torch.arange(x.shape[0], device=x.device)
    safe_pos, safe_neg = pos.clamp(min=0), neg.clamp(min=0)
    r = _row_sq_dist(x, anchors, safe_neg) - _row_sq_dist(x, anchors, safe_pos)
    r = torch.where(valid, r, torch.zeros_like(r))
    per = _per_triplet_loss(r, loss_type, alpha, gamma, margin)
    return _reduce(per, valid, reduction), pos, neg, r.detach(), valid


def triplet_loss_indexed(x: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor,
                         loss_type: int = EXP, alpha: float = 0.2, gamma: float = 0.0,
                         margin: float = 0.2, reduction: int = MEAN) -> Tuple[Tensor, Tensor]:
    """Triplet loss on explicit (anchor, positive, negative) index triplets.

    Args:
        x: (B, D); anchor, positive, negative: (T,) int64 indices into x.
    Returns:
        loss: () or (T,) in the accumulation dtype; r: (T,).
    """
    r = _row_sq_dist(x, anchor, negative) - _row_sq_dist(x, anchor, positive)
    valid = torch.ones_like(r, dtype=torch.bool)
    per = _per_triplet_loss(r, loss_type, alpha, gamma, margin)
    return _reduce(per, valid, reduction), r.detach()


def _knn_sq_norms(x: Tensor) -> Tensor:
    """(R, D) -> (R,) squared row norms, NaN where not finite (the k-NN's rule for bad rows)."""
    n = (x * x).sum(1)
    return torch.where(torch.isfinite(n), n, torch.full_like(n, float("nan")))


def knn(query: Tensor, gallery: Tensor, k: int, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
    """k nearest gallery rows of every query (squared Euclidean), sorted ascending.

    Ties go to the smaller gallery index (stable sorts; earlier chunks first). The
    gallery is processed in chunks so the full Q x N matrix is never held. A row whose
    squared norm is not finite (a NaN or inf element, or a norm beyond the accumulation
    dtype) is at NaN distance from every row: the expansion alone would give inf, NaN or
    a number depending on the signs.

    Args:
        query: (Q, D); gallery: (N, D); 1 <= k <= N.
    Returns:
        dist (Q, k) in the accumulation dtype, idx (Q, k) int64.
    """
    acc = accumulation_dtype(query.dtype)
    q, g = query.to(acc), gallery.to(acc)
    Q = q.shape[0]
    best_d = q.new_zeros((Q, 0))
    best_i = torch.zeros((Q, 0), dtype=torch.long, device=q.device)
    q_sq = _knn_sq_norms(q)[:, None]
    for start in range(0, g.shape[0], chunk):
        block = g[start:start + chunk]
        d = (q_sq - 2.0 * q @ block.T + _knn_sq_norms(block)[None, :]).clamp(min=0)
        idx = torch.arange(start, start + block.shape[0], device=q.device).expand(Q, -1)
        cand_d = torch.cat([best_d, d], 1)
        cand_i = torch.cat([best_i, idx], 1)
        # NaN sorts last in torch.sort, like torch.topk(largest=False)
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, :k]
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    return best_d, best_i


def vote(neighbour_labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Majority vote over neighbours sorted by distance.

    Args:
        neighbour_labels: (Q, k) int64 labels of the k nearest, nearest first.
    Returns:
        pred (Q,) int64 and votes (Q, num_classes) int64. A tie in votes goes to the
        tied class whose nearest member ranks first.
    """
    Q, k = neighbour_labels.shape
    one_hot = torch.nn.functional.one_hot(neighbour_labels, num_classes)  # (Q, k, C)
    votes = one_hot.sum(1)
    ranks = torch.arange(k, device=neighbour_labels.device)[None, :, None]
    first_rank = torch.where(one_hot.bool(), ranks, torch.full_like(ranks, k)).amin(1)  # (Q, C)
    score = votes * (k + 1) + (k - first_rank)
    return score.argmax(1), votes


def knn_vote(query: Tensor, gallery: Tensor, gallery_labels: Tensor, k: int,
             num_classes: int) -> Tuple[Tensor, Tensor]:
    """k-NN majority vote: pred (Q,) int64, votes (Q, num_classes) int64."""
    _, idx = knn(query, gallery, k)
    return vote(gallery_labels.long()[idx], num_classes)
