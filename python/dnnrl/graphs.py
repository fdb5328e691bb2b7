"""CUDA-graph replay of the network's training forward and backward (``--cuda-graph on``).

Why: on an H200 one training step of the Table 1 network costs about the same at batch
128 as at 256 (13.9 against 15.7 ms, ``benchmarks/bench_train.py``, 2026-11-28): at the
paper's batch the step is bound by the host launching the network's many small kernels,
not by the card. ``torch.cuda.make_graphed_callables`` records the forward and the
backward of the network once and then replays each as a single graph launch; the loss,
the optimiser step and the data pipeline stay eager (they are a few launches each).

What stays the same: the parameters (the graph reads and writes them in place, so the
optimiser, checkpoints and best-weight reloads work unchanged), evaluation (eval mode runs
the network eagerly), and any batch of another shape than the captured one (eager too).
What differs: the capture's warm-up passes would move BatchNorm's running statistics, so
they are saved before and put back after; the replayed kernels are those cuDNN picked at
capture time, so a graphed run matches an eager one to rounding, not bit for bit. The
gradients the replayed backward hands to the parameters live in the graph's memory: the
trainer clears them with ``zero_grad(set_to_none=True)`` before every backward, which keeps
one step's gradients from being added to the next's.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["NetOutputs", "GraphedForward"]


class NetOutputs(nn.Module):
    """The network's share of one training step, as one module (what the graph records).

    Args:
        model: a DNNRLNet.
        method: "dnn" (softmax logits only) or a triplet method.
        joint: a triplet method with a softmax head beside it (embedding and logits).
        amp: run under bf16 autocast (without its weight cache, which graphs cannot hold).
    Forward:
        x (B, 1, S, S) -> a tuple of float32 tensors: (logits (B, C),) for dnn,
        (embedding (B, E), logits (B, C)) when joint, (embedding (B, E),) otherwise.
    """

    def __init__(self, model: nn.Module, method: str, joint: bool, amp: bool):
        super().__init__()
        self.model, self.method, self.joint, self.amp = model, method, joint, amp

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            if self.method == "dnn":
                return (self.model.logits(x).float(),)
            if self.joint:
                emb, logits = self.model.embed_and_logits(x)
                return emb.float(), logits.float()
            return (self.model(x).float(),)


def _make_graphed(module: nn.Module, sample: Tensor) -> nn.Module:
    # allow_unused_input: a pure triplet run never uses the softmax head's parameters
    return torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=3, allow_unused_input=True)


class GraphedForward:
    """Calls ``NetOutputs`` through a CUDA graph captured on the first training batch.

    Args:
        model, method, joint, amp: as for NetOutputs.
        capture: ``(module, sample) -> module`` that records the graph (injectable so that
            the bookkeeping around it is tested without a GPU).
    Call: x (B, 1, S, S) -> NetOutputs' tuple. Graphed while the model is in training mode
    and x has the captured batch's shape and strides; eager otherwise.
    """

    def __init__(self, model: nn.Module, method: str, joint: bool, amp: bool,
                 capture: Optional[Callable[[nn.Module, Tensor], nn.Module]] = None):
        self.model = model
        self.eager = NetOutputs(model, method, joint, amp)
        self._to_graph = NetOutputs(model, method, joint, amp)  # make_graphed_callables rebinds its forward
        self.capture = capture or _make_graphed
        self.graphed: Optional[nn.Module] = None
        self.key = None  # (shape, stride, dtype) of the captured batch
        self.replays = 0

    def __call__(self, x: Tensor) -> Tuple[Tensor, ...]:
        if not self.model.training:
            return self.eager(x)
        key = (tuple(x.shape), tuple(x.stride()), x.dtype)
        if self.graphed is None:
            self._record(x, key)
        if key != self.key:
            return self.eager(x)  # e.g. a last, smaller batch: not worth a second graph
        self.replays += 1
        return self.graphed(x)

    def _record(self, x: Tensor, key) -> None:
        # the warm-up and capture passes run in training mode: keep BatchNorm's running
        # statistics (and its batch counter) and the dropout random stream as an eager run
        # would have them, so that the graphed run follows the eager one
        saved = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self._to_graph.train(self.model.training)
        self.graphed = self.capture(self._to_graph, x.detach().clone(memory_format=torch.preserve_format))
        with torch.no_grad():
            for b, s in zip(self.model.buffers(), saved):
                b.copy_(s)
        if rng is not None:
            torch.cuda.set_rng_state(rng, x.device)
        self.key = key
