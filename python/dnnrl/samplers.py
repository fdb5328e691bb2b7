"""Batch index samplers that run on the training device with an explicit generator.

* :class:`RandomBatchSampler` — the paper's batches: a random permutation cut into
  floor(N / B) batches per epoch.
* :class:`PKSampler` — class-balanced batches of P classes x K images (for in-batch
  mining: every anchor has K - 1 positives); classes drawn without replacement per
  batch, images with replacement from their class only when it has fewer than K.

Both yield (B,) int64 index tensors on ``device``; the permutations are drawn on the
generator's device, so the same seed gives the same batches on CPU and GPU runs with
CPU generators. Indices drawn on the CPU reach a CUDA device without a host sync
(:func:`to_device`).
"""
from typing import Iterator, Optional

import torch
from torch import Tensor


def to_device(t: Tensor, device) -> Tensor:
    """``t`` on ``device``, without a host sync when a CPU tensor goes to a CUDA device.

    Why: a plain ``t.to("cuda")`` of CPU memory is a blocking copy, and torch ends a
    blocking host-to-device copy with a stream synchronisation: the host waits there
    until the card has run everything queued before. Once per training step that stops
    the host from launching the next step while the card runs this one. From pinned
    memory the copy is queued on the stream like a kernel; torch's pinned-memory cache
    keeps the pinned block until the copy has run, so ``t`` may be dropped at once.
    """
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class RandomBatchSampler:
    """floor(N / batch_size) random batches per epoch (a fresh permutation each epoch)."""

    def __init__(self, num_samples: int, batch_size: int, device=None):
        if num_samples < batch_size:
            batch_size = num_samples
        self.n, self.batch_size, self.device = num_samples, batch_size, device

    def __len__(self) -> int:
        return self.n // self.batch_size if self.batch_size else 0

    def epoch(self, generator: torch.Generator) -> Iterator[Tensor]:
        perm = to_device(torch.randperm(self.n, generator=generator, device=generator.device), self.device)
        for i in range(len(self)):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]


class PKSampler:
    """Class-balanced P x K batches; ``len`` = floor(N / (P K)) batches per epoch.

    Args:
        labels: (N,) int64 labels (any device).
        p: classes per batch (capped at the number of non-empty classes).
        k: images per class.
    """

    def __init__(self, labels: Tensor, p: int, k: int, device=None):
        labels = labels.cpu()
        classes = torch.unique(labels)
        self.p, self.k = min(p, classes.numel()), k
        self.batch_size = self.p * self.k
        self.n, self.device = labels.numel(), device
        self.members = [torch.nonzero(labels == c).flatten() for c in classes.tolist()]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.batch_size else 0

    def epoch(self, generator: torch.Generator) -> Iterator[Tensor]:
        g = generator
        C = len(self.members)
        # walk every class's own permutation, reshuffling it when exhausted, so an epoch
        # sees each image of the small classes several times and of the large ones once
        perms = [m[torch.randperm(m.numel(), generator=g, device=g.device).cpu()] for m in self.members]
        pos = [0] * C
        for _ in range(len(self)):
            chosen = torch.randperm(C, generator=g, device=g.device)[: self.p].tolist()
            parts = []
            for c in chosen:
                m = self.members[c]
                if m.numel() < self.k:  # too few images: sample with replacement
                    parts.append(m[torch.randint(m.numel(), (self.k,), generator=g, device=g.device).cpu()])
                    continue
                if pos[c] + self.k > m.numel():
                    perms[c] = m[torch.randperm(m.numel(), generator=g, device=g.device).cpu()]
                    pos[c] = 0
                parts.append(perms[c][pos[c]:pos[c] + self.k])
                pos[c] += self.k
            yield to_device(torch.cat(parts), self.device)


def make_sampler(kind: str, labels: Tensor, batch_size: int, p: Optional[int] = None, device=None):
    """"random" or "pk" (P = the number of classes, K = batch_size // P unless p is given).

    Both keep a batch within the N labels, so an epoch has at least one batch whenever
    N >= 2: the random batch is capped at N, and P x K shrinks K (to N // P, at least 2),
    then P. Check ``sampler.batch_size`` against ``batch_size`` to tell the user."""
    if kind == "random":
        return RandomBatchSampler(labels.numel(), batch_size, device)
    if kind == "pk":
        n = labels.numel()
        num_classes = int(torch.unique(labels.cpu()).numel())
        p = min(p or num_classes, num_classes)
        k = max(2, batch_size // p)
        if p * k > n:  # fewer images than one batch
            k = max(2, n // p)
            p = max(1, min(p, n // k))
        return PKSampler(labels, p, k, device)
    raise ValueError("sampler must be 'random' or 'pk', got %r" % (kind,))
