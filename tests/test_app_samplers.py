"""dnnrl.samplers."""
import torch

from dnnrl.samplers import PKSampler, RandomBatchSampler, make_sampler


def test_random_batches_are_disjoint_and_floor_n_over_b():
    s = RandomBatchSampler(1000, 128)
    batches = list(s.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(s) == 7
    flat = torch.cat(batches)
    assert flat.unique().numel() == flat.numel() == 7 * 128


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
