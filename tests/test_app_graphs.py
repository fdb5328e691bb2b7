"""`--cuda-graph on` (dnnrl.graphs): the network's share of a step as one module, the
bookkeeping around the capture (tested on the CPU with a stand-in for the capture), the
option's errors, and on a GPU a graphed training run against an eager one."""
import json

import pytest
import torch

from dnnrl.config import resolve
from dnnrl.graphs import GraphedForward, NetOutputs
from dnnrl.model import DNNRLNet
from dnnrl.train import Trainer, train

TINY = dict(preset="cpu", image_size=32, width=0.125, batch_size=28, max_epochs=2, patience=5,
            synthetic_train_per_class=12, synthetic_val_per_class=4, synthetic_test_per_class=4,
            monitor_gallery=40, k_max=5, progress=False, eval_batch_size=64)


def _net(seed=0):
    torch.manual_seed(seed)
    return DNNRLNet(num_classes=7, width=0.125, embed_dim=16, dropout=0.0)


@pytest.mark.parametrize("method,joint", [("dnn", False), ("dnnrl", True), ("dnnrl", False)])
def test_net_outputs_are_the_models(method, joint):
    """The module the graph records returns exactly what the eager step uses, float32."""
    net = _net().train()
    x = torch.randn(6, 1, 32, 32)
    outs = NetOutputs(net, method, joint, amp=False)(x)
    if method == "dnn":
        want = (net.logits(x),)
    elif joint:
        want = net.embed_and_logits(x)
    else:
        want = (net(x),)
    assert len(outs) == len(want) and all(o.dtype == torch.float32 for o in outs)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)
    sum(o.sum() for o in outs).backward()
    assert next(net.parameters()).grad is not None  # the gradient reaches the first layer


class _FakeCapture:
    """Stands in for make_graphed_callables: runs 3 warm-up passes and one 'capture' pass
    (which move BatchNorm's statistics, as the real ones do) and returns a module that
    counts its calls."""

    def __init__(self):
        self.samples, self.calls = [], 0

    def __call__(self, module, sample):
        self.samples.append(sample)
        for _ in range(4):
            module(sample)
        fake = self

        class Replayed(torch.nn.Module):
            def forward(self, x):
                fake.calls += 1
                return module(x)
        return Replayed()


def test_capture_bookkeeping():
    net = _net().train()
    cap = _FakeCapture()
    g = GraphedForward(net, "dnnrl", True, amp=False, capture=cap)
    before = [b.clone() for b in net.buffers()]
    x = torch.randn(8, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    out = g(x)
    # captured once, on a copy with the batch's shape and strides; the replay served the call
    assert len(cap.samples) == 1 and cap.samples[0].stride() == x.stride()
    assert cap.samples[0].data_ptr() != x.data_ptr() and cap.calls == 1 and g.replays == 1
    # BatchNorm's statistics moved only by the one real step, not by the capture's passes
    eager_net = _net().train()
    for b, s in zip(eager_net.buffers(), before):
        b.data.copy_(s)
    want = NetOutputs(eager_net, "dnnrl", True, amp=False)(x)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)
    for b, w in zip(net.buffers(), eager_net.buffers()):
        torch.testing.assert_close(b, w)
    # same shape: replayed again; another batch size or eval mode: eager, no new capture
    g(torch.randn(8, 1, 32, 32).contiguous(memory_format=torch.channels_last))
    assert cap.calls == 2 and g.replays == 2
    g(torch.randn(5, 1, 32, 32).contiguous(memory_format=torch.channels_last))
    net.eval()
    g(x)
    assert cap.calls == 2 and g.replays == 2 and len(cap.samples) == 1


def test_option_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        resolve(dict(TINY, out=str(tmp_path / "a"), cuda_graph="yes"))
    with pytest.raises(ValueError, match="cuda_graph 'on' does not combine with compile"):
        resolve(dict(TINY, out=str(tmp_path / "b"), cuda_graph="on", compile=True))
    with pytest.raises(ValueError, match="cuda_graph 'on' needs a CUDA device"):
        Trainer(resolve(dict(TINY, out=str(tmp_path / "c"), cuda_graph="on", device="cpu")))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dnn", "dnnrl"])
def test_cuda_graph_training_follows_the_eager_run(tmp_path, method):
    """Same seed, same batches: the graphed run's losses and weights follow the eager
    run's to rounding (bf16 autocast; cuDNN's benchmark mode off so both pick the same
    algorithms), and the graph really served the steps."""
    runs = {}
    for mode in ("off", "on"):
        # a cosine (no plateau reloads) and the final checkpoint (not best.pt, whose epoch a
        # flipped k-NN vote could change): what is compared does not hinge on a selection
        cfg = resolve(dict(TINY, out=str(tmp_path / mode), method=method, device="cuda", cuda_graph=mode,
                           cudnn_benchmark="off", softmax_weight=1.0, mining="easy_positive",
                           reduction="mean", schedule="cosine", select_by="val_loss"))
        res = train(cfg)
        hist = [json.loads(line) for line in open(tmp_path / mode / "log.jsonl")]
        ckpt = torch.load(tmp_path / mode / "checkpoint.pt", map_location="cpu", weights_only=False)
        runs[mode] = (res, hist, ckpt["model"])
    res_on = json.load(open(tmp_path / "on" / "results.json"))
    assert res_on["training"]["cuda_graph"] == "on" and res_on["training"]["graph_replays"] > 0
    for a, b in zip(runs["off"][1], runs["on"][1]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2, abs=1e-3)
    sa, sb = runs["off"][2], runs["on"][2]
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sb[k], sa[k], rtol=5e-2, atol=5e-3)
        else:  # BatchNorm's batch counters: the capture's passes must not have counted
            assert torch.equal(sb[k], sa[k]), k
