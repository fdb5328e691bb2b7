"""Drop-in nn.Module losses backed by the fused kernels."""
from torch import Tensor, nn

from . import ops
from . import reference as ref


class ExpTripletLoss(nn.Module):
    """The DNNRL exponential triplet loss with in-batch mining.

    Per triplet ``L = exp(-alpha * max(r - gamma, 0))`` with ``r = d(a,n) - d(a,p)``
    (squared Euclidean distances); triplets harder than gamma (r <= gamma) give L = 1
    and no gradient. See SPEC section 2 for the paper's Eq. 1 sign typo.

    Args:
        alpha: trade-off (slope) parameter, the paper's 0.2.
        gamma: learning margin, the paper's 0; negative values let violating
            triplets be learned from.
        mining: "batch_hard", "semi_hard" or "easy_positive". With gamma >= 0, batch-hard
            triplets of an untrained network all violate (r < 0): loss 1, no gradient,
            nothing learned. "semi_hard" learns with gamma = 0 (examples/drop_in.py shows
            both). "easy_positive" pairs each anchor's nearest positive with its nearest
            negative (the mining of the FER-2013 recipe in docs/app.md).
        reduction: "mean" over valid anchors, "sum" or "none".
        backend: "auto" (fused kernels) or "reference" (pure PyTorch).

    Shape:
        embeddings (B, D), labels (B,) -> () or (B,) float32 (float64 for float64).

    Example::

        criterion = dnnrl_ext.ExpTripletLoss(alpha=0.2, gamma=0.0, mining="semi_hard", reduction="sum")
        loss = criterion(model(images), labels)
        loss.backward()
    """

    def __init__(self, alpha: float = 0.2, gamma: float = 0.0, mining: str = "batch_hard",
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        # checked here, so that a bad value fails where the module is built, not at its first call
        self.alpha = ops._check_alpha(alpha, ref.EXP)
        self.gamma = ops._check_finite_param("gamma", gamma)
        self.mining, self.reduction, self.backend = mining, reduction, backend

    def forward(self, embeddings: Tensor, labels: Tensor, return_details: bool = False):
        return ops.triplet_loss(embeddings, labels, mining=self.mining, loss="exp",
                                alpha=self.alpha, gamma=self.gamma, reduction=self.reduction,
                                return_details=return_details, backend=self.backend)

    def extra_repr(self) -> str:
        return "alpha=%g, gamma=%g, mining=%r, reduction=%r" % (
            self.alpha, self.gamma, self.mining, self.reduction)


class TripletLoss(nn.Module):
    """The standard hinge triplet loss ``max(d(a,p) - d(a,n) + margin, 0)`` (T-DNN).

    Same mining and shapes as :class:`ExpTripletLoss`; ``semi_hard`` picks the nearest
    negative farther than the positive, ``easy_positive`` the nearest positive.
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard", reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.margin = ops._check_finite_param("margin", margin)
        self.mining, self.reduction, self.backend = mining, reduction, backend

    def forward(self, embeddings: Tensor, labels: Tensor, return_details: bool = False):
        return ops.triplet_loss(embeddings, labels, mining=self.mining, loss="hinge",
                                margin=self.margin, gamma=0.0, reduction=self.reduction,
                                return_details=return_details, backend=self.backend)

    def extra_repr(self) -> str:
        return "margin=%g, mining=%r, reduction=%r" % (self.margin, self.mining, self.reduction)
