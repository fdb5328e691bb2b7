"""Where the time of a small-batch loss step goes (issue 3: B = 128 is launch-bound).

For dnnrl_ext and the plain-PyTorch version, on the same inputs, one step =
``loss_fn(x, y).backward()``. Reported per step, in microseconds:

- ``event_us``: CUDA events around one step after a sync (what bench_gpu.py reports:
  the device waits for the host, so this is host time when the host is the bottleneck);
- ``pipelined_us``: 200 steps issued back to back, one sync at the end (the rate a
  training loop sees when the host runs ahead);
- ``host_fwd_us`` / ``host_bwd_us``: host wall time of the forward call and of the
  backward call alone (no sync), to split the step;
- the torch.profiler table of one run of 20 steps (host and device time per op);
- on CUDA, ``graph_replay_us``: the step captured once in a CUDA graph and replayed
  (no host overhead at all; plain PyTorch cannot be captured: its boolean indexing
  syncs).

Usage: python3 benchmarks/profile_small_batch.py [--B 128] [--out DIR]. Works on the
CPU too (then everything is host time), which is how it was checked without a GPU.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alternatives  # noqa: E402
import common  # noqa: E402

import dnnrl_ext  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def event_time(step, device, repeats):
    if device.type != "cuda":
        return common.time_cpu(step, repeats=repeats) * 1e6
    return common.time_cuda(step, repeats=repeats) * 1e6


def pipelined(step, device, n=200):
    for _ in range(10):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def split_host(loss_fn, x, y, device, n=200):
    """Median host time of the forward call and of the backward call (no syncs inside)."""
    fwd, bwd = [], []
    for i in range(n + 10):
        x.grad = None
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= 10:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        if i % 20 == 0:
            sync(device)  # keep the queue short so the host never blocks on a full queue
    return statistics.median(fwd) * 1e6, statistics.median(bwd) * 1e6


def graphed_time(loss_fn, x, y, repeats):
    """Median time of one fwd+bwd step replayed from a CUDA graph: no host launch
    overhead, what torch.compile(mode="reduce-overhead") or a hand-captured training
    step gets. Raises where the step cannot be captured (a host sync, e.g. boolean
    indexing in the plain version)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(3):
            x.grad = None
            loss_fn(x, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss_fn(x, y).backward()
    return common.time_cuda(graph.replay, repeats=repeats) * 1e6


def profile_table(step, device, steps=20):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(5):
        step()
    sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (prof.key_averages().table(sort_by="cpu_time_total", row_limit=25) + "\n\n"
            + prof.key_averages().table(sort_by=sort, row_limit=15))


LEGACY = "dnnrl_ext_6_launches"
SMALL_TILE = "dnnrl_ext_small_tile"
# the environment of each variant (read by the C++ op per call): the launch sequence before
# session 3, and the 64x64 mining tile that B = 128 used before session 9
VARIANT_ENV = {LEGACY: {"DNNRL_LOSS_FEWER_LAUNCHES": "0"}, SMALL_TILE: {"DNNRL_MINE_TILE": "small"}}


def _variant(name) -> None:
    """Set variant ``name``'s environment and clear every other variant's (None: clear all)."""
    for env in VARIANT_ENV.values():
        for var in env:
            os.environ.pop(var, None)
    os.environ.update(VARIANT_ENV.get(name, {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None, help="directory for profile_small_batch.{json,txt}")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.nn.functional.normalize(torch.randn(args.B, args.D, device=device, generator=g), dim=1).to(dtype)
    y = torch.randint(0, 7, (args.B,), device=device, generator=g)
    x = x0.clone().requires_grad_(True)
    ours = lambda a, b: dnnrl_ext.triplet_loss(a, b)  # noqa: E731
    cands = {
        "dnnrl_ext": ours,
        # the same op with DNNRL_LOSS_FEWER_LAUNCHES=0: norms, reduction and backward
        # coefficients in launches of their own (the sequence before session 3)
        LEGACY: ours,
        # the same op on the 64x64 mining tile (DNNRL_MINE_TILE=small)
        SMALL_TILE: ours,
        "dnnrl_ext_raw_op": lambda a, b: torch.ops.dnnrl_ext.triplet_loss.default(a, b, 0, 0, 0.2, 0.0, 0.2, 1)[0],
        "plain_pytorch": alternatives.plain_pytorch_exp_triplet,
    }
    rows, tables = [], []
    for name, fn in cands.items():
        _variant(name)

        def step(fn=fn):
            x.grad = None
            fn(x, y).backward()
        row = {"method": name, "B": args.B, "dtype": args.dtype, "device": str(device),
               "event_us": event_time(step, device, args.repeats),
               "pipelined_us": pipelined(step, device)}
        row["host_fwd_us"], row["host_bwd_us"] = split_host(fn, x, y, device)
        with torch.no_grad():
            row["fwd_only_event_us"] = event_time(lambda fn=fn: fn(x0, y), device, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
        tables.append("### %s\n%s" % (name, profile_table(step, device)))
    _variant(None)
    if device.type == "cuda":  # last: a failed capture must not disturb the figures above
        for row in rows:
            _variant(row["method"])
            try:
                row["graph_replay_us"] = graphed_time(cands[row["method"]], x, y, args.repeats)
            except Exception as exc:
                row["graph_replay_us"] = "error: %s" % str(exc).splitlines()[0][:80]
                torch.cuda.synchronize()
            print(json.dumps({"method": row["method"], "graph_replay_us": row["graph_replay_us"]}), flush=True)
        _variant(None)
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        common.write_json(os.path.join(args.out, "profile_small_batch.json"),
                          {"machine": common.machine(args.device), "rows": rows})
        with open(os.path.join(args.out, "profile_small_batch.txt"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
