"""Typed wrappers over ``torch.ops.dnnrl_ext.*`` with argument checking, plus the
fake-tensor registrations that make the ops work under ``torch.compile`` and
``torch.library.opcheck`` (the loss's autograd is registered in C++, csrc/autograd.cpp; knn's
here).

Every public function takes ``backend``: ``"auto"`` / ``"compiled"`` run the fused
kernels (an error says how to rebuild if they are missing), ``"reference"`` runs the
pure-PyTorch version in :mod:`dnnrl_ext.reference`.
"""
import math
import numbers
import os
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _extension
from . import reference as ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class TripletLossOutput(NamedTuple):
    """Loss plus what the miner chose (``return_details=True``).

    loss: () or (B,); pos, neg: (B,) int64 (-1 for invalid anchors);
    r: (B,) relative distance d(a,n) - d(a,p), no gradient; valid: (B,) bool.
    """
    loss: Tensor
    pos: Tensor
    neg: Tensor
    r: Tensor
    valid: Tensor


# --------------------------------------------------------------------------- checks
def _code(name: str, value, table: dict) -> int:
    if isinstance(value, str) and value in table:
        return table[value]
    raise ValueError("%s must be one of %s, got %r" % (name, sorted(table), value))


def _check_embeddings(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
    if x.dim() != 2:
        raise ValueError("%s must be 2-D (rows, dim), got shape %s" % (name, tuple(x.shape)))
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError("%s must be float16, bfloat16, float32 or float64, got %s" % (name, x.dtype))


def _check_index_vector(name: str, t, length: Optional[int], device: torch.device,
                        length_name: str = "") -> None:
    if not isinstance(t, Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    if t.dim() != 1:
        raise ValueError("%s must be 1-D, got shape %s" % (name, tuple(t.shape)))
    if t.dtype not in _INT_DTYPES:
        raise TypeError("%s must be an integer tensor, got %s" % (name, t.dtype))
    if length is not None and t.shape[0] != length:
        raise ValueError("%s must have length %d (%s), got %d" % (name, length, length_name, t.shape[0]))
    if t.device != device:
        raise ValueError("%s is on %s but the embeddings are on %s" % (name, t.device, device))


def _check_finite_param(name: str, value) -> float:
    # numbers.Real takes Python and NumPy numbers; a one-element tensor is read once. A
    # bool or a string is refused (float() would take True as 1.0 and "0.2" as 0.2).
    if isinstance(value, bool) or not (isinstance(value, numbers.Real)
                                       or (isinstance(value, Tensor) and value.numel() == 1)):
        raise TypeError("%s must be a number, got %r" % (name, value))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError("%s must be a finite number, got %r" % (name, value))
    return value


def _check_alpha(alpha, loss_code: int) -> float:
    """The exponential loss's slope: a positive number (alpha <= 0 turns exp(-alpha r) into
    a loss that rewards violated triplets, or a constant). The hinge loss ignores it."""
    alpha = _check_finite_param("alpha", alpha)
    if loss_code == ref.EXP and alpha <= 0:
        raise ValueError("alpha must be a positive number (the exp loss's slope), got %r" % (alpha,))
    return alpha


def _eager() -> bool:
    """Value checks that read tensor data (a device sync) run only outside torch.compile."""
    return not torch.compiler.is_compiling()


def _check_backend(backend) -> None:
    if backend not in ("auto", "compiled", "reference"):
        raise ValueError("backend must be 'auto', 'compiled' or 'reference', got %r" % (backend,))


def _use_reference(backend: str, device: torch.device) -> bool:
    _check_backend(backend)
    if backend == "reference":
        return True
    _extension.require(device)
    return False


# --------------------------------------------------------------------------- loss
def triplet_loss(embeddings: Tensor, labels: Tensor, *, mining: str = "batch_hard",
                 loss: str = "exp", alpha: float = 0.2, gamma: float = 0.0, margin: float = 0.2,
                 reduction: str = "mean", return_details: bool = False,
                 backend: str = "auto"):
    """Fused in-batch mining + triplet loss (SPEC section 2).

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64, any device.
        labels: (B,) integer class labels on the same device.
        mining: "batch_hard", "semi_hard" or "easy_positive" (the nearest positive and the
            nearest negative, Xuan et al. 2020: where classes overlap, the farthest
            positive is an outlier; docs/app.md measures it on FER-2013).
        loss: "exp" (the paper's exponential loss, uses alpha and gamma) or "hinge"
            (``max(d(a,p) - d(a,n) + margin, 0)``; gamma still sets the semi-hard threshold).
        reduction: "mean" over valid anchors, "sum", or "none" ((B,), 0 for invalid anchors).
        return_details: also return mined indices, r and validity (TripletLossOutput).
    Returns:
        The loss: () or (B,), float32 (float64 for float64 embeddings); or a
        TripletLossOutput when ``return_details``.
    """
    _check_embeddings("embeddings", embeddings)
    _check_index_vector("labels", labels, embeddings.shape[0], embeddings.device,
                        "one label per embedding row")
    m = _code("mining", mining, ref.MINING_CODES)
    lt = _code("loss", loss, ref.LOSS_CODES)
    red = _code("reduction", reduction, ref.REDUCTION_CODES)
    alpha = _check_alpha(alpha, lt)
    gamma, margin = (_check_finite_param(n, v) for n, v in (("gamma", gamma), ("margin", margin)))
    if _use_reference(backend, embeddings.device):
        out = ref.triplet_loss(embeddings, labels, m, lt, alpha, gamma, margin, red)
    else:
        out = torch.ops.dnnrl_ext.triplet_loss(embeddings, labels, m, lt, alpha, gamma, margin, red)
    out = TripletLossOutput(*out)
    return out if return_details else out.loss


def triplet_loss_from_triplets(embeddings: Tensor, anchor: Tensor, positive: Tensor,
                               negative: Tensor, *, loss: str = "exp", alpha: float = 0.2,
                               gamma: float = 0.0, margin: float = 0.2, reduction: str = "mean",
                               return_r: bool = False, backend: str = "auto", validate: bool = True):
    """Triplet loss on explicit triplets (the paper's randomly sampled triplets).

    Args:
        embeddings: (B, D); anchor, positive, negative: (T,) integer indices in [0, B).
        validate: check that every index lies in [0, B) (an IndexError naming the
            argument otherwise). On a GPU that reads the indices back: one device sync
            per call. Pass False for indices built in range by your own code.
    Returns:
        loss () or (T,) (and r (T,) when ``return_r``).
    """
    _check_embeddings("embeddings", embeddings)
    _check_index_vector("anchor", anchor, None, embeddings.device)
    T = anchor.shape[0]
    _check_index_vector("positive", positive, T, embeddings.device, "same as anchor")
    _check_index_vector("negative", negative, T, embeddings.device, "same as anchor")
    B = embeddings.shape[0]
    if validate and _eager() and T > 0:
        # one read-back for all three (a device sync on a GPU); names only on failure
        bounds = torch.stack([torch.stack([t.min(), t.max()]).long()
                              for t in (anchor, positive, negative)]).tolist()
        for name, (lo, hi) in zip(("anchor", "positive", "negative"), bounds):
            if lo < 0 or hi >= B:
                raise IndexError("%s holds indices in [%d, %d] but embeddings has %d rows"
                                 % (name, lo, hi, B))
    lt = _code("loss", loss, ref.LOSS_CODES)
    red = _code("reduction", reduction, ref.REDUCTION_CODES)
    alpha = _check_alpha(alpha, lt)
    gamma, margin = (_check_finite_param(n, v) for n, v in (("gamma", gamma), ("margin", margin)))
    anchor, positive, negative = anchor.long(), positive.long(), negative.long()
    if _use_reference(backend, embeddings.device):
        value, r = ref.triplet_loss_indexed(embeddings, anchor, positive, negative, lt,
                                            alpha, gamma, margin, red)
    else:
        value, r = torch.ops.dnnrl_ext.triplet_loss_indexed(
            embeddings, anchor, positive, negative, lt, alpha, gamma, margin, red)
    return (value, r) if return_r else value


# --------------------------------------------------------------------------- knn
def _check_knn(query, gallery, k) -> None:
    _check_embeddings("query", query)
    _check_embeddings("gallery", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError("query has dim %d but gallery has dim %d" % (query.shape[1], gallery.shape[1]))
    if query.device != gallery.device:
        raise ValueError("query is on %s but gallery is on %s" % (query.device, gallery.device))
    if query.dtype != gallery.dtype:
        raise TypeError("query is %s but gallery is %s: cast one of them" % (query.dtype, gallery.dtype))
    if gallery.shape[0] == 0:
        raise ValueError("gallery is empty: k-NN needs at least one gallery row")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError("k must be an int, got %r" % (k,))
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError("k must be in [1, %d] (the gallery size), got %d" % (gallery.shape[0], k))


def knn(query: Tensor, gallery: Tensor, k: int, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """The k nearest gallery rows of every query by squared Euclidean distance.

    Args:
        query: (Q, D), gallery: (N, D), same dtype and device; 1 <= k <= N.
    Returns:
        dist (Q, k) ascending, float32 (float64 for float64); idx (Q, k) int64.
        Ties go to the smaller gallery index. The Q x N matrix is never built.
    """
    _check_knn(query, gallery, k)
    if _use_reference(backend, query.device):
        return ref.knn(query, gallery, k)
    out = torch.ops.dnnrl_ext.knn(query, gallery, k)
    _warn_knn_stats(query, gallery, k)
    return out


def _warn_knn_stats(query: Tensor, gallery: Tensor, k: int) -> None:
    """DNNRL_KNN_STATS=1 (diagnostics): warn how many queries the CUDA fast path (the
    opt-in candidate or filter path) left to the exact pass. The kernel only records the count; the warning is raised
    here, in Python, because a TORCH_WARN inside the op crashed the process on the H200."""
    if query.device.type != "cuda" or os.environ.get("DNNRL_KNN_STATS", "0") in ("", "0"):
        return
    if not _eager():
        return
    _knn_stats_warning(*_extension._C.knn_candidate_stats(), query, gallery, k)


def _knn_stats_warning(exact_rows: int, queries: int, query: Tensor, gallery: Tensor, k: int) -> None:
    """The DNNRL_KNN_STATS warning from the kernel's counters (also used by the CUDA emulator, tools/cuda_emu)."""
    if exact_rows >= 0 and queries == query.shape[0]:  # (an empty query never reaches the kernel)
        warnings.warn("dnnrl_ext knn: %d of %d queries took the exact pass (fast path, k=%d, N=%d, D=%d)"
                      % (exact_rows, queries, k, gallery.shape[0], query.shape[1]), stacklevel=4)


def knn_vote(query: Tensor, gallery: Tensor, gallery_labels: Tensor, k: int, num_classes: int,
             *, return_votes: bool = False, backend: str = "auto"):
    """k-NN majority vote.

    Args:
        query: (Q, D); gallery: (N, D); gallery_labels: (N,) integers in [0, num_classes).
    Returns:
        pred (Q,) int64 (and votes (Q, num_classes) int64 when ``return_votes``). A tie
        in votes goes to the tied class whose nearest member ranks first.
    """
    _check_knn(query, gallery, k)
    _check_index_vector("gallery_labels", gallery_labels, gallery.shape[0], gallery.device,
                        "one label per gallery row")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError("num_classes must be a positive int, got %r" % (num_classes,))
    if gallery_labels.dtype == torch.uint8 or gallery_labels.dtype == torch.int8:
        gallery_labels = gallery_labels.long()
    if _eager():
        lo, hi = int(gallery_labels.min()), int(gallery_labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError("gallery_labels must lie in [0, %d) (num_classes), got values in [%d, %d]"
                             % (num_classes, lo, hi))
    if _use_reference(backend, query.device):
        pred, votes = ref.knn_vote(query, gallery, gallery_labels, k, num_classes)
    else:
        pred, votes = torch.ops.dnnrl_ext.knn_vote(query, gallery, gallery_labels.long(), k, num_classes)
        _warn_knn_stats(query, gallery, k)
    return (pred, votes) if return_votes else pred


# --------------------------------------------------------------------------- registrations
def _acc(dtype: torch.dtype) -> torch.dtype:
    return ref.accumulation_dtype(dtype)


def _register() -> None:
    lib = "dnnrl_ext::"

    @torch.library.register_fake(lib + "triplet_loss")
    def _(x, labels, mining, loss_type, alpha, gamma, margin, reduction):
        B = x.shape[0]
        acc = _acc(x.dtype)
        loss = x.new_empty((B,) if reduction == ref.NONE else (), dtype=acc)
        idx = x.new_empty((B,), dtype=torch.long)
        return loss, idx, torch.empty_like(idx), x.new_empty((B,), dtype=acc), x.new_empty((B,), dtype=torch.bool)

    @torch.library.register_fake(lib + "triplet_loss_indexed")
    def _(x, anchor, positive, negative, loss_type, alpha, gamma, margin, reduction):
        T = anchor.shape[0]
        acc = _acc(x.dtype)
        return x.new_empty((T,) if reduction == ref.NONE else (), dtype=acc), x.new_empty((T,), dtype=acc)

    @torch.library.register_fake(lib + "triplet_loss_backward")
    def _(grad_loss, x, anchor, pos, neg, r, valid, loss_type, alpha, gamma, margin, reduction):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "knn")
    def _(query, gallery, k):
        Q = query.shape[0]
        return query.new_empty((Q, k), dtype=_acc(query.dtype)), query.new_empty((Q, k), dtype=torch.long)

    @torch.library.register_fake(lib + "knn_vote")
    def _(query, gallery, gallery_labels, k, num_classes):
        Q = query.shape[0]
        return query.new_empty((Q,), dtype=torch.long), query.new_empty((Q, num_classes), dtype=torch.long)

    # Autograd of triplet_loss / triplet_loss_indexed is registered in C++
    # (csrc/autograd.cpp, the Autograd dispatch key): the backward kernel reuses the
    # indices the forward saved, and no Python runs per step (see that file for why).
    # knn's distances get theirs here: a k-NN is rarely differentiated, so a few ATen
    # ops over the (Q, k, D) neighbour differences are enough (no kernel of its own).
    torch.library.register_autograd(lib + "knn", _knn_backward, setup_context=_knn_setup_context)


def _knn_setup_context(ctx, inputs, output) -> None:
    query, gallery, _ = inputs
    ctx.save_for_backward(query, gallery, output[1])


def _knn_backward(ctx, grad_dist: Tensor, grad_idx: Optional[Tensor]):
    """Gradients of dist (Q, k) = ||q_i - g_idx[i, j]||^2 with respect to query (Q, D) and
    gallery (N, D): 2 (q - g) for the query, -2 (q - g) summed into each gallery row; the
    same as the reference's expansion ||q||^2 - 2 q.g + ||g||^2 (which differs only where
    its clamp at 0 cut a negative rounding error, at distances of about 0). In the inputs'
    dtypes."""
    query, gallery, idx = ctx.saved_tensors
    grad_q = grad_g = None
    if grad_dist is None:
        return grad_q, grad_g, None
    acc = _acc(query.dtype)
    q, g = query.to(acc), gallery.to(acc)
    diff = q[:, None, :] - g[idx]                            # (Q, k, D)
    weighted = 2.0 * grad_dist.to(acc)[:, :, None] * diff    # d dist / d q, times the incoming gradient
    if ctx.needs_input_grad[0]:
        grad_q = weighted.sum(1).to(query.dtype)
    if ctx.needs_input_grad[1]:
        grad_g = torch.zeros_like(g).index_add_(0, idx.reshape(-1), -weighted.reshape(-1, g.shape[1]))
        grad_g = grad_g.to(gallery.dtype)
    return grad_q, grad_g, None


if _extension.is_available():
    _register()
