"""k-NN search, vote, and a scikit-learn style classifier over the fused kernels."""
import numbers
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .ops import knn, knn_vote  # noqa: F401  (re-exported)
from .reference import vote


def _as_float_tensor(name: str, x, device=None) -> Tensor:
    t = torch.as_tensor(x)
    if t.is_complex():
        raise TypeError("%s must be real, got %s (casting would drop the imaginary part)" % (name, t.dtype))
    if not t.is_floating_point():
        t = t.float()
    if t.dim() != 2:
        raise ValueError("%s must be 2-D (samples, dim), got shape %s" % (name, tuple(t.shape)))
    return t if device is None else t.to(device)


def _check_finite_rows(name: str, t: Tensor) -> None:
    """ValueError naming ``name`` when a row holds NaN or inf. The ops give such a row NaN
    distances and a vote by gallery index (a class that looks like an answer), so the
    classifier refuses it instead; one device sync, paid once per call."""
    bad = ~torch.isfinite(t).all(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        raise ValueError("%s holds NaN or inf in %d of %d rows (first: row %d); the k-NN needs finite embeddings"
                         % (name, rows.numel(), t.shape[0], int(rows[0])))


def _as_label_tensor(name: str, y, n: int, device) -> Tensor:
    t = torch.as_tensor(y, device=device)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError("%s must be 1-D with %d entries, got shape %s" % (name, n, tuple(t.shape)))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError("%s must hold integer class labels, got %s" % (name, t.dtype))
    if n and int(t.min()) < 0:
        raise ValueError("%s must be non-negative class indices, got min %d" % (name, int(t.min())))
    return t.long()


def accuracy_per_k(neighbour_labels: Tensor, true_labels: Tensor, num_classes: int,
                   chunk: int = 4096) -> Tensor:
    """Accuracy of the k-NN vote for every k = 1..k_max from one neighbour search.

    Args:
        neighbour_labels: (Q, k_max) labels of the nearest gallery rows, nearest first.
        true_labels: (Q,) int64.
    Returns:
        (k_max,) float64 accuracies; entry k-1 is the accuracy with k neighbours, under
        the same vote and tie rule as :func:`knn_vote`.
    """
    Q, k_max = neighbour_labels.shape
    correct = torch.zeros(k_max, dtype=torch.float64, device=neighbour_labels.device)
    ranks = torch.arange(k_max, device=neighbour_labels.device)[None, :, None]
    for s in range(0, Q, chunk):
        lab = neighbour_labels[s:s + chunk]
        one_hot = torch.nn.functional.one_hot(lab, num_classes)  # (q, k, C)
        counts = one_hot.cumsum(1)  # votes of each prefix k
        first = torch.where(one_hot.bool(), ranks, torch.full_like(ranks, k_max)).amin(1)
        # a class absent from the prefix has 0 votes, so the global first rank is enough
        score = counts * (k_max + 1) + (k_max - first)[:, None, :]
        pred = score.argmax(2)  # (q, k)
        correct += (pred == true_labels[s:s + chunk, None]).sum(0).double()
    return correct / max(Q, 1)


def _check_count(name: str, value) -> None:
    """ValueError naming ``name`` unless value is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError("%s must be an int >= 1, got %r" % (name, value))


class KNNClassifier:
    """k-NN classifier on embeddings with k chosen on validation data.

    Example::

        clf = KNNClassifier(num_classes=7).fit(train_emb, train_y, val=(val_emb, val_y), k_max=50)
        clf.k, clf.score(test_emb, test_y)

    Args:
        k: neighbours to vote with (overridden when ``fit`` gets validation data).
        num_classes: number of classes (default: 1 + the largest label seen in fit).
        backend: "auto" (fused kernels) or "reference".
    """

    def __init__(self, k: int = 1, num_classes: Optional[int] = None, backend: str = "auto"):
        _check_count("k", k)
        if num_classes is not None:
            _check_count("num_classes", num_classes)
        ops._check_backend(backend)
        self.k = k
        self.num_classes = num_classes
        self.backend = backend
        self.gallery: Optional[Tensor] = None
        self.gallery_labels: Optional[Tensor] = None
        self.val_accuracy_per_k: Optional[Dict[int, float]] = None

    def fit(self, embeddings, labels, val: Optional[Sequence] = None, k_max: int = 50) -> "KNNClassifier":
        """Store the gallery (N, D) with labels (N,); with ``val=(X, y)`` choose k in
        1..k_max by validation accuracy (ties to the smaller k)."""
        gallery = _as_float_tensor("embeddings", embeddings)
        if gallery.shape[0] == 0:
            raise ValueError("embeddings is empty: the k-NN gallery needs at least one row")
        _check_finite_rows("embeddings", gallery)
        if val is not None and (isinstance(val, (str, bytes)) or not isinstance(val, Sequence) or len(val) != 2):
            raise ValueError("val must be a pair (embeddings, labels), got %s" % (type(val).__name__,))
        self.gallery = gallery
        self.gallery_labels = _as_label_tensor("labels", labels, self.gallery.shape[0], self.gallery.device)
        seen = int(self.gallery_labels.max()) + 1
        if self.num_classes is None:
            self.num_classes = seen
        elif seen > self.num_classes:
            raise ValueError("labels hold class %d but num_classes is %d" % (seen - 1, self.num_classes))
        if val is not None:
            self.select_k(val[0], val[1], k_max)
        return self

    def _check_fitted(self):
        if self.gallery is None:
            raise RuntimeError("KNNClassifier is not fitted: call fit(embeddings, labels) first")

    def _query(self, x) -> Tensor:
        q = _as_float_tensor("embeddings", x, self.gallery.device).to(self.gallery.dtype)
        _check_finite_rows("embeddings", q)
        return q

    def select_k(self, embeddings, labels, k_max: int = 50) -> int:
        """Choose k by validation accuracy from one neighbour search; returns k.

        The accuracies of every k are kept in ``val_accuracy_per_k``.
        """
        self._check_fitted()
        q = self._query(embeddings)
        y = _as_label_tensor("labels", labels, q.shape[0], q.device)
        if q.shape[0] == 0:
            raise ValueError("the validation embeddings are empty: k cannot be chosen on no data")
        _check_count("k_max", k_max)
        k_max = min(int(k_max), self.gallery.shape[0])  # (a small gallery caps it)
        _, idx = ops.knn(q, self.gallery, k_max, backend=self.backend)
        acc = accuracy_per_k(self.gallery_labels[idx], y, self.num_classes)
        self.val_accuracy_per_k = {k + 1: float(a) for k, a in enumerate(acc.tolist())}
        best = acc.max()
        self.k = int(torch.nonzero(acc == best)[0, 0].item()) + 1  # ties to the smaller k
        return self.k

    def kneighbors(self, embeddings, k: Optional[int] = None):
        """(dist (Q, k), idx (Q, k)) of the nearest gallery rows."""
        self._check_fitted()
        if k is not None:
            _check_count("k", k)
        return ops.knn(self._query(embeddings), self.gallery, self.k if k is None else k, backend=self.backend)

    def predict(self, embeddings) -> Tensor:
        """(Q,) int64 predicted classes."""
        self._check_fitted()
        return ops.knn_vote(self._query(embeddings), self.gallery, self.gallery_labels, self.k,
                            self.num_classes, backend=self.backend)

    def predict_proba(self, embeddings) -> Tensor:
        """(Q, num_classes) float32 vote shares."""
        self._check_fitted()
        _, votes = ops.knn_vote(self._query(embeddings), self.gallery, self.gallery_labels, self.k,
                                self.num_classes, return_votes=True, backend=self.backend)
        return votes.float() / self.k

    def score(self, embeddings, labels) -> float:
        """Accuracy in [0, 1]."""
        pred = self.predict(embeddings)
        y = _as_label_tensor("labels", labels, pred.shape[0], pred.device)
        return float((pred == y).double().mean()) if y.numel() else 0.0

    def state_dict(self) -> dict:
        return {"k": self.k, "num_classes": self.num_classes, "gallery": self.gallery,
                "gallery_labels": self.gallery_labels}

    @classmethod
    def from_state_dict(cls, state: dict, backend: str = "auto") -> "KNNClassifier":
        clf = cls(k=state["k"], num_classes=state["num_classes"], backend=backend)
        clf.gallery, clf.gallery_labels = state["gallery"], state["gallery_labels"]
        return clf


__all__ = ["knn", "knn_vote", "vote", "accuracy_per_k", "KNNClassifier"]
