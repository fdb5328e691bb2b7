"""Multi-process training and evaluation on torch.distributed (DDP; NCCL on GPUs, gloo
on CPUs), launched by ``torchrun`` (``torchrun --nproc_per_node N -m dnnrl train ...``).

Pieces, each a no-op in a single process (``DistContext.enabled`` false):

* :func:`setup` / :func:`cleanup` — join / leave the process group that torchrun's
  environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) describes; one GPU per
  local rank.
* :func:`wrap_model` — the model under DistributedDataParallel (gradients averaged over
  ranks), callable for embeddings and ``.logits`` for the softmax head.
* :class:`ShardedBatchSampler` — every rank draws the same *global* batch from the same
  generator and keeps its contiguous slice: no duplicates across ranks, the same global
  batches for a seed whatever the world size, no per-rank sampler state.
* mining over the global batch or per rank: :class:`dnnrl_ext.DistributedLoss` (the ops
  library's, re-exported here with ``shard_range`` and ``all_gather_rows``).
* :func:`embed_sharded`, :func:`sharded_knn`, :class:`ShardedKNNClassifier` — the
  evaluation gallery embedded in shards; each rank's top-k merged into the global
  top-k (ties -> smaller gallery index), then the usual vote.
"""
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

# the pieces a user of the ops library needs too live there (DistributedLoss: mining over
# the global batch); the rest of this module is the application's (launch, sampler, evaluation)
from dnnrl_ext.distributed import DistributedLoss, all_gather_rows, shard_range  # noqa: F401 (re-exported)

log = logging.getLogger("dnnrl")
_OWN_GROUP = False  # True when setup() created the process group (cleanup() destroys it)


@dataclass
class DistContext:
    """Where this process stands: rank among world_size processes, its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of logs, checkpoints and results."""
        return self.rank == 0

    def shard_range(self, n: int) -> Tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)


def setup(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) or return the
    existing one; a single-process context otherwise.

    Args:
        device: the configured device ("auto", "cpu", "cuda", ...). CUDA ranks use
            cuda:LOCAL_RANK and NCCL; CPU ranks gloo.
    """
    global _OWN_GROUP
    from .runtime import pick_device
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():
        if world <= 1:
            return DistContext(device=dev)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        _OWN_GROUP = True
    local = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, dev)
    if ctx.enabled and dev.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1; respect a user's choice, else share the cores
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.world_size)))
    return ctx


def cleanup() -> None:
    """Leave the process group if :func:`setup` created it."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(epoch, rank) seed: augmentation and dropout streams differ across ranks and
    follow from the checkpointed epoch alone (no per-rank RNG state to save)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2 ** 63)


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value of a picklable object on every rank (protocol decisions must agree)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reseed_epoch(aug_gen: torch.Generator, seed: int, epoch: int, ctx: DistContext) -> None:
    """Per-rank augmentation and dropout streams for this epoch (distributed runs only)."""
    if ctx.enabled:
        aug_gen.manual_seed(rank_seed(seed + 7, epoch, ctx.rank))
        torch.manual_seed(rank_seed(seed, epoch, ctx.rank))


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts
    them before each training forward, so after the last step they differ; validation,
    checkpoints and sharded evaluation need one model."""
    if ctx.enabled:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


# --------------------------------------------------------------------------- model
class _Forward(nn.Module):
    """What DDP wraps: forward(x) = model(x) (embeddings) or model.logits(x)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, head: bool = False, both: bool = False):
        if both:
            return self.model.embed_and_logits(x)
        return self.model.logits(x) if head else self.model(x)


class DDPModel:
    """A model under DDP: ``m(x)`` embeddings, ``m.logits(x)`` head scores; both go
    through DDP's forward, so the backward all-reduces (averages) the gradients."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel):
        self.ddp = ddp

    def __call__(self, x: Tensor) -> Tensor:
        return self.ddp(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.ddp(x, head=True)

    def embed_and_logits(self, x: Tensor):
        return self.ddp(x, both=True)


def wrap_model(model: nn.Module, ctx: DistContext, uses_head: bool, compile: bool = False,
               compile_mode: str = "default"):
    """DDP around ``model`` (parameters broadcast from rank 0 here); the model itself
    stays the object that is saved, validated and evaluated.

    Args:
        uses_head: the training loss reads the head (method "dnn", or a triplet method
            with ``softmax_weight`` > 0). When it does
            not, the head is frozen (requires_grad False): it gets no gradient anyway,
            and DDP would otherwise wait for it.
        compile: torch.compile the wrapped forward (with ``compile_mode``).
    """
    if not ctx.enabled:
        return torch.compile(model, mode=compile_mode) if compile else model
    if not uses_head and hasattr(model, "head"):
        model.head.requires_grad_(False)
    fwd = _Forward(model)
    ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" else None
    # no buffer broadcast before every forward (one collective less per step): the BN
    # statistics follow rank 0's shards either way, and sync_buffers() copies rank 0's
    # at the end of every epoch
    # (torch >= 2.13 names it forward_sync_buffers and warns on every rank about the old name;
    # the old name is the only one before; the new one still syncs the buffers once at init)
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers"
               in inspect.signature(nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
    ddp = nn.parallel.DistributedDataParallel(fwd, device_ids=ids, **{no_sync: False})
    if compile:
        ddp = torch.compile(ddp, mode=compile_mode)
    return DDPModel(ddp)


# --------------------------------------------------------------------------- sampler
class ShardedBatchSampler:
    """Each rank's share of a batch sampler's global batches.

    All ranks hold the same generator state, so they draw the same global batch; rank r
    keeps rows ``shard_range(B, r, W)`` of it. Shards are disjoint and cover the batch
    (a P x K batch is laid out class by class, so with P divisible by W every rank gets
    whole classes: local mining still has positives).

    Args:
        sampler: a :class:`RandomBatchSampler` or :class:`PKSampler` (global batch size).
    """

    def __init__(self, sampler, ctx: DistContext):
        self.sampler, self.ctx = sampler, ctx
        self.batch_size = sampler.batch_size  # the global batch size

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, generator: torch.Generator) -> Iterator[Tensor]:
        for idx in self.sampler.epoch(generator):
            s, e = self.ctx.shard_range(idx.numel())
            yield idx[s:e]


def shard_sampler(sampler, ctx: DistContext):
    return ShardedBatchSampler(sampler, ctx) if ctx.enabled else sampler


# --------------------------------------------------------------------------- evaluation
def embed_sharded(model, images: Tensor, ctx: DistContext, gather: bool = True, **kw) -> Tensor:
    """Embeddings of ``images`` (N, S, S) computed in shards: this rank embeds rows
    ``ctx.shard_range(N)``; ``gather`` returns all N rows (rank order = row order),
    else only this rank's shard. ``kw`` as :func:`dnnrl.runtime.embed`."""
    from .runtime import embed
    s, e = ctx.shard_range(images.shape[0])
    local = embed(model, images[s:e], **kw)
    return all_gather_rows(local) if gather and ctx.enabled else local


def merge_topk(dist_parts: List[Tensor], idx_parts: List[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    """Merge per-shard top-k lists into the global top-k.

    Args:
        dist_parts, idx_parts: per shard (Q, k_r) distances (ascending) and global
            gallery indices; a padded slot has distance NaN and index int64 max.
    Returns:
        dist (Q, k), idx (Q, k): ascending distance, ties (NaN included) to the smaller
        gallery index, NaN last -- the order of :func:`dnnrl_ext.knn`.
    """
    d = torch.cat(dist_parts, 1)
    i = torch.cat(idx_parts, 1)
    # lexicographic (distance, index): stable sort by index, then stably by distance
    o = torch.sort(i, dim=1, stable=True).indices
    d, i = d.gather(1, o), i.gather(1, o)
    o = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, o), i.gather(1, o)


def sharded_knn(query: Tensor, gallery_shard: Tensor, offset: int, k: int, ctx: DistContext,
                backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Global k-NN over a gallery split across ranks.

    Args:
        query: (Q, D), the same on every rank.
        gallery_shard: (n_r, D) this rank's rows, global indices offset..offset+n_r-1.
        k: 1 <= k <= the total gallery size.
    Returns:
        dist (Q, k), idx (Q, k) int64 global gallery indices, on every rank; equal to
        ``dnnrl_ext.knn`` on the whole gallery (ties -> smaller index).
    """
    from dnnrl_ext import knn
    Q = query.shape[0]
    kl = min(k, gallery_shard.shape[0])
    if kl > 0:
        d, i = knn(query, gallery_shard, kl, backend=backend)
        i = i + offset
    else:
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        d = torch.empty((Q, 0), dtype=acc, device=query.device)
        i = torch.empty((Q, 0), dtype=torch.long, device=query.device)
    if not ctx.enabled:
        return d[:, :k], i[:, :k]
    pad = k - kl  # fixed width k per rank for all_gather
    if pad:
        d = torch.cat([d, d.new_full((Q, pad), float("nan"))], 1)
        i = torch.cat([i, i.new_full((Q, pad), torch.iinfo(torch.long).max)], 1)
    ds = [torch.empty_like(d) for _ in range(ctx.world_size)]
    is_ = [torch.empty_like(i) for _ in range(ctx.world_size)]
    dist.all_gather(ds, d.contiguous())
    dist.all_gather(is_, i.contiguous())
    return merge_topk(ds, is_, k)


class ShardedKNNClassifier:
    """:class:`dnnrl_ext.KNNClassifier`'s interface (fit with k chosen on validation,
    predict, score) over a gallery whose rows are split across ranks.

    ``fit`` takes this rank's gallery shard (rows ``ctx.shard_range(N)``) and the labels
    of the whole gallery (N,); queries are full (the same on every rank).
    """

    def __init__(self, ctx: DistContext, num_classes: int, backend: str = "auto"):
        self.ctx, self.num_classes, self.backend = ctx, num_classes, backend
        self.k = 1
        self.val_accuracy_per_k = None

    def fit(self, gallery_shard: Tensor, labels: Tensor, val=None, k_max: int = 50):
        self.gallery = gallery_shard.float() if not gallery_shard.is_floating_point() else gallery_shard
        self.labels = labels.long()
        self.n = int(labels.shape[0])
        if self.n == 0:
            raise ValueError("the k-NN gallery needs at least one row")
        # NaN / inf rows are refused as KNNClassifier refuses them; the count is summed over
        # the ranks first, so that every rank raises (one rank raising alone would leave the
        # others waiting in the next collective)
        bad = (~torch.isfinite(self.gallery).all(1)).sum().reshape(1)
        if self.ctx.enabled:
            dist.all_reduce(bad)
        if int(bad) > 0:
            raise ValueError("the gallery embeddings hold NaN or inf in %d of %d rows; the k-NN needs finite "
                             "embeddings" % (int(bad), self.n))
        self.offset = self.ctx.shard_range(self.n)[0]
        if val is not None:
            self.select_k(val[0], val[1], k_max)
        return self

    def kneighbors(self, query: Tensor, k: Optional[int] = None):
        q = query.to(self.gallery.device, self.gallery.dtype)
        from dnnrl_ext.knn import _check_finite_rows
        _check_finite_rows("embeddings", q)  # the queries are the same on every rank: all raise alike
        return sharded_knn(q, self.gallery, self.offset, k or self.k, self.ctx, self.backend)

    def select_k(self, query: Tensor, labels: Tensor, k_max: int = 50) -> int:
        from dnnrl_ext.knn import accuracy_per_k
        k_max = max(1, min(int(k_max), self.n))
        _, idx = self.kneighbors(query, k_max)
        acc = accuracy_per_k(self.labels[idx], labels.to(idx.device).long(), self.num_classes)
        self.val_accuracy_per_k = {k + 1: float(a) for k, a in enumerate(acc.tolist())}
        self.k = int(torch.nonzero(acc == acc.max())[0, 0].item()) + 1  # ties to the smaller k
        return self.k

    def predict(self, query: Tensor) -> Tensor:
        """(Q,) int64: the vote of dnnrl_ext.knn_vote (ties -> the class ranked first)."""
        from dnnrl_ext.reference import vote
        _, idx = self.kneighbors(query)
        return vote(self.labels[idx], self.num_classes)[0]

    def score(self, query: Tensor, labels: Tensor) -> float:
        pred = self.predict(query)
        y = labels.to(pred.device).long()
        return float((pred == y).double().mean()) if y.numel() else 0.0
