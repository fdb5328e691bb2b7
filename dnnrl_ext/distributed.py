"""Triplet mining over the batches of every process (torch.distributed, DDP).

Under DistributedDataParallel each process holds a shard of the batch. Mining within the
shard sees only B / W rows, so the hardest positive and negative of an anchor are often
on another process. :class:`DistributedLoss` wraps ``ExpTripletLoss`` / ``TripletLoss``
so that the mining sees the whole global batch::

    criterion = dnnrl_ext.DistributedLoss(
        dnnrl_ext.ExpTripletLoss(mining="semi_hard", reduction="sum"))
    loss = criterion(ddp_model(images), labels)   # this process's shard
    loss.backward()                               # DDP averages: the global batch's gradient

Each process computes the same loss L of the global batch and back-propagates dL/dx only
into its own rows. DDP then averages the parameter gradients over W processes, so the
loss's gradient is scaled by W here, and the averaged gradient equals one process on the
concatenated batch (tested to 1e-9 in float64 with 2 gloo processes, even and uneven
shards). Every helper is the identity in a single process or without a process group.
"""
import inspect
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedLoss", "shard_range", "gather_sizes", "all_gather_rows", "gather_with_grad", "world"]


def world(group=None) -> Tuple[int, int]:
    """(rank, world size) of this process in ``group`` (the default group when None);
    (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n rows: the first n % world_size ranks
    get one row more (the split of ``torch.tensor_split``)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_sizes(n: int, device=None, group=None) -> List[int]:
    """Every process's n, in rank order (one all_gather, read back to the host)."""
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world(group)[1])]
    dist.all_gather(out, t, group=group)
    return [int(s) for s in out]


def _gather_padded(x: Tensor, sizes: Optional[List[int]], group) -> List[Tensor]:
    """Every process's x (n_r, ...) as a list in rank order, without gradient; the rows are
    padded to the largest n_r for the collective (``sizes``: the n_r where known, else
    exchanged)."""
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    m = max(sizes)
    buf = x.detach()
    if buf.shape[0] < m:
        buf = torch.cat([buf, buf.new_zeros((m - buf.shape[0],) + tuple(buf.shape[1:]))])
    out = [torch.empty_like(buf) for _ in range(len(sizes))]
    dist.all_gather(out, buf.contiguous(), group=group)
    return [t[:s] for t, s in zip(out, sizes)]


def all_gather_rows(x: Tensor, sizes: Optional[List[int]] = None, group=None) -> Tensor:
    """(sum n_r, ...) concatenation of every process's x (n_r, ...) in rank order, without
    gradient; x itself in a single process."""
    if world(group)[1] == 1:
        return x
    return torch.cat(_gather_padded(x, sizes, group))


def gather_with_grad(x: Tensor, sizes: Optional[List[int]] = None, group=None) -> Tensor:
    """Like :func:`all_gather_rows`, but this process's rows are ``x`` itself, so a loss of
    the gathered tensor back-propagates into x (the other processes' rows are constants
    here; each process back-propagates into its own shard)."""
    rank, size = world(group)
    if size == 1:
        return x
    parts = _gather_padded(x, sizes, group)
    parts[rank] = x
    return torch.cat(parts)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class DistributedLoss(nn.Module):
    """A triplet criterion over the batches of every process.

    Args:
        criterion: ``ExpTripletLoss``, ``TripletLoss`` or any module called as
            ``criterion(embeddings, labels, return_details=True)`` that returns a
            :class:`~dnnrl_ext.TripletLossOutput`.
        scope: "global": embeddings and labels are gathered from every process (this
            process's rows stay in the graph) and every process computes the same loss
            of the global batch, so batch-hard / semi-hard mining sees all of it.
            "local": each process mines in its own shard; the loss is the sum ("sum"
            reduction) or the mean ("mean") of the per-process losses, with its exact
            gradient. Either way the returned value is the same on every process.
        reduction: the criterion's reduction, "sum" or "mean" (default: its
            ``reduction`` attribute); "none" has no global form.
        global_batch: the global batch size, where every process holds its
            ``shard_range(global_batch, rank, W)`` slice of it (as a sharded sampler
            gives). The shard sizes are then computed, not exchanged: the exchange reads
            a number back to the host, which makes every step wait for the device.
        group: the process group (default: the default group).

    Shape:
        embeddings (n_r, D) (this process's shard), labels (n_r,) -> () loss; with
        ``return_details=True`` a TripletLossOutput whose per-row fields cover the
        global batch ("global", rank order) or the local shard ("local").

    A gradient scaled by W reaches the embeddings in "global" scope (and for "sum" in
    "local"): DDP's average over W processes turns it into the global loss's gradient.
    Without DDP, divide the gradients by W yourself.
    """

    def __init__(self, criterion: nn.Module, scope: str = "global", reduction: Optional[str] = None,
                 global_batch: Optional[int] = None, group=None):
        super().__init__()
        if scope not in ("global", "local"):
            raise ValueError("scope must be 'global' or 'local', got %r" % (scope,))
        reduction = reduction if reduction is not None else getattr(criterion, "reduction", None)
        if reduction not in ("sum", "mean"):
            raise ValueError("DistributedLoss needs the criterion's reduction, 'sum' or 'mean', got %r"
                             % (reduction,))
        if global_batch is not None and (isinstance(global_batch, bool) or not isinstance(global_batch, int)
                                         or global_batch < 1):
            raise ValueError("global_batch must be a positive int or None, got %r" % (global_batch,))
        params = inspect.signature(criterion.forward).parameters if callable(getattr(criterion, "forward", None)) \
            else {}
        if "return_details" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise TypeError("criterion must take return_details (dnnrl_ext.ExpTripletLoss or TripletLoss), got %s"
                            % type(criterion).__name__)
        self.criterion, self.scope, self.reduction = criterion, scope, reduction
        self.global_batch, self.group = global_batch, group

    def _shard_sizes(self, n_local: int, device) -> List[int]:
        """Every process's number of rows: the shards of ``global_batch`` where it is given,
        else exchanged. (No fallback to the exchange for a batch of another size: a process
        that exchanged while the others did not would wait forever.)"""
        rank, size = world(self.group)
        if not self.global_batch:
            return gather_sizes(n_local, device, self.group)
        sizes = [b - a for a, b in (shard_range(self.global_batch, r, size) for r in range(size))]
        if sizes[rank] != n_local:
            raise ValueError("rank %d got %d rows, but its shard of the global batch of %d (global_batch) "
                             "has %d" % (rank, n_local, self.global_batch, sizes[rank]))
        return sizes

    def forward(self, embeddings: Tensor, labels: Tensor, return_details: bool = False):
        W = world(self.group)[1]
        if W == 1:
            if self.global_batch and embeddings.shape[0] != self.global_batch:
                raise ValueError("embeddings has %d rows, but global_batch is %d (one process holds the whole "
                                 "batch)" % (embeddings.shape[0], self.global_batch))
            return self.criterion(embeddings, labels, return_details=return_details)
        if self.scope == "global":
            sizes = self._shard_sizes(embeddings.shape[0], labels.device)
            emb = gather_with_grad(embeddings, sizes, self.group)
            lab = all_gather_rows(labels, sizes, self.group)
            out = self.criterion(emb, lab, return_details=True)
            loss = _ScaleGrad.apply(out.loss, float(W))
        else:
            out = self.criterion(embeddings, labels, return_details=True)
            total = out.loss.detach().clone()
            dist.all_reduce(total, group=self.group)
            if self.reduction == "mean":
                total = total / W
            scale = float(W) if self.reduction == "sum" else 1.0
            # value: the global loss; gradient: scale * d(local loss)
            loss = _ScaleGrad.apply(out.loss, scale) + (total - out.loss.detach())
        return out._replace(loss=loss) if return_details else loss

    def extra_repr(self) -> str:
        return "scope=%r, reduction=%r, global_batch=%r" % (self.scope, self.reduction, self.global_batch)
