"""dnnrl.distributed: 2 gloo processes on 127.0.0.1 against the single-process answers.

* the global-mining loss and the DDP parameter gradients equal one process on the
  concatenated batch (sum / mean, batch-hard / semi-hard, uneven shards; local scope;
  with the global batch size given, the shard sizes are not exchanged);
* the merged sharded k-NN (and vote) equals dnnrl_ext.knn / knn_vote, ties and NaN
  rows included;
* the sampler shards are disjoint, cover the global batch and are deterministic;
* a 2-process training run of the tiny synthetic setup ends with the same weights on
  both ranks, rank 0 alone writes the run directory, and the run resumes in 1 process.
"""
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dnnrl_ext
from dnnrl import distributed as D

BACKEND = "auto" if dnnrl_ext.extension_available() else "reference"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    mp.spawn(fn, args=(_free_port(),) + args, nprocs=WORLD, join=True)


def _join(rank: int, port: int) -> D.DistContext:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=WORLD)
    return D.setup("cpu")


# --------------------------------------------------------------------------- loss + grads
def _no_size_exchange(*args, **kwargs):
    raise AssertionError("the shard sizes were exchanged although global_batch was given")


def _grad_worker(rank: int, port: int):
    ctx = _join(rank, port)
    assert ctx.enabled and ctx.rank == rank and ctx.world_size == WORLD
    try:
        for mining, reduction, B in (("semi_hard", "sum", 12), ("batch_hard", "mean", 11),
                                     ("semi_hard", "mean", 9)):
            g = torch.Generator().manual_seed(B)
            net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
            for p in net.parameters():
                torch.nn.init.normal_(p, generator=g)
            x = torch.randn(B, 6, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (B,), generator=g)
            net = net.double()
            crit = dnnrl_ext.ExpTripletLoss(alpha=0.5, gamma=-0.5, mining=mining, reduction=reduction,
                                            backend=BACKEND)
            # single process on the concatenated batch (and the per-shard losses of the
            # local scope), before DDP hooks onto the parameters
            loss1 = crit(net(x), y)
            grads1 = torch.autograd.grad(loss1, list(net.parameters()))
            parts = [crit(net(x[a:b]), y[a:b]) for a, b in (D.shard_range(B, r, WORLD) for r in range(WORLD))]
            want = sum(parts) / (WORLD if reduction == "mean" else 1)
            grads_l = torch.autograd.grad(want, list(net.parameters()))
            # DDP, each rank its shard, global mining
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            s, e = ctx.shard_range(B)
            dl = D.DistributedLoss(crit, ctx, "global", reduction)
            out = dl(ddp(x[s:e]), y[s:e], return_details=True)
            out.loss.backward()
            torch.testing.assert_close(out.loss, loss1, rtol=1e-12, atol=1e-12)
            assert out.valid.shape == (B,)
            for p, g1 in zip(net.parameters(), grads1):
                torch.testing.assert_close(p.grad, g1, rtol=1e-9, atol=1e-12)
            # local mining: the sum (or mean) of the per-shard losses
            net.zero_grad()
            dl = D.DistributedLoss(crit, ctx, "local", reduction)
            loss_l = dl(ddp(x[s:e]), y[s:e])
            loss_l.backward()
            torch.testing.assert_close(loss_l, want.detach(), rtol=1e-12, atol=1e-12)
            for p, g1 in zip(net.parameters(), grads_l):
                torch.testing.assert_close(p.grad, g1, rtol=1e-9, atol=1e-12)
            # global mining told the global batch size (as the trainer does): the same loss and
            # gradients, with the shard sizes computed instead of exchanged (no read-back)
            exchange = D.gather_sizes
            D.gather_sizes = _no_size_exchange
            try:
                net.zero_grad()
                dl = D.DistributedLoss(crit, ctx, "global", reduction, global_batch=B)
                loss_g = dl(ddp(x[s:e]), y[s:e])
                loss_g.backward()
                torch.testing.assert_close(loss_g, loss1, rtol=1e-12, atol=1e-12)
                for p, g1 in zip(net.parameters(), grads1):
                    torch.testing.assert_close(p.grad, g1, rtol=1e-9, atol=1e-12)
                # a batch that is not the global batch's shard on every rank: a clear error
                # on every rank (B + 2 moves every shard), before any collective
                with pytest.raises(ValueError, match="global_batch"):
                    D.DistributedLoss(crit, ctx, "global", reduction, global_batch=B + 2)(net(x[s:e]), y[s:e])
            finally:
                D.gather_sizes = exchange
        # gather_with_grad with uneven shards: every row's gradient reaches its owner
        x = torch.arange(3 - rank, dtype=torch.float64).requires_grad_()
        full = D.gather_with_grad(x, ctx)
        assert full.tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]
        (full * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
        assert x.grad.tolist() == ([1.0, 2.0, 3.0] if rank == 0 else [4.0, 5.0])
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. About every other run a C++
    # static destructor in torch (no Python frame left; seen with and without our
    # extension's changes, and with the DDP objects deleted first) aborted this worker
    # at exit with "terminate called without an active exception".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_global_mining_loss_and_grads_equal_single_process():
    _spawn(_grad_worker)


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
                clf = D.ShardedKNNClassifier(ctx, num_classes=4, backend=BACKEND).fit(gallery[s:e], labels)
                clf.k = k
                want = dnnrl_ext.knn_vote(query, gallery, labels, k, 4, backend=BACKEND)
                assert torch.equal(clf.predict(query), want)
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
