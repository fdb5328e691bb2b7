"""dnnrl.distributed: 2 gloo processes on 127.0.0.1 against the single-process answers.

* (the global-mining loss is the ops library's: tests/test_distributed_loss.py);
* the merged sharded k-NN (and vote) equals dnnrl_ext.knn / knn_vote, ties and NaN
  rows included;
* the sampler shards are disjoint, cover the global batch and are deterministic;
* a 2-process training run of the tiny synthetic setup ends with the same weights on
  both ranks, rank 0 alone writes the run directory, and the run resumes in 1 process.
"""
import json
import os

import pytest
import torch
import torch.distributed as dist

import dnnrl_ext
from dnnrl import distributed as D
from ops_testutil import spawn_gloo

BACKEND = "auto" if dnnrl_ext.extension_available() else "reference"
WORLD = 2


def _spawn(fn, *args):
    spawn_gloo(fn, WORLD, *args)


def _join(rank: int, port: int) -> D.DistContext:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=WORLD)
    return D.setup("cpu")


# --------------------------------------------------------------------------- k-NN
def _knn_cases():
    g = torch.Generator().manual_seed(0)
    # integer coordinates: exact distances, many ties across the shard boundary
    gallery = torch.randint(-2, 3, (13, 3), generator=g).float()
    gallery[7] = gallery[2]                  # duplicate rows in different shards
    query = torch.randint(-2, 3, (9, 3), generator=g).float()
    labels = torch.randint(0, 4, (13,), generator=g)
    nan_gallery = gallery.clone()
    nan_gallery[1, 0] = float("nan")         # a NaN row sorts last (ties -> smaller index)
    nan_gallery[9, 2] = float("nan")
    return query, [gallery, nan_gallery], labels


def _knn_worker(rank: int, port: int):
    ctx = _join(rank, port)
    try:
        query, galleries, labels = _knn_cases()
        for gallery in galleries:
            s, e = ctx.shard_range(gallery.shape[0])
            for k in (1, 4, 7, 13):
                d, i = D.sharded_knn(query, gallery[s:e], s, k, ctx, BACKEND)
                d1, i1 = dnnrl_ext.knn(query, gallery, k, backend=BACKEND)
                assert torch.equal(i, i1), (k, i, i1)
                torch.testing.assert_close(d, d1, equal_nan=True)
                if not torch.isfinite(gallery).all():  # both classifiers refuse it, on every rank
                    with pytest.raises(ValueError, match="NaN or inf in 2 of 13 rows"):
                        D.ShardedKNNClassifier(ctx, num_classes=4, backend=BACKEND).fit(gallery[s:e], labels)
                    continue
                clf = D.ShardedKNNClassifier(ctx, num_classes=4, backend=BACKEND).fit(gallery[s:e], labels)
                clf.k = k
                want = dnnrl_ext.knn_vote(query, gallery, labels, k, 4, backend=BACKEND)
                assert torch.equal(clf.predict(query), want)
            if not torch.isfinite(gallery).all():
                continue
            # k chosen on validation as the single-process classifier does
            clf = D.ShardedKNNClassifier(ctx, 4, BACKEND).fit(gallery[s:e], labels,
                                                               val=(query, labels[:9]), k_max=8)
            one = dnnrl_ext.KNNClassifier(num_classes=4, backend=BACKEND).fit(
                gallery, labels, val=(query, labels[:9]), k_max=8)
            assert clf.k == one.k and clf.val_accuracy_per_k == one.val_accuracy_per_k
        # a shard smaller than k (3 ranks' worth of rows on 2): still the global answer
        small = galleries[0][:3]
        s, e = ctx.shard_range(3)
        d, i = D.sharded_knn(query, small[s:e], s, 3, ctx, BACKEND)
        assert torch.equal(i, dnnrl_ext.knn(query, small, 3, backend=BACKEND)[1])
    finally:
        dist.destroy_process_group()


def test_sharded_knn_equals_single_process():
    _spawn(_knn_worker)


def test_merge_topk_ties_and_nan():
    nan, big = float("nan"), torch.iinfo(torch.long).max
    d, i = D.merge_topk([torch.tensor([[1.0, 2.0, nan]]), torch.tensor([[1.0, nan, nan]])],
                        [torch.tensor([[4, 0, 5]]), torch.tensor([[2, 7, big]])], 5)
    assert i.tolist() == [[2, 4, 0, 5, 7]]


# --------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("kind", ["pk", "random"])
@pytest.mark.parametrize("world", [2, 3])
def test_sampler_shards_disjoint_and_deterministic(kind, world):
    from dnnrl.samplers import make_sampler
    labels = torch.arange(70) % 7
    base = make_sampler(kind, labels, 28)
    glob = list(base.epoch(torch.Generator().manual_seed(5)))
    shards = []
    for r in range(world):
        sh = D.shard_sampler(make_sampler(kind, labels, 28), D.DistContext(r, world))
        assert len(sh) == len(base)
        shards.append(list(sh.epoch(torch.Generator().manual_seed(5))))
        again = list(sh.epoch(torch.Generator().manual_seed(5)))
        assert all(torch.equal(a, b) for a, b in zip(shards[-1], again))
    for step, batch in enumerate(glob):
        parts = [shards[r][step] for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)  # disjoint slices covering the batch


def test_each_rank_and_epoch_draws_its_own_augmentation():
    """Per-(epoch, rank) streams: two ranks of one epoch, or one rank in two epochs, draw
    different training affines; the same (epoch, rank) draws the same ones again."""
    from dnnrl.transforms import AugmentConfig, train_theta
    cfg = AugmentConfig(out_size=32, flip=True)

    def draw(rank, epoch):
        g = torch.Generator()
        D.reseed_epoch(g, 3, epoch, D.DistContext(rank, 2))
        return train_theta(8, cfg, g)
    assert torch.equal(draw(1, 4), draw(1, 4))
    assert not torch.equal(draw(0, 4), draw(1, 4))
    assert not torch.equal(draw(1, 4), draw(1, 5))
    assert len({D.rank_seed(3, e, r) for e in range(5) for r in range(8)}) == 40


# --------------------------------------------------------------------------- training
TINY = dict(preset="cpu", image_size=24, width=0.125, batch_size=28, max_epochs=2, patience=5,
            synthetic_train_per_class=8, synthetic_val_per_class=4, synthetic_test_per_class=4,
            monitor_gallery=28, k_max=5, progress=False, eval_batch_size=64, epoch_batches=2,
            device="cpu")


def _train_worker(rank: int, port: int, out: str, stop_after):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from dnnrl import train as T
    from dnnrl.config import resolve
    orig = T.Trainer.fit

    def fit(self, stop_after=None):  # keep each rank's final weights for the test
        orig(self, stop_after=stop_after)
        torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                   os.path.join(out, "..", "rank%d.pt" % rank))
    T.Trainer.fit = fit
    T.train(resolve(dict(TINY, out=out)), stop_after=stop_after)
    assert not dist.is_initialized()  # train() leaves the group it joined


def test_two_process_training_same_weights_and_resume(tmp_path):
    out = str(tmp_path / "run")
    _spawn(_train_worker, out, 1)
    a, b = (torch.load(tmp_path / ("rank%d.pt" % r)) for r in range(WORLD))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for k in a:
        assert torch.equal(ck["model"][k], a[k]), k
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 1
    assert ck["history"][0]["steps"] == 2
    # resume after a change of world size: the second epoch in one process
    from dnnrl.config import resolve
    from dnnrl.train import train
    res = train(resolve(dict(TINY, out=out)), resume=True)
    assert res is not None and 0 <= res["test_accuracy"] <= 1
    hist = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in hist] == [1, 2]
