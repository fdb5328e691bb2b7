"""dnnrl.samplers."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnrl.samplers import PKSampler, RandomBatchSampler, make_sampler


def test_random_batches_are_disjoint_and_floor_n_over_b():
    s = RandomBatchSampler(1000, 128)
    batches = list(s.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(s) == 7
    flat = torch.cat(batches)
    assert flat.unique().numel() == flat.numel() == 7 * 128
    g = torch.Generator().manual_seed(0)
    first, second = torch.cat(list(s.epoch(g))), torch.cat(list(s.epoch(g)))
    assert torch.equal(first, flat) and not torch.equal(first, second)  # a fresh permutation each epoch
    small = RandomBatchSampler(5, 128)  # fewer images than a batch: one batch of all of them
    assert len(small) == 1 and sorted(next(iter(small.epoch(g))).tolist()) == [0, 1, 2, 3, 4]


def test_pk_batches_are_class_balanced():
    labels = torch.tensor([0] * 500 + [1] * 30 + [2] * 200 + [3] * 3)
    s = PKSampler(labels, p=4, k=8)
    batches = list(s.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == labels.numel() // 32
    for b in batches:
        counts = torch.bincount(labels[b], minlength=4)
        assert sorted(counts.tolist()) == [8, 8, 8, 8]


def test_pk_deterministic_by_seed_and_p_capped():
    labels = torch.arange(300) % 3
    s = make_sampler("pk", labels, 30)
    assert s.p == 3 and s.k == 10
    a = list(s.epoch(torch.Generator().manual_seed(5)))
    b = list(s.epoch(torch.Generator().manual_seed(5)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_pk_draws_p_of_more_classes_at_random():
    """P < number of classes: each batch's P classes are a fresh random choice, so every
    class is drawn, about equally often, and the choice changes from batch to batch."""
    labels = torch.arange(1000) % 10
    s = PKSampler(labels, p=3, k=4)
    chosen = [tuple(sorted(set(labels[b].tolist()))) for b in s.epoch(torch.Generator().manual_seed(0))]
    assert all(len(c) == 3 for c in chosen) and len(chosen) == 1000 // 12
    freq = torch.bincount(torch.tensor([c for cs in chosen for c in cs]), minlength=10)
    assert int(freq.min()) >= 10 and int(freq.max()) <= 40, freq.tolist()  # 25 expected per class
    assert len(set(chosen)) > 20


def test_pk_walks_each_class_without_repeats_until_it_is_used_up():
    """Each class's images come from a walk over its own permutation: within one pass of
    floor(n / k) * k draws no image repeats, and the pass covers all but n mod k of them
    (a class with fewer than k images is drawn with replacement)."""
    labels = torch.tensor([0] * 500 + [1] * 30 + [2] * 201 + [3] * 3)
    s = PKSampler(labels, p=4, k=8)
    draws = {c: [] for c in range(4)}
    for b in s.epoch(torch.Generator().manual_seed(1)):
        for i in b.tolist():
            draws[int(labels[i])].append(i)
    for c, n in ((0, 500), (1, 30), (2, 201)):
        seq = draws[c]
        length = (n // 8) * 8
        assert len(seq) >= 2 * 8, (c, len(seq))  # the class was drawn more than once
        for start in range(0, len(seq), length):
            chunk = seq[start:start + length]
            assert len(set(chunk)) == len(chunk), (c, start)
        if len(seq) >= length:
            assert len(set(seq[:length])) == length
    assert set(draws[3]) <= {731, 732, 733} and len(draws[3]) > 3  # 3 images, k = 8: repeats


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda c: sum(c) >= 2),
       batch_size=st.integers(2, 300), kind=st.sampled_from(["random", "pk"]))
def test_a_training_set_smaller_than_a_batch_still_gives_batches(counts, batch_size, kind):
    """Any N >= 2 labels give at least one batch per epoch, no batch larger than N, valid
    indices; with N >= batch_size the batch is the requested one (P x K as before)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    s = make_sampler(kind, labels, batch_size)
    n = labels.numel()
    assert len(s) >= 1 and s.batch_size <= n
    batches = list(s.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(s)
    for b in batches:
        assert b.numel() == s.batch_size and 0 <= int(b.min()) and int(b.max()) < n
    classes = sum(1 for c in counts if c)
    if n >= batch_size:
        expected = batch_size if kind == "random" else classes * max(2, batch_size // classes)
        assert s.batch_size == expected or (kind == "pk" and expected > n)
    if kind == "pk":
        assert s.k >= 2  # every anchor of a drawn class has a positive


def test_pk_batch_shrinks_to_a_set_smaller_than_one_batch():
    """Hand cases of the rule above: one class of 20 with a batch of 128 gives one batch
    of 20 (P 1, K 20); 3 + 3 images give P 2 x K 3; 2 + 1 give P 1 x K 2."""
    for counts, p, k in (([20], 1, 20), ([3, 3], 2, 3), ([2, 1], 1, 2)):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        s = make_sampler("pk", labels, 128)
        assert (s.p, s.k, len(s)) == (p, k, 1), counts
    # a batch smaller than two per class: K stays 2 (every anchor keeps a positive)
    s = make_sampler("pk", torch.arange(500) % 10, 12)
    assert (s.p, s.k) == (10, 2)
    assert PKSampler(torch.arange(30) % 3, p=5, k=4).p == 3  # P capped at the classes there are
