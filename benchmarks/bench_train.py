"""Training throughput of one run with the device to itself: images/s of `dnnrl train`'s
own loop (data already on the device, on-device augmentation, forward under autocast,
mining + loss, backward, SGD step), for each method and setting asked for.

Each method gets one Trainer (dnnrl.train, the configuration `dnnrl train` would
resolve from the same options); every setting is then timed over --repeats epochs of
--batches batches after one warm-up epoch in that setting (the warm-up takes cuDNN's
algorithm search and the allocator's growth out of the timing). The median epoch gives
images/s and ms per step; the peak is the allocator's during the timed epochs. Settings:
cuDNN benchmark mode on and off (`--cudnn`), so that the default is a measured choice.
With --profile-steps N each setting is then profiled over N more steps (torch.profiler):
the card's kernel time per step against the step's wall time says whether the step is
bound by the card or by the host, and a table of the ops by device time says by what.

Usage (GPU):  python3 benchmarks/bench_train.py --data fer2013.tar.xz --method dnnrl \\
                  --batch-sizes 128,256 --out bench_train.json [dnnrl train options]
Any option after the benchmark's own is passed to `dnnrl train`'s parser (the recipe);
without --data it trains on the built-in synthetic set (a CPU check of the script).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "python")]
sys.path.insert(0, HERE)
import common  # noqa: E402

# the recipe of benchmarks/gpu_session.sh (docs/app.md): what the timed runs train with
RECIPE = ["--flip", "on", "--mining", "easy_positive", "--softmax-weight", "1", "--reduction", "mean"]


def parse(argv=None):
    # allow_abbrev=False: `dnnrl train`'s --batch-size must reach the train options, not be
    # taken for an abbreviation of --batch-sizes
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", action="append", choices=("dnn", "tdnn", "dnnrl"), default=None,
                   help="methods to time (repeatable; default dnnrl)")
    p.add_argument("--cudnn", default="on,off",
                   help="cuDNN benchmark settings to time, comma-separated from on / off")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated batch sizes to time, each in a Trainer of its own (default: the "
                        "training options' --batch-size, 128 unless given)")
    p.add_argument("--cuda-graphs", default="off",
                   help="comma-separated `--cuda-graph` settings to time (off / on), each in a Trainer of "
                        "its own (on: the network's training forward and backward replayed as CUDA graphs)")
    p.add_argument("--batches", type=int, default=40, help="batches per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per setting")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after each setting's timing, profile this many steps (0: no profile); the op "
                        "tables go to OUT with .profile.txt for .json, or to stdout without --out")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-recipe", action="store_true",
                   help="leave out the session recipe's training options (%s)" % " ".join(RECIPE))
    args, train_argv = p.parse_known_args(argv)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.profile_steps < 0:
        p.error("--profile-steps must be >= 0, got %d" % args.profile_steps)
    settings = [s.strip() for s in args.cudnn.split(",") if s.strip()]
    if not settings or any(s not in ("on", "off") for s in settings):
        p.error("--cudnn: comma-separated values from on / off, got %r" % args.cudnn)
    args.cudnn = settings
    graphs = [s.strip() for s in args.cuda_graphs.split(",") if s.strip()]
    if not graphs or any(s not in ("on", "off") for s in graphs):
        p.error("--cuda-graphs: comma-separated values from off / on, got %r" % args.cuda_graphs)
    args.cuda_graphs = graphs
    if "on" in graphs and len(settings) > 1:
        # the graph is recorded in the first setting's warm-up and replayed in the next:
        # that row would time the first setting's cuDNN algorithms
        p.error("--cuda-graphs on times one --cudnn setting per run; pass --cudnn on or --cudnn off")
    sizes = [None]
    if args.batch_sizes is not None:
        try:
            sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
        except ValueError:
            sizes = []
        if not sizes or any(b < 1 for b in sizes):
            p.error("--batch-sizes: comma-separated positive integers, got %r" % args.batch_sizes)
    args.batch_sizes = sizes
    return args, train_argv


def trainer_for(method: str, train_argv, batches: int):
    """A Trainer as `dnnrl train --method METHOD TRAIN_ARGV` would build it, without a
    k-NN monitor and with a small validation subset (neither is timed)."""
    import tempfile
    from dnnrl.cli import build_parser
    from dnnrl.config import Config, resolve
    from dnnrl.train import Trainer
    import dataclasses
    out = tempfile.mkdtemp(prefix="bench_train_")
    args = build_parser().parse_args(["train", "--out", out, "--method", method, "--no-progress"]
                                     + list(train_argv))
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    over.update(out=out, epoch_batches=batches, monitor_gallery=0,
                val_subset=over.get("val_subset") or 256, progress=False)
    return Trainer(resolve(over))


def time_setting(trainer, cudnn: str, repeats: int) -> dict:
    """Warm-up epoch, then ``repeats`` timed epochs with cuDNN benchmark mode ``cudnn``."""
    torch.backends.cudnn.benchmark = cudnn == "on"
    cuda = trainer.device.type == "cuda"
    t0 = time.time()
    trainer.train_epoch()  # warm-up in this setting
    warm_s = time.time() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    epochs = [trainer.train_epoch() for _ in range(repeats)]
    ips = [e["images_per_s"] for e in epochs]
    steps = epochs[0]["steps"]
    # images per step from the epoch itself: P x K batches hold P * (B // P) images
    # (126 of 128 with 7 classes), not --batch-size
    per_step = round(epochs[0]["images_per_s"] * epochs[0]["train_seconds"] / steps)
    return {"cudnn_benchmark": cudnn, "images_per_s": statistics.median(ips), "images_per_s_all": ips,
            "ms_per_step": 1000.0 * statistics.median(e["train_seconds"] / e["steps"] for e in epochs),
            "images_per_step": per_step, "steps_per_epoch": steps, "warmup_seconds": warm_s,
            "peak_mib": torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else None}


def _device_us(evt) -> float:
    """An averaged profiler event's own device time in microseconds (torch renamed the
    attribute from self_cuda_time_total to self_device_time_total)."""
    return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0)


def profile_steps(trainer, steps: int):
    """``steps`` training steps under torch.profiler (the sampler's batches, as an epoch
    draws them). Returns (summary dict, op tables as text):

    wall_ms_per_step: the profiled steps' wall time (the profiler's own host cost included);
    device_ms_per_step: the kernels' and copies' time on the card (summed: one stream);
    device_busy_fraction: their ratio, near 1 when the card bounds the step, well below
    when the host does; device_ops_per_step: kernel launches and copies per step.
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainer.model.train()
    batches = trainer.sampler.epoch(trainer.sample_gen)
    idx = [next(batches) for _ in range(min(steps, len(trainer.sampler)))]
    if cuda:
        torch.cuda.synchronize(trainer.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in idx:
            trainer.train_step(i)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        wall = time.perf_counter() - t0
    n = max(1, len(idx))
    avg = prof.key_averages()
    on_device = [e for e in avg if str(getattr(e, "device_type", "")).endswith("CUDA")]
    device_us = sum(_device_us(e) for e in on_device)
    summary = {"steps": len(idx), "wall_ms_per_step": 1000.0 * wall / n,
               "device_ms_per_step": device_us / 1000.0 / n if cuda else None,
               "device_busy_fraction": device_us / 1e6 / wall if cuda and wall > 0 else None,
               "device_ops_per_step": sum(e.count for e in on_device) / n if cuda else None}
    tables = avg.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    if cuda:
        tables += "\n\nby host time:\n" + avg.table(sort_by="cpu_time_total", row_limit=20)
    return summary, tables


def write(path: Optional[str], payload: dict) -> None:
    """The results so far (after every row: a run stopped by a time limit keeps them)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=2)


def main(argv=None) -> int:
    args, train_argv = parse(argv)
    if not args.no_recipe:
        train_argv = RECIPE + list(train_argv)
    methods = args.method or ["dnnrl"]
    from dnnrl.runtime import device_name
    rows = []
    payload = {"train_options": list(train_argv), "batches": args.batches, "repeats": args.repeats, "rows": rows}
    for method, batch, graph in [(m, b, g) for m in methods for b in args.batch_sizes for g in args.cuda_graphs]:
        t0 = time.time()
        trainer = trainer_for(method, list(train_argv) + (["--batch-size", str(batch)] if batch else [])
                              + ["--cuda-graph", graph], args.batches)
        setup_s = time.time() - t0
        device = trainer.device
        cfg = trainer.cfg
        payload.update(machine=common.machine(device.type), device_name=device_name(device))
        for cudnn in args.cudnn:
            r = time_setting(trainer, cudnn, args.repeats)
            r.update(method=method, batch_size=cfg.batch_size, image_size=cfg.image_size, width=cfg.width,
                     amp=cfg.amp, channels_last=trainer.channels_last, compile=cfg.compile,
                     backend=trainer.backend, setup_seconds=setup_s, cuda_graph=cfg.cuda_graph,
                     graph_replays=trainer._graph.replays if trainer._graph is not None else 0)
            rows.append(r)
            write(args.out, payload)
            print("%-6s cudnn benchmark %-3s cuda graph %-3s batch %d (%d images): %8.0f images/s, %6.2f ms/step "
                  "(epochs: %s)%s" % (
                method, cudnn, cfg.cuda_graph, cfg.batch_size, r["images_per_step"], r["images_per_s"], r["ms_per_step"],
                ", ".join("%.0f" % v for v in r["images_per_s_all"]),
                ", peak %.0f MiB" % r["peak_mib"] if r["peak_mib"] is not None else ""), flush=True)
            if args.profile_steps:
                try:
                    r["profile"], tables = profile_steps(trainer, args.profile_steps)
                except Exception as exc:  # noqa: BLE001 - a profiler problem must not cost the next rows
                    print("  profile failed: %s" % str(exc).splitlines()[0][:200], flush=True)
                    continue
                write(args.out, payload)
                title = "%s, cudnn benchmark %s, cuda graph %s, batch %d" % (method, cudnn, cfg.cuda_graph,
                                                                          cfg.batch_size)
                print("  profile: %s" % ", ".join("%s %s" % (k, ("%.3g" % v) if isinstance(v, float) else v)
                                                  for k, v in r["profile"].items()), flush=True)
                if args.out:
                    with open(os.path.splitext(args.out)[0] + ".profile.txt", "a") as fh:
                        fh.write("## %s\n%s\n\n" % (title, tables))
                else:
                    print("## %s\n%s" % (title, tables), flush=True)
        shutil.rmtree(cfg.out, ignore_errors=True)  # the throwaway run directory
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next Trainer starts from an empty cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
