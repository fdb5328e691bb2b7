"""dnnrl_ext: fused exponential triplet loss, batch-hard mining and k-NN for PyTorch.

Import never fails because of the compiled extension; see
:func:`dnnrl_ext.extension_available` and ``backend="reference"``.
"""
from ._extension import ExtensionNotAvailable, has_cuda_kernels, kernels_available
from ._extension import is_available as extension_available
from . import reference
from .loss import ExpTripletLoss, TripletLoss
from .knn import KNNClassifier, accuracy_per_k
from .distributed import DistributedLoss
# imported after the submodule dnnrl_ext.knn so that the name `knn` is the function
from .ops import TripletLossOutput, knn, knn_vote, triplet_loss, triplet_loss_from_triplets

__version__ = "0.1.0"

__all__ = [
    "ExpTripletLoss", "TripletLoss", "KNNClassifier", "TripletLossOutput", "DistributedLoss",
    "triplet_loss", "triplet_loss_from_triplets", "knn", "knn_vote", "accuracy_per_k",
    "reference", "extension_available", "has_cuda_kernels", "kernels_available", "ExtensionNotAvailable",
]
